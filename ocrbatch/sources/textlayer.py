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
   font without a usable ToUnicode map yields. So is every character of a
   simple font that has no ToUnicode map and names its glyphs with names
   that are not Unicode's (``/g12``, ``/a3``: MuPDF then guesses letters),
   and every character of a font whose map fails on at least
   :data:`FONT_UNMAPPED_SHARE` of the distinct glyphs it uses on the page
   and of its characters there (a broken map is a guess for the rest: math
   fonts whose brackets read ``ðÞ``). Above
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

A good layer is then written as Markdown (:func:`page_markdown`), and that
Markdown is checked against the layer it came from:

6. **The Markdown says what the layer says.** It must hold at least
   :data:`MIN_MARKDOWN_RECALL` of the layer's words (as ``get_text`` reads
   them, with ActualText), or miss no more than :data:`SPARE_WORDS`, leaving
   aside only what it leaves out on purpose: running headers and footers,
   the labels of pictures and lines set sideways in a margin, as layout
   mode does. This catches what the page's drawing operations cannot show:
   glyphs that draw one letter where the ActualText says another, text
   pymupdf4llm cannot place, table cells cut through words, formulas (their
   text is left out: the model writes them as LaTeX).

A blank page skips the Markdown: it is ``""``, known in a millisecond. A page
whose lines do not run left to right as shown (a ``/Rotate``, text set
sideways, vertical CJK writing) is turned until they do before pymupdf4llm,
which lays out horizontal lines only, reads it.
"""

from __future__ import annotations

import html
import math
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

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
# PyMuPDF's test_3780.pdf: the math fonts whose maps are broken give U+FFFD for
# 40% of the distinct glyphs they use on a page, 12-20% of their characters;
# sound text fonts for none, or for a space among 25 glyphs (10% of the
# characters, test_3376.pdf), or for a few symbols (15% of the glyphs, 2% of
# the characters, v110-changes.pdf).
FONT_UNMAPPED_SHARE = 0.10
# Over 684 real pages (benchmarks/textlayer_recall.py: PyMuPDF's,
# pdfplumber's and pdfminer's test PDFs), the Markdown held 0.91-1.0 of the
# layer's words on the 468 good layers with words it read right (median 1.0,
# a few words lost to superscripts and hyphens), and 0.02-0.89 on the nine it
# misread: glyphs that draw other letters than their ActualText, formula
# pages, text it could not place.
MIN_MARKDOWN_RECALL = 0.9
# A chart's or photo's labels (axis ticks, a legend, a caption set inside
# it) stay under 100 characters; the layout model also calls forms and
# tables of figures pictures, with hundreds.
MAX_PICTURE_LABEL_CHARS = 100
# On a page of a few words, one word more or less (a drop capital, a
# superscript run into its word) decides nothing.
SPARE_WORDS = 1
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
_SIMPLE_FONTS = ("Type1", "MMType1", "TrueType", "Type3")  # one byte a glyph, mapped by glyph name
# pymupdf4llm's box classes for running headers and footers (left out with
# header=False, footer=False), as layout mode leaves them out.
_FURNITURE = ("page-header", "page-footer")
# How pymupdf4llm writes the text it finds inside a picture (force_text).
_PICTURE_TEXT = re.compile(r"<!-- Start of picture text -->\n?(.*?)<!-- End of picture text -->", re.DOTALL)
_SIDEWAYS_SINE = 0.1  # a line slanted more than ~6 degrees from horizontal is not a line pymupdf4llm reads
# Scripts written without spaces: each character counts as a word.
_UNSPACED = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
_WORD = re.compile(f"[{_UNSPACED}]|[^\\W_{_UNSPACED}]+")
# Ligature characters (ﬁ, ﬀ, ﬃ...) spelt out, as the model writes them: pymupdf4llm's table engine keeps them.
_LIGATURES = {code: unicodedata.normalize("NFKC", chr(code)) for code in range(0xFB00, 0xFB07)}
_HTML_MARKUP = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>", re.DOTALL)

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class TextLayerVerdict:
    """Whether a page's text layer can stand in for OCR, and the measures behind it.

    ``reason`` is one line for people: a failed page's error in ``only``
    mode, and the ``--dry-run`` listing. ``chars`` and ``bad_glyph_ratio``
    count the characters judged (hidden ones only when trusted), not
    whitespace. ``coverage`` is the share of the text-and-image area covered
    by text; ``hidden_ratio`` the share of all characters that are hidden.
    ``markdown_recall`` is the share of the layer's words its Markdown holds,
    for a page whose Markdown was written (:func:`iter_routes`).
    """

    good: bool
    reason: str
    chars: int
    coverage: float
    bad_glyph_ratio: float
    hidden_ratio: float
    ocr_layer: bool
    markdown_recall: float | None = None

    @property
    def blank(self) -> bool:
        """A page with nothing drawn on it: the only good page without characters."""
        return self.good and self.chars == 0


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
    not good): the failed row's one-line reason. ``markdown`` is the page's
    text for a page taken from its layer (set by :func:`route`).
    """

    source: str
    verdict: TextLayerVerdict | None  # None in ``never`` mode: the layer was not looked at
    error: str | None = None
    markdown: str | None = None


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


