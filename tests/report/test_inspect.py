"""ocrbatch inspect: the page as the job rendered it, with the boxes it read drawn where they were."""

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from helpers import job_options, settle, write_pdf
from PIL import Image

from ocrbatch.cli.main import main
from ocrbatch.engines.local import run_job
from ocrbatch.report.overlay import STYLES

SAMPLE_DOCS = Path(__file__).parents[2] / "sample_docs"
DPI = 110
options = partial(job_options, max_tokens=4, dpi=DPI, layout="cdla")
# The purchase order's table (ocrbatch.dev.samples): 460 pt wide, 5 rows of 28 pt, from (56, 90).
TABLE_PT = (56, 90, 516, 230)



@pytest.fixture(scope="module")
def order_job(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("inspect")
    document = folder / "docs" / "purchase-order-table.pdf"
    document.parent.mkdir()
    shutil.copy(SAMPLE_DOCS / document.name, document)
    settle(document.parent)
    out = folder / "out.parquet"
    summary = run_job(options(tiny_model, [document.parent], out))
    assert summary.pages_ok == 1
    return out, document


def inspect(target, document, page, png) -> np.ndarray:
    result = CliRunner().invoke(main, ["inspect", str(target), "--path", str(document), "--page", str(page),
                                       "--png", str(png)])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(png).convert("RGB"))


def coloured(pixels: np.ndarray, style: str) -> np.ndarray:
    return np.all(pixels == STYLES[style], axis=-1)


def test_the_table_box_is_drawn_where_the_table_is(order_job, tmp_path):
    out, document = order_job
    pixels = inspect(out, document, 1, tmp_path / "page.png")
    [row] = pq.read_table(out).to_pylist()
    assert pixels.shape[:2] == (row["height"], row["width"])  # rendered as the job rendered it
    zoom = DPI / 72
    x0, y0, x1, y1 = (round(value * zoom) for value in TABLE_PT)
    green = coloured(pixels, "table")
    # Its outline runs along the table's four sides (the layout model's box, within a few pixels)...
    near = 20
    assert green[y0 - near:y0 + near, (x0 + x1) // 2].any() and green[y1 - near:y1 + near, (x0 + x1) // 2].any()
    assert green[(y0 + y1) // 2, x0 - near:x0 + near].any() and green[(y0 + y1) // 2, x1 - near:x1 + near].any()
    # ... and nowhere else, but for its caption just above its top left corner.
    ys, xs = np.nonzero(green)
    assert xs.min() >= x0 - near and ys.max() <= y1 + near and ys.min() >= y0 - near - 40
    assert xs[ys > y0 + near].max() <= x1 + near
    # Inside the table, the page is as rendered: the drawing only outlines it.
    assert not green[y0 + near:y1 - near, x0 + near:x1 - near].any()
    # Four tokens cut the table short: its caption is red, marking the reading as suspect.
    [table] = [block for block in row["blocks"] if block["label"] == "table"]
    assert table["finish_reason"] == "length"
    assert coloured(pixels, "failed")[y0 - near - 40:y0 + near, x0 - near:x0 + 100].any()


def test_whole_page_and_text_layer_pages(tiny_model, order_job, tmp_path):
    _, document = order_job
    whole = tmp_path / "whole.jsonl"
    run_job(options(tiny_model, [document], whole, layout="none"))
    pixels = inspect(whole, document, 1, tmp_path / "whole.png")
    page = coloured(pixels, "page")
    assert page[-1, :].all() and page[:, -1].all()  # one box around the whole page

    text_pdf = tmp_path / "letter.pdf"
    write_pdf(text_pdf, 1)
    settle(tmp_path)
    layer = tmp_path / "layer.jsonl"
    run_job(options(tiny_model, [text_pdf], layer, layout="none", pdf_text="only"))
    [row] = [json.loads(line) for line in layer.read_text().splitlines()]
    assert row["source"] == "text-layer"
    pixels = inspect(layer, text_pdf, 1, tmp_path / "layer.png")
    boxes = coloured(pixels, "text-layer")
    zoom = row["width"] / 595
    ys, xs = np.nonzero(boxes)
    # The heading at (40, 60) pt and the paragraph under it, 40 pt from each side.
    assert abs(xs.min() - 40 * zoom) < 8 and abs(xs.max() - (595 - 40) * zoom) < 30
    assert ys.min() < 60 * zoom


def test_a_ray_dataset_and_a_failed_page(order_job, tmp_path):
    from ocrbatch.records.dataset import DatasetRecord

    out, document = order_job
    [row] = pq.read_table(out).to_pylist()
    DatasetRecord(tmp_path / "dataset").write([row], "run-1.parquet")
    pixels = inspect(tmp_path / "dataset", document.name, 1, tmp_path / "ray.png")
    assert coloured(pixels, "table").any()

    failed = {**row, "status": "failed", "error": "layout failed: out of memory", "blocks": [], "width": None,
              "height": None}
    DatasetRecord(tmp_path / "failed").write([failed], "run-1.parquet")
    pixels = inspect(tmp_path / "failed", document, 1, tmp_path / "failed.png")
    red = coloured(pixels, "failed")
    assert red[:, 0].all() and red[0, :].all()  # the page framed as failed, its reason on it
