"""Layout analysis: CDLA on the real sample documents, the tiny PP-DocLayout model,
the official filters on hand-made detections, reading order, crops and prompts."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ocrbatch.dev.samples import ARTICLE_FOOTER, ARTICLE_HEADER
from ocrbatch.errors import ModelError
from ocrbatch.layout.blocks import KINDS, OMITTED_FROM_MARKDOWN, Block, crop, prompt_for, whole_page
from ocrbatch.layout.detect import (
    CDLA_LABELS,
    PP_DOCLAYOUT_LABELS,
    CdlaDetector,
    LayoutError,
    PPDocLayoutDetector,
    decode_detections,
    default_pp_doclayout,
    load_layout,
    order_ranks,
)
from ocrbatch.layout.markdown import page_markdown
from ocrbatch.layout.order import filter_blocks, reading_order

SAMPLES = Path(__file__).resolve().parents[2] / "sample_docs"
DPI = 110


def render(name: str, page: int = 0, dpi: float = DPI) -> Image.Image:
    import pymupdf

    with pymupdf.open(SAMPLES / name) as document:
        pixmap = document[page].get_pixmap(dpi=dpi)
        return Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)


def pt(value: float) -> float:
    """PDF points → pixels at the test DPI."""
    return value * DPI / 72


def pixel_size(block: Block) -> tuple[int, int]:
    """The size of a block's crop: its box rounded outwards to whole pixels."""
    return (math.ceil(block.x1) - math.floor(block.x0), math.ceil(block.y1) - math.floor(block.y0))


def box(label: str, x0, y0, x1, y1, score: float = 0.9, order: int = 0) -> Block:
    return Block(order, label, score, float(x0), float(y0), float(x1), float(y1))


@pytest.fixture(scope="module")
def cdla():
    return load_layout("cdla", threads=2)


# ------------------------------------------------------------------ CDLA

def test_cdla_label_map_covers_the_models_own_labels(cdla):
    # The class list stored in the ONNX model itself, not the documentation's.
    model_labels = cdla._engine.session.characters
    assert sorted(model_labels) == sorted(CDLA_LABELS)
    assert set(CDLA_LABELS.values()) <= set(PP_DOCLAYOUT_LABELS)


def test_cdla_finds_the_purchase_order_table(cdla):
    image = render("purchase-order-table.pdf")
    blocks = cdla.detect(image)
    tables = [b for b in blocks if b.label == "table"]
    assert len(tables) == 1
    table = tables[0]
    assert table.prompt == "Table Recognition:" and table.kind == "table"
    # samples.py draws the 5 x 4 grid from (56, 90) to (516, 230) points.
    grid = box("table", pt(56), pt(90), pt(516), pt(230))
    inter = (min(grid.x1, table.x1) - max(grid.x0, table.x0)) * (min(grid.y1, table.y1) - max(grid.y0, table.y0))
    assert inter / (grid.area + table.area - inter) > 0.85
    region = crop(image, table)
    assert region.size == pixel_size(table)
    # The crop holds the table's ruling and text: plenty of dark pixels.
    assert (np.asarray(region.convert("L")) < 128).mean() > 0.02
    assert [b.order for b in blocks] == list(range(len(blocks)))


def test_cdla_reads_the_two_column_article_column_by_column(cdla):
    image = render("two-column-article.pdf")
    blocks = cdla.detect(image)
    middle = image.width / 2
    labels = [b.label for b in blocks]
    assert labels.count("header") == 2 and labels[:2] == ["header", "header"]
    assert labels[-1] == "footer"
    body = [b for b in blocks if b.label not in ("header", "footer")]
    title = body[0]
    assert title.y1 < pt(110) and title.x1 > middle  # the full-width title comes first
    columns = body[1:]
    left = [b for b in columns if b.x1 < middle]
    right = [b for b in columns if b.x0 > middle]
    assert len(left) + len(right) == len(columns)
    # Four paragraphs and a section title per column.
    assert len(left) >= 5 and len(right) >= 5
    # Left column entirely before the right one, each top to bottom, even
    # though the paragraph gaps of the two columns line up across the page.
    assert columns == left + right
    assert [b.y0 for b in left] == sorted(b.y0 for b in left)
    assert [b.y0 for b in right] == sorted(b.y0 for b in right)
    assert [b.order for b in blocks] == list(range(len(blocks)))