def _is_unicode_glyph_name(name: str) -> bool:
    """Whether a glyph name says its character, as the Adobe Glyph List's rules read it.

    ``A``, ``eacute``, ``uni00E9``, ``u1F600``, ``f_i`` and ``a.sc`` do;
    ``g12``, ``a3``, ``C138`` and ``cid42`` are numbers a producer chose, from
    which MuPDF can only guess.
    """
    import pymupdf

    components = name.split(".", 1)[0].split("_")
    return all(
        pymupdf.mupdf.fz_unicode_from_glyph_name_strict(part)
        or re.fullmatch(r"uni(?:[0-9A-F]{4})+|u[0-9A-F]{4,6}", part)
        for part in components
    )


def _differences(doc: "pymupdf.Document", font_xref: int) -> list[tuple[int, str]]:
    """``(code, glyph name)`` for each entry of a simple font's /Encoding /Differences (none without one)."""
    kind, value = doc.xref_get_key(font_xref, "Encoding/Differences")
    entries, code = [], 0
    for number, name in re.findall(r"(\d+)|/([^\s/\[\]<>(){}%]+)", value) if kind == "array" else ():
        if number:
            code = int(number)
        else:
            entries.append((code, name))
            code += 1
    return entries


def _fonts_without_unicode(page: "pymupdf.Page") -> set[str]:
    """Names, as ``get_texttrace()`` gives them, of the page's fonts whose characters are guesses.

    A simple font (one byte a glyph) without a ToUnicode map is read through
    the glyph names of its encoding's Differences. When most of those names
    are neither Unicode glyph names nor the number of their own code (which
    says the code is the character, as Ghostscript writes them), MuPDF
    guesses letters from their digits, and the text it gives is not what
    the page shows. MuPDF names a Type3 font after its /Name, or else its
    object number.
    """
    doc = page.parent
    names = set()
    for xref, _, subtype, basefont, *_ in page.get_fonts():
        # xref 0: a font written inline in the resources, with no object number to read it by
        # (PyMuPDF reads keys by number); its characters alone judge it.
        if not xref or subtype not in _SIMPLE_FONTS or doc.xref_get_key(xref, "ToUnicode")[0] != "null":
            continue
        named = [(code, name) for code, name in _differences(doc, xref) if name != ".notdef"]
        said = sum(name == str(code) or _is_unicode_glyph_name(name) for code, name in named)
        if 2 * said < len(named):
            if subtype != "Type3":
                names.add(basefont.split("+", 1)[-1])  # without a subset's "ABCDEF+"
            else:
                kind, name = doc.xref_get_key(xref, "Name")
                names.add(name[1:] if kind == "name" else f"Type3 ({xref} 0 R)")
    return names


