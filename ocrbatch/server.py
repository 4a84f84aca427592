"""``ocrbatch serve``: an OpenAI-compatible ``/v1/chat/completions`` for OCR.

Requests carry one image (a ``data:`` URI in an ``image_url`` part) and the
prompt text (a task prompt such as ``OCR:`` or free text). The image is
encoded by the shared :class:`VisionEncoder` and decoded by the same
:class:`WorkerPool` the batch job uses, so concurrent requests share the
workers' sequence slots. A full queue answers 503 with ``Retry-After``.
Errors use OpenAI's error body; no request can take the server down.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .errors import InputError
from .images import open_image
from .language import Sampling

DEFAULT_PORT = 7778


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 32
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_pixels: int = 40_000_000
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
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None


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
    if not settings.allow_local_files:
        raise ApiError(400, "local file paths are disabled on this server (start it with --allow-local-files); "
                       "send the image as a data: URI", param="image_url")
    path = url.removeprefix("file://")
    try:
        with open(path, "rb") as handle:
            return handle.read(settings.max_body_bytes + 1)
    except OSError as exc:
        raise ApiError(400, f"cannot read {path}: {exc.strerror}", param="image_url") from None


def _parse_prompt(body: ChatCompletionRequest) -> tuple[str, str]:
    """The single image URL and the prompt text of the last user message."""
    users = [m for m in body.messages if m.role == "user"]
    if not users:
        raise ApiError(400, "messages must contain a user message", param="messages")
    content = users[-1].content
    if not isinstance(content, list):
        raise ApiError(400, "the user message must contain an image_url part with the image", param="messages")
    images = [p for p in content if p.type in ("image_url", "input_image")]
    if len(images) != 1:
        raise ApiError(400, f"the user message must contain exactly one image, found {len(images)}",
                       param="messages")
    image = images[0].image_url
    url = image.url if isinstance(image, ImageURL) else image
    if not url:
        raise ApiError(400, "image_url part without a url", param="messages")
    text = "".join(p.text or "" for p in content if p.type in ("text", "input_text")).strip()
    return url, text or "OCR:"


class OcrService:
    """The server's state: engine (vision, prompts), pool and limits."""

    def __init__(self, engine, pool, settings: ServerSettings):
        self.engine, self.pool, self.settings = engine, pool, settings
        self._vision_lock = threading.Lock()
        self._admitted = 0
        self._admit_lock = threading.Lock()

    def admit(self) -> None:
        with self._admit_lock:
            if self._admitted >= self.settings.max_queue:
                raise ApiError(503, "server is busy, try again shortly", type_="server_error",
                               code="overloaded", headers={"Retry-After": "2"})
            self._admitted += 1

    def release(self) -> None:
        with self._admit_lock:
            self._admitted -= 1

    def encode(self, image_data: bytes):
        try:
            image = open_image(image_data, name="image", max_pixels=self.settings.max_image_pixels)
        except InputError as exc:
            message = str(exc)
            status = 413 if "exceeds the limit" in message else 400
            raise ApiError(status, message, param="image_url") from None
        with self._vision_lock:  # one forward at a time bounds memory
            try:
                return self.engine.vision.encode([image])[0]
            except Exception as exc:
                raise ApiError(400, f"the image cannot be encoded: {exc}", param="image_url") from None


def create_app(engine, pool, settings: ServerSettings) -> FastAPI:
    """The FastAPI application over a loaded engine and a worker pool."""
    app = FastAPI(title="ocrbatch", version="0.1.0")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    service = OcrService(engine, pool, settings)
    app.state.service = service

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
        return ApiError(400, f"{where}: {first.get('msg', 'invalid request')}", param=where or None).response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error").response()

    def authorised(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {settings.api_key}":
            raise ApiError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queued": pool.pending}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models():
        return {"object": "list", "data": [
            {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ocrbatch"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat_completions(body: ChatCompletionRequest):
        if body.model and body.model != settings.model_name:
            raise ApiError(404, f"model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                           code="model_not_found", param="model")
        max_tokens = body.max_completion_tokens or body.max_tokens or settings.default_max_tokens
        if max_tokens > settings.max_tokens_limit:
            raise ApiError(400, f"max_tokens must be at most {settings.max_tokens_limit}", param="max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        url, text = _parse_prompt(body)
        image_data = await asyncio.to_thread(_image_bytes, url, settings)
        service.admit()
        try:
            encoded = await asyncio.to_thread(service.encode, image_data)
        except BaseException:
            service.release()
            raise
        sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                _stream(service, encoded, text, max_tokens, sampling, stops, completion_id, created,
                        include_usage),
                media_type="text/event-stream")
        try:
            future = pool.submit(engine.request(encoded, text, max_tokens, sampling))
            result = await asyncio.wrap_future(future)
        finally:
            service.release()
        if result.error:
            raise ApiError(400, result.error)
        token_ids = list(result.token_ids)
        content = engine.prompts.decode(token_ids)
        finish = result.finish_reason
        content, stopped = _apply_stops(content, stops)
        if stopped:
            finish = "stop"
        return {
            "id": completion_id, "object": "chat.completion", "created": created, "model": settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish, "logprobs": None}],
            "usage": {"prompt_tokens": result.n_prompt_tokens, "completion_tokens": len(token_ids),
                      "total_tokens": result.n_prompt_tokens + len(token_ids)},
            "ocrbatch": {"token_ids": token_ids, "n_image_tokens": encoded.n_tokens,
                         "prefill_s": result.prefill_s, "decode_s": result.decode_s},
        }

    return app


def _apply_stops(text: str, stops: list[str]) -> tuple[str, bool]:
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


async def _stream(service: OcrService, encoded, text, max_tokens, sampling, stops, completion_id, created,
                  include_usage):
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""
    engine, pool, model = service.engine, service.pool, service.settings.model_name
    loop = asyncio.get_running_loop()
    tokens: asyncio.Queue = asyncio.Queue()
    future = None

    def chunk(delta: dict, finish: str | None = None) -> str:
        payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    try:
        request_ = engine.request(encoded, text, max_tokens, sampling,
                                  on_token=lambda token: loop.call_soon_threadsafe(tokens.put_nowait, token))
        future = pool.submit(request_)
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(tokens.put_nowait, None))
        yield chunk({"role": "assistant", "content": ""})
        ids: list[int] = []
        sent = ""
        finish = None
        while True:
            token = await tokens.get()
            if token is None:
                break
            ids.append(token)
            decoded = engine.prompts.decode(ids)
            if decoded.endswith("\ufffd"):
                continue  # a multi-byte character is not complete yet
            decoded, stopped = _apply_stops(decoded, stops)
            if len(decoded) > len(sent):
                yield chunk({"content": decoded[len(sent):]})
                sent = decoded
            if stopped:
                finish = "stop"
                pool.cancel(future)
                break
        result = await asyncio.wrap_future(future) if finish is None else None
        if result is not None and result.error:
            yield f"data: {json.dumps({'error': {'message': result.error, 'type': 'invalid_request_error'}})}\n\n"
        else:
            final = engine.prompts.decode(ids)
            final, _ = _apply_stops(final, stops)
            if len(final) > len(sent):
                yield chunk({"content": final[len(sent):]})
            yield chunk({}, finish or result.finish_reason)
            if include_usage:
                prompt_tokens = result.n_prompt_tokens if result else 0
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                         "total_tokens": prompt_tokens + len(ids)}
                payload = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                           "model": model, "choices": [], "usage": usage}
                yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        # Also reached when the client disconnects mid-stream: free the sequence.
        if future is not None and not future.done():
            pool.cancel(future)
        service.release()
