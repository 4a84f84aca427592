"""``ocrbatch serve``: an OpenAI-compatible ``/v1/chat/completions`` for OCR.

Requests carry one image or several (``data:`` URIs in ``image_url`` parts, up
to ``max_images_per_request``) and the prompt text (a task prompt such as
``OCR:`` or free text). The images are encoded by the shared
:class:`VisionEncoder`, each at its own size, placed in the prompt in the
order the message gives them (as transformers does), and decoded by the same
:class:`WorkerPool` the batch job uses, so concurrent requests share the
workers' sequence slots. A full queue answers 503 with ``Retry-After``.
Errors use OpenAI's error body; no request can take the server down.

``/v1/models`` reports the model's own image resize bounds (an ``ocrbatch``
field with ``min_pixels`` and ``max_pixels``). Three of vLLM's request
extensions are honoured: ``mm_processor_kwargs`` with ``min_pixels`` /
``max_pixels`` (the image's resize bounds, as the batch job sends for pages
and layout blocks; any other key is refused, since silently ignoring it would
change the answer unannounced), ``ignore_eos`` (generate ``max_tokens``
tokens: benchmarks) and ``skip_special_tokens`` (false keeps special tokens
in the answer: a spotting page's ``<|LOC_n|>`` locations).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import InputError
from ..layout.blocks import BLOCK_MAX_PIXELS
from ..layout.spotting import SPOTTING_PIXEL_BOUNDS
from ..model.language import GenerationResult, Sampling
from ..model.repetition import LoopSettings
from ..sources.images import open_image

# Sampling seeds are unsigned 64-bit, as llama.cpp's and most servers' are (numpy takes any, but
# a seed another server would refuse should not quietly work here).
SEED_MAX = 2**64 - 1
# A URL's scheme (two characters at least: "C:/page.png" is a Windows path, not a URL).
URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]+):")
# Resize bounds below one 28x28 group of patches (one image token) mean nothing to the encoder.
MIN_BOUND_PIXELS = 28 * 28
BOUND_KEYS = ("min_pixels", "max_pixels")


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 32
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_images_per_request: int = 4
    max_tokens_limit: int = 8192
    default_max_tokens: int = 1024
    allow_remote_images: bool = False
    allow_local_files: bool = False


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def _characters_only(text: str, what: str) -> None:
    """Refuse a lone UTF-16 surrogate (JSON's ``"\\ud800"``): it is no character, and neither the
    tokenizer nor a URL or file name takes it."""
    surrogate = LONE_SURROGATE.search(text)
    if surrogate:
        raise ApiError(400, f"the {what} holds a lone UTF-16 surrogate (\\u{ord(surrogate.group()):04x} at "
                       f"character {surrogate.start()}), which is not a character", param="messages")


def _stops_not_empty(stop):
    """An empty stop string would be found before any text: refuse it rather than answer nothing."""
    if stop == "" or (isinstance(stop, list) and "" in stop):
        raise ValueError("stop strings must not be empty")
    return stop


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url", "input_text", "input_image"]
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Annotated[str | list[str] | None, AfterValidator(_stops_not_empty)] = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    mm_processor_kwargs: dict | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # ocrbatch's extension: cut a decoding loop as the batch job does (LoopSettings' fields; the remote backend
    # sends it for layout blocks). The answer then ends with finish_reason "repetition".
    repetition_guard: dict | None = None


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes with 413, declared or streamed."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        too_big = ApiError(413, f"request body exceeds {self.limit} bytes", code="request_too_large")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await too_big.response()(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


def _image_bytes(url: str, settings: ServerSettings) -> bytes:
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "image data URI must be base64-encoded", param="image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "image data URI has invalid base64", param="image_url") from None
    if url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise ApiError(400, "remote image URLs are disabled on this server (start it with "
                           "--allow-remote-images); send the image as a data: URI", param="image_url")
        import httpx

        try:
            with httpx.stream("GET", url, timeout=30, follow_redirects=True) as response:
                response.raise_for_status()
                data = b""
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > settings.max_body_bytes:
                        raise ApiError(400, "remote image is too large", param="image_url")
                return data
        except httpx.HTTPError as exc:
            raise ApiError(400, f"could not fetch the image: {exc}", param="image_url") from None
    scheme = URL_SCHEME.match(url)
    if scheme and scheme.group(1).lower() != "file":
        raise ApiError(400, f"unsupported image URL scheme {scheme.group(1)!r}: send the image as a data: URI "
                       "(or an http(s) URL, or a file path, where the server allows them)", param="image_url")
    if not settings.allow_local_files:
        raise ApiError(400, "local file paths are disabled on this server (start it with --allow-local-files); "
                       "send the image as a data: URI", param="image_url")
    path = url.removeprefix("file://")
    try:
        with open(path, "rb") as handle:
            return handle.read(settings.max_body_bytes + 1)
    except OSError as exc:
        raise ApiError(400, f"cannot read {path}: {exc.strerror}", param="image_url") from None


def _routing_error(request: Request, exc: HTTPException) -> ApiError:
    """Starlette's own errors (no such route, a wrong method, a body it cannot parse) as OpenAI's error."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        return ApiError(404, f"Invalid URL ({where}): this server serves POST /v1/chat/completions, "
                        "GET /v1/models and GET /health")
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow", "another method")
        return ApiError(405, f"method not allowed ({where}): use {allowed}", headers=exc.headers)
    cause = exc.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return ApiError(400, f"request body is not valid UTF-8 (byte {cause.object[cause.start]:#04x} at "
                        f"offset {cause.start})")
    if isinstance(cause, RecursionError):
        return ApiError(400, "request body is nested too deeply to parse")
    return ApiError(exc.status_code, str(exc.detail), headers=exc.headers)