def test_headers_and_footers_stay_out_of_the_page_text(cdla):
    blocks = cdla.detect(render("two-column-article.pdf"))
    texts = {"header": f"{ARTICLE_HEADER[0]} {ARTICLE_HEADER[1]}", "footer": ARTICLE_FOOTER}
    markdown = page_markdown([(b, texts.get(b.label, f"<{b.order}>")) for b in blocks])
    assert ARTICLE_HEADER[0] not in markdown and ARTICLE_FOOTER not in markdown
    body = [b for b in blocks if b.label not in OMITTED_FROM_MARKDOWN]
    assert len(body) == len(blocks) - 3
    positions = [markdown.index(f"<{b.order}>") for b in body]
    assert positions == sorted(positions)
    # The blocks themselves are all still there, furniture included.
    assert [b.label for b in blocks].count("header") == 2 and blocks[-1].label == "footer"


def test_cdla_on_every_sample_page(cdla):
    counts = {}
    for name in ("report.pdf", "minutes-3-pages.pdf"):
        blocks = cdla.detect(render(name))
        counts[name] = [b.label for b in blocks]
    # The title line is also labelled a header by CDLA; the body label wins.
    assert counts["report.pdf"] == ["paragraph_title", "text"]
    assert counts["minutes-3-pages.pdf"] == ["paragraph_title", "text"]


def test_layout_mode_renders_at_the_dpi_where_cdla_finds_a_small_type_scans_columns(cdla, tmp_path):
    from scanned_article import write_scanned_article

    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import LAYOUT_PAGE_MAX_PIXELS, iter_pages, page_pixel_cap

    scan = Document(write_scanned_article(tmp_path / "scan.pdf"), "scan")
    model_max = 672 * 672  # the tiny model's processor maximum

    def rendered(layout: str) -> Image.Image:
        [page] = iter_pages(scan, [1], dpi=DPI, max_pixels=page_pixel_cap(layout, model_max))
        return page.image

    # Whole pages keep the model's cap, --max-pixels only lowering it...
    assert page_pixel_cap("none", model_max) == model_max
    assert page_pixel_cap("none", model_max, 200_000) == 200_000
    assert page_pixel_cap("none", model_max, 10**9) == model_max
    # ...where CDLA, on this page, sees the two columns of body text as one picture.
    assert [b.label for b in cdla.detect(rendered("none"))].count("image") == 1
    # A layout page is rendered at the dpi (US Letter at 110 dpi), capped only for memory.
    assert page_pixel_cap("cdla", model_max, 200_000) == LAYOUT_PAGE_MAX_PIXELS
    image = rendered("cdla")
    assert image.size == (935, 1210)
    blocks = cdla.detect(image)
    middle = image.width / 2
    text = [b for b in blocks if b.label == "text"]
    assert "image" not in [b.label for b in blocks]
    left, right = [b for b in text if b.x1 < middle], [b for b in text if b.x0 > middle]
    assert len(left) >= 4 and len(right) >= 4 and len(left) + len(right) == len(text)
    body = [b for b in blocks if b.label not in ("header", "footer")]
    assert body.index(left[-1]) < body.index(right[0])  # the left column is read first


def test_a_page_with_no_blocks(cdla):
    assert cdla.detect(Image.new("RGB", (935, 1210), "white")) == []
    assert page_markdown([]) == ""


def test_a_failing_layout_model_raises_layout_error(cdla, monkeypatch):
    def broken(image):
        raise RuntimeError("onnxruntime: bad input")

    monkeypatch.setattr(cdla, "_engine", broken)
    with pytest.raises(LayoutError, match="cdla.*RuntimeError: onnxruntime: bad input"):
        cdla.detect(render("report.pdf"))