@dataclass
class _FontTally:
    """One font's characters on a page, and its glyphs: all used, and those without Unicode."""

    chars: int = 0
    bad: int = 0
    glyphs: set = field(default_factory=set)
    unmapped: set = field(default_factory=set)


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

    unnamed_glyphs = _fonts_without_unicode(page)
    per_font: dict[tuple[bool, str], _FontTally] = {}
    boxes: dict[bool, list[Box]] = {True: [], False: []}
    for span in page.get_texttrace():
        box = _clip(span["bbox"], width, height)
        glyphs = [char[:2] for char in span["chars"] if not chr(char[0]).isspace()]  # (unicode, glyph id)
        codes = [code for code, _ in glyphs]
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
        tally = per_font.setdefault((hidden, span["font"]), _FontTally())
        tally.chars += len(codes)
        tally.bad += len(codes) if span["font"] in unnamed_glyphs else sum(map(_is_bad_glyph, codes))
        tally.glyphs.update(glyph for _, glyph in glyphs)
        tally.unmapped.update(glyph for code, glyph in glyphs if _is_bad_glyph(code))
        boxes[hidden].append(box)
    counts = {True: [0, 0], False: [0, 0]}  # hidden -> [chars, bad]
    for (hidden, _), tally in per_font.items():
        counts[hidden][0] += tally.chars
        # A map with holes in a tenth of the glyphs used, and of the characters, is a guess for the others.
        broken = (bool(tally.unmapped) and len(tally.unmapped) >= FONT_UNMAPPED_SHARE * len(tally.glyphs)
                  and tally.bad >= FONT_UNMAPPED_SHARE * tally.chars)
        counts[hidden][1] += tally.chars if broken else tally.bad
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
    """Where each of the 1-based ``pages`` of the PDF at ``path`` goes under ``mode``: :func:`iter_routes` at once."""
    return dict(iter_routes(path, pages, mode, trust_ocr_layer))


def iter_routes(path: str | Path, pages: Iterable[int], mode: str,
                trust_ocr_layer: bool = False) -> Iterator[tuple[int, Route]]:
    """``(page, route)`` for each of the 1-based ``pages`` of the PDF at ``path`` under ``mode``, in page order.

    Each page is judged (:func:`assess_page`); a good one is then written
    as Markdown and kept only if the Markdown holds enough of the layer's
    words (:data:`MIN_MARKDOWN_RECALL`), so a route to the text layer
    carries its ``markdown``. Pages come one at a time, as each is read. In
    ``never`` mode the file is not opened: every page goes to the model. A
    page whose content or Markdown cannot be read is judged not good: it
    goes to the model in ``auto`` (whose renderer reports any real problem)
    and fails in ``only``. Raises whatever ``pymupdf.open`` raises for a
    file that is not a readable PDF; the caller has opened it before, to
    count its pages.
    """
    if mode not in PDF_TEXT_MODES:
        raise ValueError(f"pdf-text mode {mode!r}; one of {PDF_TEXT_MODES}")
    pages = sorted(set(pages))
    if mode == "never":
        yield from ((number, Route("model", None)) for number in pages)
        return
    from .rasterize import open_pdf_file

    # pymupdf4llm alters the document it reads: it gets its own copy.
    with open_pdf_file(path) as pdf, open_pdf_file(path) as markdown_pdf:
        for number in pages:
            if not 1 <= number <= pdf.page_count:
                raise ValueError(f"{path}: no page {number} (the PDF has {pdf.page_count})")
            try:
                verdict = assess_page(pdf[number - 1], trust_ocr_layer)
            except Exception as exc:  # MuPDF raises plain exceptions for broken content streams
                verdict = TextLayerVerdict(good=False, reason=f"cannot read the page's content ({exc})", chars=0,
                                           coverage=0.0, bad_glyph_ratio=0.0, hidden_ratio=0.0, ocr_layer=False)
            markdown = None
            if verdict.blank:
                markdown = ""
            elif verdict.good:
                try:
                    written = page_markdown(markdown_pdf, number)
                except Exception as exc:  # pymupdf4llm, like MuPDF, raises plain exceptions
                    verdict = replace(verdict, good=False, reason=f"cannot write the page's Markdown "
                                                                  f"({type(exc).__name__}: {exc})")
                else:
                    if written.holds_the_layer:
                        markdown = written.text
                        reason = f"{verdict.reason}; its Markdown holds {written.recall:.0%} of its words"
                    else:
                        reason = (f"its Markdown holds {written.recall:.0%} of the text layer's words: glyphs that "
                                  "do not draw what they say, text pymupdf4llm cannot place, formulas or split "
                                  "table cells")
                    verdict = replace(verdict, good=written.holds_the_layer, reason=reason,
                                      markdown_recall=written.recall)
            chosen = decide(verdict, mode)
            yield number, replace(chosen, markdown=markdown) if chosen.source == "text-layer" else chosen


