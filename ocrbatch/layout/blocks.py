"""Layout blocks: the official label set's roles, a block and its task, and its crop.

A :class:`Block` is one region of a page as a layout detector found it
(:mod:`ocrbatch.layout.detect`): its label, score, box (and polygon), and its
place in reading order (:mod:`ocrbatch.layout.order`). Its label decides how it
is recognised (:func:`task_for`: tables with ``Table Recognition:``, formulas
with ``Formula Recognition:``, text with ``OCR:``; pictures are not sent at
all) and written (:data:`KINDS`). Charts and seals stay pictures unless the
job asks for them to be recognised (``--charts``, ``--seals``, as PaddleX's
``use_chart_recognition`` and ``use_seal_recognition``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..model.prompt import TASK_PROMPTS

# Picture labels the model can be asked to read (--charts, --seals); by default they stay pictures.
RECOGNISABLE_PICTURES = ("chart", "seal")


# How each label is recognised and written: see markdown.block_markdown.
KINDS = {
    "chart": "chart",
    "content": "contents",
    "display_formula": "formula",
    "inline_formula": "formula",
    "formula": "formula",
    "doc_title": "title",
    "paragraph_title": "heading",
    "footer_image": "image",
    "header_image": "image",
    "image": "image",
    "seal": "seal",
    "table": "table",
}


IMAGE_LABELS = frozenset({"image", "header_image", "footer_image"})


# Page furniture: recognised and kept in the page's blocks, but not written
# into its Markdown (as the official pipeline's markdown_ignore_labels, plus
# formula numbers, which it never writes either).
OMITTED_FROM_MARKDOWN = frozenset({
    "number", "footnote", "header", "header_image", "footer", "footer_image", "aside_text", "formula_number",
})


# The official pipeline's pixel bounds for a block crop before the language
# model: small crops are enlarged to at least this many pixels, large ones
# reduced to at most this many (the image processor's own bounds apply to
# whole pages only).
BLOCK_MIN_PIXELS = 112896


BLOCK_MAX_PIXELS = 1003520


@dataclass(frozen=True)
class Block:
    """One region of a page: its label, detection score and box, and its place in reading order.

    ``order`` counts from 0 in the page's reading order. Coordinates are
    pixels of the page image given to the detector. ``polygon`` is the
    region's outline where the detector gives one (PP-DocLayoutV3: a
    slanted or non-rectangular block), corners in page pixels; ``None``:
    the box is the region.
    """

    order: int
    label: str
    score: float
    x0: float
    y0: float
    x1: float
    y1: float
    polygon: tuple[tuple[float, float], ...] | None = None
    # Picture labels (of RECOGNISABLE_PICTURES) the job sends to the model rather than keeping as pictures.
    recognised: frozenset[str] = frozenset()

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def kind(self) -> str:
        """How the block is written: text, contents, title, heading, table, formula, image, chart or seal."""
        return KINDS.get(self.label, "text")

    @property
    def task(self) -> str | None:
        """The recognition task for this block (a key of ``prompt.TASK_PROMPTS``), or ``None``."""
        return task_for(self.label, charts="chart" in self.recognised, seals="seal" in self.recognised)

    @property
    def prompt(self) -> str | None:
        """The prompt to recognise this block with; ``None`` when it is not sent to the model."""
        task = self.task
        return None if task is None else TASK_PROMPTS[task]


def task_for(label: str, charts: bool = False, seals: bool = False) -> str | None:
    """The task a block of this label is recognised with, as the official pipeline chooses it.

    Pictures are never sent to the model; charts and seals only when their
    recognition is switched on (otherwise they are kept as pictures).
    """
    if label in IMAGE_LABELS:
        return None
    if label == "chart":
        return "chart" if charts else None
    if label == "seal":
        return "seal" if seals else None
    if label == "table":
        return "table"
    if "formula" in label and label != "formula_number":
        return "formula"
    return "ocr"


def prompt_for(label: str, charts: bool = False, seals: bool = False) -> str | None:
    """The prompt for a block of this label (``None``: not sent to the model); see :func:`task_for`."""
    task = task_for(label, charts=charts, seals=seals)
    return None if task is None else TASK_PROMPTS[task]


def recognised_pictures(charts: bool = False, seals: bool = False) -> frozenset[str]:
    """The picture labels whose blocks go to the model: ``chart`` with ``charts``, ``seal`` with ``seals``."""
    return frozenset(label for label, wanted in zip(RECOGNISABLE_PICTURES, (charts, seals)) if wanted)


def whole_page(image: Image.Image, label: str = "text") -> list[Block]:
    """The page as a single block: ``--layout none``."""
    return [Block(0, label, 1.0, 0.0, 0.0, float(image.width), float(image.height))]


def crop(image: Image.Image, block: Block) -> Image.Image:
    """The block's region of the page: its box exactly (rounded outwards), formulas trimmed to their ink.

    A block with a polygon keeps only what lies inside it, the rest of its
    box painted white (as PaddleX crops PP-DocLayoutV3's blocks), so a
    slanted block does not bring its neighbours' text along. Raises
    ``ValueError`` for a box with no pixels on the page.
    """
    x0, y0 = max(0, math.floor(block.x0)), max(0, math.floor(block.y0))
    x1, y1 = min(image.width, math.ceil(block.x1)), min(image.height, math.ceil(block.y1))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"block {block.order} ({block.label}) has no pixels on the "
                         f"{image.width}x{image.height} page: box {block.x0:.0f},{block.y0:.0f},"
                         f"{block.x1:.0f},{block.y1:.0f}")
    region = image.crop((x0, y0, x1, y1))
    if block.polygon:
        region = _inside_polygon(region, [(x - x0, y - y0) for x, y in block.polygon])
    if block.kind == "formula":
        region = _trim_to_ink(region)
    return region


def _inside_polygon(region: Image.Image, polygon: list[tuple[float, float]]) -> Image.Image:
    """``region`` with every pixel outside ``polygon`` (in the region's pixels) painted white."""
    inside = Image.new("L", region.size, 0)
    ImageDraw.Draw(inside).polygon(polygon, fill=255)
    return Image.composite(region, Image.new(region.mode, region.size, "white"), inside)


def _trim_to_ink(image: Image.Image) -> Image.Image:
    """Cut the blank margins around a formula, as the official pipeline does before recognising it."""
    grey = np.asarray(image.convert("L"), dtype=np.int16)
    ink = grey < grey.max() - 50
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if len(rows) == 0 or rows[-1] - rows[0] < 2 or cols[-1] - cols[0] < 2:
        return image
    return image.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
