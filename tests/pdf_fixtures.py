"""PDFs for the text-layer tests, each page a case the router must tell apart.

Every page is made with PyMuPDF the way real producers make it: a scan is a
rendered page inserted as an image; an OCR layer is text in render mode 3
(what OCRmyPDF and scanners write), in a font whose glyphs draw nothing
(Tesseract's GlyphLessFont, OCRmyPDF's Occulta), or drawn before the scan
image that then covers it; "garbage" fonts are embedded fonts whose Unicode map is
missing (MuPDF then reports U+FFFD) or maps to private-use code points, the
two ways broken producers lose a layer's text in the wild, or a Type3 font
whose glyph names say nothing. Twins of real files the text layer misread
(PyMuPDF's test_3780 and test_4907, pdfplumber's issue-1054, pdfminer's
jo.pdf) rebuild each one's trait: a math font with a broken map, glyphs
that draw other letters than their ActualText, a sideways page shown upright
by /Rotate through an offset CropBox, vertical Japanese; and pages with
what layout mode leaves out (running header and footer, chart labels) or
a dense table whose cells the layout grid cut through words.

``write_pdf(path, kinds)`` writes one page per kind; ``TEXTS[kind]`` holds
the words a correct reading of that page contains.
"""

from __future__ import annotations

import io
import re
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
# A formula in a math font whose map is broken, as in PyMuPDF's test_3780.pdf:
# brackets and "=" read U+FFFD, the other glyphs Latin-1 letters they do not draw.
FORMULA = "F(x) = (a + b)(c - d) / (x + y) + (p - q)(r + s)"
# Running header and footer, and the labels of a chart: what layout mode leaves out of a page's Markdown.
RUNNING_HEADER = "Port of Eastham - Annual review 2024"
RUNNING_FOOTER = "Page 3 of 12"
CHART_LABELS = ["Cargo handled, million tonnes", "2021", "2022", "2023", "2024"]
# A dense borderless table whose group headings span columns, as in financial reports: pymupdf4llm's
# layout grid cut these words across cells ("modificati|ion", "Valuatio|n").
TABLE_GROUPS = ["Primary modification type (1)", "Financial effects of modifications"]
TABLE_COLUMNS = ["Category", "Forfeited", "Redeemed", "Outstanding", "Interest", "Appraisal", "Valuation", "Collateral"]
TABLE_ROWS = [[name] + [f"{(7919 * row * (column + 3)) % 90000 + 1000:,}" for column in range(7)]
              for row, name in enumerate(["Pre-Pawn", "Jewellery", "Electronics", "Instruments", "Watches",
                                          "Bicycles", "Cameras", "Tools", "Antiques", "Silverware"] * 2, start=1)]
# Lines of vertical Japanese writing (Miyazawa Kenji, as in pdfminer's jo.pdf), read right to left.
VERTICAL_JAPANESE = ["わたくしといふ現象は", "假定された有機交流電燈の", "ひとつの青い照明です",
                     "風景やみんなといっしょに", "せはしくせはしく明滅しながら"]

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
    "garbage-type3": [GARBLED],
    "broken-math-font": [TITLE, *BODY, FORMULA],
    "actualtext-mismatch": [TITLE, *BODY],
    "sideways": [TITLE, *BODY],
    "vertical-writing": VERTICAL_JAPANESE,
    "furniture": [TITLE, *BODY],
    "dense-table": [*TABLE_GROUPS, *TABLE_COLUMNS, *(cell for row in TABLE_ROWS for cell in row)],
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