def test_load_layout_choices(tmp_path):
    assert load_layout("none") is None
    page = Image.new("RGB", (300, 200))
    assert whole_page(page) == [Block(0, "text", 1.0, 0.0, 0.0, 300.0, 200.0)]
    assert isinstance(load_layout("cdla"), CdlaDetector)
    with pytest.raises(ModelError, match="unknown layout 'yolo'"):
        load_layout("yolo")
    with pytest.raises(ModelError, match="pp-doclayout only"):
        load_layout("cdla", model="some/model")
    with pytest.raises(ModelError, match="cannot load the PP-DocLayout model"):
        load_layout("pp-doclayout", model=str(tmp_path / "missing"))
    with pytest.raises(ModelError, match="cannot recognise table blocks; only chart, seal"):
        load_layout("cdla", recognised=frozenset({"table"}))
    assert default_pp_doclayout(later_release=False) == "PaddlePaddle/PP-DocLayoutV2_safetensors"
    assert default_pp_doclayout(later_release=True) == "PaddlePaddle/PP-DocLayoutV3_safetensors"


# ------------------------------------------------------------ PP-DocLayout

@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory):
    from ocrbatch.dev.layout_model import make_layout_model

    # Seed 1 of the tiny random model detects "table" boxes on the sample pages.
    return make_layout_model(tmp_path_factory.mktemp("layout") / "tiny-v2", seed=1)


def test_tiny_model_is_the_real_architecture(tiny_layout):
    from transformers import AutoModelForObjectDetection, PPDocLayoutV2ForObjectDetection

    model = AutoModelForObjectDetection.from_pretrained(tiny_layout)
    assert isinstance(model, PPDocLayoutV2ForObjectDetection)
    assert [model.config.id2label[i] for i in range(25)] == list(PP_DOCLAYOUT_LABELS)
    assert model.config.class_thresholds[PP_DOCLAYOUT_LABELS.index("seal")] == 0.45


def test_tiny_model_is_reproducible(tmp_path):
    from safetensors.numpy import load_file

    from ocrbatch.dev.layout_model import make_layout_model

    first = load_file(make_layout_model(tmp_path / "a", seed=3) / "model.safetensors")
    second = load_file(make_layout_model(tmp_path / "b", seed=3) / "model.safetensors")
    other = load_file(make_layout_model(tmp_path / "c", seed=4) / "model.safetensors")
    assert all(np.array_equal(first[k], second[k]) for k in first)
    assert not all(np.array_equal(first[k], other[k]) for k in first)


def test_pp_doclayout_detect_is_decode_filter_and_model_order(tiny_layout):
    import torch

    detector = load_layout("pp-doclayout", model=str(tiny_layout))
    assert isinstance(detector, PPDocLayoutDetector)
    image = render("two-column-article.pdf")
    blocks = detector.detect(image)
    assert blocks, "the tiny model detects nothing: its random init changed"
    assert [b.order for b in blocks] == list(range(len(blocks)))

    with torch.inference_mode():
        outputs = detector.model(pixel_values=torch.from_numpy(detector.pixel_values(image)))
    logits, boxes = outputs.logits[0].numpy(), outputs.pred_boxes[0].numpy()
    order_logits = outputs.order_logits[0].numpy()
    raw = decode_detections(logits, boxes, order_logits, image.width, image.height, detector.labels,
                            detector.thresholds, detector.default_threshold)
    assert len(raw) > len(blocks)  # the filters removed overlapping boxes
    # Same boxes, in the model's reading order (its rank of each query).
    kept = filter_blocks(raw, image.width, image.height)
    assert [(b.label, b.x0, b.y0, b.x1, b.y1) for b in kept] == [(b.label, b.x0, b.y0, b.x1, b.y1) for b in blocks]
    ranks = [b.order for b in kept]
    assert ranks == sorted(ranks)

    for block in blocks:
        assert 0 <= block.x0 < block.x1 <= image.width and 0 <= block.y0 < block.y1 <= image.height
        assert block.width >= 4 and block.height >= 4
        assert block.prompt == prompt_for(block.label)
        assert crop(image, block).size == pixel_size(block)
    for i, a in enumerate(blocks):
        for b in blocks[i + 1:]:
            overlap = max(0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0, min(a.y1, b.y1) - max(a.y0, b.y0))
            assert overlap <= 0.7 * min(a.area, b.area)


