"""Recognition on a remote OpenAI-compatible server (``--backend openai``).

Each page (or layout block) goes to ``POST {base_url}/chat/completions`` as
one user message: the image as a ``data:image/png`` URI and the task prompt,
with ``max_tokens`` and ``temperature`` 0. No model is loaded here.
``concurrency`` sender threads share one connection pool; :meth:`RemoteRecognizer.submit`
blocks once ``concurrency + queue_size`` requests are unfinished, so a fast
producer (the page renderer) cannot run ahead of the server.

Every image is sent at the size the local engine would encode it for the
same model: a layout block within the block bounds (small crops are
upscaled), a whole page within the model's own bounds, which ``ocrbatch
serve`` reports on ``/v1/models`` (:data:`DEFAULT_MODEL_PIXEL_BOUNDS`, the
current releases', for a server that does not). A server would otherwise
apply its own processor's bounds (PaddleOCR-VL's default min_pixels is
147,456) to whatever it is sent, so the image is resized here, exactly as
the local image processor resizes it (transformers' ``smart_resize`` for
PaddleOCR-VL, bicubic), and the bounds also go as vLLM's per-request
``mm_processor_kwargs``: a server that honours them leaves the resized image
as it is, and one that ignores them gets an image already within them.
Benchmarks may ask for ``ignore_eos`` (vLLM's and llama-server's extension),
so that every answer is ``max_tokens`` long. A spotting page asks for
``skip_special_tokens: false`` (vLLM's sampling parameter, as PaddleX sends
it): its answer's locations are special tokens. A layout block carries its
loop guard (:class:`~ocrbatch.model.repetition.LoopSettings`) as
``repetition_guard``, an extension field that ``ocrbatch serve`` applies as
the local engine does (the answer ends with ``finish_reason``
``repetition``); other servers ignore it.

Retry policy, per request:

- retried: HTTP 408, 429 and 5xx, connection errors (refused, reset,
  dropped without an answer) and timeouts;
- not retried: every other status (400, 401, 404, 413, ...) and answers that
  are not a chat completion;
- the wait before a retry is the server's ``Retry-After`` (seconds or an
  HTTP date, at most ``max_retry_after_s``) when it sends one, otherwise
  exponential backoff with "equal jitter": half of
  ``min(backoff_max_s, backoff_initial_s * 2**(n-1))`` fixed, the other half
  uniformly random, so that clients that failed together do not retry
  together, yet every wait keeps a floor that grows;
- at most ``max_attempts`` attempts, each bounded by ``timeout_s`` (connect,
  send, and every wait for response bytes);
- a request that runs out of attempts resolves with ``error`` naming the
  HTTP status (or connection problem) and the server's own message.

Library choice: httpx for transport and tenacity for the retry loop, rather
than the openai SDK's built-in retries (``max_retries``). The SDK (3.x, read
in ``openai/_base_client.py``) also retries 409, which the policy above must
not; it does not retry at all when ``Retry-After`` exceeds two minutes; its
backoff (0.5 s doubling to 8 s) is a set of module constants, not per-client
settings; it cannot say how many attempts a request took; and its sleep
between attempts cannot be interrupted, so closing would wait out every
backoff. tenacity provides each of those as an explicit part: a stop
(attempt count), a wait (ours: ``Retry-After`` or jittered backoff), a retry
predicate, and a sleep function (an event wait that closing cuts short).
httpx is already the project's HTTP client and thread-safe, so one
connection pool serves all worker threads.
"""

from __future__ import annotations

import base64
import email.utils
import io
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, TypeVar

import httpx
import tenacity
from PIL import Image

from ..errors import OcrbatchError
from ..model.repetition import LoopSettings
from .base import Decoded, chained

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 429})  # and every 5xx
# PaddleOCR-VL's 14-pixel patches merge 2x2 into one token: resized sides are multiples of 28.
RESIZE_FACTOR = 28
# A whole page's resize bounds when the server does not report its model's: PaddleOCR-VL 1.5 and
# 1.6's own (their preprocessor_config.json), the releases a server most likely runs.
DEFAULT_MODEL_PIXEL_BOUNDS = (112896, 1003520)
# Server messages go into one-line error columns; a stack trace or an HTML page must not.
MESSAGE_LIMIT = 300