def _loop_guard(settings: dict | None) -> LoopSettings | None:
    """The request's ``repetition_guard``, or a 400 naming what is wrong with it."""
    if settings is None:
        return None
    try:
        return LoopSettings(**settings)
    except (TypeError, ValueError) as exc:
        raise ApiError(400, f"repetition_guard: {exc}", param="repetition_guard") from None


def _parse_prompt(body: ChatCompletionRequest, max_images: int) -> tuple[list[str], str]:
    """The image URLs (in order) and the prompt text of the last user message."""
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "messages must contain a user message", param="messages")
    content = users[-1].content
    if not isinstance(content, list):
        raise ApiError(400, "the user message must contain an image_url part with the image", param="messages")
    images = [p.image_url for p in content if p.type in ("image_url", "input_image")]
    if not images:
        raise ApiError(400, "the user message must contain an image_url part with the image", param="messages")
    if len(images) > max_images:
        raise ApiError(400, f"the user message has {len(images)} images; this server takes at most {max_images} "
                       "per request (--max-images-per-request)", param="messages", code="too_many_images")
    urls = [image.url if isinstance(image, ImageURL) else image for image in images]
    for number, url in enumerate(urls, start=1):
        if not url:
            raise ApiError(400, f"image {number}: image_url part without a url", param="messages")
        _characters_only(url, f"URL of image {number}")
    text = "".join(p.text or "" for p in content if p.type in ("text", "input_text")).strip()
    _characters_only(text, "prompt text")
    return urls, text or "OCR:"


_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class Detokenizer:
    """Streamed token ids to text pieces, each decode covering only the last few tokens.

    The pieces joined equal ``decode`` of all the ids. A token's text can depend on its
    neighbours: SentencePiece drops the leading space of a decode's first token, and a run of
    byte-fallback tokens decodes as a whole (one character split over several tokens, or a
    replacement character for every byte of an invalid run), with skipped special tokens
    joining the runs on either side. So each decode starts at the previous piece, for context,
    and a piece ends only after an ordinary token; byte, special and unknown ids wait for one.
    """

    def __init__(self, decode: Callable[[list[int]], str], ordinary: frozenset[int]):
        self._decode, self._ordinary = decode, ordinary
        self._window: list[int] = []  # the last piece's tokens, then those not yet handed out
        self._done = 0  # how many of the window's tokens have been handed out

    def push(self, token: int) -> str:
        """The text ``token`` completes ("" while it waits for an ordinary token)."""
        self._window.append(token)
        return self._piece() if token in self._ordinary else ""

    def flush(self) -> str:
        """The text of tokens still waiting, at the end of the answer."""
        return self._piece() if self._done < len(self._window) else ""

    def _piece(self) -> str:
        known = len(self._decode(self._window[: self._done]))
        piece = self._decode(self._window)[known:]
        del self._window[: self._done]
        self._done = len(self._window)
        return piece


