"""``RemoteRecognizer``: retries, backpressure and closing against a fault-injecting
loopback server; then real servers: ``ocrbatch serve`` (text equals the local
engine at F32) and llama-cpp-python's own OpenAI server with a llama.cpp mmproj."""

from __future__ import annotations

import base64
import email.utils
import io
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import wait
from pathlib import Path

import pytest
from fault_server import Drop, FaultServer, Hold, Ok, Stall, Status
from helpers import document_image, free_port, llama_cpp_source, start_http_server, stop_process
from PIL import Image

from ocrbatch.backends.remote import DEFAULT_MODEL_PIXEL_BOUNDS, BackendUnavailable, RemoteRecognizer
from ocrbatch.errors import OcrbatchError

# Already the size PaddleOCR-VL's processor gives it (sides multiples of 28, at the current releases'
# minimum): the client sends it as it is, and the fault server's answer names that size.
IMAGE = document_image(336, 336, 0)
TIMEOUT_S = 0.5
SAMPLE_DOCS = Path(__file__).resolve().parents[2] / "sample_docs"


@pytest.fixture
def server():
    with FaultServer() as running:
        yield running


@pytest.fixture
def recognizer(server):
    """A factory: recognizers on ``server`` with quick timeouts and backoff, all closed afterwards."""
    made = []

    def make(**settings):
        options = dict(concurrency=2, timeout_s=TIMEOUT_S, max_attempts=4, backoff_initial_s=0.02,
                       backoff_max_s=0.1)
        made.append(RemoteRecognizer(settings.pop("url", server.url), **{**options, **settings}))
        return made[-1]

    yield make
    for each in made:
        each.close()


def gaps(server, prompt) -> list[float]:
    """Seconds between the server's arrivals of successive attempts for ``prompt``."""
    times = [seen.at for seen in server.requests_for(prompt)]
    return [later - earlier for earlier, later in zip(times, times[1:])]


# -- retries ----------------------------------------------------------------------------

def test_every_transient_failure_is_retried_until_the_page_completes(server, recognizer):
    faults = [Status(503, retry_after="0"), Status(429, retry_after="0"), Drop(), Stall(), Status(408),
              Status(502)]
    server.script("OCR:", *faults)
    remote = recognizer(max_attempts=len(faults) + 1)
    remote.check()
    result = remote.submit(IMAGE, "OCR:", 32).result(timeout=30)
    assert result.ok
    assert result.text == "OCR: 336x336"  # the fault server read the image back
    assert (result.n_output_tokens, result.n_image_tokens, result.finish_reason) == (7, 30, "stop")
    assert result.attempts == len(faults) + 1 == len(server.requests_for("OCR:"))
    assert result.elapsed_s >= TIMEOUT_S  # the stalled attempt was waited out, then retried


@pytest.mark.parametrize(("fault", "error"), [
    (Status(503, "model overloaded", retry_after="0"), "HTTP 503: model overloaded (gave up after 3 attempts)"),
    (Status(500, "CUDA error:\n  out of memory"), "HTTP 500: CUDA error: out of memory (gave up after 3 attempts)"),
    (Drop(), "connection failed: RemoteProtocolError: Server disconnected without sending a response. "
             "(gave up after 3 attempts)"),
    (Stall(), f"no answer within {TIMEOUT_S:g} s (ReadTimeout) (gave up after 3 attempts)"),
])
def test_a_page_that_keeps_failing_fails_with_the_reason_after_the_budget(server, recognizer, fault, error):
    server.script("OCR:", *[fault] * 5)
    remote = recognizer(max_attempts=3)
    remote.check()
    result = remote.submit(IMAGE, "OCR:", 32).result(timeout=30)
    assert result.error == error and result.text == "" and result.attempts == 3
    assert len(server.requests_for("OCR:")) == 3


@pytest.mark.parametrize("code", [400, 401, 404, 409, 413, 422])
def test_other_client_errors_are_not_retried(server, recognizer, code):
    server.script("OCR:", Status(code, "image is not a page"))
    remote = recognizer()
    remote.check()
    result = remote.submit(IMAGE, "OCR:", 32).result(timeout=30)
    assert result.error == f"HTTP {code}: image is not a page" and result.attempts == 1
    assert len(server.requests_for("OCR:")) == 1


