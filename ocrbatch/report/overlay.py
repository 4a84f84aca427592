"""What the job saw on a page: the page rendered as the job rendered it, with every box it read.

A row records the size its page was rendered at (``width``, ``height``), so
the page is rendered again to exactly that size: a PDF page at the zoom that
gives it, an image file fitted to it. The boxes come from the row: layout
blocks (``blocks``, in rendered-page pixels), the whole page for a page the
model read whole, the text layer's text blocks (from PyMuPDF) for a page read
from its text layer, and spotting's quadrilaterals. ``ocrbatch inspect`` draws
them with Pillow; ``ocrbatch report`` draws them in SVG, with the same styles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import OcrbatchError
from ..layout.blocks import KINDS, OMITTED_FROM_MARKDOWN
from ..model.prompt import TASK_PROMPTS
from ..sources.discover import Document, unescaped
from ..sources.rasterize import LAYOUT_PAGE_MAX_PIXELS, iter_pages

# Box colours by style (RGB); a test finds boxes by these exact colours.
STYLES = {
    "text": (0, 90, 255),
    "title": (255, 120, 0),
    "table": (0, 170, 0),
    "formula": (170, 0, 200),
    "picture": (128, 128, 128),  # not sent to the model
    "skipped": (190, 170, 120),  # recognised, left out of the Markdown (headers, footers, ...)
    "text-layer": (0, 160, 170),
    "page": (0, 90, 255),
    "failed": (230, 0, 0),
}
_STYLE_OF_KIND = {"title": "title", "heading": "title", "table": "table", "formula": "formula",
                  "image": "picture", "chart": "picture", "seal": "picture"}
LINE_WIDTH = 3


@dataclass(frozen=True)
class PageBox:
    """One box drawn on a page: where, what it is, how it was read, and what came of it."""

    number: int  # reading order, from 0
    label: str
    prompt: str
    x0: float
    y0: float
    x1: float
    y1: float
    style: str  # a key of STYLES: what kind of box it is
    problem: str = ""  # why its reading is suspect ("cut at max tokens", "no text"), marked in red; empty when fine
    quad: tuple[float, ...] | None = None  # spotting: the 8 corners' coordinates, drawn instead of the box

    @property
    def caption(self) -> str:
        parts = [str(self.number), self.label]
        if self.prompt:
            parts.append(self.prompt)
        if self.problem:
            parts.append(f"! {self.problem}")
        return " ".join(parts)


def block_style(block: dict) -> tuple[str, str]:
    """A layout block's style and problem (see :class:`PageBox`)."""
    if not block.get("prompt"):
        return "picture", ""
    reason = block.get("finish_reason") or ""
    problem = {"repetition": "cut in a loop", "length": "cut at max tokens"}.get(reason, "")
    if not problem and not (block.get("text") or "").strip() and block.get("group", block["order"]) == block["order"]:
        problem = "no text"
    if block["label"] in OMITTED_FROM_MARKDOWN:
        return "skipped", problem
    return _STYLE_OF_KIND.get(KINDS.get(block["label"], "text"), "text"), problem


def page_boxes(row: dict) -> list[PageBox]:
    """Every box of a recorded page, in reading order."""
    if row.get("status") != "ok":
        return []
    if row.get("blocks"):
        boxes = []
        for block in row["blocks"]:
            style, problem = block_style(block)
            boxes.append(PageBox(block["order"], block["label"], block.get("prompt") or "", block["x0"], block["y0"],
                                 block["x1"], block["y1"], style, problem))
        return boxes
    if row.get("source") == "text-layer":
        return text_layer_boxes(row)
    if row.get("spots"):
        return [_spot_box(number, spot) for number, spot in enumerate(row["spots"])]
    prompt = TASK_PROMPTS.get(row.get("task") or "ocr", "")
    problem = "cut at max tokens" if row.get("finish_reason") == "length" else ""
    return [PageBox(0, "page", prompt, 0, 0, row["width"], row["height"], "page", problem)]


def _spot_box(number: int, spot: dict) -> PageBox:
    quad = tuple(spot["quad"])
    xs, ys = quad[0::2], quad[1::2]
    return PageBox(number, "spot", spot.get("text") or "", min(xs), min(ys), max(xs), max(ys), "text", quad=quad)


def text_layer_boxes(row: dict) -> list[PageBox]:
    """The text blocks of a text-layer page, as PyMuPDF finds them, in rendered-page pixels."""
    import pymupdf

    from ..sources.rasterize import open_pdf_file

    with open_pdf_file(unescaped(row["path"])) as pdf:
        page = pdf[row["page"] - 1]
        # Text comes in unrotated page space; the render is of the page as shown.
        to_pixels = page.rotation_matrix * pymupdf.Matrix(row["width"] / page.rect.width,
                                                         row["height"] / page.rect.height)
        boxes = []
        for block in page.get_text("dict")["blocks"]:
            if block["type"] != 0:
                continue
            rect = pymupdf.Rect(block["bbox"]) * to_pixels
            boxes.append(PageBox(len(boxes), "text-layer", "", rect.x0, rect.y0, rect.x1, rect.y1, "text-layer"))
    return boxes


