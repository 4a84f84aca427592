"""Size and build time of ``ocrbatch report`` for a 1,000-page job, no model needed.

The job is made up: a 1,000-page PDF and one output row per page written
with the job's own Parquet writer, as a layout job records them (a title, two
text blocks, a table, a picture and a footer per page; some pages failed,
some from the text layer; pages finished over 100 minutes). The report then
renders its sampled page views from that PDF, as it would for a real job.

    python benchmarks/report_size.py --out benchmarks/results/report-size.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import write_results  # helpers in the same folder

from ocrbatch.records.output import open_output
from ocrbatch.report.html import build_report

TABLE = "<table><tr><td>Item</td><td>Qty</td></tr><tr><td>Paper</td><td>20</td></tr></table>"


def write_pdf(path: Path, pages: int) -> None:
    import pymupdf

    with pymupdf.open() as document:
        for number in range(1, pages + 1):
            page = document.new_page(width=595, height=842)
            page.insert_text((56, 60), f"Section {number}", fontsize=18)
            page.insert_textbox(pymupdf.Rect(56, 90, 539, 300), "The quick brown fox jumps. " * 30, fontsize=10)
            page.draw_rect(pymupdf.Rect(56, 320, 539, 480), color=(0, 0, 0))
        document.save(path)


def block(order: int, label: str, box: tuple, prompt: str, text: str) -> dict:
    return {"order": order, "label": label, "score": 0.9, "x0": box[0], "y0": box[1], "x1": box[2], "y1": box[3],
            "prompt": prompt, "text": text, "n_image_tokens": 100, "n_output_tokens": 50, "finish_reason": "stop",
            "group": order}


def row(path: Path, number: int, pages: int, start: datetime) -> dict:
    common = {"path": str(path), "doc_id": f"{number // 50:032x}", "page": number, "page_count": pages,
              "task": "ocr", "model": "synthetic", "quant": "Q4_K_M",
              "created_at": (start + timedelta(seconds=6 * number)).isoformat()}
    if number % 97 == 0:
        return {**common, "status": "failed", "text": "", "error": f"{path} page {number}: layout failed"}
    width, height = 1240, 1754  # A4 at 150 dpi
    if number % 5 == 0:
        return {**common, "status": "ok", "source": "text-layer", "text": f"## Section {number}\n\nThe quick brown fox.",
                "width": width, "height": height, "finish_reason": "stop"}
    blocks = [block(0, "paragraph_title", (116, 100, 500, 140), "OCR:", f"Section {number}"),
              block(1, "text", (116, 180, 1120, 400), "OCR:", "The quick brown fox jumps. " * 20),
              block(2, "text", (116, 420, 1120, 620), "OCR:", "Over the lazy dog. " * 20),
              block(3, "table", (116, 660, 1120, 1000), "Table Recognition:", TABLE),
              block(4, "image", (116, 1040, 600, 1400), "", ""),
              block(5, "footer", (116, 1650, 1120, 1700), "OCR:", f"page {number}")]
    text = f"## Section {number}\n\n" + "The quick brown fox jumps. " * 20 + "\n\n" + TABLE
    return {**common, "status": "ok", "source": "model", "text": text, "blocks": blocks, "width": width,
            "height": height, "n_image_tokens": 500, "n_output_tokens": 250, "finish_reason": "stop",
            "render_s": 0.05, "layout_s": 0.15, "vision_s": 1.0 + number % 7, "prefill_s": 0.5, "decode_s": 20.0}


def measure(pages: int, max_pages: int, folder: Path) -> dict:
    pdf = folder / "job.pdf"
    write_pdf(pdf, pages)
    out = folder / "out.parquet"
    writer = open_output(out)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    writer.write([row(pdf, number, pages, start) for number in range(1, pages + 1)])
    writer.commit()
    started = time.perf_counter()
    index = build_report(out, folder / "report", max_pages=max_pages)
    seconds = time.perf_counter() - started
    files = [file for file in index.parent.rglob("*") if file.is_file()]
    return {"pages": pages, "max_pages": max_pages, "build_s": round(seconds, 2), "files": len(files),
            "report_bytes": sum(file.stat().st_size for file in files), "index_bytes": index.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=1000)
    parser.add_argument("--max-pages", type=int, action="append", help="Page views (repeatable) [default: 200].")
    parser.add_argument("--out", type=Path, help="Write the results as JSON here.")
    args = parser.parse_args()
    results = []
    for max_pages in args.max_pages or [200]:
        with tempfile.TemporaryDirectory() as folder:
            results.append(measure(args.pages, max_pages, Path(folder)))
    write_results({"report_size": results}, args.out)


if __name__ == "__main__":
    main()
