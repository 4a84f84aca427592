"""A small client for ``ocrbatch serve`` (any OpenAI-compatible endpoint works the same)."""

from __future__ import annotations

import base64
import json
import mimetypes
from pathlib import Path
from typing import Iterator

import httpx

from ..errors import OcrbatchError
from ..model.prompt import TASK_PROMPTS


def image_message(image_path: str | Path, text: str) -> dict:
    """A user message with the image as a data: URI and the prompt text."""
    mime = mimetypes.guess_type(str(image_path))[0] or "image/png"
    data = base64.b64encode(Path(image_path).read_bytes()).decode()
    return {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}},
        {"type": "text", "text": text},
    ]}


def ocr_request(url: str, image_path: str | Path, task: str = "ocr", prompt: str | None = None,
                api_key: str | None = None, max_tokens: int | None = None, stream: bool = False,
                timeout: float = 600) -> Iterator[str]:
    """Yield the answer's text: whole, or piece by piece when ``stream``."""
    body: dict = {"messages": [image_message(image_path, prompt or TASK_PROMPTS[task])], "stream": stream}
    if max_tokens:
        body["max_tokens"] = max_tokens
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    endpoint = url.rstrip("/") + "/v1/chat/completions"
    try:
        with httpx.Client(timeout=timeout) as http:
            with http.stream("POST", endpoint, json=body, headers=headers) as response:
                if response.status_code != 200:
                    response.read()
                    try:
                        message = response.json()["error"]["message"]
                    except (ValueError, KeyError, TypeError):
                        message = response.text
                    raise OcrbatchError(f"{endpoint}: HTTP {response.status_code}: {message}")
                if not stream:
                    response.read()
                    yield response.json()["choices"][0]["message"]["content"]
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise OcrbatchError(f"{endpoint}: {event['error']['message']}")
                    for choice in event.get("choices", []):
                        piece = choice.get("delta", {}).get("content")
                        if piece:
                            yield piece
    except httpx.HTTPError as exc:
        raise OcrbatchError(f"{endpoint}: {exc}") from None