class BackendUnavailable(OcrbatchError):
    """The server cannot be reached, refuses us, or does not serve the model."""


@dataclass
class RemoteResult:
    """The server's answer for one image, or why there is none."""

    text: str = ""
    n_output_tokens: int | None = None  # usage.completion_tokens; None when the server gives no usage
    n_image_tokens: int | None = None  # usage.prompt_tokens_details.image_tokens; None when not given
    finish_reason: str | None = None
    error: str | None = None  # one line: the HTTP status or connection problem and the server's message
    elapsed_s: float = 0.0  # from the first attempt's start to the last one's end, waits included
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None


class _AttemptFailed(Exception):
    """One attempt's failure: a one-line ``message``, whether to retry, and the server's requested wait."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(message)
        self.message, self.retryable, self.retry_after = message, retryable, retry_after


class _Closed(Exception):
    """The recognizer was closed while a request waited to retry."""


class _GaveUp(Exception):
    """A request's final failure: the one line to report and the attempts made."""

    def __init__(self, message: str, attempts: int):
        super().__init__(message)
        self.message, self.attempts = message, attempts


class RemoteRecognizer:
    """OCR requests to an OpenAI-compatible server, run ``concurrency`` at a time.

    >>> recognizer = RemoteRecognizer("http://127.0.0.1:7778/v1", concurrency=4)
    >>> recognizer.check()  # raises BackendUnavailable if the server is down or lacks the model
    >>> future = recognizer.submit(page_image, "OCR:", max_tokens=1024)
    >>> future.result().text
    >>> recognizer.close()
    """

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, concurrency: int = 4,
                 queue_size: int | None = None, timeout_s: float = 600.0, max_attempts: int = 5,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 60.0, max_retry_after_s: float = 300.0):
        """Set up the client; nothing is sent until :meth:`check` or :meth:`submit`.

        ``base_url`` is the OpenAI-style base, e.g. ``http://host:port/v1``; a
        bare ``http://host:port`` gets ``/v1``. ``model`` None means the first
        model the server lists (resolved by :meth:`check`). ``queue_size``
        (default ``concurrency``) requests may wait beyond the ``concurrency``
        being sent, so the senders never idle; past that, :meth:`submit` blocks.
        """
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise OcrbatchError(f"base URL {base_url!r} is not an http(s) URL")
        if url.path in ("", "/"):
            url = url.copy_with(path="/v1")
        if concurrency < 1 or max_attempts < 1 or timeout_s <= 0:
            raise OcrbatchError("concurrency and max_attempts must be at least 1, timeout_s above 0")
        self.base_url = str(url).rstrip("/")
        self.model = model
        # Whole pages' resize bounds (min, max pixels): the served model's, once check() has read them.
        self.model_pixel_bounds = DEFAULT_MODEL_PIXEL_BOUNDS
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.max_retry_after_s = max_retry_after_s
        # Equal jitter: a fixed half that doubles, plus a random half of the same size.
        self._backoff = (tenacity.wait_exponential(multiplier=backoff_initial_s / 2, max=backoff_max_s / 2)
                         + tenacity.wait_random_exponential(multiplier=backoff_initial_s / 2, max=backoff_max_s / 2))
        headers = {"User-Agent": "ocrbatch"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), headers=headers,
                                  limits=httpx.Limits(max_connections=concurrency,
                                                      max_keepalive_connections=concurrency))
        self._slots = threading.BoundedSemaphore(concurrency + (concurrency if queue_size is None else queue_size))
        self._closing = threading.Event()
        self._submit_lock = threading.Lock()
        # Own threads rather than a ThreadPoolExecutor: its shutdown(cancel_futures=True) leaves
        # futures CANCELLED but never notified, so concurrent.futures.wait() would hang on them.
        self._queue: queue.Queue = queue.Queue()
        self._threads = [threading.Thread(target=self._work, name=f"ocrbatch-remote-{n}", daemon=True)
                         for n in range(concurrency)]
        for thread in self._threads:
            thread.start()

    # -- public -----------------------------------------------------------------------

    def check(self) -> str:
        """Confirm the server answers and serves the model (retrying as requests do); return the model name.

        Also takes the model's pixel bounds from the listing where the server
        reports them (``ocrbatch serve`` does). Raises :class:`BackendUnavailable`
        naming the server and the reason.
        """
        try:
            listing, _ = self._with_retries(self._list_models)
        except _GaveUp as exc:
            raise BackendUnavailable(f"{self.base_url}: {exc.message}") from None
        served = {entry["id"]: entry for entry in listing}
        if self.model is None:
            if not served:
                raise BackendUnavailable(f"{self.base_url}: the server lists no models")
            self.model = next(iter(served))
        elif self.model not in served:
            raise BackendUnavailable(f"{self.base_url}: model {self.model!r} is not served here; "
                                     f"it serves {', '.join(map(repr, served)) or 'nothing'}")
        reported = _reported_pixel_bounds(served[self.model])
        self.model_pixel_bounds = reported or DEFAULT_MODEL_PIXEL_BOUNDS
        log.info("%s: whole pages are sized within %d to %d pixels (%s)", self.base_url, *self.model_pixel_bounds,
                 "the server's model" if reported else "the server reports no bounds: PaddleOCR-VL 1.5's")
        return self.model

    def submit(self, image: Image.Image, prompt: str, max_tokens: int, pixel_bounds: tuple[int, int] | None = None,
               ignore_eos: bool = False, keep_special_tokens: bool = False,
               loop_guard: LoopSettings | None = None) -> Future:
        """Queue one image; the future resolves to a :class:`RemoteResult` (failures included, as ``error``).

        ``pixel_bounds`` (min, max pixels; None: the model's own, for a whole
        page): resize the image within them before sending it, and ask the
        server to keep to them.
        ``ignore_eos``: ask the server to generate ``max_tokens`` tokens
        whatever it samples (benchmarks). ``keep_special_tokens``: ask for
        the answer with its special tokens (``skip_special_tokens: false``, as
        PaddleX asks for a spotting page's ``<|LOC_n|>`` locations).
        ``loop_guard``: ask the server to cut a decoding loop as the local
        engine does (``repetition_guard``, an extension ``ocrbatch serve``
        applies; other servers ignore it). Blocks while ``concurrency +
        queue_size`` requests are unfinished.
        """
        if self.model is None:
            raise OcrbatchError("no model chosen: call check() before submit()")
        self._slots.acquire()
        with self._submit_lock:
            if self._closing.is_set():
                self._slots.release()
                raise OcrbatchError("the remote recognizer is closed")
            future: Future = Future()
            future.add_done_callback(lambda _: self._slots.release())
            self._queue.put((future, (image, prompt, max_tokens, pixel_bounds, ignore_eos, keep_special_tokens,
                                      loop_guard)))
        return future

    def close(self) -> None:
        """Cancel queued requests, stop retrying, and wait for attempts in flight (each within ``timeout_s``).

        Every future :meth:`submit` returned is done afterwards: with a result,
        an ``error`` result (a request that was waiting to retry), or cancelled
        (a request not yet sent).
        """
        with self._submit_lock:
            if self._closing.is_set():
                return
            self._closing.set()
        # Behind the queued requests: each sender cancels those it takes from now on, then stops.
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._http.close()

    def __enter__(self) -> RemoteRecognizer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- one request ------------------------------------------------------------------

    def _work(self) -> None:
        """A sender thread: runs queued requests until it takes the ``None`` that close() queues."""
        while (item := self._queue.get()) is not None:
            future, args = item
            if self._closing.is_set():
                _cancel(future)
                continue
            if not future.set_running_or_notify_cancel():
                continue  # the caller cancelled it while it waited
            try:
                future.set_result(self._recognize(*args))
            except Exception as exc:  # a bug or an unencodable image: the caller hears of it, the thread lives on
                future.set_exception(exc)

    def _recognize(self, image: Image.Image, prompt: str, max_tokens: int, pixel_bounds: tuple[int, int] | None,
                   ignore_eos: bool, keep_special_tokens: bool, loop_guard: LoopSettings | None) -> RemoteResult:
        pixel_bounds = pixel_bounds or self.model_pixel_bounds
        image = resize_within(image, pixel_bounds)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the server sees the pixels the local engine would
        uri = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
        body = {"model": self.model, "max_tokens": max_tokens, "temperature": 0,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                          {"type": "text", "text": prompt}]}],
                "mm_processor_kwargs": {"min_pixels": pixel_bounds[0], "max_pixels": pixel_bounds[1]}}
        if ignore_eos:
            body["ignore_eos"] = True
        if keep_special_tokens:
            body["skip_special_tokens"] = False
        if loop_guard is not None and not ignore_eos:
            body["repetition_guard"] = asdict(loop_guard)
        started = time.monotonic()
        try:
            result, attempts = self._with_retries(lambda: self._complete(body))
        except _GaveUp as exc:
            return RemoteResult(error=exc.message, elapsed_s=time.monotonic() - started, attempts=exc.attempts)
        result.elapsed_s, result.attempts = time.monotonic() - started, attempts
        return result

    def _complete(self, body: dict) -> RemoteResult:
        answer = self._json(self._send("POST", "/chat/completions", json=body))
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise _AttemptFailed(f"the answer is not a chat completion: {_one_line(str(answer))}",
                                 retryable=False) from None
        usage = answer.get("usage") or {}
        return RemoteResult(text=text, n_output_tokens=usage.get("completion_tokens"),
                            n_image_tokens=_image_tokens(answer), finish_reason=choice.get("finish_reason"))

    def _list_models(self) -> list[dict]:
        listing = self._json(self._send("GET", "/models"))
        try:
            return [entry for entry in listing["data"] if entry["id"]]
        except (KeyError, TypeError):
            raise _AttemptFailed(f"GET /models answered without a model list: {_one_line(str(listing))}",
                                 retryable=False) from None

    def _send(self, method: str, path: str, **kwargs) -> httpx.Response:
        """One HTTP exchange; any failure becomes an :class:`_AttemptFailed` that says whether to retry."""
        try:
            response = self._http.request(method, self.base_url + path, **kwargs)
        except httpx.TimeoutException as exc:
            raise _AttemptFailed(f"no answer within {self.timeout_s:g} s ({type(exc).__name__})",
                                 retryable=True) from None
        except httpx.TransportError as exc:  # refused, reset, or closed without an answer
            raise _AttemptFailed(f"connection failed: {type(exc).__name__}: {_one_line(str(exc))}",
                                 retryable=True) from None
        if response.status_code == 200:
            return response
        retryable = response.status_code in RETRYABLE_STATUS or response.status_code >= 500
        raise _AttemptFailed(f"HTTP {response.status_code}: {_server_message(response)}", retryable,
                             _retry_after(response.headers.get("retry-after")))

    @staticmethod
    def _json(response: httpx.Response):
        try:
            return response.json()
        except ValueError:
            raise _AttemptFailed(f"HTTP 200 with a body that is not JSON: {_one_line(response.text)}",
                                 retryable=False) from None

    # -- retries ----------------------------------------------------------------------

    def _with_retries(self, attempt: Callable[[], T]) -> tuple[T, int]:
        """``attempt()`` under the retry policy: its value and the attempts made, or :class:`_GaveUp`."""
        failures: list[_AttemptFailed] = []

        def once() -> T:
            if failures and self._closing.is_set():
                raise _Closed
            try:
                return attempt()
            except _AttemptFailed as exc:
                failures.append(exc)
                raise

        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception(lambda exc: isinstance(exc, _AttemptFailed) and exc.retryable),
            sleep=self._closing.wait,  # returns at once when close() is called
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(once), len(failures) + 1
        except _AttemptFailed as exc:
            suffix = f" (gave up after {len(failures)} attempts)" if exc.retryable and len(failures) > 1 else ""
            raise _GaveUp(exc.message + suffix, len(failures)) from None
        except _Closed:
            raise _GaveUp(f"{failures[-1].message} (stopped retrying after {len(failures)} attempt(s): "
                          "the recognizer was closed)", len(failures)) from None

    def _wait(self, state: tenacity.RetryCallState) -> float:
        failure = state.outcome.exception()
        if failure.retry_after is not None:
            return min(failure.retry_after, self.max_retry_after_s)
        return self._backoff(state)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        log.info("%s: %s; attempt %d of %d in %.1f s", self.base_url, state.outcome.exception().message,
                 state.attempt_number + 1, self.max_attempts, state.next_action.sleep)


