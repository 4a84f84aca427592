"""``ocrbatch serve``: a real server on a loopback port, driven by the openai SDK and httpx."""

import base64
import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import document_image, write_png_claiming_size

MAX = 16


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
def test_client_disconnecting_mid_stream_is_cleaned_up(server, test_images):
    body = {"messages": messages(data_uri(test_images[2])), "max_tokens": 4000, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=60) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index > 3:
                break  # hang up
    deadline = time.monotonic() + 30
    while httpx.get(server + "/health").json()["queued"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert httpx.get(server + "/health").json()["queued"] == 0  # the sequence was cancelled
    ok = _post(server, {"messages": messages(data_uri(test_images[0])), "max_tokens": 2})
    assert ok.status_code == 200


@pytest.mark.slow
def test_api_key_queue_and_body_limits(guarded_server, test_images):
    uri = data_uri(test_images[0])
    assert _post(guarded_server, {"messages": messages(uri)}).status_code == 401
    wrong = _post(guarded_server, {"messages": messages(uri)}, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
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
