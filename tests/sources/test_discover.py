"""Discovery on hostile inboxes: file names of any bytes, special files, PATHS that name nothing."""

import codecs
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import document_image, settle, write_pdf

from ocrbatch.cli.main import main
from ocrbatch.job.options import JobOptions
from ocrbatch.job.plan import plan_job
from ocrbatch.records.sqlite import Store, checkpoint_path_for
from ocrbatch.sources.discover import discover, escaped

NOT_UTF8 = b"bad\xff\xfe name.pdf"


def run(*args):
    return CliRunner().invoke(main, [*map(str, args)])


def named(folder: Path, raw_name: bytes) -> Path:
    """The path of ``raw_name`` (bytes, not necessarily UTF-8) in ``folder``, as Python keeps it."""
    return folder / os.fsdecode(raw_name)


def write_pdf_named(folder: Path, raw_name: bytes, pages: int, text: str) -> Path:
    """A PDF under a name of any bytes (PyMuPDF saves only to names that are UTF-8)."""
    scratch = folder / "scratch.pdf"
    write_pdf(scratch, pages, text=text)
    path = named(folder, raw_name)
    scratch.rename(path)
    return path


def test_escaped_paths_are_one_line_of_utf8_that_reads_back_to_their_bytes():
    for raw in [b"/in/" + NOT_UTF8, b"/in/new\nline\ttab\rcr\x01.pdf", b"back\\slash.pdf",
                "caf\u00e9 \u0085 \u2028 \u4e16.pdf".encode()]:
        text = escaped(os.fsdecode(raw))
        text.encode("utf-8")  # valid UTF-8: no lone surrogates left
        assert len(text.splitlines()) == 1
        assert codecs.escape_decode(text.encode())[0] == raw
    assert escaped("/in/plain café.pdf") == "/in/plain café.pdf"


@pytest.fixture
def odd_names(tmp_path):
    """A folder with a good PDF, one whose name is not UTF-8 and one with a newline and a tab in its name."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    write_pdf(folder / "plain.pdf", 1, text="Plain")
    bad = write_pdf_named(folder, NOT_UTF8, 2, text="Bytes")
    lines = write_pdf_named(folder, b"two\nlines\tand a tab.pdf", 1, text="Lines")
    settle(folder)
    return folder, bad, lines


def test_a_name_that_is_not_utf8_is_planned_and_kept_exactly(odd_names, tmp_path):
    folder, bad, lines = odd_names
    out = tmp_path / "out.parquet"
    dry = run("run", folder, "--out", out, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"2\t{folder}/bad\\xff\\xfe name.pdf" in dry.stdout.splitlines()
    assert "unreadable" not in dry.stdout

    options = JobOptions(paths=[folder], out=out, min_file_age=0, progress=False)
    store = Store(checkpoint_path_for(out))
    plan = plan_job(options, store)  # as the run plans: with the checkpoint
    planned = {item.document.path: item.pages for item in plan.work}
    assert planned == {folder / "plain.pdf": [1], bad: [1, 2], lines: [1]} and not plan.unreadable
    [document] = [item.document for item in plan.work if item.document.path == bad]
    assert store.document_path(document.doc_id) == bad  # the exact bytes, back from SQLite
    assert store.known_id(bad, document.size, document.mtime_ns) == document.doc_id  # not hashed again
    store.record_page(document.doc_id, 1, "ok", {"page": 1, "status": "ok"})
    [row] = list(store.rows())
    assert row["path"] == f"{folder}/bad\\xff\\xfe name.pdf"
    assert codecs.escape_decode(row["path"].encode())[0] == os.fsencode(bad)
    store.close()


def test_dry_run_escapes_names_so_each_entry_is_one_line(odd_names, tmp_path):
    folder, bad, lines = odd_names
    result = run("run", folder, "--out", tmp_path / "out.parquet", "--dry-run")
    assert result.exit_code == 0, result.output
    listing = result.stdout.splitlines()
    assert len(listing) == 3 and all(len(line.split("\t")) == 2 for line in listing), listing
    assert f"1\t{folder}/two\\nlines\\tand a tab.pdf" in listing


@pytest.fixture
def special_files(tmp_path):
    """A folder holding a FIFO and a link to /dev/zero under document names, and a corrupt PDF."""
    folder = tmp_path / "inbox"
    folder.mkdir()
    os.mkfifo(folder / "pipe.pdf")
    (folder / "zeros.png").symlink_to("/dev/zero")
    os.mkfifo(folder / "ignored.fifo")  # not a document type: not reported, as any other such file
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.4 not really")
    settle(folder)
    return folder


def test_special_files_are_skipped_and_counted_never_opened(special_files, tmp_path):
    folder = special_files
    found = {d.path.name: d.special for d in discover([folder]) if d.special}
    assert found == {"pipe.pdf": "a FIFO (named pipe)",
                     "zeros.png": "a character device (through a symbolic link to /dev/zero)"}

    out = tmp_path / "out.jsonl"
    dry = run("run", folder, "--out", out, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert f"special\t{folder}/pipe.pdf\ta FIFO (named pipe): not a regular file, skipped" in dry.stdout.splitlines()
    assert "2 special files skipped" in dry.stderr
    # A run that blocked on the FIFO or read /dev/zero would never end; this one has nothing to decode.
    result = run("run", folder, "--out", out, "--quiet")
    assert result.exit_code == 1, result.output
    assert "2 special files (FIFOs, devices, sockets) skipped" in result.stderr.splitlines()[-1]
    assert [json.loads(line)["path"] for line in out.read_text().splitlines()] == [f"{folder}/corrupt.pdf"]


@pytest.mark.parametrize("make, reason", [
    (lambda path: None, "no such file or folder"),
    (lambda path: path.symlink_to(path.parent / "unmounted"), "broken symbolic link"),
    (lambda path: os.mkfifo(path), "a FIFO (named pipe), not a file or folder"),
    (lambda path: path.symlink_to("/dev/zero"), "a character device (through a symbolic link to /dev/zero)"),
])
def test_a_path_that_names_no_file_or_folder_is_a_bad_command_line(tmp_path, make, reason):
    target = tmp_path / "share"
    make(target)
    write_pdf(tmp_path / "good.pdf", 1)
    settle(tmp_path)
    out = tmp_path / "out" / "results.parquet"
    for extra in ([], ["--dry-run"]):
        result = run("run", tmp_path / "good.pdf", target, "--out", out, *extra)
        assert result.exit_code == 2, result.output
        assert f"{target}: {reason}" in result.stderr
        assert not (tmp_path / "out").exists()  # no output, checkpoint or lock


def test_image_under_a_name_that_is_not_utf8_counts_its_pages(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    frames = [document_image(120, 90, 1), document_image(120, 90, 2)]
    frames[0].save(folder / "fax.tiff", save_all=True, append_images=frames[1:])
    (folder / "fax.tiff").rename(named(folder, b"fax\xe9.tiff"))
    settle(folder)
    result = run("run", folder, "--out", tmp_path / "o.parquet", "--dry-run")
    assert result.stdout.splitlines() == [f"2\t{folder}/fax\\xe9.tiff"], result.output
