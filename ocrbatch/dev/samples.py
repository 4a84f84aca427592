"""Small sample documents made by project code (``ocrbatch dev make-samples``).

``sample_docs/`` in the repository was written by :func:`make_samples`: a
text PDF, a three-page PDF, a table, a two-column article with a running
header and footer, and a scanned-looking JPEG, so the README's main command
runs on a fresh machine with no downloads.
"""

from __future__ import annotations

from pathlib import Path

PARAGRAPHS = [
    "Quarterly report. Revenue grew 12% over the previous quarter, driven by "
    "new customers in the logistics segment. Operating costs remained flat.",
    "The board approved the budget for the next fiscal year on 14 March. "
    "Capital expenditure is planned at 2.4 million, mostly for new scanners.",
    "Appendix A lists the sites visited during the audit, with the dates and "
    "the names of the inspectors responsible for each visit.",
]

ARTICLE_TITLE = "Reading order in two-column documents"
ARTICLE_HEADER = ("Journal of Document Engineering", "Vol. 12, No. 3")
ARTICLE_FOOTER = "Page 1 of 1"
# Left column, then right column: (section title or None, paragraph).
ARTICLE_COLUMNS = [
    [
        ("1 Introduction",
         "Scanned articles often set their text in two columns. A reader finishes the left column "
         "before moving to the right one, and software that extracts the text has to do the same."),
        (None,
         "Reading each line straight across the page mixes the columns together and produces text "
         "that no longer makes sense, even when every single word was recognised correctly."),
        (None,
         "Layout analysis first finds the blocks on the page, then decides in which order a person "
         "would read them, and only then recognises the text inside each block."),
        (None,
         "This article shows the approach on a small example page with a title, two sections and a "
         "running header and footer, the kind of page found in journals and reports."),
    ],
    [
        ("2 Method",
         "Blocks are grouped by the empty vertical bands between them. Each group is a column, and "
         "the columns are read from left to right, top to bottom within each column."),
        (None,
         "Titles and figures that span both columns divide the page into regions, and every region "
         "is read column by column before the next region below it begins."),
        (None,
         "Running headers and footers are repeated on every page. They are kept with the page but "
         "left out of the document text, where they would interrupt the paragraphs."),
        (None,
         "The result is one text per page in the order of reading, ready to be joined with the "
         "other pages of the document into a single file."),
    ],
]

TABLE = [
    ["Item", "Qty", "Unit price", "Total"],
    ["Paper, A4", "20", "4.50", "90.00"],
    ["Toner", "3", "62.00", "186.00"],
    ["Stapler", "2", "11.25", "22.50"],
    ["Sum", "", "", "298.50"],
]


def synthetic_page(width: int, height: int, seed: int):
    """A page-like image: light paper, dark word-shaped strokes in lines, sensor noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (width, height), (245, 244, 240))
    draw = ImageDraw.Draw(image)
    for y in range(4, height - 8, 14):
        x = 4
        while x < width - 10:
            word = int(rng.integers(8, 40))
            draw.rectangle([x, y, min(x + word, width - 4), y + 7], fill=tuple(int(v) for v in rng.integers(0, 90, 3)))
            x += word + int(rng.integers(4, 10))
    noise = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype("uint8"))


def _text_page(document, title: str, paragraphs: list[str]) -> None:
    import pymupdf as fitz

    page = document.new_page(width=595, height=842)  # A4 in points
    page.insert_text((56, 80), title, fontsize=20, fontname="helv")
    box = fitz.Rect(56, 110, 539, 780)
    page.insert_textbox(box, "\n\n".join(paragraphs), fontsize=12, fontname="helv")


def _two_column_article(document) -> None:
    """One US Letter page: running header, full-width title, two columns of sections, footer."""
    import pymupdf as fitz

    page = document.new_page(width=612, height=792)
    page.insert_text((54, 40), ARTICLE_HEADER[0], fontsize=9, fontname="helv")
    page.insert_text((470, 40), ARTICLE_HEADER[1], fontsize=9, fontname="helv")
    page.draw_line((54, 48), (558, 48), width=0.5)
    page.insert_text((54, 92), ARTICLE_TITLE, fontsize=20, fontname="hebo")
    # The paragraphs of both columns start at the same heights, so the gaps
    # between them line up across the page: reading by rows would interleave
    # the columns.
    for x0, sections in zip((54, 318), ARTICLE_COLUMNS):
        y = 130
        for heading, paragraph in sections:
            if heading:
                page.insert_text((x0, y + 12), heading, fontsize=13, fontname="hebo")
                y += 26
            page.insert_textbox(fitz.Rect(x0, y, x0 + 240, y + 100), paragraph, fontsize=11, fontname="tiro")
            y += 100
    page.draw_line((54, 742), (558, 742), width=0.5)
    page.insert_text((270, 760), ARTICLE_FOOTER, fontsize=9, fontname="helv")


def make_samples(out_dir: str | Path) -> list[Path]:
    """Write the sample documents into ``out_dir`` and return their paths."""
    import numpy as np
    import pymupdf as fitz
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    with fitz.open() as document:
        _text_page(document, "Quarterly report", PARAGRAPHS[:2])
        document.save(out / "report.pdf", garbage=4, deflate=True)
    written.append(out / "report.pdf")

    with fitz.open() as document:
        for number, paragraph in enumerate(PARAGRAPHS, start=1):
            _text_page(document, f"Minutes, page {number}", [paragraph] * 2)
        document.save(out / "minutes-3-pages.pdf", garbage=4, deflate=True)
    written.append(out / "minutes-3-pages.pdf")

    with fitz.open() as document:
        page = document.new_page(width=595, height=420)
        page.insert_text((56, 60), "Purchase order 1043", fontsize=16, fontname="helv")
        widths = [200, 60, 100, 100]
        top, row_height = 90, 28
        for r, row in enumerate(TABLE):
            x = 56
            for width, cell in zip(widths, row):
                rect = fitz.Rect(x, top + r * row_height, x + width, top + (r + 1) * row_height)
                page.draw_rect(rect, color=(0, 0, 0), width=0.8)
                page.insert_text((rect.x0 + 6, rect.y1 - 9), cell, fontsize=11,
                                 fontname="hebo" if r == 0 else "helv")
                x += width
        document.save(out / "purchase-order-table.pdf", garbage=4, deflate=True)
    written.append(out / "purchase-order-table.pdf")

    with fitz.open() as document:
        _two_column_article(document)
        document.save(out / "two-column-article.pdf", garbage=4, deflate=True)
    written.append(out / "two-column-article.pdf")

    # A "scanned" page: rendered, slightly rotated, greyish paper, sensor noise.
    with fitz.open() as document:
        _text_page(document, "Delivery note", PARAGRAPHS[2:])
        pixmap = document[0].get_pixmap(dpi=72, clip=fitz.Rect(0, 0, 595, 320))
        image = Image.frombytes("RGB", (pixmap.width, pixmap.height), pixmap.samples)
    image = image.rotate(1.2, fillcolor=(255, 255, 255), expand=False)
    pixels = np.asarray(image).astype(np.float32) * np.array([0.96, 0.95, 0.9])
    pixels += np.random.default_rng(7).normal(0, 7, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype("uint8")).save(out / "scanned-delivery-note.jpg", quality=80)
    written.append(out / "scanned-delivery-note.jpg")
    return written