def ordinary_token_ids(tokenizer) -> frozenset[int]:
    """Ids whose text does not change with the tokens after them: neither bytes nor special tokens."""
    special = set(tokenizer.all_special_ids)
    return frozenset(i for token, i in tokenizer.get_vocab().items()
                     if i not in special and not _BYTE_TOKEN.fullmatch(token))


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where to cut ``text``: before the stop string that completes first, as in generation order."""
    found = [(at + len(stop), at) for stop in stops if stop and (at := text.find(stop)) >= 0]
    return min(found)[1] if found else None


def _apply_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = _first_stop(text, stops)
    return (text, False) if cut is None else (text[:cut], True)


class StopScanner:
    """Cuts streamed text at the first stop string, seeing each character about once.

    The tail that could be the start of a stop string is held back until the next piece shows
    whether it is one, so no text past a stop is ever sent and a stop string split over pieces
    is found.
    """

    def __init__(self, stops: list[str]):
        self._stops = [stop for stop in stops if stop]
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """The text that can be sent now, and whether a stop string ended the answer."""
        text = self._held + piece
        cut = _first_stop(text, self._stops)
        if cut is not None:
            self._held = ""
            return text[:cut], True
        keep = max((k for stop in self._stops for k in range(min(len(stop) - 1, len(text)), 0, -1)
                    if text.endswith(stop[:k])), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """The held-back tail, once the answer has ended without a stop string."""
        held, self._held = self._held, ""
        return held


def _usage(n_prompt: int, n_image: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion,
            "prompt_tokens_details": {"image_tokens": n_image, "text_tokens": n_prompt - n_image}}


class OcrService:
    """The server's state: engine (vision, prompts), pool and limits."""

    def __init__(self, engine, pool, settings: ServerSettings):
        self.engine, self.pool, self.settings = engine, pool, settings
        self._vision_lock = threading.Lock()
        self._admitted = 0
        self._admit_lock = threading.Lock()
        self._ordinary = ordinary_token_ids(engine.prompts.tokenizer)

    def admit(self) -> None:
        with self._admit_lock:
            if self._admitted >= self.settings.max_queue:
                raise ApiError(503, "server is busy, try again shortly", type_="server_error",
                               code="overloaded", headers={"Retry-After": "2"})
            self._admitted += 1

    def release(self) -> None:
        with self._admit_lock:
            self._admitted -= 1

    def detokenizer(self, keep_special_tokens: bool = False) -> Detokenizer:
        prompts = self.engine.prompts
        return Detokenizer(lambda ids: prompts.decode(ids, keep_special_tokens), self._ordinary)

    def pixel_bounds(self, kwargs: dict | None) -> tuple[int, int] | None:
        """The resize bounds ``mm_processor_kwargs`` asks for (None: the processor's own), or ApiError 400."""
        if not kwargs:
            return None
        unknown = sorted(set(kwargs) - set(BOUND_KEYS))
        if unknown:
            raise ApiError(400, f"mm_processor_kwargs: unsupported key(s) {', '.join(map(repr, unknown))}; "
                           "this server takes min_pixels and max_pixels", param="mm_processor_kwargs")
        # Up to the largest of the model's own maximum, the batch job's block maximum and its spotting
        # maximum: the images the batch job itself encodes, so no request makes the encoder (and the
        # language model's context) take more than they are sized for.
        size = self.engine.vision.image_processor.size
        ceiling = max(size.longest_edge, BLOCK_MAX_PIXELS, SPOTTING_PIXEL_BOUNDS[1])
        bounds = {"min_pixels": size.shortest_edge, "max_pixels": size.longest_edge}
        for key, value in kwargs.items():
            if isinstance(value, bool) or not isinstance(value, int) or not MIN_BOUND_PIXELS <= value <= ceiling:
                raise ApiError(400, f"mm_processor_kwargs.{key} must be an integer from {MIN_BOUND_PIXELS} to "
                               f"{ceiling}, not {value!r}", param=f"mm_processor_kwargs.{key}")
            bounds[key] = value
        if bounds["min_pixels"] > bounds["max_pixels"]:
            raise ApiError(400, f"mm_processor_kwargs: min_pixels ({bounds['min_pixels']}) exceeds max_pixels "
                           f"({bounds['max_pixels']})", param="mm_processor_kwargs")
        return bounds["min_pixels"], bounds["max_pixels"]

    def encode(self, images_data: list[bytes], pixel_bounds: tuple[int, int] | None = None):
        """Every image of a request, each at its own size, in one forward; ApiError names the image at fault."""
        images = []
        for number, data in enumerate(images_data, start=1):
            name = "image" if len(images_data) == 1 else f"image {number}"
            try:
                images.append(open_image(data, name=name, max_pixels=self.settings.max_image_pixels))
            except InputError as exc:
                message = str(exc)
                status = 413 if "exceeds the limit" in message else 400
                raise ApiError(status, message, param="image_url") from None
        with self._vision_lock:  # one forward at a time bounds memory
            try:
                return self.engine.vision.encode(images, pixel_bounds)
            except Exception as exc:
                raise ApiError(400, f"the image cannot be encoded: {exc}", param="image_url") from None


