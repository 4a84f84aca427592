"""Born-digital PDF pages: judge a page's text layer, and take Markdown from it.

A PDF page may carry its text already (a "text layer"). Where that layer is
good, reading it is exact and nearly free; where it is missing, partial,
hidden or garbled, the page must go to the model. ``--pdf-text`` chooses:

- ``never``: every page goes to the model (the layer is not looked at);
- ``auto``: pages whose layer is good are taken from it, the others go to the model;
- ``only``: pages whose layer is good are taken from it, the others fail with the reason.

A layer is judged from the page itself, in this order (the first failing
test gives the reason):

1. **Hidden text.** Text in render mode 3 (invisible), fully transparent, in
   a font whose glyphs paint nothing, or painted over by a later opaque image
   is what OCR tools put over a scan. When at least :data:`OCR_LAYER_SHARE`
   of a page's characters are hidden the page is an OCR layer: not good
   unless ``trust_ocr_layer``. Trusted, hidden text counts like visible text
   and the images under it count as read; untrusted, the few hidden
   characters of an otherwise visible page are left out of the counts.
2. **Some text.** A page with no characters is not good, except a page on
   which nothing at all is drawn: a blank page, whose (empty) layer is exact.
3. **Readable glyphs.** Characters the font cannot map to Unicode (MuPDF
   reports U+FFFD), private-use code points and control characters are what a
   font without a usable ToUnicode map yields. Above
   :data:`MAX_BAD_GLYPH_RATIO` of the characters, the layer is garbage.
4. **Text covers the content.** The share of the page's text-and-image area
   that text covers must reach :data:`MIN_TEXT_COVERAGE`; a scan with a stamp,
   a header or a caption fails this, as the image holds the rest.
5. **Enough characters for the page's area**, :data:`MIN_CHARS_PER_A4` per A4
   of page, when the page also has images or vector graphics: a sparse layer
   beside other content (a title over a chart, a page number on a drawing)
   does not carry the page. Where text is all that is drawn, the layer is the
   whole page however short it is.

Vector graphics (rules, table borders, background fills, charts) count as
content for the blank-page test only: they carry no text that the layer could
miss, except text converted to outlines, which leaves no characters and so
fails test 2 or 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import pymupdf

PDF_TEXT_MODES = ("never", "auto", "only")

# Most of a scan's OCR layer is hidden; a born-digital page hides at most a
# few words (form values, accessibility labels): SF424 in pypdf's test files
# hides 9%. Half separates the two with room on both sides.
OCR_LAYER_SHARE = 0.5
# Symbol-font bullets (Wingdings, Symbol) map to private-use U+F0xx and stay
# at 1-3% of a page's characters; a font without a Unicode map makes 30-100%
# of them unreadable. At 5% one word in four or five is broken.
MAX_BAD_GLYPH_RATIO = 0.05
# A one-line stamp or header on a scan covers 1-3% of its text-and-image
# area, a caption beside a picture 1-9% (pypdf's and pikepdf's test files);
# text pages with figures are at 20-60%.
MIN_TEXT_COVERAGE = 0.10
# A header, footer, stamp or page number is under 80 characters; a page
# carrying real text has several hundred per A4 (2,000-3,500 when full).
MIN_CHARS_PER_A4 = 100
A4_AREA = 595.0 * 842.0  # points
# Union areas are measured on a grid this many cells along the page's longer
# side: 3 pt cells on A4, finer than a line of text, cheap to fill.
GRID_CELLS = 300

_HIDDEN_TRACE_TYPE = 3  # get_texttrace() span type for render mode 3 ("ignore text")
_OCCLUDING_IMAGE = "fill-image"  # image masks ("fill-imgmask") paint only their set pixels
_IMAGE_KINDS = ("fill-image", "fill-imgmask")
_TEXT_KINDS = ("fill-text", "stroke-text", "ignore-text")

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TextLayerVerdict:
    """Whether a page's text layer can stand in for OCR, and the measures behind it.

    ``reason`` is one line for people: a failed page's error in ``only``
    mode, and the ``--dry-run`` listing. ``chars`` and ``bad_glyph_ratio``
    count the characters judged (hidden ones only when trusted), not
    whitespace. ``coverage`` is the share of the text-and-image area covered
    by text; ``hidden_ratio`` the share of all characters that are hidden.
    """

    good: bool
    reason: str
    chars: int
    coverage: float
    bad_glyph_ratio: float
    hidden_ratio: float
    ocr_layer: bool


@dataclass(frozen=True)
class PageStats:
    """What a page draws, as far as judging its text layer needs: see :func:`page_stats`."""

    width: float
    height: float
    visible_chars: int
    visible_bad: int
    hidden_chars: int
    hidden_bad: int
    visible_boxes: tuple[Box, ...]
    hidden_boxes: tuple[Box, ...]
    image_boxes: tuple[Box, ...]
    graphics: bool  # anything drawn besides text: images, paths, shadings
    drawn: bool  # anything drawn at all


@dataclass(frozen=True)
class Route:
    """Where one page goes.

    ``source`` is the row's ``source`` column: ``text-layer`` or ``model``.
    ``error`` is set when the page must fail instead (``only`` mode, layer
    not good): the failed row's one-line reason.
    """

    source: str
    verdict: TextLayerVerdict | None  # None in ``never`` mode: the layer was not looked at
    error: str | None = None


def _is_bad_glyph(code: int) -> bool:
    """Whether a non-space character shows a broken font map rather than text."""
    return (
        code == 0xFFFD  # MuPDF's "no Unicode for this glyph"
        or 0xE000 <= code <= 0xF8FF  # private-use area
        or code >= 0xF0000  # supplementary private-use planes
        or code < 0x20  # C0 controls: raw glyph codes passed through as text
        or 0x7F <= code < 0xA0  # DEL and C1 controls
    )


def _clip(box: Iterable[float], width: float, height: float) -> Box | None:
    x0, y0, x1, y1 = box
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, width), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def _centre(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _inside(point: tuple[float, float], box: Box) -> bool:
    return box[0] <= point[0] <= box[2] and box[1] <= point[1] <= box[3]


def page_stats(page: "pymupdf.Page") -> PageStats:
    """Measure a page's text and images from its content stream (no rendering).

    Uses ``get_bboxlog()`` (every drawing operation in painting order, with
    its bounding box) and ``get_texttrace()`` (every text span with its
    characters, render type, opacity and the index of its operation in that
    log), so text painted over by a later image is found by order.
    Coordinates are the unrotated page's, the space both calls report in.
    """
    width, height = page.rect.width, page.rect.height
    if page.rotation % 180:
        width, height = height, width
    log = page.get_bboxlog()
    on_page = [(kind, _clip(box, width, height)) for kind, box, *_ in log]
    occluders = [(seqno, box) for seqno, (kind, box) in enumerate(on_page) if kind == _OCCLUDING_IMAGE and box]
    image_boxes = tuple(box for kind, box in on_page if kind in _IMAGE_KINDS and box)
    graphics = any(box for kind, box in on_page if kind not in _TEXT_KINDS)

    counts = {True: [0, 0], False: [0, 0]}  # hidden -> [chars, bad]
    boxes: dict[bool, list[Box]] = {True: [], False: []}
    for span in page.get_texttrace():
        box = _clip(span["bbox"], width, height)
        codes = [char[0] for char in span["chars"] if not chr(char[0]).isspace()]
        if box is None or not codes:
            continue  # off the page, or only spaces: nothing a reader would see
        centre = _centre(box)
        # A seqno past the log's end would mean the two calls disagree: assume painted.
        painted = span["seqno"] >= len(on_page) or on_page[span["seqno"]][1] is not None
        hidden = (
            span["type"] == _HIDDEN_TRACE_TYPE
            or span["opacity"] == 0
            or not painted  # a glyphless font (Tesseract's GlyphLessFont, OCRmyPDF's Occulta)
            or any(seqno > span["seqno"] and _inside(centre, image) for seqno, image in occluders)
        )
        counts[hidden][0] += len(codes)
        counts[hidden][1] += sum(map(_is_bad_glyph, codes))
        boxes[hidden].append(box)
    return PageStats(
        width=width, height=height,
        visible_chars=counts[False][0], visible_bad=counts[False][1],
        hidden_chars=counts[True][0], hidden_bad=counts[True][1],
        visible_boxes=tuple(boxes[False]), hidden_boxes=tuple(boxes[True]),
        image_boxes=image_boxes, graphics=graphics, drawn=any(box for _, box in on_page),
    )


def _covered_cells(boxes: Iterable[Box], width: float, height: float):
    import numpy as np

    cell = max(width, height, 1.0) / GRID_CELLS
    grid = np.zeros((max(1, math.ceil(height / cell)), max(1, math.ceil(width / cell))), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        grid[int(y0 / cell):math.ceil(y1 / cell), int(x0 / cell):math.ceil(x1 / cell)] = True
    return grid


def text_coverage(text_boxes: Iterable[Box], image_boxes: Iterable[Box], width: float, height: float) -> float:
    """Share of the area covered by text or images that text covers (0 when there is neither)."""
    text = _covered_cells(text_boxes, width, height)
    content = text | _covered_cells(image_boxes, width, height)
    total = int(content.sum())
    return float(text.sum()) / total if total else 0.0


def judge(stats: PageStats, trust_ocr_layer: bool = False) -> TextLayerVerdict:
    """Decide whether a page's text layer is good, by the rules in this module's docstring."""
    all_chars = stats.visible_chars + stats.hidden_chars
    hidden_ratio = stats.hidden_chars / all_chars if all_chars else 0.0
    ocr_layer = hidden_ratio >= OCR_LAYER_SHARE
    if trust_ocr_layer:
        chars, bad = all_chars, stats.visible_bad + stats.hidden_bad
        text_boxes = stats.visible_boxes + stats.hidden_boxes
        # A trusted OCR layer is the reading of the scan under it: that image
        # holds nothing more to read, however sparse the page's text.
        image_boxes = tuple(image for image in stats.image_boxes
                            if not any(_inside(_centre(box), image) for box in stats.hidden_boxes))
    else:
        chars, bad = stats.visible_chars, stats.visible_bad
        text_boxes, image_boxes = stats.visible_boxes, stats.image_boxes
    coverage = text_coverage(text_boxes, image_boxes, stats.width, stats.height)
    bad_ratio = bad / chars if chars else 0.0

    def verdict(good: bool, reason: str) -> TextLayerVerdict:
        return TextLayerVerdict(good, reason, chars, coverage, bad_ratio, hidden_ratio, ocr_layer)

    if ocr_layer and not trust_ocr_layer:
        return verdict(False, f"invisible OCR layer: {stats.hidden_chars} of {all_chars} characters are hidden "
                              "(render mode 3, transparent, glyphless or under an image); --trust-ocr-layer to use it")
    if not all_chars and not stats.drawn:
        return verdict(True, "blank page")
    if chars == 0:
        return verdict(False, "no text layer")
    if bad_ratio > MAX_BAD_GLYPH_RATIO:
        return verdict(False, f"{bad_ratio:.0%} of the characters are unmapped glyphs (U+FFFD, private-use "
                              "or control characters): fonts without a usable Unicode map")
    if coverage < MIN_TEXT_COVERAGE:
        return verdict(False, f"text covers {coverage:.0%} of the page's text and image area: "
                              "a scan or picture with little text on it")
    needed = math.ceil(MIN_CHARS_PER_A4 * stats.width * stats.height / A4_AREA)
    if stats.graphics and chars < needed:
        return verdict(False, f"{chars} characters beside images or graphics, fewer than the {needed} "
                              "expected of a page this size")
    return verdict(True, f"text layer: {chars} characters covering {coverage:.0%} of the content")


def assess_page(page: "pymupdf.Page", trust_ocr_layer: bool = False) -> TextLayerVerdict:
    """Judge one page's text layer from the page alone: :func:`judge` of :func:`page_stats`."""
    return judge(page_stats(page), trust_ocr_layer)


