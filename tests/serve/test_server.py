"""``ocrbatch serve``: real servers on loopback ports, driven by the openai SDK, httpx and raw sockets.

Most tests run ``ocrbatch serve`` as a subprocess. Those that must see inside the server (its
pool's futures, cancels and queue slots) run the same app under uvicorn in this process.
"""

import asyncio
import base64
import io
import json
import random
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
from helpers import LONG, document_image, free_port, write_png_claiming_size

MAX = 16



def start_server(model, *extra):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ocrbatch", "serve", "--model", str(model), "--quant", "F32", "--port", str(port),
         "--seqs-per-worker", "4", "--max-tokens", str(MAX), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {process.stderr.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("server did not start")


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def server(tiny_model):
    process, url = start_server(tiny_model, "--max-queue", "64")
    yield url
    stop(process)


@pytest.fixture(scope="module")
def guarded_server(tiny_model):
    process, url = start_server(tiny_model, "--api-key", "sesame", "--max-queue", "1", "--max-body-mb", "1",
                                "--max-image-pixels", "2000000")
    yield url
    stop(process)


def data_uri(image, fmt="PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def messages(uri: str, text: str = "OCR:") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": text}]}]


def openai_client(url, key="unused"):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.mark.slow
def test_openai_sdk_plain_matches_engine(server, tiny_model, test_images, engine_f32):
    client = openai_client(server)
    [model] = client.models.list().data
    assert model.id == str(tiny_model)
    for image in test_images[:3]:
        completion = client.chat.completions.create(model=model.id, messages=messages(data_uri(image)),
                                                    max_tokens=MAX)
        [expected] = engine_f32.ocr([image], max_tokens=MAX)
        assert completion.model_extra["ocrbatch"]["token_ids"] == expected.token_ids
        assert completion.choices[0].message.content == expected.text
        assert completion.choices[0].finish_reason == ("length" if len(expected.token_ids) == MAX else "stop")
        assert completion.usage.completion_tokens == len(expected.token_ids)
        assert completion.usage.prompt_tokens == expected.n_prompt_tokens
        details = completion.usage.prompt_tokens_details
        assert details.image_tokens == expected.n_image_tokens > 0
        assert details.text_tokens == expected.n_prompt_tokens - expected.n_image_tokens > 0
        assert completion.id.startswith("chatcmpl-") and completion.object == "chat.completion"