def layer_words(text: str) -> list[str]:
    """The words of ``text`` for comparing readings: case-folded, NFKC, each CJK or kana character a word."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


@dataclass(frozen=True)
class LayerMarkdown:
    """A page's Markdown from its text layer, the layer's words and how many of them it holds."""

    text: str
    words: int
    found: int

    @property
    def recall(self) -> float:
        return self.found / self.words if self.words else 1.0

    @property
    def holds_the_layer(self) -> bool:
        """At least :data:`MIN_MARKDOWN_RECALL` of the words, or all but :data:`SPARE_WORDS` of them."""
        return self.recall >= MIN_MARKDOWN_RECALL or self.words - self.found <= SPARE_WORDS


def _reading_rotation(page: "pymupdf.Page") -> int:
    """The /Rotate that shows most of the page's characters in lines running left to right."""
    characters_by_angle: Counter = Counter()
    for span in page.get_texttrace():
        dx, dy = span["dir"]  # the glyphs' baseline, in the unrotated page (y down)
        if span["wmode"]:  # vertical writing: upright glyphs, lines run down the page
            dx, dy = -dy, dx
        angle = round(math.degrees(math.atan2(dy, dx)) / 90) % 4 * 90
        characters_by_angle[angle] += len(span["chars"])
    if not characters_by_angle:
        return page.rotation
    angle = characters_by_angle.most_common(1)[0][0]
    return (360 - angle) % 360  # /Rotate turns clockwise as shown


def _straighten(page: "pymupdf.Page") -> None:
    """Turn ``page`` so its text reads in horizontal lines, and bake the turn into its content.

    pymupdf4llm lays out horizontal lines only: a page turned by /Rotate, or
    set sideways, or written vertically, gives it nothing. ``remove_rotation``
    turns the MediaBox and drops the CropBox, so the visible area (the
    CropBox, which ``page.cropbox`` gives top-down from the MediaBox's top)
    becomes the MediaBox first.
    """
    import pymupdf

    rotation = _reading_rotation(page)
    if rotation == page.rotation == 0:
        return
    mediabox, cropbox = page.mediabox, page.cropbox
    page.set_mediabox(pymupdf.Rect(cropbox.x0, mediabox.y1 - cropbox.y1, cropbox.x1, mediabox.y1 - cropbox.y0))
    page.set_rotation(rotation)
    page.remove_rotation()


Char = tuple[str, float, float, float]  # a character, its origin's x and y, its font size
Line = tuple[Box, list[Char]]


def _layer_blocks(page: "pymupdf.Page") -> list[list[Line]]:
    """The text blocks of a straightened ``page`` as ``get_text`` reads them (with ActualText): lines of characters.

    Lines still set sideways once the page is straightened are left out: the
    margin notes and stamps running up a page's edge, which pymupdf4llm skips
    and layout mode leaves out as aside text.
    """
    return [[(tuple(line["bbox"]), [(char["c"], *char["origin"], span["size"])
                                    for span in line["spans"] for char in span["chars"]])
             for line in block["lines"] if line["wmode"] or abs(line["dir"][1]) < _SIDEWAYS_SINE]
            for block in page.get_text("rawdict")["blocks"] if block["type"] == 0]


def _chars_inside(box: Box, blocks: list[list[Line]]) -> int:
    """How many of the layer's characters (not spaces) lie inside ``box``."""
    return sum(not char.isspace() and _inside((x, y), box)
               for block in blocks for _, line in block for char, x, y, _ in line)


