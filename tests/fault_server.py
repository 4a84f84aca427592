"""A scriptable OpenAI-compatible server on loopback, for fault injection.

A real HTTP server (stdlib ``ThreadingHTTPServer``, one thread per
connection) that answers ``GET /v1/models`` and ``POST /v1/chat/completions``.
Each chat request is answered by the next action scripted for its prompt
text, so concurrent requests with different prompts stay deterministic:

>>> server.script("p1", Status(503, retry_after="1"), Drop(), Ok())

An unscripted prompt (or one whose script is used up) gets :class:`Ok`,
whose text is ``"<prompt> <width>x<height>"`` of the decoded image, so a
test can tell that the image really arrived. Every request is recorded
with its arrival time, for counting attempts and measuring gaps.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image

# A stalled or held handler gives up after this long, so a test that fails
# half-way cannot leave server threads behind for ever.
HANDLER_WAIT_LIMIT_S = 60


@dataclass(frozen=True)
class Ok:
    """A normal answer; ``usage=False`` leaves ``usage`` out, as some servers do; ``text`` replaces its text."""

    usage: bool = True
    text: str | None = None


@dataclass(frozen=True)
class Status:
    """An error status with OpenAI's error body and, if given, ``Retry-After``."""

    code: int
    message: str = "injected failure"
    retry_after: str | None = None


@dataclass(frozen=True)
class Drop:
    """Read the request, then close the connection without answering."""


@dataclass(frozen=True)
class Stall:
    """Answer nothing until the server closes (past any client timeout)."""


@dataclass(frozen=True)
class Hold:
    """Wait until the test calls :meth:`FaultServer.release_held`, then answer normally."""


@dataclass
class Seen:
    """One request as the server saw it."""

    prompt: str
    at: float  # time.monotonic() on arrival
    body: dict


class FaultServer:
    """The server; use as a context manager. ``url`` is its OpenAI base URL (``.../v1``)."""

    def __init__(self, models: tuple[str, ...] = ("fault-model",), api_key: str | None = None,
                 pixel_bounds: tuple[int, int] | None = None):
        """``pixel_bounds``: the model image bounds to report on ``/v1/models``, as ``ocrbatch serve`` does."""
        self.models = list(models)
        self.api_key = api_key
        self.pixel_bounds = pixel_bounds
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._scripts: dict[str, deque] = defaultdict(deque)
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._released = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fault-server", daemon=True)

    def __enter__(self) -> FaultServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()  # frees stalled handlers
        self._released.set()  # and held ones
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def script(self, prompt: str, *actions) -> None:
        """Queue ``actions`` for the next requests whose prompt text is ``prompt``."""
        with self._changed:
            self._scripts[prompt].extend(actions)

    def release_held(self) -> None:
        self._released.set()

    def requests_for(self, prompt: str) -> list[Seen]:
        with self._changed:
            return [s for s in self.seen if s.prompt == prompt]

    def wait_for(self, predicate, timeout: float = 30) -> bool:
        """Block until ``predicate(server)`` holds (checked whenever a request arrives or ends)."""
        with self._changed:
            return self._changed.wait_for(lambda: predicate(self), timeout=timeout)

    # -- called from handler threads ----------------------------------------------

    def _arrive(self, prompt: str, body: dict):
        with self._changed:
            script = self._scripts[prompt]
            action = script.popleft() if script else Ok()
            self.seen.append(Seen(prompt, time.monotonic(), body))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self._changed.notify_all()
        return action

    def _leave(self) -> None:
        with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()


def _handler_for(server: FaultServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

        def log_message(self, *args) -> None:
            pass  # quiet test output

        def _send_json(self, code: int, payload: dict, headers: dict | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, code: int, message: str, headers: dict | None = None) -> None:
            self._send_json(code, {"error": {"message": message, "type": "test_error", "param": None,
                                             "code": None}}, headers)

        def _authorised(self) -> bool:
            if server.api_key is None or self.headers.get("Authorization") == f"Bearer {server.api_key}":
                return True
            self._error(401, "invalid API key")
            return False

        def do_GET(self) -> None:
            if self.path != "/v1/models":
                return self._error(404, f"no route {self.path}")
            if self._authorised():
                reported = {} if server.pixel_bounds is None else {"ocrbatch": dict(
                    zip(("min_pixels", "max_pixels"), server.pixel_bounds))}
                self._send_json(200, {"object": "list", "data": [
                    {"id": name, "object": "model", "created": 0, "owned_by": "test", **reported}
                    for name in server.models]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            if self.path != "/v1/chat/completions":
                return self._error(404, f"no route {self.path}")
            if not self._authorised():
                return
            content = body["messages"][-1]["content"]
            prompt = "".join(part.get("text", "") for part in content if part["type"] == "text")
            action = server._arrive(prompt, body)
            try:
                self._act(action, body, prompt, content)
            finally:
                server._leave()

        def _act(self, action, body: dict, prompt: str, content: list) -> None:
            if isinstance(action, Status):
                headers = {"Retry-After": action.retry_after} if action.retry_after is not None else {}
                return self._error(action.code, action.message, headers)
            if isinstance(action, Drop):
                self.close_connection = True
                return
            if isinstance(action, Stall):
                server._closing.wait(HANDLER_WAIT_LIMIT_S)
                self.close_connection = True
                return
            if isinstance(action, Hold):
                server._released.wait(HANDLER_WAIT_LIMIT_S)
                action = Ok()
            [image_part] = [part for part in content if part["type"] == "image_url"]
            encoded = image_part["image_url"]["url"].split(",", 1)[1]
            width, height = Image.open(io.BytesIO(base64.b64decode(encoded))).size
            text = f"{prompt} {width}x{height}" if action.text is None else action.text
            message = {"role": "assistant", "content": text}
            answer = {"id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": body.get("model"),
                      "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
            if action.usage:
                answer["usage"] = {"prompt_tokens": 40, "completion_tokens": 7, "total_tokens": 47,
                                   "prompt_tokens_details": {"image_tokens": 30}}
            self._send_json(200, answer)

    return Handler