def test_retry_after_is_honoured_in_seconds_and_as_a_date(server, recognizer):
    # backoff_initial_s is 0.02: a gap of a second or more can only come from Retry-After.
    server.script("seconds", Status(429, retry_after="1"))
    # Dated 3 s ahead, whole seconds, when scripted: 2-3 s less the time until the server answers.
    server.script("date", Status(503, retry_after=email.utils.formatdate(time.time() + 3, usegmt=True)))
    remote = recognizer()
    remote.check()
    futures = [remote.submit(IMAGE, prompt, 8) for prompt in ("seconds", "date")]
    assert all(f.result(timeout=30).error is None for f in futures)
    [seconds], [date] = gaps(server, "seconds"), gaps(server, "date")
    assert 1.0 <= seconds < 2.0
    assert 1.0 <= date < 3.5


def test_retry_after_is_capped(server, recognizer):
    server.script("OCR:", Status(503, retry_after="3600"))
    remote = recognizer(max_retry_after_s=0.5)
    remote.check()
    assert remote.submit(IMAGE, "OCR:", 8).result(timeout=30).error is None
    [gap] = gaps(server, "OCR:")
    assert 0.5 <= gap < 1.5


def test_backoff_without_retry_after_grows_exponentially(server, recognizer):
    server.script("OCR:", Status(503), Status(503), Status(503))
    remote = recognizer(backoff_initial_s=0.2, backoff_max_s=10)
    remote.check()
    assert remote.submit(IMAGE, "OCR:", 8).result(timeout=30).error is None
    waits = gaps(server, "OCR:")
    # Equal jitter: attempt n waits between half and all of 0.2 * 2**(n-1) (plus scheduling slack).
    for n, gap in enumerate(waits, start=1):
        base = 0.2 * 2 ** (n - 1)
        assert base / 2 <= gap < base + 0.5, (n, waits)


# -- check ------------------------------------------------------------------------------

def test_check_raises_when_the_server_is_unreachable(recognizer):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    remote = recognizer(url=f"http://127.0.0.1:{port}", max_attempts=2)
    with pytest.raises(BackendUnavailable, match=r"127\.0\.0\.1:\d+/v1: connection failed: ConnectError: .*"
                                                 r"\(gave up after 2 attempts\)"):
        remote.check()


def test_check_picks_the_first_model_or_refuses_an_unknown_one():
    with FaultServer(models=("first", "second")) as server:
        with RemoteRecognizer(server.url) as remote:
            assert remote.check() == "first" and remote.model == "first"
        with RemoteRecognizer(server.url, model="second") as remote:
            assert remote.check() == "second"
        with RemoteRecognizer(server.url, model="third") as remote:
            with pytest.raises(BackendUnavailable, match="model 'third' is not served here; "
                                                         "it serves 'first', 'second'"):
                remote.check()


def test_api_key_is_sent_and_a_refusal_is_reported():
    with FaultServer(api_key="sesame") as server:
        with RemoteRecognizer(server.url, max_attempts=3) as remote:
            with pytest.raises(BackendUnavailable, match="HTTP 401: invalid API key$"):  # not retried
                remote.check()
        with RemoteRecognizer(server.url, api_key="sesame") as remote:
            remote.check()
            assert remote.submit(IMAGE, "OCR:", 8).result(timeout=30).error is None


def test_request_is_one_image_and_the_prompt_greedy_and_usage_may_be_absent(server, recognizer):
    server.script("Table Recognition:", Ok(usage=False))
    remote = recognizer()
    remote.check()
    result = remote.submit(IMAGE, "Table Recognition:", 77).result(timeout=30)
    assert result.text == "Table Recognition: 336x336"
    assert result.n_output_tokens is None and result.n_image_tokens is None
    [seen] = server.requests_for("Table Recognition:")
    assert {k: seen.body[k] for k in ("model", "max_tokens", "temperature")} == {
        "model": "fault-model", "max_tokens": 77, "temperature": 0}
    [message] = seen.body["messages"]
    image, text = message["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,") and text["text"] == "Table Recognition:"


