"""``ocrbatch run``: the resumable batch job, end to end, with bad input and kills."""

import os
import re
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import (
    document_image,
    good_documents,
    job_options,
    llama_workers,
    read_rows,
    run_cli,
    settle,
    settled_pdfs,
    write_encrypted_pdf,
    write_pdf,
    write_png_claiming_size,
    write_zero_page_pdf,
)

from ocrbatch.cli.main import main
from ocrbatch.engines.local import run_job
from ocrbatch.records.lock import JobLock
from ocrbatch.records.output import COLUMNS
from ocrbatch.records.recorder import EXIT_LOCKED
from ocrbatch.records.sqlite import Store, checkpoint_path_for

# Root ignores file permissions; without these capabilities it meets them like any user.
AS_USER = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
cli = partial(run_cli, prefix=AS_USER)
options = partial(job_options, max_tokens=8, workers=1, seqs_per_worker=2, dpi=72, layout="none")




@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """Good documents of every kind, plus every kind of bad input."""
    folder = tmp_path_factory.mktemp("mixed")
    expected = good_documents(folder)
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.4\n" + os.urandom(300))
    write_encrypted_pdf(folder / "locked.pdf")
    write_zero_page_pdf(folder / "empty-pages.pdf")
    (folder / "zero.png").write_bytes(b"")
    truncated = folder / "truncated.png"
    document_image(300, 300, 9).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    write_png_claiming_size(folder / "bomb.png", 20000, 20000)
    (folder / "notes.pdf").write_text("just some text, not a PDF\n")
    (folder / "dangling.png").symlink_to(folder / "does-not-exist.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "sub" / "back-to-top").symlink_to(folder, target_is_directory=True)  # a folder loop
    (folder / "readme.txt").write_text("ignored: not a document type")
    write_pdf(folder / "secret.pdf", 1)
    os.chmod(folder / "secret.pdf", 0o000)
    settle(folder)
    bad = {
        "corrupt.pdf": "not a readable PDF",
        "locked.pdf": "encrypted PDF (needs a password)",
        "empty-pages.pdf": "PDF has no pages",
        "zero.png": "empty file (0 bytes)",
        "truncated.png": "corrupt or truncated image",
        "bomb.png": "exceeds the limit of 100000000 pixels",
        "notes.pdf": "not a readable PDF",
        "dangling.png": "broken symbolic link",
        "loop.png": "symbolic link loop",
        "secret.pdf": "permission denied",
    }
    return folder, expected, bad


@pytest.mark.slow
def test_mixed_folder_end_to_end(tiny_model, mixed_folder, tmp_path):
    folder, expected, bad = mixed_folder
    out = tmp_path / "results.parquet"
    result = cli("run", folder, "--out", out, "--model", tiny_model, "--quant", "F32", "--max-tokens", "6",
                 "--dpi", "72", "--layout", "none")
    assert result.returncode == 1, result.stderr  # some failed
    rows = read_rows(out)
    by_file = {}
    for row in rows:
        by_file.setdefault(Path(row["path"]).relative_to(folder).as_posix(), []).append(row)
    for name, pages in expected.items():
        assert sorted(r["page"] for r in by_file[name]) == list(range(1, pages + 1)), name
        assert all(r["status"] == "ok" and r["page_count"] == pages and r["n_output_tokens"] > 0
                   for r in by_file[name]), name
    for name, reason in bad.items():
        [row] = by_file[name]
        assert row["status"] == "failed" and row["page"] in (0, 1), name
        assert reason in row["error"] and name in row["error"], (name, row["error"])
        assert row["error"].count("\n") == 0
    assert "readme.txt" not in by_file
    assert len(rows) == sum(expected.values()) + len(bad)  # the folder loop was walked once
    good, failed = sum(expected.values()), len(bad)
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"ocrbatch: {good + failed} pages processed ({good} ok, {failed} failed), 0 already done")
    assert "Traceback" not in result.stderr

    status = cli("status", out)
    assert status.returncode == 0
    assert f"pages: {len(bad)} failed, {sum(expected.values())} ok" in status.stdout
    for name in bad:
        assert name in status.stdout


@pytest.fixture
def pages_folder(tmp_path):
    return settled_pdfs(tmp_path / "docs", 4, 3)