def resize_within(image: Image.Image, pixel_bounds: tuple[int, int]) -> Image.Image:
    """The image as PaddleOCR-VL's image processor resizes it within ``pixel_bounds`` (min, max pixels).

    The same target size (transformers' own ``smart_resize``) and the same
    resampling (PIL bicubic, which the processor's PIL backend applies), so a
    server's processor finds the size already right and encodes these very pixels.
    """
    # Imported here: it loads torch, which nothing else of the client needs.
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        smart_resize,
    )

    height, width = smart_resize(image.height, image.width, factor=RESIZE_FACTOR, min_pixels=pixel_bounds[0],
                                 max_pixels=pixel_bounds[1])
    return image.resize((width, height), Image.Resampling.BICUBIC)


def _reported_pixel_bounds(entry: dict) -> tuple[int, int] | None:
    """The ``(min_pixels, max_pixels)`` a ``/v1/models`` entry reports in its ``ocrbatch`` field, if it does."""
    reported = entry.get("ocrbatch")
    if not isinstance(reported, dict):
        return None
    bounds = reported.get("min_pixels"), reported.get("max_pixels")
    if not all(type(value) is int for value in bounds) or not 0 < bounds[0] <= bounds[1]:
        return None
    return bounds


def _cancel(future: Future) -> None:
    """Cancel a future not yet running and notify its waiters (``wait()``, ``as_completed()``)."""
    future.cancel()
    future.set_running_or_notify_cancel()


