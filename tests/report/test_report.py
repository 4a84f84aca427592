"""ocrbatch report: a static HTML report of a job, checked in a real headless browser."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from helpers import settle, write_pdf
from PIL import Image

from ocrbatch.cli.main import main
from ocrbatch.engines.local import run_job
from ocrbatch.job.options import JobOptions
from ocrbatch.records.output import open_output
from ocrbatch.records.recorder import JobSummary
from ocrbatch.records.rows import read_rows
from ocrbatch.report.overlay import STYLES

SAMPLE_DOCS = Path(__file__).parents[2] / "sample_docs"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install "
                                    "chromium; .ci/run installs it)")
HOSTILE = ('Hello <img src="https://example.com/pixel.png"> [a link](http://example.com/) '
           '<script>fetch("https://example.com/")</script> ![x](https://example.com/y.png)')


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
    """A scanned page with a table (layout mode), a page read from its text layer, and a document that cannot be read."""
    folder = tmp_path_factory.mktemp("report")
    docs = folder / "docs"
    docs.mkdir()
    import pymupdf

    with pymupdf.open(SAMPLE_DOCS / "purchase-order-table.pdf") as pdf:  # a scan: the model reads it
        pdf[0].get_pixmap(dpi=110).save(docs / "order.png")
    write_pdf(docs / "letter.pdf", 1, text="Letter")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a PDF")
    settle(docs)
    out = folder / "out.parquet"
    run_job(JobOptions(paths=[docs], out=out, model=str(tiny_model), quant="F32", max_tokens=4, dpi=110,
                       progress=False, min_file_age=0, layout="cdla", pdf_text="auto"))
    return out


def report(target, folder) -> Path:
    result = CliRunner().invoke(main, ["report", str(target), "--html", str(folder)])
    assert result.exit_code == 0, result.output
    return Path(result.output.strip())


def view_of(index: Path, name: str) -> Path:
    """The page view that the index links for the document called ``name``."""
    [link] = re.findall(rf'{re.escape(name)}</td><td><a href="(pages/\d+\.html)"', index.read_text())
    return index.parent / link


def chromium(url: str, folder: Path, *extra: str) -> subprocess.CompletedProcess:
    """Headless Chromium with name resolution switched off, so nothing could be fetched even if asked."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--window-size=1400,1000",
               f"--user-data-dir={folder / 'profile'}", "--host-resolver-rules=MAP * ~NOTFOUND", *extra, url]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


def test_counts_and_failed_pages_with_their_reasons(job, tmp_path):
    index = report(job, tmp_path / "report")
    text = index.read_text()
    [failed] = [row for row in read_rows(job) if row["status"] == "failed"]
    assert "broken.pdf" in failed["path"]
    row = re.search(r"<tr><td>[^<]*broken\.pdf</td><td>.*?</td><td class=\"error\">(.*?)</td></tr>", text)
    assert row and row.group(1) == failed["error"].replace("'", "&#39;")
    assert "not a readable PDF" in row.group(1)
    assert re.search(r">3<small>pages</small>", text) and re.search(r">1<small>text layer", text)
    assert "<svg" in text  # throughput over time
    slowest = re.search(r"<h2>Slowest documents</h2>\s*<table.*?</table>", text, re.S).group()
    assert "order.png" in slowest and "letter.pdf" not in slowest  # text-layer pages record no stage time


def test_the_summary_shows_the_shares_and_the_slowest_documents():
    summary = JobSummary(pages_ok=3, pages_text_layer=1, pages_failed=1, elapsed_s=60)
    summary.add_work("a.pdf", {"render_s": 1.0, "decode_s": 4.0, "vision_s": None})
    summary.add_work("b.pdf", {"vision_s": 9.0})
    summary.add_work("c.pdf", {"render_s": 0.0})
    line = summary.line(Path("out.parquet"))
    assert line.endswith("4.0 pages/min (25% text layer, 50% model, 25% failed); slowest: b.pdf 9.0 s, a.pdf 5.0 s "
                         "-> out.parquet")