def _kill_a_worker_when_busy(process: subprocess.Popen, out: Path, deadline: float) -> bool:
    """Once the job has finished a page (so the worker holds more), kill the llama.cpp worker."""
    import sqlite3

    database = checkpoint_path_for(out)
    while time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
                done, = db.execute("SELECT count(*) FROM pages WHERE status = 'ok'").fetchone()
        except sqlite3.Error:
            continue
        if not done:
            continue
        workers = llama_workers(process)
        if workers:
            workers[0].kill()
            return True
    return False


@pytest.mark.slow
def test_crashed_worker_pages_are_retried_on_a_fresh_worker(tiny_model, pages_folder, tmp_path):
    out = tmp_path / "out.parquet"
    process = subprocess.Popen(
        [sys.executable, "-m", "ocrbatch", "run", pages_folder, "--out", out, "--model", tiny_model, "--quant",
         "F32", "--max-tokens", "400", "--seqs-per-worker", "2", "--dpi", "72", "--max-retries", "2", "--layout",
         "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _kill_a_worker_when_busy(process, out, time.monotonic() + 120)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr
    # It held several pages, none of them charged: each was retried alone and finished.
    assert re.search(r"died \(exit code -9\) holding [2-9] request", stderr), stderr
    rows = read_rows(out)
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows)


def test_lock_contention(tiny_model, pages_folder, tmp_path):
    out = tmp_path / "out.parquet"
    with JobLock(checkpoint_path_for(out)):
        result = cli("run", pages_folder, "--out", out, "--model", tiny_model)
    assert result.returncode == EXIT_LOCKED
    assert "another ocrbatch run" in result.stderr and str(os.getpid()) in result.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_output_schema(tiny_model, pages_folder, tmp_path, suffix):
    out = tmp_path / f"results{suffix}"
    summary = run_job(options(tiny_model, [pages_folder / "doc0.pdf"], out))
    assert summary.exit_code == 0 and summary.pages_ok == 3
    rows = read_rows(out)
    assert list(rows[0].keys()) == COLUMNS
    assert [r["page"] for r in rows] == [1, 2, 3]
    assert {r["page_count"] for r in rows} == {3}
    assert all(r["doc_id"] == rows[0]["doc_id"] and len(r["doc_id"]) == 32 for r in rows)
    assert all(r["task"] == "ocr" and r["model"] == str(tiny_model) and r["quant"] == "F32" for r in rows)
    if suffix == ".parquet":
        import duckdb
        import pandas as pd

        frame = pd.read_parquet(out)
        assert list(frame.columns) == COLUMNS and len(frame) == 3
        [(count,)] = duckdb.sql(f"SELECT count(*) FROM read_parquet('{out}') WHERE status = 'ok'").fetchall()
        assert count == 3


@pytest.mark.slow
def test_rerun_skips_finished_pages_and_follows_moves_and_edits(tiny_model, pages_folder, tmp_path):
    out = tmp_path / "out.parquet"
    first = run_job(options(tiny_model, [pages_folder], out))
    assert first.pages_ok == 12
    again = run_job(options(tiny_model, [pages_folder], out))
    assert again.pages_ok == 0 and again.pages_skipped == 12
    (pages_folder / "doc0.pdf").rename(pages_folder / "renamed.pdf")  # moved: not redone
    write_pdf(pages_folder / "doc1.pdf", 2, text="Edited")  # edited: redone
    third = run_job(options(tiny_model, [pages_folder], out))
    assert third.pages_ok == 2
    rows = read_rows(out)
    names = sorted((Path(r["path"]).name, r["page"]) for r in rows)
    assert names == sorted([("renamed.pdf", p) for p in (1, 2, 3)] + [("doc1.pdf", 1), ("doc1.pdf", 2)]
                           + [(f"doc{i}.pdf", p) for i in (2, 3) for p in (1, 2, 3)])


def test_dry_run_changes_nothing(tiny_model, mixed_folder, tmp_path):
    folder, expected, bad = mixed_folder
    out = tmp_path / "out.parquet"
    result = cli("run", folder, "--out", out, "--model", tiny_model, "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert f"2\t{folder / 'two-pages.pdf'}" in lines and f"2\t{folder / 'fax.tiff'}" in lines
    # A truncated image still has a readable header: it is counted, and fails when rendered.
    assert f"1\t{folder / 'truncated.png'}" in lines
    unreadable = [line for line in lines if line.startswith("unreadable")]
    assert len(unreadable) == len(bad) - 1
    assert f"{sum(expected.values()) + 1} pages to process" in result.stderr
    assert not out.exists() and not checkpoint_path_for(out).exists()


@pytest.mark.slow
def test_config_precedence(tiny_model, pages_folder, tmp_path):
    config = tmp_path / "job.toml"
    config.write_text('max-tokens = 3\ndpi = 40\ntask = "table"\n')
    out = tmp_path / "out.jsonl"
    result = CliRunner().invoke(main, ["run", str(pages_folder / "doc0.pdf"), "--out", str(out), "--model",
                                       str(tiny_model), "--quant", "F32", "--config", str(config), "--dpi", "60",
                                       "--layout", "none"])
    assert result.exit_code == 0, result.output
    rows = read_rows(out)
    assert all(r["n_output_tokens"] <= 3 and r["task"] == "table" for r in rows)  # from the config
    assert rows[0]["width"] == round(595 * 60 / 72)  # the flag beats the config
    bad = tmp_path / "bad.toml"
    bad.write_text("colour = 'blue'\n")
    result = CliRunner().invoke(main, ["run", str(pages_folder), "--out", str(out), "--config", str(bad)])
    assert result.exit_code == 2 and "unknown setting 'colour'" in result.output


@pytest.mark.slow
def test_markdown_dir(tiny_model, pages_folder, tmp_path):
    markdown = tmp_path / "md"
    run_job(options(tiny_model, [pages_folder / "doc2.pdf"], tmp_path / "o.parquet", markdown_dir=markdown))
    [file] = markdown.glob("doc2-*.md")
    text = file.read_text()
    assert text.index("<!-- page 1 -->") < text.index("<!-- page 2 -->") < text.index("<!-- page 3 -->")


def test_posters_are_rendered_within_the_pixel_cap(tmp_path):
    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import iter_pages

    poster = tmp_path / "poster.pdf"
    write_pdf(poster, 1, width=14000, height=9000)  # about 5 m x 3 m
    [page] = iter_pages(Document(poster, "x"), [1], dpi=300, max_pixels=1_000_000)
    width, height = page.image.size
    assert width * height <= 1_000_000 and width > height > 500


def test_parquet_is_written_atomically(tmp_path):
    """(Row groups of ROW_GROUP_ROWS rows, however the rows come: tests/records/test_output.py.)"""
    from ocrbatch.records.output import ParquetOutput

    target = tmp_path / "r.parquet"
    writer = ParquetOutput(target)
    row = {"path": "a.pdf", "doc_id": "d", "page": 1, "status": "ok", "created_at": "2026-01-01T00:00:00+00:00"}
    writer.write([row])
    writer.write([{**row, "page": 2}])
    assert not target.exists() and writer.partial.exists()
    writer.commit()
    assert [r["page"] for r in pq.read_table(target).to_pylist()] == [1, 2] and not writer.partial.exists()


def test_status_of_a_missing_checkpoint(tmp_path):
    result = CliRunner().invoke(main, ["status", str(tmp_path / "nothing.parquet")])
    assert result.exit_code == 1 and "no such checkpoint" in result.output


def test_store_refuses_other_settings(tmp_path):
    store = Store(tmp_path / "c.db")
    store.check_settings({"task": "ocr"})
    with pytest.raises(Exception, match="task=ocr, not table"):
        store.check_settings({"task": "table"})


@pytest.mark.parametrize("preset", ["cpu.toml", "gpu.toml"])
def test_shipped_presets_are_valid(preset, tmp_path):
    config = Path(__file__).parents[2] / "configs" / preset
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "o.parquet"),
                                       "--config", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "0 pages to process" in result.stderr


def test_include_and_exclude_globs(tmp_path):
    from ocrbatch.sources.discover import discover

    write_pdf(tmp_path / "a.pdf", 1)
    (tmp_path / "drafts").mkdir()
    write_pdf(tmp_path / "drafts" / "b.pdf", 1)
    document_image(50, 50, 0).save(tmp_path / "c.png")
    names = lambda **globs: sorted(d.path.relative_to(tmp_path).as_posix()  # noqa: E731
                                   for d in discover([tmp_path], **globs))
    assert names() == ["a.pdf", "c.png", "drafts/b.pdf"]
    assert names(include=["*.pdf"]) == ["a.pdf", "drafts/b.pdf"]
    assert names(exclude=["drafts/*"]) == ["a.pdf", "c.png"]
    assert names(include=["*.pdf"], exclude=["b.pdf"]) == ["a.pdf"]


def test_page_error_budget(tmp_path):
    store = Store(tmp_path / "c.db")
    store.upsert_document("doc", tmp_path / "x.pdf")
    store.set_page_count("doc", 4)
    for page, status in zip(range(1, 5), ["ok", "ok", "ok", "failed"]):
        store.record_page("doc", page, status, {"page": page})
    assert store.finish_document("doc", max_page_error_rate=0.5) == "ok"
    assert store.finish_document("doc", max_page_error_rate=0.2) == "failed"
    assert store.counts()["documents"] == {"failed": 1}


@pytest.mark.slow
def test_log_file_and_quiet(tiny_model, pages_folder, tmp_path):
    log = tmp_path / "job.log"
    result = cli("run", pages_folder / "doc0.pdf", "--out", tmp_path / "o.jsonl", "--model", tiny_model,
                 "--quant", "F32", "--max-tokens", "4", "--quiet", "--log-file", log, "--layout", "none")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]  # the summary alone
    assert "ocrbatch: 3 pages processed (3 ok, 0 failed)" in result.stderr
    assert "3 pages to process in 1 documents" in log.read_text()


