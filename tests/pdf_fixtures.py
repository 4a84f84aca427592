"""PDFs for the text-layer tests, each page a case the router must tell apart.

Every page is made with PyMuPDF the way real producers make it: a scan is a
rendered page inserted as an image; an OCR layer is text in render mode 3
(what OCRmyPDF and scanners write), in a font whose glyphs draw nothing
(Tesseract's GlyphLessFont, OCRmyPDF's Occulta), or drawn before the scan
image that then covers it; "garbage" fonts are embedded fonts whose Unicode map is
missing (MuPDF then reports U+FFFD) or maps to private-use code points, the
two ways broken producers lose a layer's text in the wild.

``write_pdf(path, kinds)`` writes one page per kind; ``TEXTS[kind]`` holds
the words a correct reading of that page contains.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pymupdf

A4 = (595, 842)
MARGIN = 56
SCAN_DPI = 100  # enough for the model to read; keeps each fixture page ~100 kB

TITLE = "Harbour authority annual review"
BODY = [
    "The harbour handled 4.2 million tonnes of cargo this year, an increase of nine percent. "
    "Container traffic grew fastest, while bulk grain shipments fell after the poor harvest.",
    "Dredging of the eastern channel finished in October, two months ahead of schedule. "
    "Ships with a draught of up to fourteen metres can now berth at every quay.",
    "The authority thanks the pilots, the lock keepers and the crews of the tugboats "
    "Albatross and Petrel for another year without a serious accident.",
]
STAMP = "RECEIVED 14 MAR 2024 - ARCHIVE COPY"
GARBLED = "Invoice 2024-117: payment is due within thirty days of delivery."

# What each kind of page says, for checking what was read from it.
TEXTS = {
    "text": [TITLE, *BODY],
    "scan": [TITLE, *BODY],
    "ocr-layer": [TITLE, *BODY],
    "hidden-under-image": [TITLE, *BODY],
    "glyphless": [TITLE, *BODY],
    "stamp": [STAMP],
    "garbage-fffd": [GARBLED],
    "garbage-pua": [GARBLED],
    "blank": [],
}
KINDS = tuple(TEXTS)


def _write_text(page: pymupdf.Page, render_mode: int = 0) -> None:
    """The born-digital page: a title and paragraphs, as a word processor lays them out."""
    page.insert_text((MARGIN, 90), TITLE, fontsize=20, fontname="helv", render_mode=render_mode)
    box = pymupdf.Rect(MARGIN, 120, A4[0] - MARGIN, A4[1] - MARGIN)
    page.insert_textbox(box, "\n\n".join(BODY), fontsize=12, fontname="helv", render_mode=render_mode)


def _scan_pixmap() -> pymupdf.Pixmap:
    """The born-digital page rendered in grey, as a scanner would deliver it."""
    with pymupdf.open() as source:
        page = source.new_page(width=A4[0], height=A4[1])
        _write_text(page)
        return page.get_pixmap(dpi=SCAN_DPI, colorspace="gray")


def _insert_scan(page: pymupdf.Page, overlay: bool = True) -> None:
    page.insert_image(page.rect, pixmap=_scan_pixmap(), overlay=overlay)


def _garbage_font_page(page: pymupdf.Page, font: str, to_unicode: bytes | None) -> None:
    """Text in embedded ``font`` with its ToUnicode map dropped, or replaced by ``to_unicode``.

    The glyphs still render as the right letters, so a reader sees the text
    while extraction gets nothing usable: exactly when the model is needed.
    PyMuPDF embeds a font once per document, so each variant needs its own
    font, or the second would rewrite the first one's map.
    """
    doc = page.parent
    page.insert_font(fontname="F0", fontbuffer=pymupdf.Font(font).buffer)
    page.insert_text((MARGIN, 100), GARBLED, fontname="F0", fontsize=12)
    font_xref = next(entry[0] for entry in page.get_fonts() if entry[4] == "F0")
    if to_unicode is None:
        doc.xref_set_key(font_xref, "ToUnicode", "null")
    else:
        cmap_xref = int(doc.xref_get_key(font_xref, "ToUnicode")[1].split()[0])
        doc.update_stream(cmap_xref, to_unicode)


def _glyphless_text(page: pymupdf.Page) -> None:
    """The page's text in a Type3 font whose glyphs paint nothing, mapped to Unicode.

    Text extraction finds every word; rendering shows none: an OCR layer
    that needs no render mode 3. Written with PyMuPDF's object API, as
    PyMuPDF has no call that makes such a font.
    """
    doc = page.parent
    empty_glyph = doc.get_new_xref()
    doc.update_object(empty_glyph, "<<>>")
    doc.update_stream(empty_glyph, b"500 0 0 0 0 0 d1")  # advance only, no bounding box, no paint
    codes = range(32, 127)
    font = doc.get_new_xref()
    doc.update_object(font, (
        "<< /Type /Font /Subtype /Type3 /FontBBox [0 0 0 0] /FontMatrix [0.001 0 0 0.001 0 0]"
        f" /CharProcs << {' '.join(f'/g{code} {empty_glyph} 0 R' for code in codes)} >>"
        f" /Encoding << /Type /Encoding /Differences [32 {' '.join(f'/g{code}' for code in codes)}] >>"
        f" /FirstChar 32 /LastChar 126 /Widths [{' '.join(['500'] * len(codes))}] >>"
    ))
    to_unicode = doc.get_new_xref()
    doc.update_object(to_unicode, "<<>>")
    doc.update_stream(to_unicode, ASCII_CMAP)
    doc.xref_set_key(font, "ToUnicode", f"{to_unicode} 0 R")
    lines = [(TITLE, 90)]
    for paragraph in BODY:
        for line in textwrap.wrap(paragraph, 80):
            lines.append((line, lines[-1][1] + 16))
        lines.append(("", lines[-1][1] + 8))
    operators = [f"BT /GL 12 Tf 1 0 0 1 {MARGIN} {A4[1] - y} Tm ({_pdf_string(text)}) Tj ET" for text, y in lines]
    content = doc.get_new_xref()
    doc.update_object(content, "<<>>")
    doc.update_stream(content, "\n".join(operators).encode("latin-1"))
    doc.xref_set_key(page.xref, "Resources", f"<< /Font << /GL {font} 0 R >> >>")
    doc.xref_set_key(page.xref, "Contents", f"{content} 0 R")


def _pdf_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


ASCII_CMAP = b"""/CIDInit /ProcSet findresource begin
12 dict begin
begincmap
/CMapName /Ascii def
/CMapType 2 def
1 begincodespacerange
<00> <FF>
endcodespacerange
1 beginbfrange
<20> <7E> <0020>
endbfrange
endcmap
CMapName currentdict /CMap defineresource pop
end
end
"""

# Maps every two-byte code of the first 256 glyphs to U+E000.. : the shape of
# ToUnicode maps written from a symbol font's private-use cmap.
PRIVATE_USE_CMAP = b"""/CIDInit /ProcSet findresource begin
12 dict begin
begincmap
/CMapName /PrivateUse def
/CMapType 2 def
1 begincodespacerange
<0000> <FFFF>
endcodespacerange
1 beginbfrange
<0000> <00FF> <E000>
endbfrange
endcmap
CMapName currentdict /CMap defineresource pop
end
end
"""


def add_page(doc: pymupdf.Document, kind: str) -> pymupdf.Page:
    """Append one page of ``kind`` (one of :data:`KINDS`) to ``doc``."""
    page = doc.new_page(width=A4[0], height=A4[1])
    if kind == "text":
        _write_text(page)
    elif kind == "scan":
        _insert_scan(page)
    elif kind == "ocr-layer":
        _insert_scan(page)
        _write_text(page, render_mode=3)
    elif kind == "glyphless":
        # The invisible text first, the scan behind it: only the font hides the text.
        _glyphless_text(page)
        _insert_scan(page, overlay=False)
    elif kind == "hidden-under-image":
        # Text first, then the scan painted over it: visible text nobody can see.
        _write_text(page)
        _insert_scan(page, overlay=True)
    elif kind == "stamp":
        _insert_scan(page)
        page.insert_text((MARGIN, 40), STAMP, fontsize=11, fontname="helv", color=(0.7, 0, 0))
    elif kind == "garbage-fffd":
        _garbage_font_page(page, "helv", None)
    elif kind == "garbage-pua":
        _garbage_font_page(page, "tiro", PRIVATE_USE_CMAP)
    elif kind != "blank":
        raise ValueError(f"unknown page kind {kind!r}; one of {KINDS}")
    return page


def write_pdf(path: str | Path, kinds: list[str]) -> Path:
    """Write a PDF with one page per entry of ``kinds``; return its path."""
    with pymupdf.open() as doc:
        for kind in kinds:
            add_page(doc, kind)
        doc.save(path, garbage=3, deflate=True)
    return Path(path)