def _image_tokens(answer: dict) -> int | None:
    """Image tokens where OpenAI's schema puts them (``usage.prompt_tokens_details.image_tokens``), if present."""
    details = (answer.get("usage") or {}).get("prompt_tokens_details") or {}
    return details.get("image_tokens")


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delay seconds or an HTTP date); None if absent or unreadable."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000" dates parse naive; HTTP dates are UTC
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _server_message(response: httpx.Response) -> str:
    """The server's own words: OpenAI's ``error.message``, else the body text, else the reason phrase."""
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return _one_line(response.text) or response.reason_phrase
    return _one_line(str(message))


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MESSAGE_LIMIT else text[:MESSAGE_LIMIT - 1] + "…"


class RemoteDecoder:
    """The remote backend: each unit's image sent to an OpenAI-compatible server through a :class:`RemoteRecognizer`."""

    needs_embeddings = False

    def __init__(self, recognizer: RemoteRecognizer, max_tokens: int, ignore_eos: bool = False):
        self.recognizer = recognizer
        self.max_tokens, self.ignore_eos = max_tokens, ignore_eos

    def submit(self, unit) -> Future:
        """Queue the unit's image at its pixel bounds (None: a whole page's, the model's own), with its loop guard.

        A spotting unit asks for the answer with its special tokens (its
        locations), since here it arrives as text.
        """
        inner = self.recognizer.submit(unit.image, unit.prompt, self.max_tokens, unit.pixel_bounds, self.ignore_eos,
                                       unit.spotting, unit.loop_guard)
        return chained(inner, remote_decoded)

    def cancel(self, future: Future) -> None:
        future.cancel()  # a request already sent finishes on the server; its answer is dropped


def remote_decoded(result: RemoteResult) -> Decoded:
    """A server's answer as a :class:`Decoded`: token counts are its ``usage``, if any."""
    if result.error:
        return Decoded(error=result.error)
    return Decoded(text=result.text, n_output_tokens=result.n_output_tokens, n_image_tokens=result.n_image_tokens,
                   finish_reason=result.finish_reason, decode_s=result.elapsed_s)