def sent_image(seen) -> Image.Image:
    """The image of a request the fault server saw, as sent (a PNG ``data:`` URL)."""
    url = seen.body["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_a_block_goes_resized_within_its_bounds_with_the_bounds(server, recognizer):
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        PaddleOCRVLImageProcessorPil,
    )

    from ocrbatch.job.units import BLOCK_PIXEL_BOUNDS

    remote = recognizer()
    remote.check()
    small = document_image(300, 120, 1)  # 36,000 pixels: below the block minimum, so upscaled
    block = remote.submit(small, "block", 8, pixel_bounds=BLOCK_PIXEL_BOUNDS).result(timeout=30)
    assert block.text == "block 532x224"
    [seen] = server.requests_for("block")
    assert seen.body["mm_processor_kwargs"] == {"min_pixels": 112896, "max_pixels": 1003520}
    assert "ignore_eos" not in seen.body
    # The pixels sent are those PaddleOCR-VL's processor encodes from the crop within the same bounds.
    processor = PaddleOCRVLImageProcessorPil(min_pixels=BLOCK_PIXEL_BOUNDS[0], max_pixels=BLOCK_PIXEL_BOUNDS[1])
    assert (processor(images=[sent_image(seen)], return_tensors="np")["pixel_values"]
            == processor(images=[small], return_tensors="np")["pixel_values"]).all()


@pytest.mark.parametrize(("reported", "bounds"), [
    ((12544, 451584), (12544, 451584)),  # ocrbatch serve with the tiny model
    (None, DEFAULT_MODEL_PIXEL_BOUNDS),  # a server that does not say (vLLM, llama-server)
    ((451584, 12544), DEFAULT_MODEL_PIXEL_BOUNDS),  # nonsense is not taken
])
def test_a_page_goes_resized_within_the_models_bounds_that_the_server_reports(reported, bounds):
    from transformers.models.paddleocr_vl.image_processing_pil_paddleocr_vl import (
        PaddleOCRVLImageProcessorPil,
    )

    page = document_image(900, 700, 2)  # 630,000 pixels: above the tiny model's maximum, within the releases'
    with FaultServer(pixel_bounds=reported) as server, RemoteRecognizer(server.url) as remote:
        remote.check()
        assert remote.model_pixel_bounds == bounds
        result = remote.submit(page, "page", 8).result(timeout=30)
    [seen] = server.requests_for("page")
    assert seen.body["mm_processor_kwargs"] == {"min_pixels": bounds[0], "max_pixels": bounds[1]}
    sent = sent_image(seen)
    assert result.text == f"page {sent.width}x{sent.height}" and sent.size != page.size
    # The server encodes what the model's own processor would encode from the page here.
    processor = PaddleOCRVLImageProcessorPil(min_pixels=bounds[0], max_pixels=bounds[1])
    assert (processor(images=[sent], return_tensors="np")["pixel_values"]
            == processor(images=[page], return_tensors="np")["pixel_values"]).all()


def test_ignore_eos_is_sent_only_when_asked(server, recognizer):
    remote = recognizer()
    remote.check()
    remote.submit(IMAGE, "forced", 8, ignore_eos=True).result(timeout=30)
    [seen] = server.requests_for("forced")
    assert seen.body["ignore_eos"] is True and seen.body["max_tokens"] == 8


# -- concurrency, backpressure, closing ----------------------------------------------------

def test_submit_blocks_while_concurrency_plus_queue_requests_are_unfinished(server, recognizer):
    remote = recognizer(concurrency=2, queue_size=1, timeout_s=30)  # held requests must not time out
    remote.check()
    for prompt in ("a", "b", "c", "d"):
        server.script(prompt, Hold())
    futures = [remote.submit(IMAGE, prompt, 8) for prompt in ("a", "b", "c")]
    assert server.wait_for(lambda s: s.in_flight == 2)
    fourth = []
    submitter = threading.Thread(target=lambda: fourth.append(remote.submit(IMAGE, "d", 8)))
    submitter.start()
    submitter.join(timeout=0.5)
    assert submitter.is_alive() and not fourth  # two sent, one queued: the fourth waits
    server.release_held()
    submitter.join(timeout=10)
    assert fourth
    results = [f.result(timeout=30) for f in futures + fourth]
    assert [r.text for r in results] == ["a 336x336", "b 336x336", "c 336x336", "d 336x336"]
    assert server.max_in_flight == 2