def _type3_without_unicode(page: pymupdf.Page) -> None:
    """:data:`GARBLED` in a Type3 font without a ToUnicode map, its glyphs named ``/g33``, ``/g34``...

    Codes are given in order of first use, as the Type3 fonts of some
    printer drivers and browsers are; each glyph draws its letter in
    Helvetica, so the page reads right while MuPDF can only guess letters
    from the glyph names. Written with PyMuPDF's object API, as PyMuPDF has
    no call that makes such a font.
    """
    doc = page.parent
    letters = sorted(set(GARBLED), key=GARBLED.index)
    codes = {letter: 33 + i for i, letter in enumerate(letters)}
    helvetica = doc.get_new_xref()
    doc.update_object(helvetica, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    widths = [round(pymupdf.Font("helv").text_length(letter, fontsize=1000)) for letter in letters]
    procs = []
    for letter, width in zip(letters, widths):
        proc = doc.get_new_xref()
        doc.update_object(proc, "<<>>")
        doc.update_stream(proc, f"{width} 0 d0 BT /H 1000 Tf ({_pdf_string(letter)}) Tj ET".encode("latin-1"))
        procs.append(f"/g{codes[letter]} {proc} 0 R")
    font = doc.get_new_xref()
    doc.update_object(font, (
        "<< /Type /Font /Subtype /Type3 /FontBBox [0 -250 1000 1000] /FontMatrix [0.001 0 0 0.001 0 0]"
        f" /CharProcs << {' '.join(procs)} >>"
        f" /Encoding << /Type /Encoding /Differences [33 {' '.join(f'/g{code}' for code in codes.values())}] >>"
        f" /FirstChar 33 /LastChar {32 + len(letters)} /Widths [{' '.join(map(str, widths))}]"
        f" /Resources << /Font << /H {helvetica} 0 R >> >> >>"
    ))
    encoded = "".join(chr(codes[letter]) for letter in GARBLED)
    content = doc.get_new_xref()
    doc.update_object(content, "<<>>")
    doc.update_stream(content, f"BT /T3 12 Tf {MARGIN} {A4[1] - 100} Td ({_pdf_string(encoded)}) Tj ET".encode("latin-1"))
    doc.xref_set_key(page.xref, "Resources", f"<< /Font << /T3 {font} 0 R >> >>")
    doc.xref_set_key(page.xref, "Contents", f"{content} 0 R")


def _broken_math_font(page: pymupdf.Page) -> None:
    """A text page with :data:`FORMULA` in an embedded font whose ToUnicode map is broken.

    The map reads the formula's brackets and equals sign as U+FFFD and its
    other glyphs as Latin-1 letters they do not draw: a few percent of the
    page's characters unreadable, the rest of that font's characters wrong.
    """
    doc = page.parent
    _write_text(page)
    font = pymupdf.Font("tiro")
    page.insert_font(fontname="M0", fontbuffer=font.buffer)
    page.insert_text((MARGIN, 600), FORMULA, fontname="M0", fontsize=12)
    font_xref = next(entry[0] for entry in page.get_fonts() if entry[4] == "M0")
    glyphs = {font.has_glyph(ord(char)): char for char in set(FORMULA)}
    mapping = "\n".join(
        f"<{glyph:04X}> <{0x0020 if char == ' ' else 0xFFFD if char in '()=' else 0xC0 + glyph % 0x3F:04X}>"
        for glyph, char in sorted(glyphs.items()))
    cmap_xref = int(doc.xref_get_key(font_xref, "ToUnicode")[1].split()[0])
    doc.update_stream(cmap_xref, (CMAP_HEAD + f"{len(glyphs)} beginbfchar\n{mapping}\nendbfchar\n" + CMAP_TAIL).encode())


LETTER = re.compile(r"[^\W\d_]")


def _actualtext_mismatch(page: pymupdf.Page) -> None:
    """The born-digital page's lines drawn as ``aaaa aa``, each with its real text as ActualText.

    As in PyMuPDF's test_4907.pdf: ``get_text`` reads the ActualText, while
    the glyphs, and so the page and any layout tool that reads glyphs, show
    only a's.
    """
    doc = page.parent
    page.insert_font(fontname="helv")
    lines = [(TITLE, 90)]
    for paragraph in BODY:
        for line in textwrap.wrap(paragraph, 80):
            lines.append((line, lines[-1][1] + 16))
        lines.append(("", lines[-1][1] + 8))
    operators = [f"/Span << /ActualText ({_pdf_string(text)}) >> BDC BT /helv 12 Tf 1 0 0 1 {MARGIN} {A4[1] - y} Tm"
                 f" ({_pdf_string(LETTER.sub('a', text))}) Tj ET EMC" for text, y in lines if text]
    content = doc.get_new_xref()
    doc.update_object(content, "<<>>")
    doc.update_stream(content, "\n".join(operators).encode("latin-1"))
    doc.xref_set_key(page.xref, "Contents", f"{content} 0 R")


def _sideways(page: pymupdf.Page) -> None:
    """The born-digital page set sideways, shown upright by /Rotate 270 through a CropBox in a larger MediaBox.

    As pdfplumber's issue-1054-example.pdf: the lines run down the unrotated
    page, and the visible area is a corner of a page three times its size.
    """
    page.set_mediabox(pymupdf.Rect(0, 0, 3 * A4[1], 3 * A4[0]))
    shown = pymupdf.Rect(14, 14, 14 + A4[1], 14 + A4[0])
    # Upright, the page's top edge is the unrotated page's right edge.
    page.insert_text((shown.x1 - 70, shown.y0 + MARGIN), TITLE, fontsize=20, fontname="helv", rotate=270)
    body = pymupdf.Rect(shown.x0 + MARGIN, shown.y0 + MARGIN, shown.x1 - 100, shown.y1 - MARGIN)
    page.insert_textbox(body, "\n\n".join(BODY), fontsize=12, fontname="helv", rotate=270)
    page.set_cropbox(shown)
    page.set_rotation(270)


def _vertical_writing(page: pymupdf.Page) -> None:
    """:data:`VERTICAL_JAPANESE` in vertical writing: columns of upright characters, right to left."""
    for column, line in enumerate(VERTICAL_JAPANESE):
        page.insert_text((A4[0] - MARGIN - 30 * column, 60), line, fontname="japan", fontsize=16)
    # The same CMap written downwards: PyMuPDF writes horizontal text only.
    font_xref = next(entry[0] for entry in page.get_fonts() if entry[4] == "japan")
    page.parent.xref_set_key(font_xref, "Encoding", "/UniJIS-UTF16-V")


def _furniture(page: pymupdf.Page) -> None:
    """A report page with a running header and footer, and a bar chart labelled in text over its image."""
    page.insert_text((MARGIN, 36), RUNNING_HEADER, fontsize=9, fontname="helv")
    page.insert_text((A4[0] - MARGIN - 60, A4[1] - 30), RUNNING_FOOTER, fontsize=9, fontname="helv")
    page.insert_text((MARGIN, 90), TITLE, fontsize=20, fontname="helv")
    page.insert_textbox(pymupdf.Rect(MARGIN, 120, A4[0] - MARGIN, 420), "\n\n".join(BODY), fontsize=12,
                        fontname="helv")
    chart = pymupdf.Rect(MARGIN + 60, 450, A4[0] - MARGIN - 60, 720)
    with pymupdf.open() as drawing:
        canvas = drawing.new_page(width=chart.width, height=chart.height)
        for bar, height in enumerate((120, 150, 135, 170)):
            left = 40 + bar * 85
            canvas.draw_rect(pymupdf.Rect(left, 230 - height, left + 50, 230), color=None, fill=(0.2, 0.4, 0.7))
        page.insert_image(chart, pixmap=canvas.get_pixmap(dpi=100))
    title, *years = CHART_LABELS
    page.insert_text((chart.x0 + 40, chart.y0 + 20), title, fontsize=10, fontname="helv")
    for bar, year in enumerate(years):
        page.insert_text((chart.x0 + 52 + bar * 85, chart.y1 - 12), year, fontsize=9, fontname="helv")


def _dense_table(doc: pymupdf.Document) -> pymupdf.Page:
    """Append a page holding :data:`TABLE_ROWS` in small type, laid out by PyMuPDF's Story from HTML."""
    cell = "style='font-size: 7px; padding: 1px'"
    heading = (f"<tr><td></td><td colspan='3' {cell}>{TABLE_GROUPS[0]}</td>"
               f"<td colspan='4' {cell}>{TABLE_GROUPS[1]}</td></tr>")
    rows = "".join("<tr>" + "".join(f"<td {cell}>{text}</td>" for text in row) + "</tr>"
                   for row in [TABLE_COLUMNS, *TABLE_ROWS])
    story = pymupdf.Story(html=f"<table style='border-collapse: collapse'>{heading}{rows}</table>")
    buffer = io.BytesIO()
    writer = pymupdf.DocumentWriter(buffer)
    device = writer.begin_page(pymupdf.Rect(0, 0, *A4))
    story.place(pymupdf.Rect(MARGIN, MARGIN, A4[0] - MARGIN, A4[1] - MARGIN))
    story.draw(device)
    writer.end_page()
    writer.close()
    with pymupdf.open("pdf", buffer.getvalue()) as table:
        doc.insert_pdf(table)
    return doc[-1]


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

CMAP_HEAD = """/CIDInit /ProcSet findresource begin
12 dict begin
begincmap
/CMapName /Broken def
/CMapType 2 def
1 begincodespacerange
<0000> <FFFF>
endcodespacerange
"""
CMAP_TAIL = """endcmap
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
    if kind == "dense-table":
        return _dense_table(doc)
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
    elif kind == "garbage-type3":
        _type3_without_unicode(page)
    elif kind == "broken-math-font":
        _broken_math_font(page)
    elif kind == "actualtext-mismatch":
        _actualtext_mismatch(page)
    elif kind == "sideways":
        _sideways(page)
    elif kind == "vertical-writing":
        _vertical_writing(page)
    elif kind == "furniture":
        _furniture(page)
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
