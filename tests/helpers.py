"""Helpers shared by the tests."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

from ocrbatch.dev.samples import synthetic_page
from ocrbatch.job.options import JobOptions
from ocrbatch.records.sqlite import checkpoint_path_for
from ocrbatch.storage import ObjectPath

document_image = synthetic_page

# A decode this long is never waited for: with end-of-sentence ignored, only a cancel ends it in time.
LONG = 2000


def reference_generate(processor, model, image, text, max_new_tokens, images_kwargs=None):
    """transformers' greedy tokens for one image, or a list of images in one message (in order);
    ``images_kwargs`` as a model card passes them (size bounds)."""
    import torch

    images = image if isinstance(image, list) else [image]
    content = [{"type": "image", "image": each} for each in images] + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt",
        **({"images_kwargs": images_kwargs} if images_kwargs else {}),
    )
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    generated = out[0, inputs["input_ids"].shape[1]:].tolist()
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    if generated and generated[-1] in eos:
        generated = generated[:-1]
    return generated, inputs


def llama_cpp_source(folder):
    """The llama.cpp tree vendored in the pinned llama-cpp-python sdist (for its ``convert_hf_to_gguf.py``),
    downloaded into ``folder``; skips the calling test when the sdist cannot be downloaded."""
    import subprocess
    import sys

    import pytest

    download = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-binary", ":all:",
                               "--no-deps", "llama-cpp-python==0.3.36", "-d", str(folder)],
                              capture_output=True, text=True, timeout=900)
    if download.returncode != 0:
        pytest.skip(f"cannot download llama-cpp-python's sdist for its converter: {download.stderr[-500:]}")
    archive = next(folder.glob("llama_cpp_python-*.tar.gz"))
    subprocess.run(["tar", "xzf", str(archive), "-C", str(folder)], check=True)
    return next(folder.glob("llama_cpp_python-*/vendor/llama.cpp"))


def write_pdf(path, pages: int, width: float = 595, height: float = 842, text: str = "Page") -> None:
    """A text PDF with ``pages`` pages."""
    import pymupdf

    with pymupdf.open() as document:
        for number in range(1, pages + 1):
            page = document.new_page(width=width, height=height)
            page.insert_text((40, 60), f"{text} {number}", fontsize=18)
            page.insert_textbox(pymupdf.Rect(40, 90, width - 40, height - 40),
                                "The quick brown fox jumps over the lazy dog. " * 8, fontsize=11)
        document.save(path)


def write_encrypted_pdf(path) -> None:
    import pymupdf

    with pymupdf.open() as document:
        document.new_page().insert_text((40, 60), "secret", fontsize=18)
        document.save(path, encryption=pymupdf.PDF_ENCRYPT_AES_256, user_pw="user", owner_pw="owner")


def write_zero_page_pdf(path) -> None:
    """A well-formed PDF whose page tree is empty."""
    write_raw_pdf(path, [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"])


def write_raw_pdf(path, objects: list[bytes]) -> None:
    """A PDF of exactly these objects (numbered from 1, the first the catalog), with a correct xref table."""
    body, offsets = b"%PDF-1.4\n", []
    for number, obj in enumerate(objects, start=1):
        offsets.append(len(body))
        body += b"%d 0 obj\n" % number + obj + b"\nendobj\n"
    xref = len(body)
    body += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    body += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    body += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(body)


def write_png_claiming_size(path, width: int, height: int) -> None:
    """A small PNG whose header claims ``width`` x ``height`` (a decompression bomb's shape)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.new("L", (8, 8), 255).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8  # after the signature: length(4) type(4) data(13) crc(4)
    data[ihdr + 8:ihdr + 16] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr + 4:ihdr + 21])) & 0xFFFFFFFF
    data[ihdr + 21:ihdr + 25] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def good_documents(folder) -> dict[str, int]:
    """Write one document of each supported kind; returns name -> page count."""
    folder.mkdir(parents=True, exist_ok=True)
    write_pdf(folder / "two-pages.pdf", 2)
    (folder / "sub").mkdir(exist_ok=True)
    write_pdf(folder / "sub" / "one-page.pdf", 1, width=300, height=200, text="Small")
    document_image(320, 200, 1).save(folder / "scan.png")
    document_image(260, 300, 2).save(folder / "photo.jpg", quality=90)
    document_image(240, 180, 3).save(folder / "shot.webp")
    document_image(200, 150, 4).save(folder / "old.bmp")
    frames = [document_image(220, 160, 5), document_image(220, 160, 6)]
    frames[0].save(folder / "fax.tiff", save_all=True, append_images=frames[1:])
    return {"two-pages.pdf": 2, "sub/one-page.pdf": 1, "scan.png": 1, "photo.jpg": 1, "shot.webp": 1,
            "old.bmp": 1, "fax.tiff": 2}