def test_close_resolves_or_cancels_every_future(server, recognizer):
    remote = recognizer(concurrency=2, queue_size=2, timeout_s=30)
    remote.check()
    server.script("backing off", Status(503, "busy", retry_after="30"))
    server.script("in flight", Hold())
    backing_off, in_flight = remote.submit(IMAGE, "backing off", 8), remote.submit(IMAGE, "in flight", 8)
    queued = [remote.submit(IMAGE, "queued", 8) for _ in range(2)]
    assert server.wait_for(lambda s: len(s.seen) == 2 and s.in_flight == 1)

    closer = threading.Thread(target=remote.close)
    closer.start()
    # The 30 s backoff is cut short; queued requests are never sent.
    done, _ = wait([backing_off, *queued], timeout=5)
    assert len(done) == 3 and all(f.cancelled() for f in queued)
    assert backing_off.result().error == ("HTTP 503: busy (stopped retrying after 1 attempt(s): "
                                          "the recognizer was closed)")
    assert closer.is_alive()  # still waiting for the attempt in flight
    server.release_held()
    closer.join(timeout=10)
    assert not closer.is_alive() and in_flight.result(timeout=0).text == "in flight 336x336"
    assert len(server.seen) == 2
    with pytest.raises(OcrbatchError, match="closed"):
        remote.submit(IMAGE, "late", 8)


# -- real servers --------------------------------------------------------------------------

MAX_TOKENS = 16



def sample_pages() -> list:
    """First pages of the sample documents, rendered as the batch job renders them (at a low dpi)."""
    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import iter_pages

    pages = []
    for path in sorted(SAMPLE_DOCS.iterdir()):
        [page] = iter_pages(Document(path, None), [1], dpi=50)
        assert page.error is None, page.error
        pages.append(page.image)
    return pages


@pytest.mark.slow
def test_ocrbatch_serve_gives_the_local_engines_text(tiny_model, engine_f32, test_images, tmp_path):
    port = free_port()
    process = start_http_server([sys.executable, "-m", "ocrbatch", "serve", "--model", str(tiny_model), "--quant", "F32",
                     "--port", str(port), "--max-tokens", str(MAX_TOKENS)], port, tmp_path / "serve.log")
    try:
        images = sample_pages() + test_images[:2]
        with RemoteRecognizer(f"http://127.0.0.1:{port}", concurrency=3, timeout_s=120) as remote:
            assert remote.check() == str(tiny_model)
            futures = [remote.submit(image, "OCR:", MAX_TOKENS) for image in images]
            results = [f.result(timeout=300) for f in futures]
    finally:
        stop_process(process)
    for image, result in zip(images, results):
        [expected] = engine_f32.ocr([image], max_tokens=MAX_TOKENS)
        assert result.error is None, result.error
        assert result.text == expected.text
        assert result.n_output_tokens == len(expected.token_ids)
        assert result.n_image_tokens == expected.n_image_tokens
        assert result.finish_reason == expected.finish_reason


# The converter's tensor-name table covers as many projector layers as the model has vision
# blocks; the tiny model's 2 blocks leave out its projector's third layer (mlp_AR.linear_2).
# Widening the table changes no tensor.
CONVERTER = """
import runpy, sys
import gguf
table = gguf.get_tensor_name_map
gguf.get_tensor_name_map = lambda arch, n_blocks: table(arch, max(n_blocks, 4))
script = sys.argv.pop(1)
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


def build_mmproj(model_folder: Path, work: Path) -> Path:
    """The vision tower as a llama.cpp mmproj GGUF, made by llama.cpp's own converter from the pinned sdist."""
    sdist = work / "sdist"
    sdist.mkdir()
    root = llama_cpp_source(sdist)
    target = work / "mmproj.gguf"
    converted = subprocess.run(
        [sys.executable, "-c", CONVERTER, str(root / "convert_hf_to_gguf.py"), str(model_folder), "--mmproj",
         "--outtype", "f32", "--outfile", str(target)],
        capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)])})
    assert converted.returncode == 0, converted.stderr[-3000:]
    return target


