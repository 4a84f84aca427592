"""``ocrbatch run`` with inputs and outputs in object storage: a real S3 API (moto's server) on loopback.

The job runs as a subprocess with ``--storage-option endpoint_url=...`` against
the server started here, and ``--backend openai`` against the scriptable stub
in :mod:`fault_server`, whose answer is the prompt and the size of the image it
got: the rows say that each page was rendered from the object's bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from fault_server import FaultServer, Hold, Ok
from helpers import document_image, settle, write_pdf
from video_fixtures import write_slides_video

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

COMMON = ["--backend", "openai", "--concurrency", "1", "--max-tokens", "16", "--dpi", "50", "--layout", "none"]
COMPARED = ("text", "status", "page_count", "width", "height", "doc_id", "timestamp_s")


@pytest.fixture(scope="module")
def s3():
    """``(endpoint_url, filesystem)`` of a moto S3 server on loopback, with dummy credentials."""
    with pytest.MonkeyPatch.context() as patch:
        # Subprocesses inherit these: s3fs finds credentials where it always does.
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        yield endpoint, s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        server.stop()


@pytest.fixture
def counted_s3(s3):
    """``(endpoint_url, served)``: a second endpoint on the same moto backends that counts, in ``served``,
    the body bytes its GETs send for each ``/bucket/key``: a whole-object download is the object's size."""
    import collections
    import threading

    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app, served, lock = DomainDispatcherApplication(create_backend_app), collections.Counter(), threading.Lock()

    def counting(environ, start_response):
        body = app(environ, start_response)
        if environ["REQUEST_METHOD"] != "GET":
            return body
        try:
            chunks = list(body)
        finally:
            getattr(body, "close", lambda: None)()
        with lock:
            served[environ["PATH_INFO"]] += sum(map(len, chunks))
        return chunks

    server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", served
    server.shutdown()
    thread.join()


@pytest.fixture(scope="module")
def stub():
    with FaultServer() as server:
        yield server