def llama_workers(process) -> list:
    """The llama.cpp worker processes of a running job (psutil processes): each maps its GGUF,
    which the render process and others do not."""
    import psutil

    def holds_a_gguf(child) -> bool:
        try:
            return any(region.path.endswith(".gguf") for region in child.memory_maps())
        except psutil.Error:
            return False

    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return []
    return [child for child in children if holds_a_gguf(child)]


def settled_pdfs(folder, documents: int, pages: int):
    """``folder`` made with ``documents`` text PDFs of ``pages`` pages each (doc0.pdf, ...), settled."""
    folder.mkdir()
    for i in range(documents):
        write_pdf(folder / f"doc{i}.pdf", pages, text=f"Document {i}")
    settle(folder)
    return folder


def settle(folder, age_s: float = 3600) -> None:
    """Date every file under ``folder`` back by ``age_s``: written long ago, not still being written."""
    import os
    import time
    from pathlib import Path

    past = time.time() - age_s
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.utime(path, (past, past))


def write_lying_pdf(path, kids: int = 1, count: int = 3) -> None:
    """A PDF whose page tree says ``count`` pages but holds ``kids``: PyMuPDF reports ``count``
    and raises IndexError loading the others, as real files with a stale /Count do."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [" + b" ".join(b"%d 0 R" % (3 + i) for i in range(kids))
               + b"] /Count %d >>" % count]
    for i in range(kids):
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 200] /Contents %d 0 R /Resources "
                       b"<< /Font << /F1 << /Type /Font /Subtype /Type1 /BaseFont /Helvetica >> >> >> >>"
                       % (3 + kids + i))
    for i in range(kids):
        stream = b"BT /F1 18 Tf 30 100 Td (Page %d of a lying tree) Tj ET" % (i + 1)
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    write_raw_pdf(path, objects)


def job_options(model, paths, out, **settings) -> JobOptions:
    """A job's options as the tests run it (F32, no progress bar, files taken at once), ``settings`` on top."""
    def local_or_object(path):  # an ObjectPath (s3://...) stays one
        return path if isinstance(path, ObjectPath) else Path(path)

    base = dict(paths=[local_or_object(p) for p in paths], out=local_or_object(out), model=str(model), quant="F32",
                progress=False, min_file_age=0)
    return JobOptions(**{**base, **settings})


def run_cli(*args, timeout: float = 600, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    """``python -m ocrbatch ARGS`` in a child process (after ``prefix``, a command that runs it), its output kept."""
    return subprocess.run([*prefix, sys.executable, "-m", "ocrbatch", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def read_rows(path: Path) -> list[dict]:
    """The rows of a job's output file, read with pyarrow or json, not with the code under test."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines()]
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def free_port() -> int:
    """A loopback port nothing listens on (for a server a test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def page_states(out: Path) -> dict[str, int]:
    """Page counts by status in the job's checkpoint (read-only, safe while a run writes it)."""
    with sqlite3.connect(f"file:{checkpoint_path_for(out)}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT status, count(*) FROM pages GROUP BY status").fetchall())


def wait_for_ok_pages(out: Path, process: subprocess.Popen, at_least: int, deadline_s: float = 180) -> int:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and process.poll() is None:
        try:
            ok = page_states(out).get("ok", 0)
        except sqlite3.Error:
            ok = 0
        if ok >= at_least:
            return ok
        time.sleep(0.05)
    raise AssertionError(f"the run never finished {at_least} pages (exit code {process.poll()})")


def slow_run_args(tiny_model, folder, out, tokens=300):
    """Pages slow enough (forced long outputs, one at a time) that a signal lands mid-decode."""
    return ["run", folder, "--out", out, "--model", tiny_model, "--quant", "F32", "--max-tokens", str(tokens),
            "--ignore-eos", "--seqs-per-worker", "1", "--batch-size", "1", "--dpi", "72", "--layout", "none"]


def popen(args):
    return subprocess.Popen([sys.executable, "-m", "ocrbatch", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_http_server(command: list[str], port: int, log: Path, startup_s: float = 300, env: dict | None = None) -> subprocess.Popen:
    """Start a server process; return once ``GET /v1/models`` answers (polled: a process has no event for it)."""
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + startup_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not start within {startup_s} s: {log.read_text()[-2000:]}")


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
