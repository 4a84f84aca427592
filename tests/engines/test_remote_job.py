"""``ocrbatch run --backend openai``: the batch job in front of an OpenAI-compatible server."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import (
    document_image,
    free_port,
    page_states,
    settle,
    start_http_server,
    stop_process,
    wait_for_ok_pages,
    write_pdf,
)
from scanned_article import write_scanned_article

SAMPLE_DOCS = Path(__file__).parents[2] / "sample_docs"
MAX_TOKENS = 24


def rows_of(out: Path) -> dict:
    return {(Path(r["path"]).name, r["page"]): r for r in map(json.loads, out.read_text().splitlines())}


def ocrbatch(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ocrbatch", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    process = start_http_server([sys.executable, "-m", "ocrbatch", "serve", "--model", str(tiny_model), "--quant", "F32",
                     "--port", str(port), "--max-tokens", str(MAX_TOKENS), "--seqs-per-worker", "2"], port, log)
    yield f"http://127.0.0.1:{port}/v1"
    stop_process(process)


def local_and_remote_rows(tiny_model, served, tmp_path, layout: str, docs: Path = SAMPLE_DOCS,
                          dpi: int = 50) -> tuple[dict, dict]:
    """The rows of ``docs`` from the local engine at F32 and from the tiny model's server."""
    common = ["--max-tokens", MAX_TOKENS, "--dpi", dpi, "--min-file-age", "0", "--layout", layout]
    local = ocrbatch("run", docs, "--out", tmp_path / "local.jsonl", "--model", tiny_model, "--quant", "F32",
                     *common)
    assert local.returncode == 0, local.stderr
    remote = ocrbatch("run", docs, "--out", tmp_path / "remote.jsonl", "--backend", "openai", "--base-url",
                      served, "--concurrency", "2", *common)
    assert remote.returncode == 0, remote.stderr
    local_rows, remote_rows = rows_of(tmp_path / "local.jsonl"), rows_of(tmp_path / "remote.jsonl")
    assert local_rows.keys() == remote_rows.keys()
    return local_rows, remote_rows


@pytest.mark.slow
def test_remote_backend_gives_the_local_engines_text(tiny_model, served, tmp_path):
    # Whole pages above the tiny model's maximum (451,584 pixels) and one below its minimum: at 110 dpi
    # the A4 and Letter pages and the large image are above 1,003,520 pixels, the current releases'
    # maximum, the purchase order between the two.
    docs = tmp_path / "docs"
    shutil.copytree(SAMPLE_DOCS, docs)
    write_scanned_article(docs / "scanned-article.pdf")
    document_image(1400, 1000, 5).save(docs / "large.png")
    document_image(60, 40, 6).save(docs / "small.jpg")
    settle(docs)
    local_rows, remote_rows = local_and_remote_rows(tiny_model, served, tmp_path, "none", docs, dpi=110)
    assert len(local_rows) == 10
    for key, row in remote_rows.items():
        assert row["status"] == "ok" and row["text"] == local_rows[key]["text"], key
        assert (row["width"], row["height"]) == (local_rows[key]["width"], local_rows[key]["height"]), key
        assert row["n_output_tokens"] == local_rows[key]["n_output_tokens"]
        assert row["n_image_tokens"] == local_rows[key]["n_image_tokens"]
        assert row["model"] == str(tiny_model) and row["quant"] == "remote" and row["vision_s"] is None