class _EventStream(StreamingResponse):
    """A server-sent-event response that owns a decode and a queue slot.

    ``close`` runs however the response ends: finished, client gone mid-stream, or client gone
    before the body was ever iterated, when the generator's own ``finally`` would never run.
    """

    def __init__(self, events: AsyncIterator[str], close: Callable[[], None]):
        super().__init__(events, media_type="text/event-stream")
        self._close = close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                self._close()


async def _client_gone(receive) -> None:
    """Return when the client disconnects; the request body has already been read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _result_unless_client_leaves(pool, future: Future, receive) -> GenerationResult | None:
    """The decode's result, or None once the client has hung up and the decode was cancelled.

    Waits for the cancelled decode to end, so its queue slot is held until its sequence is free.
    """
    outcome = asyncio.wrap_future(future)
    gone = asyncio.ensure_future(_client_gone(receive))
    try:
        await asyncio.wait({outcome, gone}, return_when=asyncio.FIRST_COMPLETED)
        if outcome.done():
            return outcome.result()
    finally:
        gone.cancel()
        if not outcome.done():  # the client left, or this handler is being cancelled
            pool.cancel(future)
    await asyncio.wait({outcome})
    return None


def _answer_errors_as_openai_does(app: FastAPI) -> None:
    """Every error, ours or the framework's, as an OpenAI-style JSON error with its status."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, "request body is not valid JSON").response()
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        if not where:
            return ApiError(400, "request body must be a JSON object").response()
        message = first.get("msg", "invalid request").removeprefix("Value error, ")  # pydantic's, for our checks
        return ApiError(400, f"{where}: {message}", param=where).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _routing_error(request, exc).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").response()


def _authorisation(api_key: str | None):
    """The dependency that checks ``Authorization: Bearer KEY`` (nothing to check without a key)."""
    expected_authorization = None if api_key is None else f"Bearer {api_key}".encode()

    def authorised(request: Request) -> None:
        if expected_authorization is None:
            return
        # Starlette decodes header values as latin-1; encoding back gives the bytes sent, and
        # comparing bytes in constant time does not tell a guesser how much of a key was right.
        given = request.headers.get("authorization", "").encode("latin-1")
        if not hmac.compare_digest(given, expected_authorization):
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    return authorised


