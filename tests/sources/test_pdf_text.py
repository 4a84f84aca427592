"""``ocrbatch run --pdf-text``: pages routed to the text layer or the model, in the batch job."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import settle
from pdf_fixtures import BODY, GARBLED, RUNNING_FOOTER, RUNNING_HEADER, TITLE, write_pdf

from ocrbatch.cli.main import main
from ocrbatch.engines.local import run_job
from ocrbatch.job.options import JobOptions


@pytest.fixture(scope="module")
def inbox(tmp_path_factory):
    """A born-digital page, a scan, a scan with an OCR layer, garbage fonts and a mixed document."""
    folder = tmp_path_factory.mktemp("inbox")
    write_pdf(folder / "born-digital.pdf", ["text"])
    write_pdf(folder / "scan.pdf", ["scan"])
    write_pdf(folder / "ocr-layer.pdf", ["ocr-layer"])
    write_pdf(folder / "garbage.pdf", ["garbage-fffd"])
    write_pdf(folder / "mixed.pdf", ["text", "scan", "text", "stamp"])
    settle(folder)
    return folder


ROUTES_AUTO = {("born-digital.pdf", 1): "text-layer", ("scan.pdf", 1): "model", ("ocr-layer.pdf", 1): "model",
               ("garbage.pdf", 1): "model", ("mixed.pdf", 1): "text-layer", ("mixed.pdf", 2): "model",
               ("mixed.pdf", 3): "text-layer", ("mixed.pdf", 4): "model"}


def run(tiny_model, inbox, out, **settings) -> tuple:
    options = JobOptions(paths=[inbox], out=out, model=str(tiny_model), quant="F32", max_tokens=6, dpi=72,
                         progress=False, min_file_age=0, **settings)
    summary = run_job(options)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return summary, {(Path(r["path"]).name, r["page"]): r for r in rows}


@pytest.mark.slow
def test_auto_routes_each_page_and_resumes_exactly_once(tiny_model, inbox, tmp_path):
    out = tmp_path / "auto.jsonl"
    summary, rows = run(tiny_model, inbox, out, pdf_text="auto")
    assert {key: row["source"] for key, row in rows.items()} == ROUTES_AUTO
    assert all(row["status"] == "ok" for row in rows.values())
    assert summary.pages_text_layer == 3 and summary.pages_ok == 8
    # A text-layer page reports the size it would have been rendered at, as a model page does.
    assert (rows[("mixed.pdf", 1)]["width"], rows[("mixed.pdf", 1)]["height"]) == (
        rows[("mixed.pdf", 2)]["width"], rows[("mixed.pdf", 2)]["height"])
    for key, row in rows.items():
        if row["source"] == "text-layer":
            assert TITLE in row["text"] and BODY[0][:40] in row["text"]  # the page's real text
            assert row["n_output_tokens"] == row["n_image_tokens"] == 0 and row["decode_s"] == 0
        else:
            assert row["n_image_tokens"] > 0 and row["n_output_tokens"] > 0 and row["vision_s"] > 0

    # The model pages are exactly what a run without the text layer makes of them.
    never, never_rows = run(tiny_model, inbox, tmp_path / "never.jsonl", pdf_text="never")
    assert never.pages_text_layer == 0 and {r["source"] for r in never_rows.values()} == {"model"}
    for key, source in ROUTES_AUTO.items():
        if source == "model":
            assert rows[key]["text"] == never_rows[key]["text"]

    again, again_rows = run(tiny_model, inbox, out, pdf_text="auto")
    assert again.pages_ok == 0 and again.pages_skipped == 8
    assert again_rows == rows


@pytest.mark.slow
def test_only_fails_pages_without_a_good_layer_and_retry_sends_them_to_the_model(tiny_model, inbox, tmp_path):
    out = tmp_path / "only.jsonl"
    summary, rows = run(tiny_model, inbox, out, pdf_text="only")
    for key, source in ROUTES_AUTO.items():
        if source == "text-layer":
            assert rows[key]["status"] == "ok" and rows[key]["source"] == "text-layer"
        else:
            assert rows[key]["status"] == "failed" and key[0] in rows[key]["error"]
    assert "no text layer" in rows[("scan.pdf", 1)]["error"]
    assert "OCR layer" in rows[("ocr-layer.pdf", 1)]["error"]
    assert "unreadable characters" in rows[("garbage.pdf", 1)]["error"] or "U+FFFD" in rows[("garbage.pdf", 1)]["error"]
    assert summary.exit_code == 1

    retried, rows = run(tiny_model, inbox, out, pdf_text="auto", retry_failed=True)
    assert retried.pages_ok == 5 and retried.pages_text_layer == 0
    assert {key: row["source"] for key, row in rows.items()} == ROUTES_AUTO
    assert all(row["status"] == "ok" for row in rows.values())


@pytest.mark.slow
def test_trusting_the_ocr_layer_takes_its_text(tiny_model, inbox, tmp_path):
    _, rows = run(tiny_model, inbox, tmp_path / "trust.jsonl", pdf_text="auto", trust_ocr_layer=True)
    assert rows[("ocr-layer.pdf", 1)]["source"] == "text-layer"
    assert TITLE in rows[("ocr-layer.pdf", 1)]["text"]
    assert rows[("garbage.pdf", 1)]["source"] == "model"
    assert GARBLED not in rows[("garbage.pdf", 1)]["text"]


@pytest.mark.slow
def test_text_layer_pages_of_a_mixed_pdf_read_as_layout_mode_would_and_misread_ones_go_to_the_model(
        tiny_model, tmp_path):
    folder = tmp_path / "inbox"
    folder.mkdir()
    kinds = ["furniture", "scan", "garbage-type3", "broken-math-font", "actualtext-mismatch", "sideways"]
    write_pdf(folder / "report.pdf", kinds)
    settle(folder)
    _, rows = run(tiny_model, folder, tmp_path / "auto.jsonl", pdf_text="auto")
    sources = {page: row["source"] for (_, page), row in rows.items()}
    assert sources == {1: "text-layer", 2: "model", 3: "model", 4: "model", 5: "model", 6: "text-layer"}
    assert all(row["status"] == "ok" for row in rows.values())
    furniture = rows[("report.pdf", 1)]["text"]
    assert furniture.startswith(f"# {TITLE}") and BODY[0][:40] in furniture
    for left_out in (RUNNING_HEADER, RUNNING_FOOTER, "picture text", "<!--"):
        assert left_out not in furniture
    assert rows[("report.pdf", 6)]["text"].startswith(f"# {TITLE}")  # the sideways page, read upright

    _, rows = run(tiny_model, folder, tmp_path / "only.jsonl", pdf_text="only")
    for page, reason in ((3, "unmapped glyphs"), (4, "unmapped glyphs"), (5, "Markdown holds")):
        assert rows[("report.pdf", page)]["status"] == "failed" and reason in rows[("report.pdf", page)]["error"]


def test_dry_run_shows_the_route_of_every_page(tiny_model, inbox, tmp_path):
    result = CliRunner().invoke(main, ["run", str(inbox), "--out", str(tmp_path / "o.jsonl"), "--model",
                                       str(tiny_model), "--pdf-text", "auto", "--dry-run", "--min-file-age", "0"])
    assert result.exit_code == 0, result.output
    lines = {line.split("\t")[1]: line for line in result.stdout.splitlines()}
    mixed = lines[str(inbox / "mixed.pdf")]
    assert mixed.startswith("4\t") and "p1 text-layer" in mixed and "p2 model" in mixed and "p4 model" in mixed
    assert "p1 model (" in lines[str(inbox / "scan.pdf")]


def test_text_layer_is_refused_for_other_tasks(tmp_path):
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "o.jsonl"), "--task", "table",
                                       "--pdf-text", "auto"])
    assert result.exit_code == 2 and "stands in for OCR only" in result.output


def test_pdf_text_on_the_command_line(tiny_model, inbox, tmp_path):
    out = tmp_path / "cli.jsonl"
    result = subprocess.run([sys.executable, "-m", "ocrbatch", "run", str(inbox / "born-digital.pdf"), "--out",
                             str(out), "--model", str(tiny_model), "--quant", "F32", "--pdf-text", "only",
                             "--min-file-age", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "(1 ok, 0 failed; 1 from the text layer)" in result.stderr
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["source"] == "text-layer" and TITLE in row["text"]