def ocrbatch(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "ocrbatch", "run", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


def backdate(bucket: str, key: str, age_s: float = 3600) -> None:
    """Make an object in the moto server look uploaded ``age_s`` ago (S3 cannot be told a time)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    stored = s3_backends[DEFAULT_ACCOUNT_ID]["global"].buckets[bucket].keys[key]
    stored.last_modified -= timedelta(seconds=age_s)


def make_inbox(folder: Path) -> Path:
    """PDFs and images in nested folders, a copy of one PDF, and a file to exclude."""
    (folder / "scans" / "deep").mkdir(parents=True)
    write_pdf(folder / "report.pdf", 3, text="Report")
    write_pdf(folder / "scans" / "letter.pdf", 2, width=612, height=792, text="Letter")
    shutil.copy(folder / "report.pdf", folder / "scans" / "report copy.pdf")
    document_image(620, 240, 1).save(folder / "scans" / "receipt.png")
    document_image(260, 700, 2).save(folder / "scans" / "deep" / "note.jpg")
    write_pdf(folder / "scans" / "draft.pdf", 1, text="Draft")  # excluded
    write_slides_video(folder / "talk.mp4", [1.5, 1.5])  # two slides: two pages
    settle(folder)
    return folder


def upload_tree(fs, folder: Path, prefix: str, bucket: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            key = f"{prefix}/{path.relative_to(folder).as_posix()}"
            fs.put_file(str(path), f"{bucket}/{key}")
            backdate(bucket, key)


def rows_by_relative_path(rows: list[dict], root: str) -> dict:
    keyed = {}
    for row in rows:
        assert row["path"].startswith(root), row["path"]
        key = (row["path"][len(root):].lstrip("/"), row["page"])
        assert key not in keyed, f"{key} twice"
        keyed[key] = {column: row[column] for column in COMPARED}
    return keyed


def bucket_rows(fs, key: str) -> list[dict]:
    fs.invalidate_cache()
    with fs.open(key, "rb") as handle:
        return pq.read_table(io.BytesIO(handle.read())).to_pylist()


def checkpoint_states(checkpoint: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{checkpoint}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT status, count(*) FROM pages GROUP BY status").fetchall())


def test_a_bucket_inbox_into_a_bucket_dataset_equals_the_same_job_on_local_folders(s3, stub, tmp_path):
    endpoint, fs = s3
    fs.mkdir("equal")
    inbox = make_inbox(tmp_path / "inbox")
    upload_tree(fs, inbox, "inbox", "equal")
    options = ["--base-url", stub.url, "--exclude", "draft*", "--min-file-age", "60", *COMMON]

    local = ocrbatch(inbox, "--out", tmp_path / "local.jsonl", *options)
    assert local.returncode == 0, local.stderr
    local_rows = rows_by_relative_path([json.loads(line) for line in (tmp_path / "local.jsonl").open()],
                                       str(inbox))
    requests_before = len(stub.seen)
    remote = ocrbatch("s3://equal/inbox", "--out", "s3://equal/results/", "--storage-option",
                      f"endpoint_url={endpoint}", *options)
    assert remote.returncode == 0, remote.stderr
    remote_rows = rows_by_relative_path(bucket_rows(fs, "equal/results/pages.parquet"), "s3://equal/inbox")

    # 3 + 2 pages of PDFs, 2 images, 2 slides of a video; the copy is processed once under its first
    # path, the draft excluded.
    assert sorted(local_rows) == [("report.pdf", 1), ("report.pdf", 2), ("report.pdf", 3),
                                  ("scans/deep/note.jpg", 1), ("scans/letter.pdf", 1), ("scans/letter.pdf", 2),
                                  ("scans/receipt.png", 1), ("talk.mp4", 1), ("talk.mp4", 2)]
    assert remote_rows == local_rows
    # The stub answers with the size of the image it got: each object was rendered, at its own size.
    receipt, note = remote_rows[("scans/receipt.png", 1)]["text"], remote_rows[("scans/deep/note.jpg", 1)]["text"]
    assert receipt.startswith("OCR: ") and note.startswith("OCR: ") and receipt != note
    assert len(stub.seen) - requests_before == 9
    assert "same content as s3://equal/inbox/report.pdf" in remote.stderr
    # The checkpoint stays on this machine, where the log says, keyed by the output's URL.
    from ocrbatch.storage import ObjectPath, local_state_folder

    output = ObjectPath.of("s3://equal/results/pages.parquet", {"endpoint_url": endpoint})
    checkpoint = local_state_folder(output) / "pages.parquet.ocrbatch.db"
    assert f"the checkpoint is kept on this machine in {checkpoint}" in remote.stderr
    assert checkpoint_states(checkpoint) == {"ok": 9}
    assert not fs.exists("equal/results/pages.parquet.ocrbatch.db")

    # A moved object keeps its rows under its new path, without being read by the model again.
    fs.mv("equal/inbox/scans/receipt.png", "equal/inbox/receipt-moved.png")
    backdate("equal", "inbox/receipt-moved.png")
    again = ocrbatch("s3://equal/inbox", "--out", "s3://equal/results/", "--storage-option",
                     f"endpoint_url={endpoint}", *options)
    assert again.returncode == 0, again.stderr
    moved = rows_by_relative_path(bucket_rows(fs, "equal/results/pages.parquet"), "s3://equal/inbox")
    assert len(stub.seen) - requests_before == 9
    assert moved[("receipt-moved.png", 1)] == remote_rows[("scans/receipt.png", 1)]
    assert ("scans/receipt.png", 1) not in moved and len(moved) == 9


def test_an_object_still_being_uploaded_is_deferred(s3, stub, tmp_path):
    endpoint, fs = s3
    fs.mkdir("young")
    folder = tmp_path / "inbox"
    folder.mkdir()
    write_pdf(folder / "old.pdf", 1)
    write_pdf(folder / "new.pdf", 2)
    fs.put_file(str(folder / "old.pdf"), "young/inbox/old.pdf")
    backdate("young", "inbox/old.pdf")
    fs.put_file(str(folder / "new.pdf"), "young/inbox/new.pdf")  # modified just now
    out = tmp_path / "out.jsonl"
    args = ["s3://young/inbox", "--out", out, "--storage-option", f"endpoint_url={endpoint}",
            "--base-url", stub.url, "--min-file-age", "60", *COMMON]

    first = ocrbatch(*args)
    assert first.returncode == 0, first.stderr
    assert "s3://young/inbox/new.pdf: modified" in first.stderr and "left for a later run" in first.stderr
    assert "1 files still being written" in first.stderr
    assert [(row["path"], row["page"]) for row in map(json.loads, out.open())] == [("s3://young/inbox/old.pdf", 1)]

    backdate("young", "inbox/new.pdf")  # the upload has settled
    second = ocrbatch(*args)
    assert second.returncode == 0, second.stderr
    assert sorted((row["path"], row["page"]) for row in map(json.loads, out.open())) == [
        ("s3://young/inbox/new.pdf", 1), ("s3://young/inbox/new.pdf", 2), ("s3://young/inbox/old.pdf", 1)]


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("where", ["input", "output", "refused"])
def test_a_bucket_that_does_not_exist_or_refuses_access_is_fatal_before_any_page_is_marked(
        s3, stub, tmp_path, monkeypatch, where, dry_run):
    endpoint, fs = s3
    present = f"present-{where}-dry" if dry_run else f"present-{where}"
    fs.mkdir(present)
    folder = tmp_path / "inbox"
    folder.mkdir()
    write_pdf(folder / "a.pdf", 1)
    fs.put_file(str(folder / "a.pdf"), f"{present}/inbox/a.pdf")
    backdate(present, "inbox/a.pdf")
    inbox = "s3://no-such-inbox/docs" if where == "input" else f"s3://{present}/inbox"
    out = "s3://no-such-results/out.jsonl" if where == "output" else tmp_path / "out.jsonl"
    if where == "refused":
        import moto.settings

        # The server checks signatures from now on, and knows no user with the dummy keys: 403.
        monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    checkpoint = tmp_path / "job.db"
    requests_before = len(stub.seen)
    result = ocrbatch(inbox, "--out", out, "--checkpoint", checkpoint, "--storage-option",
                      f"endpoint_url={endpoint}", "--base-url", stub.url, "--min-file-age", "0", *COMMON,
                      *(["--dry-run"] if dry_run else []))
    assert result.returncode == 3, result.stderr  # a dry run says what the run would: fatal, not a failed page
    assert result.stdout == ""  # nothing listed as to be done
    expected = {"input": "bucket 'no-such-inbox': no such bucket", "output": "bucket 'no-such-results': no such bucket",
                "refused": f"bucket '{present}': access refused"}[where]
    assert expected in result.stderr
    assert len(stub.seen) == requests_before
    assert not checkpoint.exists() or checkpoint_states(checkpoint) == {}
    assert where == "output" or not (tmp_path / "out.jsonl").exists()


def test_an_fsspec_protocol_without_its_package_names_the_package(tmp_path):
    pytest.importorskip("fsspec")
    if __import__("importlib").util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    result = ocrbatch("gs://some-bucket/inbox", "--out", tmp_path / "out.jsonl", "--base-url",
                      "http://127.0.0.1:9/v1", *COMMON)
    assert result.returncode == 3, result.stderr
    assert "gs://some-bucket/inbox: Please install gcsfs" in result.stderr


def test_a_bad_storage_option_is_a_bad_command_line(tmp_path):
    result = ocrbatch("s3://b/inbox", "--out", tmp_path / "out.jsonl", "--storage-option", "endpoint_url",
                      "--base-url", "http://127.0.0.1:9/v1", *COMMON)
    assert result.returncode == 2
    assert "'endpoint_url': expected KEY=VALUE" in result.stderr


def test_parse_storage_options():
    from ocrbatch.storage import parse_storage_options

    assert parse_storage_options(["anon=true", "use_ssl=False", "max_concurrency=8", "endpoint_url=http://h:1",
                                  "key=a=b"]) == {"anon": True, "use_ssl": False, "max_concurrency": 8,
                                                  "endpoint_url": "http://h:1", "key": "a=b"}


def test_kill_9_mid_run_then_every_page_exactly_once_in_the_bucket(s3, stub, tmp_path):
    endpoint, fs = s3
    fs.mkdir("killed")
    folder = tmp_path / "inbox"
    folder.mkdir()
    for i in range(4):
        write_pdf(folder / f"doc{i}.pdf", 2, text=f"Document {i}")
    upload_tree(fs, folder, "inbox", "killed")
    checkpoint = tmp_path / "job.db"
    args = ["s3://killed/inbox", "--out", "s3://killed/results.parquet", "--checkpoint", checkpoint,
            "--storage-option", f"endpoint_url={endpoint}", "--base-url", stub.url, "--min-file-age", "60",
            *COMMON]
    # Two pages answered, then the third held: the kill lands while the run is in its middle.
    stub.script("OCR:", Ok(), Ok(), Hold())
    process = subprocess.Popen([sys.executable, "-m", "ocrbatch", "run", *map(str, args)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if checkpoint_states(checkpoint).get("ok", 0) >= 2 and stub.in_flight:
                    break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before the kill"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        stub.release_held()
    states = checkpoint_states(checkpoint)
    assert states.get("ok") == 2 and states.get("pending", 0) == 6  # the kill landed mid-run
    assert not fs.exists("killed/results.parquet")  # uploaded whole at the end of a run, never in part

    final = ocrbatch(*args)
    assert final.returncode == 0, final.stderr
    keys = [(row["path"], row["page"]) for row in bucket_rows(fs, "killed/results.parquet")]
    assert sorted(keys) == [(f"s3://killed/inbox/doc{i}.pdf", page) for i in range(4) for page in (1, 2)]
    assert not list(Path(os.environ["OCRBATCH_CACHE_DIR"]).glob("outputs/*/.results.parquet.*.partial"))


def test_an_object_outputs_checkpoint_is_local_keyed_by_url_and_store_not_credentials(tmp_path, monkeypatch):
    from ocrbatch.job.options import JobOptions
    from ocrbatch.storage import ObjectPath

    monkeypatch.setenv("OCRBATCH_CACHE_DIR", str(tmp_path))

    def checkpoint(url, **options):
        return JobOptions(paths=[], out=ObjectPath.of(url, options)).checkpoint_path

    here = checkpoint("s3://b/out.parquet", endpoint_url="http://a:1", key="old")
    assert here.parent.parent == tmp_path / "outputs" and here.name == "out.parquet.ocrbatch.db"
    assert checkpoint("s3://b/out.parquet", endpoint_url="http://a:1", key="rotated") == here
    assert checkpoint("s3://b/out.parquet", endpoint_url="http://other:1") != here
    assert checkpoint("s3://b/other.parquet", endpoint_url="http://a:1") != here


def store_failing_renderer(document, pages, dpi, max_pixels):
    """Renders as usual, but the store fails (as a dropped connection does) reading ``doc1.pdf``."""
    from ocrbatch.sources.rasterize import iter_pages
    from ocrbatch.storage import StorageError

    if document.path.name == "doc1.pdf":
        raise StorageError(f"{document.path}: cannot read from storage (ConnectionError: injected)")
    return iter_pages(document, pages, dpi, max_pixels)


def test_a_store_failing_while_rendering_stops_the_run_and_fails_no_page(stub, docs, tmp_path):
    from helpers import job_options, read_rows

    from ocrbatch.engines.local import PipelineError, run_job
    from ocrbatch.records.sqlite import checkpoint_path_for

    out = tmp_path / "out.jsonl"
    options = job_options("unused", [docs], out, backend="openai", base_url=stub.url, concurrency=1,
                          layout="none", dpi=50, max_tokens=16)
    with pytest.raises(PipelineError, match="render stage failed: .*doc1.pdf: cannot read from storage"):
        run_job(options, render_pages=store_failing_renderer)
    states = checkpoint_states(checkpoint_path_for(out))
    assert states.get("failed", 0) == 0 and states.get("pending", 0) >= 4  # doc1 and doc2 left for the next run
    summary = run_job(options)
    assert summary.exit_code == 0
    assert sorted((Path(row["path"]).name, row["page"]) for row in read_rows(out)) == [
        (f"doc{i}.pdf", page) for i in range(3) for page in (1, 2)]


def test_a_store_failing_while_planning_stops_the_run_and_fails_no_document(stub, docs, tmp_path, monkeypatch):
    from helpers import job_options

    import ocrbatch.job.plan
    from ocrbatch.engines.local import run_job
    from ocrbatch.records.sqlite import checkpoint_path_for
    from ocrbatch.storage import StorageError

    def count_pages(document, *args):
        raise StorageError(f"{document.path}: cannot read from storage (ConnectionError: injected)")

    monkeypatch.setattr(ocrbatch.job.plan, "count_pages", count_pages)
    out = tmp_path / "out.jsonl"
    options = job_options("unused", [docs], out, backend="openai", base_url=stub.url, layout="none")
    with pytest.raises(StorageError, match="doc0.pdf: cannot read from storage"):
        run_job(options)
    assert checkpoint_states(checkpoint_path_for(out)) == {}


def test_a_pdf_object_is_downloaded_once_to_plan_and_once_to_render_its_text_layer_and_pages(
        s3, counted_s3, stub, tmp_path):
    import pdf_fixtures

    _, fs = s3
    endpoint, served = counted_s3
    fs.mkdir("counted")
    pdf = tmp_path / "mixed.pdf"
    pdf_fixtures.write_pdf(pdf, ["text", "scan", "text"])
    fs.put_file(str(pdf), "counted/inbox/mixed.pdf")
    backdate("counted", "inbox/mixed.pdf")
    out = tmp_path / "out.jsonl"
    args = ["s3://counted/inbox", "--out", out, "--storage-option", f"endpoint_url={endpoint}", "--base-url",
            stub.url, "--min-file-age", "60", "--pdf-text", "auto", *COMMON]

    first = ocrbatch(*args)
    assert first.returncode == 0, first.stderr
    rows = {row["page"]: row for row in map(json.loads, out.open())}
    assert {page: row["source"] for page, row in rows.items()} == {1: "text-layer", 2: "model", 3: "text-layer"}
    assert pdf_fixtures.TITLE in rows[1]["text"] and rows[2]["text"].startswith("OCR: ")
    # The planner reads it whole twice (its hash, then MuPDF's count of its pages: discovery does not
    # keep what it hashed); the render process once, for the text layer's routing and Markdown and for
    # rendering the scan, which used to be four downloads.
    assert served["/counted/inbox/mixed.pdf"] == 3 * pdf.stat().st_size

    again = ocrbatch(*args)  # known by its listing, its pages done: not read at all
    assert again.returncode == 0, again.stderr
    assert served["/counted/inbox/mixed.pdf"] == 3 * pdf.stat().st_size


def test_a_downloaded_object_is_read_from_its_copy_which_leaves_no_file(s3, counted_s3, tmp_path, monkeypatch):
    from ocrbatch.errors import InputError
    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import fetched
    from ocrbatch.storage import ObjectPath

    _, fs = s3
    endpoint, served = counted_s3
    fs.mkdir("copied")
    fs.pipe_file("copied/blob.bin", b"content " * 1000)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR is read again
    path = ObjectPath.of("s3://copied/blob.bin", {"endpoint_url": endpoint})
    with path.downloaded() as held:
        assert held == path and held.copy.startswith("/proc/self/fd/")
        assert not list(tmp_path.iterdir())  # the copy has no name: a process killed here leaves nothing
        with held.downloaded() as again, held.open() as handle:
            assert again is held and handle.read() == held.read_bytes() == b"content " * 1000
    assert served["/copied/blob.bin"] == 8000  # once, for the download
    assert path.read_bytes() == b"content " * 1000 and served["/copied/blob.bin"] == 16000
    missing = ObjectPath.of("s3://copied/missing.pdf", dict(path.options))
    with pytest.raises(FileNotFoundError), missing.downloaded():
        pass
    # Gone between planning and rendering: the document's own failure, as a deleted file's is.
    with pytest.raises(InputError, match="s3://copied/missing.pdf: no such object"), fetched(Document(missing, "id")):
        pass