def test_a_rerun_exits_1_while_the_output_holds_failed_pages(tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    write_encrypted_pdf(folder / "locked.pdf")
    (folder / "notes.pdf").write_text("not a PDF")
    settle(folder)
    out = tmp_path / "out.parquet"
    first = CliRunner().invoke(main, ["run", str(folder), "--out", str(out), "--quiet"])
    assert first.exit_code == 1, first.output
    again = CliRunner().invoke(main, ["run", str(folder), "--out", str(out), "--quiet"])
    # Nothing to do, but the output still holds the failed rows: not 0.
    assert again.exit_code == 1, again.output
    assert ("0 pages processed (0 ok, 0 failed), 2 already done, 0 documents, 2 failed pages from earlier runs "
            "in the output") in again.stderr
    assert [r["status"] for r in read_rows(out)] == ["failed", "failed"]


@pytest.mark.slow
def test_names_that_are_not_utf8_among_good_files(tiny_model, tmp_path):
    import codecs

    folder = tmp_path / "share"
    expected = good_documents(folder)
    write_pdf(folder / "scratch.pdf", 2, text="Bytes")  # PyMuPDF saves only to names that are UTF-8
    (folder / "scratch.pdf").rename(folder / os.fsdecode(b"r\xe9sum\xe9.pdf"))  # Latin-1, as old shares write
    document_image(300, 200, 7).save(folder / os.fsdecode(b"scan\xff.png"))
    settle(folder)
    out = tmp_path / "out.parquet"
    markdown = tmp_path / "md"
    dry = cli("run", folder, "--out", out, "--dry-run")
    assert f"2\t{folder}/r\\xe9sum\\xe9.pdf" in dry.stdout.splitlines(), dry.stdout  # the dry run agrees
    result = cli("run", folder, "--out", out, "--model", tiny_model, "--quant", "F32", "--max-tokens", "4",
                 "--dpi", "72", "--layout", "none", "--markdown-dir", markdown)
    assert result.returncode == 0, result.stderr
    rows = read_rows(out)
    assert len(rows) == sum(expected.values()) + 3 and all(r["status"] == "ok" for r in rows)
    paths = {codecs.escape_decode(r["path"].encode())[0] for r in rows}
    assert {os.fsencode(folder) + b"/r\xe9sum\xe9.pdf", os.fsencode(folder) + b"/scan\xff.png"} <= paths
    assert len(list(markdown.glob("r\ufffdsum\ufffd-*.md"))) == 1
    status = cli("status", out)
    assert status.returncode == 0 and f"pages: {len(rows)} ok" in status.stdout, status.stdout