@pytest.mark.slow
def test_openai_sdk_streaming(server, test_images, engine_f32):
    client = openai_client(server)
    image = test_images[0]
    stream = client.chat.completions.create(model=client.models.list().data[0].id,
                                            messages=messages(data_uri(image), "Table Recognition:"),
                                            max_tokens=MAX, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    [expected] = engine_f32.ocr([image], task="table", max_tokens=MAX)
    assert "".join(pieces) == expected.text
    assert len([p for p in pieces if p]) > 1  # really streamed, not one lump
    assert finish in ("stop", "length") and usage.completion_tokens == len(expected.token_ids)
    assert usage.prompt_tokens == expected.n_prompt_tokens
    assert usage.prompt_tokens_details.image_tokens == expected.n_image_tokens > 0


@pytest.mark.slow
def test_httpx_stream_ends_with_done(server, test_images):
    body = {"messages": messages(data_uri(test_images[1])), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(e["object"] == "chat.completion.chunk" for e in events)


@pytest.mark.slow
def test_eight_simultaneous_requests(server, test_images, engine_f32):
    images = [document_image(200 + 40 * i, 160 + 25 * i, 100 + i) for i in range(8)]
    expected = [engine_f32.ocr([image], max_tokens=MAX)[0].token_ids for image in images]

    def ask(image):
        response = httpx.post(server + "/v1/chat/completions", timeout=120,
                              json={"messages": messages(data_uri(image)), "max_tokens": MAX})
        assert response.status_code == 200, response.text
        return response.json()["ocrbatch"]["token_ids"]

    with ThreadPoolExecutor(8) as executor:
        answers = list(executor.map(ask, images))
    assert answers == expected


def several(uris: list[str], text: str = "OCR:") -> list[dict]:
    """One user message with every image in ``uris``, in order, then the text."""
    parts = [{"type": "image_url", "image_url": {"url": uri}} for uri in uris]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.mark.slow
def test_several_images_in_one_request_plain_streamed_and_together(server, test_images, engine_f32):
    """2 and 3 images of different sizes: the engine's tokens (transformers' at F32, test_exactness),
    image tokens summed; several such requests at once, among one-image ones, through the same queue."""
    client = openai_client(server)
    model = client.models.list().data[0].id
    for picks in [(0, 3), (2, 1, 4)]:
        images = [test_images[i] for i in picks]
        expected = engine_f32.ocr_together(images, max_tokens=MAX)
        assert expected.n_image_tokens == sum(e.n_tokens for e in engine_f32.vision.encode(images))
        completion = client.chat.completions.create(model=model, messages=several([data_uri(i) for i in images]),
                                                    max_tokens=MAX)
        assert completion.model_extra["ocrbatch"]["token_ids"] == expected.token_ids
        assert completion.choices[0].message.content == expected.text
        assert completion.usage.prompt_tokens == expected.n_prompt_tokens
        assert completion.usage.prompt_tokens_details.image_tokens == expected.n_image_tokens
        stream = client.chat.completions.create(model=model, messages=several([data_uri(i) for i in images]),
                                                max_tokens=MAX, stream=True, stream_options={"include_usage": True})
        pieces, usage = [], None
        for chunk in stream:
            usage = chunk.usage or usage
            pieces += [choice.delta.content or "" for choice in chunk.choices]
        assert "".join(pieces) == expected.text
        assert usage.prompt_tokens_details.image_tokens == expected.n_image_tokens
        assert usage.completion_tokens == len(expected.token_ids)

    bodies = [several([data_uri(test_images[i]) for i in picks]) for picks in [(0, 3), (4,), (2, 1, 4), (1,), (3, 0)]]
    expected = [engine_f32.ocr_together([test_images[i] for i in picks], max_tokens=MAX).token_ids
                for picks in [(0, 3), (4,), (2, 1, 4), (1,), (3, 0)]]

    def ask(body):
        response = httpx.post(server + "/v1/chat/completions", timeout=120, json={"messages": body, "max_tokens": MAX})
        assert response.status_code == 200, response.text
        return response.json()["ocrbatch"]["token_ids"]

    with ThreadPoolExecutor(len(bodies)) as executor:
        assert list(executor.map(ask, bodies)) == expected


@pytest.mark.slow
def test_bad_multi_image_requests_get_4xx_and_the_server_stays_up(server, test_images):
    good = [data_uri(image) for image in test_images[:2]]
    not_an_image = "data:image/png;base64," + base64.b64encode(b"hello").decode()
    cases = [  # the server's default --max-images-per-request is 4
        (several([good[0]] * 5), 400, "5 images; this server takes at most 4", "too_many_images"),
        (several([good[0], not_an_image, good[1]]), 400, "image 2", None),
        (several([good[0], good[1], "data:image/png;base64,@@@"]), 400, "image 3: image data URI has invalid base64",
         None),
        (several([good[0], "/etc/passwd"]), 400, "image 2: local file paths are disabled", None),
    ]
    for body, status, words, code in cases:
        response = _post(server, {"messages": body, "max_tokens": 2})
        assert response.status_code == status, (words, response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
        assert words in error["message"], (words, error)
        assert httpx.get(server + "/health", timeout=10).status_code == 200
    ok = _post(server, {"messages": several([good[0]] * 4), "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def _post(url, body=None, content=None, headers=None):
    return httpx.post(url + "/v1/chat/completions", json=body, content=content, headers=headers, timeout=60)


@pytest.mark.slow
def test_bad_requests_get_openai_errors_and_the_server_stays_up(server, test_images, tmp_path):
    image_uri = data_uri(test_images[0])
    bomb = tmp_path / "bomb.png"
    write_png_claiming_size(bomb, 20000, 20000)
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        (dict(body={"model": "x"}), 400, "messages"),
        (dict(body={"messages": []}), 400, "messages"),
        (dict(body={"messages": messages("data:image/png;base64,@@@not-base64@@@")}), 400, "invalid base64"),
        (dict(body={"messages": messages("data:image/png;base64," + base64.b64encode(b"hello").decode())}),
         400, "not a recognised image format"),
        (dict(body={"messages": messages("data:image/png;base64," + base64.b64encode(bomb.read_bytes()).decode())}),
         413, "exceeds the limit"),
        (dict(body={"messages": messages(image_uri), "max_tokens": 0}), 400, "max_tokens"),
        (dict(body={"messages": messages(image_uri), "max_tokens": 10**6}), 400, "max_tokens"),
        (dict(body={"messages": messages(image_uri), "model": "gpt-9"}), 404, "does not exist"),
        (dict(body={"messages": messages("https://example.com/page.png")}), 400, "remote image URLs are disabled"),
        (dict(body={"messages": messages("/etc/passwd")}), 400, "local file paths are disabled"),
        (dict(body={"messages": [{"role": "user", "content": "OCR:"}]}), 400, "image"),
    ]
    for kwargs, status, words in cases:
        response = _post(server, **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        error = response.json()["error"]
        assert words in error["message"] and error["type"], (words, error)
    ok = _post(server, {"messages": messages(image_uri), "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


@pytest.mark.slow
def test_malformed_requests_get_openai_errors_naming_the_param(server, test_images):
    uri = data_uri(test_images[0])
    json_body = {"content-type": "application/json"}

    def post(body: dict) -> dict:  # json.dumps escapes a lone surrogate as JSON's \udXXX, as clients send it
        return dict(content=json.dumps(body).encode(), headers=json_body)

    request = {"messages": messages(uri), "max_tokens": 2}
    chat = "/v1/chat/completions"
    cases = [
        ("POST", chat, post({"messages": messages(uri, "OCR: \ud800")}), 400, "lone UTF-16 surrogate", "messages"),
        ("POST", chat, dict(content=b"[" * 100_000 + b"]" * 100_000, headers=json_body), 400,
         "nested too deeply", None),
        ("POST", chat, dict(content=b'{"messages": "\xff"}', headers=json_body), 400, "not valid UTF-8", None),
        ("GET", chat, {}, 405, "method not allowed (GET /v1/chat/completions): use POST", None),
        ("GET", "/v2/nothing", {}, 404, "Invalid URL (GET /v2/nothing)", None),
        ("POST", chat, post({**request, "seed": -1}), 400, "greater than or equal to 0", "seed"),
        ("POST", chat, post({**request, "seed": 2**70}), 400, "less than or equal to 18446744073709551615", "seed"),
        ("POST", chat, post({**request, "stop": [""]}), 400, "stop strings must not be empty", "stop"),
        ("POST", chat, post({"messages": messages("gopher://example.com/1/page.png")}), 400,
         "unsupported image URL scheme 'gopher'", "image_url"),
    ]
    for method, path, kwargs, status, words, param in cases:
        response = httpx.request(method, server + path, timeout=60, **kwargs)
        assert response.status_code == status, (path, kwargs.get("content", b"")[:80], response.text)
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert words in error["message"] and error["param"] == param and error["type"], (words, error)
        assert httpx.get(server + "/health", timeout=10).status_code == 200  # still up
    assert _post(server, {**request, "seed": 2**64 - 1, "temperature": 1.0}).status_code == 200


@pytest.mark.slow
def test_api_key_queue_and_body_limits(guarded_server, test_images):
    uri = data_uri(test_images[0])
    assert _post(guarded_server, {"messages": messages(uri)}).status_code == 401
    for key in ("nope", "sesam", "sesamex", "sésame"):
        wrong = _post(guarded_server, {"messages": messages(uri)}, headers={"Authorization": f"Bearer {key}".encode()})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key", (key, wrong.text)
    client = openai_client(guarded_server, key="sesame")
    assert client.models.list().data
    big = _post(guarded_server, content=b"x" * (2 * 1024 * 1024),
                headers={"Authorization": "Bearer sesame", "content-type": "application/json"})
    assert big.status_code == 413

    # max-queue 1: of eight requests sent at once, those arriving while one is admitted get 503.
    headers = {"Authorization": "Bearer sesame"}
    body = {"messages": messages(uri), "max_tokens": 64}
    with ThreadPoolExecutor(8) as executor:
        answers = list(executor.map(lambda _: _post(guarded_server, body, headers=headers), range(8)))
    codes = sorted(a.status_code for a in answers)
    assert 200 in codes and 503 in codes and set(codes) <= {200, 503}, codes
    busy = next(a for a in answers if a.status_code == 503)
    assert busy.headers["retry-after"] and busy.json()["error"]["code"] == "overloaded"
    assert _post(guarded_server, {"messages": messages(uri), "max_tokens": 2}, headers=headers).status_code == 200


@pytest.mark.slow
def test_client_command(server, test_images, tmp_path, engine_f32):
    path = tmp_path / "page.png"
    test_images[0].save(path)
    [expected] = engine_f32.ocr([path], max_tokens=MAX)
    for extra in ([], ["--stream"]):
        result = subprocess.run([sys.executable, "-m", "ocrbatch", "client", "--image", str(path), "--url", server,
                                 "--max-tokens", str(MAX), *extra], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected.text + "\n"


@pytest.mark.slow
def test_stop_strings_and_seeded_sampling(server, test_images, engine_f32):
    image = test_images[0]
    [greedy] = engine_f32.ocr([image], max_tokens=MAX)
    stop = greedy.text[3:5]
    response = _post(server, {"messages": messages(data_uri(image)), "max_tokens": MAX, "stop": [stop]})
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == greedy.text[:greedy.text.find(stop)]
    hot = {"messages": messages(data_uri(image)), "max_tokens": MAX, "temperature": 1.5, "seed": 11}
    first, again = (_post(server, hot).json()["ocrbatch"]["token_ids"] for _ in range(2))
    assert first == again and first != greedy.token_ids


# -- inside a running server ---------------------------------------------------------------


@pytest.fixture
def watched(live, monkeypatch):
    """``live`` with end-of-sentence ignored, recording decodes submitted and cancelled and slots released."""
    seen = SimpleNamespace(submitted=[], cancelled=[], released=threading.Event(), first_token=threading.Event())
    monkeypatch.setattr(live.engine, "stop_ids", ())  # only max_tokens or a cancel ends a decode
    submit, cancel, release = live.pool.submit, live.pool.cancel, live.service.release

    def submitting(request):
        on_token = request.on_token

        def token(token_id):
            seen.first_token.set()
            if on_token is not None:
                on_token(token_id)

        request.on_token = token  # also for plain requests: tells the test their decode is running
        future = submit(request)
        seen.submitted.append(future)
        return future

    def cancelling(future):
        seen.cancelled.append(future)
        cancel(future)

    def releasing():
        release()
        seen.released.set()

    monkeypatch.setattr(live.pool, "submit", submitting)
    monkeypatch.setattr(live.pool, "cancel", cancelling)
    monkeypatch.setattr(live.service, "release", releasing)
    return seen


def ending(future) -> tuple[str, int]:
    """How a decode ended and how many tokens it made (one cancelled while queued made none)."""
    try:
        result = future.result(timeout=120)
    except CancelledError:
        return "cancelled", 0
    return result.finish_reason, len(result.token_ids)


def assert_slots_free(service):
    """All ``max_queue`` requests can be admitted: no path left a slot taken."""
    admitted = 0
    try:
        for _ in range(service.settings.max_queue):
            service.admit()  # ApiError 503 if a slot leaked
            admitted += 1
    finally:
        for _ in range(admitted):
            service.release()


def assert_cancelled_by_the_hang_up(seen, live):
    assert seen.released.wait(60), "the request's queue slot was never released"
    [future] = seen.submitted
    assert seen.cancelled == [future]
    reason, n_tokens = ending(future)
    assert reason == "cancelled" and n_tokens < LONG, (reason, n_tokens)
    assert live.pool.pending == 0
    assert_slots_free(live.service)


def stream_pieces(url: str, body: dict) -> list[str]:
    pieces = []
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: {"):
                pieces += [c["delta"].get("content") or "" for c in json.loads(line[6:])["choices"]]
    return pieces


@pytest.mark.slow
def test_streamed_pieces_join_to_the_answer_each_decoding_a_few_tokens(watched, live, test_images, monkeypatch):
    n_tokens = 150
    lengths = []
    decode = live.engine.prompts.decode
    monkeypatch.setattr(live.engine.prompts, "decode",
                        lambda ids, *args: lengths.append(len(ids)) or decode(ids, *args))
    body = {"messages": messages(data_uri(test_images[0])), "max_tokens": n_tokens}
    pieces = stream_pieces(live.url, body)
    streamed_lengths = list(lengths)
    whole = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=120).json()
    assert whole["usage"]["completion_tokens"] == n_tokens  # a long answer: end-of-sentence is ignored
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert len([p for p in pieces if p]) > n_tokens // 4  # piece by piece, not one lump at the end
    # Re-decoding the answer so far for every token would reach n_tokens here.
    assert max(streamed_lengths) <= 16, streamed_lengths


@pytest.mark.slow
def test_ignore_eos_generates_exactly_max_tokens_plain_and_streamed(live, test_images, monkeypatch):
    body = {"messages": messages(data_uri(test_images[0])), "max_tokens": MAX,
            "stream_options": {"include_usage": True}}
    first = _post(live.url, body).json()["ocrbatch"]["token_ids"][0]
    # The tiny model never samples its end of sentence this early: make its first token one.
    monkeypatch.setattr(live.engine, "stop_ids", (first,))
    stopped = _post(live.url, body).json()
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] <= 1
    forced = _post(live.url, {**body, "ignore_eos": True}).json()
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == MAX
    with httpx.stream("POST", live.url + "/v1/chat/completions", json={**body, "ignore_eos": True, "stream": True},
                      timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == MAX


@pytest.mark.slow
def test_skip_special_tokens_false_keeps_them_plain_and_streamed(live, test_images):
    # The tiny model's answer for this image holds special tokens within 48 tokens.
    body = {"messages": messages(data_uri(test_images[0])), "max_tokens": 48}
    prompts = live.engine.prompts
    skipped = _post(live.url, body).json()
    token_ids = skipped["ocrbatch"]["token_ids"]
    kept_text = prompts.decode(token_ids, keep_special_tokens=True)
    assert kept_text != prompts.decode(token_ids) == skipped["choices"][0]["message"]["content"]
    kept = _post(live.url, {**body, "skip_special_tokens": False}).json()
    assert kept["ocrbatch"]["token_ids"] == token_ids and kept["choices"][0]["message"]["content"] == kept_text
    with httpx.stream("POST", live.url + "/v1/chat/completions",
                      json={**body, "skip_special_tokens": False, "stream": True}, timeout=120) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == kept_text


@pytest.mark.slow
def test_a_repetition_guard_cuts_the_answer_where_the_batch_jobs_guard_would(live, test_images, monkeypatch):
    """``repetition_guard`` (sent by the remote backend for layout blocks) is applied as the local engine applies it."""
    from ocrbatch.model.repetition import LoopSettings, RepetitionGuard

    monkeypatch.setattr(live.engine, "stop_ids", ())  # only max_tokens, or the guard, ends an answer
    body = {"messages": messages(data_uri(test_images[0])), "max_tokens": LONG}
    free = _post(live.url, body).json()["ocrbatch"]["token_ids"]
    # Loose settings, so that the tiny model's noise holds a "loop" (any cycle of up to 64 tokens seen twice in a
    # row; the noise depends on the pool's prompt cache): where the guard cuts it, token by token.
    settings = {"max_period": 64, "min_repeats": 2, "min_tokens": 2}
    guard = RepetitionGuard(LoopSettings(**settings))
    cut = next((keep for token in free if (keep := guard.push(token)) is not None), None)
    assert cut is not None and cut < len(free), "the unguarded answer holds no loop for these settings"
    guarded = _post(live.url, {**body, "repetition_guard": settings}).json()
    assert guarded["choices"][0]["finish_reason"] == "repetition"
    assert guarded["ocrbatch"]["token_ids"] == free[:cut]
    bad = _post(live.url, {**body, "max_tokens": 2, "repetition_guard": {"min_repeats": 1}})
    assert bad.status_code == 400 and "repetition_guard" in bad.json()["error"]["message"]
    assert_slots_free(live.service)


@pytest.mark.slow
def test_mm_processor_kwargs_resize_bounds_are_honoured_and_checked(live, test_images):
    from ocrbatch.job.units import BLOCK_PIXEL_BOUNDS

    image = test_images[1]  # 40x30: the block minimum upscales it far past the processor's own minimum
    bounds = {"min_pixels": BLOCK_PIXEL_BOUNDS[0], "max_pixels": BLOCK_PIXEL_BOUNDS[1]}
    answer = _post(live.url, {"messages": messages(data_uri(image)), "max_tokens": MAX,
                              "mm_processor_kwargs": bounds}).json()
    engine = live.engine
    [expected] = engine.generate(engine.vision.encode([image], BLOCK_PIXEL_BOUNDS), ["OCR:"], MAX)
    assert answer["ocrbatch"]["token_ids"] == expected.token_ids
    assert answer["usage"]["prompt_tokens_details"]["image_tokens"] == expected.n_image_tokens
    assert expected.n_image_tokens > engine.vision.n_tokens_for(*image.size)

    uri = data_uri(image)
    cases = [({"size": {"shortest_edge": 1}}, "unsupported key(s) 'size'"),
             # Up to the spotting bound, the largest image the batch job sends.
             ({"min_pixels": "112896"}, "mm_processor_kwargs.min_pixels must be an integer from 784 to 1605632"),
             ({"min_pixels": True}, "must be an integer"),
             ({"min_pixels": 100}, "must be an integer"),
             ({"max_pixels": 10**9}, "mm_processor_kwargs.max_pixels must be an integer"),
             ({"min_pixels": 500000, "max_pixels": 200000}, "min_pixels (500000) exceeds max_pixels (200000)"),
             ([112896], "mm_processor_kwargs")]
    for kwargs, words in cases:
        response = _post(live.url, {"messages": messages(uri), "max_tokens": 2, "mm_processor_kwargs": kwargs})
        assert response.status_code == 400, (kwargs, response.text)
        assert words in response.json()["error"]["message"], (kwargs, response.text)
    assert_slots_free(live.service)


def test_detokenizer_pieces_join_to_the_full_decode(engine_f32):
    from ocrbatch.serve.app import Detokenizer, ordinary_token_ids

    prompts = engine_f32.prompts
    tokenizer = prompts.tokenizer
    vocab = tokenizer.get_vocab()
    ordinary = ordinary_token_ids(tokenizer)
    byte = [vocab[f"<0x{b:02X}>"] for b in range(256)]
    kinds = [sorted(ordinary), byte, byte, list(tokenizer.all_special_ids), [len(vocab) + 7]]
    rng = random.Random(0)
    word = tokenizer(" ok", add_special_tokens=False)["input_ids"]
    answers = [tokenizer("a é 世界 ok", add_special_tokens=False)["input_ids"],  # characters split over byte tokens
               [*word, vocab["<0xC3>"], vocab["<0xA9>"], vocab["<0xA9>"], *word],  # a valid run turned invalid
               [*word, vocab["<0xC3>"], tokenizer.all_special_ids[0], vocab["<0xA9>"], *word]]  # a run across a skip
    answers += [[rng.choice(rng.choice(kinds)) for _ in range(rng.randrange(1, 40))] for _ in range(400)]
    for ids in answers:
        text = Detokenizer(prompts.decode, ordinary)
        pieces = [text.push(token) for token in ids] + [text.flush()]
        assert "".join(pieces) == prompts.decode(ids), ids
        kept = Detokenizer(lambda window: prompts.decode(window, keep_special_tokens=True), ordinary)
        pieces = [kept.push(token) for token in ids] + [kept.flush()]
        assert "".join(pieces) == prompts.decode(ids, keep_special_tokens=True), ids


def test_stop_strings_are_found_across_pieces_and_never_leak():
    from ocrbatch.serve.app import StopScanner, _apply_stops

    scanner = StopScanner(["ab"])
    assert scanner.feed("xa") == ("x", False)  # "a" may start the stop string: held back
    assert scanner.feed("bc") == ("", True)
    scanner = StopScanner(["ab"])
    assert scanner.feed("xa") == ("x", False) and scanner.flush() == "a"
    # Generation meets "b" before "abc" is complete: both paths cut there.
    assert StopScanner(["abc", "b"]).feed("abc") == ("a", True)
    assert _apply_stops("abc", ["abc", "b"]) == ("a", True)


def http_post(body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: ocrbatch\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(payload)) + payload


@pytest.mark.slow
def test_client_hanging_up_on_a_plain_request_cancels_its_decode(watched, live, test_images):
    body = {"messages": messages(data_uri(test_images[0])), "max_tokens": LONG}
    with socket.create_connection(live.address) as client:
        client.sendall(http_post(body))
        assert watched.first_token.wait(120)  # decoding, with no answer before LONG tokens
    assert_cancelled_by_the_hang_up(watched, live)


@pytest.mark.slow
def test_client_hanging_up_mid_stream_cancels_its_decode(watched, live, test_images):
    body = {"messages": messages(data_uri(test_images[2])), "max_tokens": LONG, "stream": True}
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                break  # text is flowing: hang up
    assert_cancelled_by_the_hang_up(watched, live)


async def hang_up_before_the_body(app, body: bytes, spec_version: str) -> None:
    """Call ``app`` as a server whose client leaves before the response starts.

    Under ASGI spec 2.3 the server reports the disconnect and sending never completes; under
    2.4 sending fails. Either way the streaming body is never iterated.
    """
    requests = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return requests.pop() if requests else {"type": "http.disconnect"}

    async def send(message):
        if spec_version >= "2.4":
            raise OSError("connection lost")
        await asyncio.Event().wait()

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 80),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]}
    await app(scope, receive, send)


@pytest.mark.slow
@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_stream_that_never_starts_frees_its_slot_and_decode(watched, live, test_images, spec_version):
    from starlette.requests import ClientDisconnect

    from ocrbatch.serve.app import ServerSettings, create_app

    app = create_app(live.engine, live.pool, ServerSettings(model_name="tiny", max_queue=1, max_tokens_limit=LONG))
    body = json.dumps({"messages": messages(data_uri(test_images[0])), "max_tokens": LONG, "stream": True}).encode()

    async def scenario():
        try:
            await hang_up_before_the_body(app, body, spec_version)
        except ClientDisconnect:
            assert spec_version >= "2.4"
        # Token callbacks target this loop: let the decode end before the loop closes.
        await asyncio.to_thread(ending, watched.submitted[0])

    asyncio.run(scenario())
    [future] = watched.submitted
    assert watched.cancelled == [future] and ending(future)[0] == "cancelled"
    assert_slots_free(app.state.service)


@pytest.mark.slow
def test_a_failed_encode_frees_its_slot(live, test_images, monkeypatch):
    def out_of_memory(images):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(live.engine.vision, "encode", out_of_memory)
    body = {"messages": messages(data_uri(test_images[0])), "max_tokens": 2}
    for _ in range(live.service.settings.max_queue + 1):  # a leaked slot turns the last ones into 503s
        response = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
        assert response.status_code == 400 and "cannot be encoded" in response.json()["error"]["message"]
    assert_slots_free(live.service)



def test_prompt_cache_is_bounded(tiny_model):
    from ocrbatch.model.prompt import PROMPT_CACHE_SIZE, PromptBuilder
    from ocrbatch.model.weights import ModelWeights

    builder = PromptBuilder(tiny_model, ModelWeights.open(tiny_model).config.image_token_id, merge_size=2)
    for i in range(PROMPT_CACHE_SIZE + 50):  # distinct texts, as clients of the server may send
        builder.text_parts(f"client prompt {i}")
    assert builder.text_parts.cache_info().currsize == PROMPT_CACHE_SIZE
    assert builder.build("client prompt 1", (1, 4, 4)).n_image_tokens == 4