def _reference_words(blocks: list[list[Line]], left_out: list[Box], kept: list[Box]) -> list[list[str]]:
    """The words of each of the layer's ``blocks``, less characters inside ``left_out`` boxes (and no ``kept`` one).

    A block's lines are joined by a space (MuPDF breaks some producers'
    lines inside words; :func:`_found_words` joins them again). A character drawn
    again where it already is (bold faked by overprinting: the copies lie a
    fraction of a point apart, where the narrowest letters stand 0.2 em
    apart) counts once, as a reader sees it.
    """
    drawn: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    words = []
    for block in blocks:
        text = []
        for _, line in block:
            for char, x, y, size in line:
                cell = max(size, 1.0) * 0.15
                near = (drawn.get((char, int(x // cell) + i, int(y // cell) + j), ())
                        for i in (-1, 0, 1) for j in (-1, 0, 1))
                if not char.isspace() and any(abs(x - x2) < cell and abs(y - y2) < cell
                                              for places in near for x2, y2 in places):
                    continue
                drawn.setdefault((char, int(x // cell), int(y // cell)), []).append((x, y))
                dropped = any(_inside((x, y), box) for box in left_out) and not any(_inside((x, y), box) for box in kept)
                text.append(" " if dropped else char)
            text.append(" ")
        words.append(layer_words("".join(text)))
    return words


def _found_words(reference: list[list[str]], markdown: str) -> int:
    """How many of the ``reference`` words (one list per block) ``markdown`` holds, each found once.

    MuPDF splits a word where its letters are set apart (``r epresent``,
    ``loa ns``) and pymupdf4llm may join them: consecutive words of a block
    whose joining is a word of the Markdown count as found. Written here, as
    no library compares two readings this way (difflib's matching is
    order-bound, and reading orders differ).
    """
    found = Counter(layer_words(html.unescape(_HTML_MARKUP.sub(" ", markdown))))
    matched = 0
    for words in reference:
        start = 0
        while start < len(words):
            for end in range(min(start + 3, len(words)), start, -1):  # the longest joining first
                joined = "".join(words[start:end])
                if found[joined]:
                    found[joined] -= 1
                    matched += end - start
                    break
            else:
                end = start + 1
            start = end
    return matched


def _write_markdown(pdf: "pymupdf.Document", page_number: int, blocks: list[list[Line]],
                    table_output: str | None) -> LayerMarkdown:
    """One pymupdf4llm reading of a straightened page, assembled box by box as layout mode writes a page.

    pymupdf4llm writes the text it finds inside pictures and formulas in
    HTML comments (``force_text``); here a picture with fewer than
    :data:`MAX_PICTURE_LABEL_CHARS` characters of text (a chart's labels) is
    left out, as layout mode leaves pictures out, while one with more (a
    form or a table of figures the layout model took for a picture, a
    diagram full of words) keeps its lines as plain text. Formulas are left out, but count in the layer's words: a page of
    them goes to the model, which writes LaTeX.
    """
    import pymupdf4llm

    [chunk] = pymupdf4llm.to_markdown(pdf, pages=[page_number - 1], use_ocr=False, show_progress=False,
                                      header=False, footer=False, force_text=True, table_output=table_output,
                                      page_chunks=True)
    pieces, left_out, kept = [], [], []
    for box in chunk["page_boxes"]:
        start, stop = box["pos"]
        piece = chunk["text"][start:stop]
        labels = box["class"] == "picture" and _chars_inside(box["bbox"], blocks) < MAX_PICTURE_LABEL_CHARS
        if box["class"] in _FURNITURE or labels:
            left_out.append(box["bbox"])
            continue
        kept.append(box["bbox"])
        if box["class"] == "picture":
            pieces.append("\n".join(_PICTURE_TEXT.findall(piece)).replace("<br>", "\n") + "\n\n")
        elif box["class"] != "formula":
            pieces.append(piece)
    markdown = "".join(pieces).strip().translate(_LIGATURES)
    if not markdown:
        # pymupdf4llm lays text out by glyph boxes, so it drops text whose
        # glyphs have no extent: the glyphless fonts of some OCR layers.
        markdown = pdf[page_number - 1].get_text().strip()
    reference = _reference_words(blocks, left_out, kept)
    return LayerMarkdown(markdown, sum(map(len, reference)), _found_words(reference, markdown))


def page_markdown(pdf: "pymupdf.Document", page_number: int) -> LayerMarkdown:
    """Markdown of the 1-based ``page_number`` of an open PDF, from its text layer, with the layer's words it holds.

    Uses pymupdf4llm with PyMuPDF's layout model (bundled, offline): headings,
    paragraphs with lines joined, lists, and tables as HTML (its table
    engine keeps words whole, where the layout grid's cells can cut through
    them; where it loses words, the layout grid's tables are tried), in
    reading order. Running headers and footers, the labels of pictures and
    formulas are left out (:func:`_write_markdown`). OCR is off: a page that needs
    it goes to the model instead. Text that pymupdf4llm cannot place at all
    comes back as PyMuPDF's plain text. The words counted are the layer's
    (:func:`layer_words`, outside what is left out on purpose). The page is
    first turned to read in horizontal lines, and pymupdf4llm alters the
    document too (it drops the structure tree), so pass a document opened
    for this, not one that will be rendered.
    """
    page = pdf[page_number - 1]
    _straighten(page)
    blocks = _layer_blocks(page)  # before pymupdf4llm drops the structure tree, and the ActualText in it
    written = _write_markdown(pdf, page_number, blocks, "html")
    if not written.holds_the_layer:
        grid = _write_markdown(pdf, page_number, blocks, None)
        written = max(written, grid, key=lambda markdown: markdown.found)
    return written