@pytest.mark.slow
def test_remote_backend_gives_the_local_engines_layout_text_and_blocks(tiny_model, served, tmp_path):
    from transformers import AutoImageProcessor

    from ocrbatch.layout.blocks import BLOCK_MIN_PIXELS

    # Block crops are resized within the block bounds on both sides: by the encoder here, by the client there.
    local_rows, remote_rows = local_and_remote_rows(tiny_model, served, tmp_path, "cdla")
    assert len(local_rows) == 7

    def blocks(row):
        return [(b["order"], b["label"], b["prompt"], b["text"], b["n_image_tokens"], b["n_output_tokens"],
                 b["finish_reason"]) for b in row["blocks"]]

    for key, row in remote_rows.items():
        assert row["status"] == "ok" and row["text"] == local_rows[key]["text"], key
        # image tokens too: the server's usage, block by block and summed, equals the local encoder's count
        assert blocks(row) == blocks(local_rows[key]), key
        assert row["n_image_tokens"] == local_rows[key]["n_image_tokens"], key
    # The comparison means something only for crops that the block bounds resize differently from a
    # server's own bounds: small ones, below the block minimum (so also below PaddleOCR-VL's default
    # min_pixels, 147,456), which the local engine upscales and the tiny server, left to its own
    # bounds, would encode with fewer tokens.
    processor = AutoImageProcessor.from_pretrained(tiny_model)
    upscaled = [block for row in local_rows.values() for block in row["blocks"] if block["prompt"]
                and (block["x1"] - block["x0"]) * (block["y1"] - block["y0"]) < BLOCK_MIN_PIXELS < 147456
                and block["n_image_tokens"] * 4 > processor.get_number_of_image_patches(
                    math.ceil(block["y1"] - block["y0"]), math.ceil(block["x1"] - block["x0"]))]
    assert upscaled


@pytest.mark.slow
def test_ignore_eos_reaches_the_server_and_every_page_is_max_tokens_long(live, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(live.engine, "stop_ids", range(2**31))  # every token ends the answer, unless ignored
    common = ["--base-url", live.url, "--backend", "openai", "--concurrency", live.service.settings.max_queue,
              "--max-tokens", MAX_TOKENS, "--dpi", "50", "--min-file-age", "0", "--layout", "none"]
    for name, extra, tokens, reason in (("stopped", [], 0, "stop"), ("forced", ["--ignore-eos"], MAX_TOKENS, "length")):
        result = ocrbatch("run", SAMPLE_DOCS, "--out", tmp_path / f"{name}.jsonl", *common, *extra)
        assert result.returncode == 0, result.stderr
        rows = rows_of(tmp_path / f"{name}.jsonl").values()
        assert len(rows) == 7
        assert all(row["n_output_tokens"] == tokens and row["finish_reason"] == reason for row in rows), name


def test_an_unreachable_server_is_fatal_before_any_page_is_marked(tmp_path):
    out = tmp_path / "out.jsonl"
    result = ocrbatch("run", SAMPLE_DOCS, "--out", out, "--backend", "openai", "--base-url",
                      f"http://127.0.0.1:{free_port()}/v1", "--min-file-age", "0", timeout=120)
    assert result.returncode == 3, result.stderr
    assert "Error: http://127.0.0.1:" in result.stderr and "connection failed" in result.stderr
    assert not out.exists()
    with __import__("sqlite3").connect(out.with_name(out.name + ".ocrbatch.db")) as db:
        assert db.execute("SELECT count(*) FROM pages").fetchone() == (0,)


def test_a_checkpoint_cannot_mix_backends(tiny_model, tmp_path):
    from ocrbatch.records.sqlite import Store, checkpoint_path_for

    out = tmp_path / "out.jsonl"
    store = Store(checkpoint_path_for(out))
    store.check_settings({"task": "ocr", "model": str(tiny_model), "quant": "F32", "max_tokens": "24",
                          "backend": "local", "prompt": "OCR:"})
    with pytest.raises(Exception, match="backend=local, not openai"):
        store.check_settings({"backend": "openai"})


@pytest.mark.slow
def test_kill_9_of_the_client_mid_run_then_every_page_exactly_once(served, tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for i in range(5):
        write_pdf(folder / f"doc{i}.pdf", 3, text=f"Document {i}")
    settle(folder)
    out = tmp_path / "out.jsonl"
    args = ["run", folder, "--out", out, "--backend", "openai", "--base-url", served, "--concurrency", "1",
            "--max-tokens", MAX_TOKENS, "--dpi", "72", "--layout", "none"]
    process = subprocess.Popen([sys.executable, "-m", "ocrbatch", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_for_ok_pages(out, process, at_least=2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    states = page_states(out)
    assert states.get("ok", 0) >= 2 and states.get("pending", 0) > 0  # the kill landed mid-run
    time.sleep(0.5)
    final = ocrbatch(*args)
    assert final.returncode == 0, final.stderr
    keys = [(Path(r["path"]).name, r["page"]) for r in map(json.loads, out.read_text().splitlines())]
    assert len(keys) == len(set(keys)) == 15