def llama_cpp_server_env() -> dict:
    """llama-cpp-python's own server looks for llama.cpp's CPU backend module beside the Python
    executable only; with ocrbatch's build (modules beside libllama.so) it is named for it."""
    from ocrbatch.machine.llama_runtime import best_cpu_module

    module = best_cpu_module()
    return {**os.environ, **({"GGML_BACKEND_PATH": str(module)} if module else {})}


@pytest.mark.slow
def test_smoke_against_llama_cpp_pythons_own_server(tmp_path):
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]")
    from ocrbatch.dev.model import make_model
    from ocrbatch.model.gguf import convert

    # The official layout: llama.cpp's converter reads its vision tower (PaddleOCRVisionModel).
    model_folder = make_model(tmp_path / "tiny-official", size="tiny", seed=0, version="1.0", layout="official")
    mmproj = build_mmproj(model_folder, tmp_path)
    port = free_port()
    process = start_http_server([sys.executable, "-m", "llama_cpp.server", "--model", str(convert(model_folder, "F32")),
                     "--clip_model_path", str(mmproj), "--chat_format", "mtmd", "--n_ctx", "4096",
                     "--host", "127.0.0.1", "--port", str(port), "--model_alias", "paddleocr-vl-tiny"],
                    port, tmp_path / "llama-server.log", env=llama_cpp_server_env())
    try:
        with RemoteRecognizer(f"http://127.0.0.1:{port}/v1", concurrency=2, timeout_s=120) as remote:
            assert remote.check() == "paddleocr-vl-tiny"
            # Different sizes: llama-cpp-python's prompt cache keys on tokens, not on the image.
            images = [document_image(300, 200, 1), document_image(180, 260, 2)]
            results = [remote.submit(image, "OCR:", MAX_TOKENS).result(timeout=300) for image in images]
    finally:
        stop_process(process)
    for result in results:
        assert result.error is None, result.error
        assert result.text.strip() and result.finish_reason in ("stop", "length")
        assert 0 < result.n_output_tokens <= MAX_TOKENS
        assert (result.n_output_tokens == MAX_TOKENS) == (result.finish_reason == "length")
        assert result.n_image_tokens is None  # llama-cpp-python's usage has no image count
    assert results[0].text != results[1].text  # the image reached the model


def test_the_remote_decoder_sends_each_units_loop_guard_as_the_local_engine_applies_it(server, recognizer):
    from ocrbatch.backends.remote import RemoteDecoder
    from ocrbatch.job.units import BLOCK_PIXEL_BOUNDS, Unit
    from ocrbatch.layout.blocks import Block
    from ocrbatch.model.repetition import PROSE, TABLE

    remote = recognizer()
    remote.check()
    table = Unit(Block(0, "table", 0.9, 0, 0, 300, 120), document_image(300, 120, 1), "Table Recognition:",
                 BLOCK_PIXEL_BOUNDS)
    text = Unit(Block(1, "text", 0.9, 0, 0, 300, 120), document_image(300, 120, 2), "OCR:", BLOCK_PIXEL_BOUNDS)
    page = Unit(None, IMAGE, "Spotting:", None)
    assert (table.loop_guard, text.loop_guard, page.loop_guard) == (TABLE, PROSE, None)
    decoder = RemoteDecoder(remote, max_tokens=8)
    results = [decoder.submit(unit).result(timeout=30) for unit in (table, text, page)]
    assert all(result.error is None for result in results)
    assert results[2].text.startswith("Spotting:")  # the Decoded of the server's answer, as the page flow reads it
    sent = {prompt: server.requests_for(prompt)[0].body for prompt in ("Table Recognition:", "OCR:", "Spotting:")}
    assert sent["Table Recognition:"]["repetition_guard"] == {"max_period": 256, "min_repeats": 8, "min_tokens": 1500}
    assert sent["OCR:"]["repetition_guard"] == {"max_period": 128, "min_repeats": 5, "min_tokens": 200}
    assert "repetition_guard" not in sent["Spotting:"]  # a whole page decodes as the model alone would
    assert sent["Spotting:"]["skip_special_tokens"] is False
    RemoteDecoder(remote, max_tokens=8, ignore_eos=True).submit(text).result(timeout=30)
    assert "repetition_guard" not in server.requests_for("OCR:")[1].body  # only max_tokens ends a forced answer