def render_recorded_page(row: dict, fallback_dpi: float = 150, scale: float = 1.0) -> Image.Image:
    """The page of ``row`` rendered again as the job rendered it: to the recorded size, times ``scale``.

    A failed page has no recorded size; it is rendered at ``fallback_dpi`` (times ``scale``).
    Raises :class:`OcrbatchError` when the document cannot be read (moved, deleted).
    """
    path = unescaped(row["path"])
    if not path.is_file():
        raise OcrbatchError(f"{row['path']}: the document is not there any more; cannot render its page")
    document = Document(path, row.get("doc_id"))
    size = None
    if row.get("width") and row.get("height"):
        size = (max(1, round(row["width"] * scale)), max(1, round(row["height"] * scale)))
    dpi, cap = fallback_dpi * scale, LAYOUT_PAGE_MAX_PIXELS
    if size:
        dpi, cap = _dpi_for(document, row["page"], size), size[0] * size[1]
    [page] = iter_pages(document, [row["page"]], dpi=dpi, max_pixels=cap)
    if page.error:
        raise OcrbatchError(page.error)
    image = page.image
    # Zoom rounding leaves a pixel either way; a scaled render (a report's picture, stretched over the
    # page's box) is not worth a resize for it.
    if size and image.size != size and scale == 1.0:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def _dpi_for(document: Document, number: int, size: tuple[int, int]) -> float:
    """The dpi that renders page ``number`` at ``size`` (images: any; they are fitted to the cap)."""
    if document.kind != "pdf":
        return 72
    from ..sources.rasterize import open_pdf_file

    with open_pdf_file(document.path) as pdf:
        return size[0] / pdf[number - 1].rect.width * 72


def draw_overlay(image: Image.Image, boxes: list[PageBox], failure: str | None = None) -> Image.Image:
    """A copy of ``image`` with ``boxes`` drawn, captioned, and a banner for a failed page."""
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    font = _font(max(12, canvas.width // 70))
    for box in boxes:
        colour = STYLES[box.style]
        if box.quad:
            draw.polygon(list(zip(box.quad[0::2], box.quad[1::2])), outline=colour, width=LINE_WIDTH)
        else:
            _rectangle(draw, box, colour)
        # A suspect reading's caption is red, so it stands out whatever the box's kind.
        _caption(draw, (box.x0, box.y0), box.caption, STYLES["failed"] if box.problem else colour, font)
    if failure:
        draw.rectangle((0, 0, canvas.width - 1, canvas.height - 1), outline=STYLES["failed"], width=LINE_WIDTH * 2)
        _caption(draw, (0, 0), f"failed: {failure}", STYLES["failed"], font)
    return canvas


def _rectangle(draw: ImageDraw.ImageDraw, box: PageBox, colour) -> None:
    shape = (box.x0, box.y0, max(box.x0, box.x1 - 1), max(box.y0, box.y1 - 1))
    if box.style in ("picture", "skipped"):  # not read into the Markdown: dashed
        _dashed(draw, shape, colour)
    else:
        draw.rectangle(shape, outline=colour, width=LINE_WIDTH)


def _dashed(draw: ImageDraw.ImageDraw, shape, colour, dash: int = 10) -> None:
    x0, y0, x1, y1 = shape
    for start in range(int(x0), int(x1), dash * 2):
        end = min(start + dash, x1)
        draw.line((start, y0, end, y0), fill=colour, width=LINE_WIDTH)
        draw.line((start, y1, end, y1), fill=colour, width=LINE_WIDTH)
    for start in range(int(y0), int(y1), dash * 2):
        end = min(start + dash, y1)
        draw.line((x0, start, x0, end), fill=colour, width=LINE_WIDTH)
        draw.line((x1, start, x1, end), fill=colour, width=LINE_WIDTH)


def _caption(draw: ImageDraw.ImageDraw, corner, text: str, colour, font) -> None:
    """White text on the box's colour, above its top left corner (inside it at the page's top)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    height = bottom - top + 4
    x, y = corner[0], corner[1] - height if corner[1] >= height else corner[1]
    draw.rectangle((x, y, x + right - left + 6, y + height), fill=colour)
    draw.text((x + 3, y + 2 - top), text, fill=(255, 255, 255), font=font)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def inspect_page(out: str | Path, path: str | Path, page: int, png: str | Path, fallback_dpi: float = 150) -> Path:
    """``ocrbatch inspect``: draw page ``page`` of ``path`` in the job ``out`` into ``png``."""
    from ..records.rows import find_row, read_rows

    row = find_row(read_rows(out), path, page)
    image = render_recorded_page(row, fallback_dpi)
    failure = row.get("error") if row.get("status") != "ok" else None
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    draw_overlay(image, page_boxes(row), failure).save(png)
    return png