def decide(verdict: TextLayerVerdict, mode: str) -> Route:
    """Route one judged page under ``mode`` (``auto`` or ``only``)."""
    if mode not in PDF_TEXT_MODES[1:]:
        raise ValueError(f"pdf-text mode {mode!r} needs no verdict; judged modes: {PDF_TEXT_MODES[1:]}")
    if verdict.good:
        return Route("text-layer", verdict)
    if mode == "auto":
        return Route("model", verdict)
    return Route("text-layer", verdict, error=f"no usable text layer: {verdict.reason}")


def route(path: str | Path, pages: Iterable[int], mode: str, trust_ocr_layer: bool = False) -> dict[int, Route]:
    """Where each of the 1-based ``pages`` of the PDF at ``path`` goes under ``mode``.

    Opens the PDF once. In ``never`` mode the file is not opened: every page
    goes to the model. A page whose content cannot be read is judged not
    good: it goes to the model in ``auto`` (whose renderer reports any real
    problem) and fails in ``only``. Raises whatever ``pymupdf.open`` raises
    for a file that is not a readable PDF; the caller has opened it before,
    to count its pages.
    """
    if mode not in PDF_TEXT_MODES:
        raise ValueError(f"pdf-text mode {mode!r}; one of {PDF_TEXT_MODES}")
    pages = sorted(set(pages))
    if mode == "never":
        return {number: Route("model", None) for number in pages}
    from .rasterize import open_pdf_file

    routes = {}
    with open_pdf_file(path) as pdf:
        for number in pages:
            if not 1 <= number <= pdf.page_count:
                raise ValueError(f"{path}: no page {number} (the PDF has {pdf.page_count})")
            try:
                verdict = assess_page(pdf[number - 1], trust_ocr_layer)
            except Exception as exc:  # MuPDF raises plain exceptions for broken content streams
                verdict = TextLayerVerdict(good=False, reason=f"cannot read the page's content ({exc})", chars=0,
                                           coverage=0.0, bad_glyph_ratio=0.0, hidden_ratio=0.0, ocr_layer=False)
            routes[number] = decide(verdict, mode)
    return routes


def page_markdown(pdf: "pymupdf.Document", page_number: int) -> str:
    """Markdown of the 1-based ``page_number`` of an open PDF, from its text layer.

    Uses pymupdf4llm with PyMuPDF's layout model (bundled, offline): headings,
    paragraphs with lines joined, lists and tables in reading order. OCR is
    off: a page that needs it goes to the model instead. Text that
    pymupdf4llm cannot place comes back as PyMuPDF's plain text. pymupdf4llm alters
    the document in memory (it bakes page rotation into the content and drops
    the structure tree), so pass a document opened for this, not one that
    will be rendered.
    """
    import pymupdf4llm

    markdown = pymupdf4llm.to_markdown(pdf, pages=[page_number - 1], use_ocr=False, show_progress=False).strip()
    if not markdown:
        # pymupdf4llm lays text out by glyph boxes, so it drops text whose
        # glyphs have no extent: the glyphless fonts of some OCR layers.
        markdown = pdf[page_number - 1].get_text().strip()
    return markdown