@needs_chromium
def test_a_page_view_shows_the_page_with_its_boxes_beside_its_markdown(job, tmp_path):
    index = report(job, tmp_path / "report")
    letter = view_of(index, "letter.pdf")
    shot = tmp_path / "letter.png"
    chromium(letter.as_uri(), tmp_path, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    half = pixels.shape[1] // 2
    page, text = pixels[:, :half], pixels[:, half:]
    # Left: the rendered page (black type) inside its text layer's boxes; right: the Markdown's type.
    assert np.all(page == STYLES["text-layer"], axis=-1).sum() > 200
    assert (page.sum(axis=-1) < 150).sum() > 500
    assert (text.sum(axis=-1) < 150).sum() > 2000
    dom = chromium(letter.as_uri(), tmp_path, "--dump-dom").stdout
    assert re.search(r'<section id="text"[^>]*>\s*<h2>Letter 1</h2>|<section id="text"[^>]*>.*Letter 1', dom, re.S)
    assert "quick brown fox" in dom

    order = view_of(index, "order.png")
    shot = tmp_path / "order.png"
    chromium(order.as_uri(), tmp_path, f"--screenshot={shot}")
    left = np.asarray(Image.open(shot).convert("RGB"))[:, :half]
    assert np.all(left == STYLES["table"], axis=-1).sum() > 500  # the table's box over the page
    dom = chromium(order.as_uri(), tmp_path, "--dump-dom").stdout
    assert '<a href="#b1" id="box1">' in dom and '<a href="#box1">1 table' in dom  # box to text and back


@needs_chromium
def test_no_request_leaves_the_machine(job, tmp_path):
    rows = read_rows(job)
    for row in rows:
        if row["status"] == "ok":
            row["text"] = HOSTILE + "\n\n" + row["text"]
            for block in row["blocks"] or []:
                block["text"] = HOSTILE
    hostile = tmp_path / "hostile.jsonl"
    writer = open_output(hostile)
    writer.write([{**row, "created_at": row["created_at"].isoformat()} for row in rows])
    writer.commit()
    index = report(hostile, tmp_path / "report")
    pages = list(index.parent.rglob("*.html"))
    assert any("example.com" in file.read_text() for file in pages)  # the text is shown, but inert:
    for file in pages:
        text = file.read_text()
        assert not re.search(r"""(?i)(src|href)\s*=\s*["']?\s*(https?:|//)|<script|url\(""", text), file
    # What the page asks the network for, from Chromium's net log. A control page that embeds a remote
    # image shows the log does catch such a request.
    control = tmp_path / "control.html"
    control.write_text('<img src="http://example.invalid/x.png">')
    assert page_requests(control, tmp_path) == ["http://example.invalid/x.png"]
    for page in [index, *index.parent.glob("pages/*.html")]:
        assert page_requests(page, tmp_path) == [], page


def page_requests(page: Path, folder: Path) -> list[str]:
    """The URLs that opening ``page`` sends to the network stack (Chromium's own background requests left out)."""
    log = folder / "net.json"
    chromium(page.as_uri(), folder, f"--log-net-log={log}", f"--screenshot={folder / 'shot.png'}")
    netlog = json.loads(log.read_text())
    start = netlog["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    # A page opened from a file requests within the file:// network partition; Chromium's services do not.
    return [event["params"]["url"] for event in netlog["events"] if event["type"] == start
            and event["params"].get("network_isolation_key", "").startswith("file://")]


def test_a_huge_job_is_sampled(job, tmp_path):
    rows = read_rows(job)
    many = tmp_path / "many.jsonl"
    writer = open_output(many)
    ok = [row for row in rows if row["status"] == "ok"]
    copies = [{**row, "doc_id": f"{number:032x}", "path": row["path"], "created_at": row["created_at"].isoformat()}
              for number, row in enumerate(ok * 30)]
    writer.write(copies)
    writer.commit()
    result = CliRunner().invoke(main, ["report", str(many), "--html", str(tmp_path / "report"), "--max-pages", "5"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "report" / "pages").glob("*.html"))) == 5
    assert f"Pages (5 of {len(copies)})" in (tmp_path / "report" / "index.html").read_text()