def create_app(engine, pool, settings: ServerSettings) -> FastAPI:
    """The FastAPI application over a loaded engine and a worker pool."""
    app = FastAPI(title="ocrbatch", version="0.1.0")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    service = OcrService(engine, pool, settings)
    app.state.service = service

    _answer_errors_as_openai_does(app)
    authorised = _authorisation(settings.api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queued": pool.pending}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models():
        # The processor's own resize bounds, so that a client can size whole pages as this model
        # encodes them locally (what ``--backend openai`` does) instead of guessing.
        size = engine.vision.image_processor.size
        return {"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ocrbatch",
             "ocrbatch": {"min_pixels": size.shortest_edge, "max_pixels": size.longest_edge}}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat_completions(body: ChatCompletionRequest, http: Request):
        if body.model and body.model != settings.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                           code="model_not_found", param="model")
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be at most {settings.max_tokens_limit}", param="max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        pixel_bounds = service.pixel_bounds(body.mm_processor_kwargs)
        urls, text = _parse_prompt(body, settings.max_images_per_request)
        images_data = []
        for number, url in enumerate(urls, start=1):
            try:
                images_data.append(await asyncio.to_thread(_image_bytes, url, settings))
            except ApiError as exc:
                if len(urls) > 1:
                    exc.message = f"image {number}: {exc.message}"
                raise
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        loop_guard = _loop_guard(body.repetition_guard)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def language_request(encoded, on_token=None):
            request_ = engine.request(encoded, text, max_tokens, sampling, on_token=on_token)
            request_.loop_guard = loop_guard
            if body.ignore_eos:  # only max_tokens ends it, as the batch job's --ignore-eos
                request_.stop_ids, request_.loop_guard = (), None
            return request_

        service.admit()
        slot_handed_over = False
        try:
            encoded = await asyncio.to_thread(service.encode, images_data, pixel_bounds)
            if body.stream:
                loop = asyncio.get_running_loop()
                tokens: asyncio.Queue = asyncio.Queue()
                request_ = language_request(
                    encoded, on_token=lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token))
                future = pool.submit(request_)
                future.add_done_callback(lambda _: loop.call_soon_threadsafe(tokens.put_nowait, None))

                def close() -> None:
                    if not future.done():
                        pool.cancel(future)
                    service.release()

                include_usage = bool(body.stream_options and body.stream_options.include_usage)
                events = _events(service, request_, future, tokens, stops, completion_id, created, include_usage,
                                 keep_special_tokens=not body.skip_special_tokens)
                response = _EventStream(events, close)
                slot_handed_over = True
                return response
            request_ = language_request(encoded)
            result = await _result_unless_client_leaves(pool, pool.submit(request_), http.receive)
        finally:
            if not slot_handed_over:
                service.release()
        if result is None:
            return Response(status_code=499)  # nginx's "client closed request", for the access log
        if result.error:
            raise ApiError(400, result.error)
        token_ids = list(result.token_ids)
        content, stopped = _apply_stops(engine.prompts.decode(token_ids, not body.skip_special_tokens), stops)
        prompt = request_.prompt
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop" if stopped else result.finish_reason, "logprobs": None}],
            "usage": _usage(prompt.n_prompt_tokens, prompt.n_image_tokens, len(token_ids)),
            "ocrbatch": {"token_ids": token_ids, "n_image_tokens": prompt.n_image_tokens,
                         "prefill_s": result.prefill_s, "decode_s": result.decode_s},
        }

    return app


async def _events(service: OcrService, request_, future: Future, tokens: asyncio.Queue, stops, completion_id,
                  created, include_usage, keep_special_tokens: bool = False) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``.

    ``tokens`` receives each token id, then None once ``future`` is done.
    """
    model = service.settings.model_name

    def chunk(delta: dict, finish: str | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def error(message: str, type_: str) -> str:
        return f"data: {json.dumps({'error': {'message': message, 'type': type_}}, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    text, scanner = service.detokenizer(keep_special_tokens), StopScanner(stops)
    n_tokens, stopped = 0, False
    while not stopped and (token := await tokens.get()) is not None:
        n_tokens += 1
        piece, stopped = scanner.feed(text.push(token))
        if piece:
            yield chunk({"content": piece})
    if stopped:
        finish = "stop"
    else:
        try:
            result = future.result()
        except Exception as exc:  # the pool failed or shut down: say so rather than cut the stream
            yield error(f"{type(exc).__name__}: {exc}", "server_error")
            yield "data: [DONE]\n\n"
            return
        if result.error:
            yield error(result.error, "invalid_request_error")
            yield "data: [DONE]\n\n"
            return
        piece, stopped = scanner.feed(text.flush())
        piece += "" if stopped else scanner.flush()
        if piece:
            yield chunk({"content": piece})
        finish = "stop" if stopped else result.finish_reason
    yield chunk({}, finish)
    if include_usage:
        prompt = request_.prompt
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [], "usage": _usage(prompt.n_prompt_tokens, prompt.n_image_tokens, n_tokens)}
        yield f"data: {json.dumps(payload)}\n\n"
    yield "data: [DONE]\n\n"