def test_pp_doclayout_input_follows_the_preprocessor_config(tiny_layout, tmp_path):
    import json
    import shutil

    detector = load_layout("pp-doclayout", model=str(tiny_layout))
    image = Image.new("RGB", (612, 792), (255, 0, 0))
    pixels = detector.pixel_values(image)
    assert pixels.shape == (1, 3, 800, 800) and pixels.dtype == np.float32
    assert pixels[0, 0].min() == pytest.approx(1.0) and pixels[0, 1].max() == pytest.approx(0.0)

    other = Path(shutil.copytree(tiny_layout, tmp_path / "other"))
    config = json.loads((other / "preprocessor_config.json").read_text())
    config.update(size={"height": 640, "width": 608}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    (other / "preprocessor_config.json").write_text(json.dumps(config))
    pixels = load_layout("pp-doclayout", model=str(other)).pixel_values(image)
    assert pixels.shape == (1, 3, 640, 608)
    assert pixels[0, 0].min() == pytest.approx(1.0) and pixels[0, 1].max() == pytest.approx(-1.0)


def test_pp_doclayout_v3_model_loads_and_runs(tmp_path):
    from ocrbatch.dev.layout_model import make_layout_model

    detector = load_layout("pp-doclayout", model=str(make_layout_model(tmp_path / "v3", version="v3")))
    assert detector.thresholds == {} and detector.default_threshold == 0.3
    for block in detector.detect(render("report.pdf")):
        assert block.prompt == prompt_for(block.label)


def test_pp_doclayout_v3_blocks_take_their_polygons_from_the_models_masks(tmp_path):
    import torch

    from ocrbatch.dev.layout_model import make_layout_model

    detector = load_layout("pp-doclayout", model=str(make_layout_model(tmp_path / "v3", version="v3")))
    image = render("report.pdf")
    blocks = detector.detect(image)
    outlined = [b for b in blocks if b.polygon]
    assert outlined, "the tiny V3 model outlines nothing: its random init changed"
    with torch.inference_mode():
        outputs = detector.model(pixel_values=torch.from_numpy(detector.pixel_values(image)))
    masks = outputs.out_masks[0].numpy()
    raw = decode_detections(outputs.logits[0].numpy(), outputs.pred_boxes[0].numpy(),
                            outputs.order_logits[0].numpy(), image.width, image.height, detector.labels,
                            detector.thresholds, detector.default_threshold, masks)
    assert {b.polygon for b in blocks} <= {b.polygon for b in raw}
    for block in outlined:
        assert len(block.polygon) >= 4
        for x, y in block.polygon:  # corners inside the block's box
            assert block.x0 - 1 <= x <= block.x1 + 1 and block.y0 - 1 <= y <= block.y1 + 1


def slanted_mask(size: int, corners: list[tuple[float, float]]) -> np.ndarray:
    """Mask logits (positive inside) of one quadrilateral, corners given as fractions of the page."""
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon([(x * size, y * size) for x, y in corners], fill=255)
    return np.where(np.asarray(mask) > 0, 8.0, -8.0)


def test_mask_polygon_outlines_a_slanted_block_in_page_pixels():
    from ocrbatch.layout.detect import mask_polygon

    # A parallelogram leaning right, on an 800 x 1000 page whose mask is 200 x 200.
    corners = [(0.25, 0.2), (0.75, 0.2), (0.85, 0.4), (0.35, 0.4)]
    polygon = mask_polygon(slanted_mask(200, corners), (200.0, 200.0, 680.0, 400.0), 800, 1000)
    assert polygon is not None and len(polygon) == 4
    expected = [(x * 800, y * 1000) for x, y in corners]
    for corner in expected:  # each corner found within a mask cell (4 px across, 5 down)
        assert min(math.dist(corner, found) for found in polygon) <= 8
    # Nothing under the box, or a mask too thin for an outline: the box stands.
    assert mask_polygon(np.full((200, 200), -8.0), (200.0, 200.0, 680.0, 400.0), 800, 1000) is None
    assert mask_polygon(slanted_mask(200, corners), (0.0, 600.0, 100.0, 700.0), 800, 1000) is None


def test_a_polygon_block_is_cropped_to_its_outline():
    page = Image.new("RGB", (200, 100), "black")
    slanted = Block(0, "text", 0.9, 20.0, 10.0, 180.0, 90.0,
                    polygon=((60.0, 10.0), (180.0, 10.0), (140.0, 90.0), (20.0, 90.0)))
    region = np.asarray(crop(page, slanted))
    assert region.shape[:2] == (80, 160)
    assert region[0, 0].tolist() == [255, 255, 255] and region[79, 159].tolist() == [255, 255, 255]  # outside
    assert region[40, 80].tolist() == [0, 0, 0]  # inside
    assert np.asarray(crop(page, replace(slanted, polygon=None))).max() == 0  # the box alone keeps everything


def test_slanted_blocks_whose_boxes_overlap_are_both_kept():
    # Two thin bands slanting across nearly the same box (labels apart, so NMS keeps both boxes):
    # the boxes overlap, the bands do not touch.
    upper = Block(0, "text", 0.9, 0.0, 0.0, 400.0, 200.0, polygon=((0.0, 80.0), (400.0, 0.0), (400.0, 40.0), (0.0, 120.0)))
    lower = Block(1, "footnote", 0.8, 0.0, 0.0, 400.0, 190.0,
                  polygon=((0.0, 160.0), (400.0, 80.0), (400.0, 110.0), (0.0, 190.0)))
    assert filter_blocks([upper, lower], 1000, 1000) == [upper, lower]
    # Without polygons (or with polygons that do overlap) the smaller box goes, as before.
    assert filter_blocks([replace(upper, polygon=None), replace(lower, polygon=None)], 1000, 1000) == [
        replace(upper, polygon=None)]
    assert filter_blocks([upper, replace(lower, polygon=upper.polygon)], 1000, 1000) == [upper]


def test_pp_doclayout_failure_raises_layout_error(tiny_layout, monkeypatch):
    detector = load_layout("pp-doclayout", model=str(tiny_layout))

    def broken(**inputs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(detector, "model", broken)
    with pytest.raises(LayoutError, match="pp-doclayout.*out of memory"):
        detector.detect(render("report.pdf"))


def test_order_ranks_follow_the_pairwise_beliefs():
    # Queries 0..4 should be read in the order 2, 0, 4, 1, 3: rank of each query.
    wanted = np.array([1, 3, 0, 4, 2])
    n = len(wanted)
    logits = np.full((n, n), -1e4)
    for i in range(n):
        for j in range(i + 1, n):
            logits[i, j] = 6.0 if wanted[i] < wanted[j] else -6.0
    assert order_ranks(logits).tolist() == wanted.tolist()


def test_decode_detections_thresholds_boxes_and_order():
    labels = ["text", "image", "table"]

    def logit(p):
        return np.log(p / (1 - p))

    logits = np.full((3, 3), logit(0.01))
    logits[0, 0] = logit(0.45)  # text at 0.45: kept (text threshold 0.4)
    logits[1, 1] = logit(0.45)  # image at 0.45: dropped (default 0.5)
    logits[2, 2] = logit(0.9)   # table, and the same query also as text
    logits[2, 0] = logit(0.6)
    boxes = np.array([[0.5, 0.5, 0.2, 0.1], [0.2, 0.2, 0.1, 0.1], [0.9, 0.1, 0.4, 0.4]])
    # Pairwise beliefs (row before column): 0 before 1, 2 before 0, 2 before 1.
    order = np.full((3, 3), -1e4)
    order[0, 1], order[0, 2], order[1, 2] = 6.0, -6.0, -6.0
    blocks = decode_detections(logits, boxes, order, 1000, 500, labels, {"text": 0.4}, 0.5)
    assert [(b.label, b.order) for b in blocks] == [("table", 0), ("text", 0), ("text", 1)]
    table = blocks[0]
    assert table.score == pytest.approx(0.9)
    # Centre (0.9, 0.1), size (0.4, 0.4) → clipped to the page.
    assert (table.x0, table.y0, table.x1, table.y1) == pytest.approx((700, 0, 1000, 150))
    assert (blocks[2].x0, blocks[2].y0, blocks[2].x1, blocks[2].y1) == pytest.approx((400, 225, 600, 275))


# ---------------------------------------------------------------- filters

def test_nms_keeps_the_better_score_where_the_duplicate_filter_would_keep_the_larger_box():
    large, small = box("text", 0, 0, 100, 100, score=0.6), box("text", 0, 0, 100, 80, score=0.9)
    assert filter_blocks([large, small], 1000, 1000) == [small]  # same label, IoU 0.8
    assert filter_blocks([small, small], 1000, 1000) == [small]  # the same box twice
    table, text = box("table", 0, 0, 100, 100, score=0.6), box("text", 0, 0, 100, 99, score=0.9)
    assert filter_blocks([table, text], 1000, 1000) == [text]  # other labels, IoU 0.99
    table, text = box("table", 0, 0, 100, 100, score=0.6), box("text", 0, 0, 100, 90, score=0.9)
    assert filter_blocks([table, text], 1000, 1000) == [table]  # IoU 0.9: only the duplicate filter


def test_boxes_inside_titles_formulas_and_charts_are_dropped():
    title = box("paragraph_title", 100, 100, 500, 140)
    inside_title = box("text", 110, 105, 300, 135)
    chart = box("chart", 100, 200, 500, 500)
    inside_chart = box("image", 120, 210, 480, 400)  # the duplicate filter alone would keep a picture
    table = box("table", 100, 600, 500, 800)
    inside_table = box("image", 120, 610, 200, 700)  # a table is no container
    kept = filter_blocks([title, inside_title, chart, inside_chart, table, inside_table], 1000, 1000)
    assert kept == [title, chart, table, inside_table]


def test_near_identical_container_boxes_do_not_remove_each_other():
    # Each lies (over 90 %) inside the other; the official rule would drop both.
    a = box("doc_title", 100, 100, 500, 140, score=0.5)
    b = box("paragraph_title", 110, 100, 500, 140, score=0.6)
    assert filter_blocks([a, b], 1000, 1000) == [a]


def test_small_reference_and_duplicate_boxes_are_dropped():
    kept = filter_blocks([
        box("text", 0, 0, 3, 100),                 # 3 px wide
        box("reference", 0, 200, 400, 300),
        box("text", 0, 400, 400, 500),
        box("footnote", 10, 410, 390, 480),       # inside the text box: the smaller one goes
        box("image", 500, 0, 900, 400),
        box("figure_title", 510, 20, 890, 60),    # inside a picture: kept
        box("table", 500, 500, 900, 900),
        box("text", 600, 600, 800, 650),          # inside the table: smaller one dropped
    ], 1000, 1000)
    assert [(b.label, b.x0, b.y0) for b in kept] == [
        ("text", 0, 400), ("image", 500, 0), ("figure_title", 510, 20), ("table", 500, 500)]


def test_a_page_sized_picture_is_dropped():
    portrait = [box("image", 0, 0, 1000, 1400), box("text", 100, 100, 900, 200)]
    assert [b.label for b in filter_blocks(portrait, 1000, 1414)] == ["text"]
    figure = [box("image", 0, 0, 1000, 1200), box("text", 100, 1300, 900, 1400)]
    assert [b.label for b in filter_blocks(figure, 1000, 1414)] == ["image", "text"]
    assert [b.label for b in filter_blocks(portrait[:1], 1000, 1414)] == ["image"]


def test_degenerate_boxes():
    image = Image.new("RGB", (200, 100), "white")
    assert filter_blocks([box("text", 50, 50, 50, 80)], 200, 100) == []
    with pytest.raises(ValueError, match="no pixels"):
        crop(image, box("text", 250, 10, 300, 50))
    with pytest.raises(ValueError, match="no pixels"):
        crop(image, box("text", 50, 50, 50, 80))
    # A box hanging over the edge is cut at the page.
    assert crop(image, box("text", 150.5, 80.2, 260, 130)).size == (50, 20)


# ---------------------------------------------------------- reading order

def test_reading_order_two_columns_with_a_spanning_figure():
    page = [
        box("footer", 400, 1350, 600, 1380),
        box("text", 550, 900, 950, 1000, order=1),   # right column, below the figure
        box("text", 50, 200, 450, 300),               # left, top
        box("image", 50, 700, 950, 850),              # spans both columns
        box("text", 550, 200, 950, 300),             # right, top (aligned with left top)
        box("text", 50, 350, 450, 450),
        box("text", 550, 350, 950, 420),
        box("paragraph_title", 50, 60, 950, 120),
        box("header", 50, 10, 300, 30),
        box("text", 50, 900, 450, 1050),
        box("text", 50, 500, 450, 650),
    ]
    ordered = reading_order(page)
    assert [(b.label, b.x0, b.y0) for b in ordered] == [
        ("header", 50, 10), ("paragraph_title", 50, 60),
        ("text", 50, 200), ("text", 50, 350), ("text", 50, 500),
        ("text", 550, 200), ("text", 550, 350),
        ("image", 50, 700),
        ("text", 50, 900), ("text", 550, 900),
        ("footer", 400, 1350),
    ]
    assert [b.order for b in ordered] == list(range(len(page)))


def test_reading_order_sees_columns_through_small_overlaps():
    # The columns' boxes overlap by 2 px across the gutter, and their rows line up.
    left = [box("text", 50, 100 + 150 * i, 452, 200 + 150 * i) for i in range(3)]
    right = [box("text", 450, 100 + 150 * i, 900, 200 + 150 * i) for i in range(3)]
    ordered = reading_order([b for pair in zip(right, left) for b in pair])
    assert [(b.x0, b.y0) for b in ordered] == [(b.x0, b.y0) for b in left + right]


# ------------------------------------------------------------ crops, prompts

def test_formula_crops_are_trimmed_to_their_ink():
    image = Image.new("RGB", (400, 200), "white")
    ImageDraw.Draw(image).rectangle((150, 80, 249, 109), fill="black")
    formula = crop(image, box("display_formula", 100, 50, 300, 150))
    assert formula.size == (100, 30)
    text = crop(image, box("text", 100, 50, 300, 150))
    assert text.size == (200, 100)
    blank = crop(image, box("inline_formula", 0, 0, 50, 50))
    assert blank.size == (50, 50)  # nothing to trim to: kept as is


def test_prompts_follow_the_official_pipeline():
    assert prompt_for("table") == "Table Recognition:"
    for label in ("display_formula", "inline_formula", "formula"):
        assert prompt_for(label) == "Formula Recognition:"
    assert prompt_for("formula_number") == "OCR:"
    for label in ("image", "header_image", "footer_image", "chart", "seal"):
        assert prompt_for(label) is None
    assert prompt_for("chart", charts=True) == "Chart Recognition:"
    assert prompt_for("seal", seals=True) == "Seal Recognition:"
    for label in ("text", "doc_title", "paragraph_title", "header", "footer", "abstract", "reference_content"):
        assert prompt_for(label) == "OCR:"
    assert box("table", 0, 0, 1, 1).task == "table" and box("image", 0, 0, 1, 1).task is None
    chart, seal = box("chart", 0, 0, 1, 1), box("seal", 0, 0, 1, 1)
    both = frozenset({"chart", "seal"})
    assert chart.prompt is None and replace(chart, recognised=both).prompt == "Chart Recognition:"
    assert seal.prompt is None and replace(seal, recognised=frozenset({"chart"})).prompt is None
    assert replace(seal, recognised=both).task == "seal"
    assert replace(box("image", 0, 0, 1, 1), recognised=both).prompt is None  # pictures are never sent
    assert box("paragraph_title", 0, 0, 1, 1).kind == "heading"
    assert box("vertical_text", 0, 0, 1, 1).kind == "text"
    assert set(KINDS) - set(PP_DOCLAYOUT_LABELS) == {"formula"}
