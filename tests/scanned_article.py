"""A scanned two-column journal page, as the layout tests need it.

Small type (7 pt body) set in two full columns under a running header,
a title and the authors, then printed, scanned in grey at 200 dpi with a
slight skew and sensor noise and stored as a JPEG that fills the page,
with no text layer: what an archive of scanned articles holds. Its body
text is fine enough that a layout model reads it as text only when the
page is rendered at an ordinary resolution: rendered at a vision model's
page cap (591 x 764 pixels for a 451,584-pixel model), CDLA sees the two
columns as one picture.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pymupdf
from PIL import Image

from ocrbatch.dev.samples import ARTICLE_COLUMNS, ARTICLE_TITLE, PARAGRAPHS

LETTER = (612, 792)
SCAN_DPI = 200
# Each column: left edge and right edge in points; both run from below the authors to the footer.
COLUMNS = ((54, 298), (314, 558))
BODY_TOP, BODY_BOTTOM = 115, 740
CSS = """
body { font-family: serif; font-size: 7pt; line-height: 1.2; }
h2 { font-family: sans-serif; font-size: 9pt; margin-bottom: 3pt; }
p { text-align: justify; margin-bottom: 5pt; }
"""


def _body_html() -> str:
    """More sections than the two columns hold (the rest is left off): headings and long paragraphs."""
    sentences = [paragraph for column in ARTICLE_COLUMNS for _, paragraph in column] + PARAGRAPHS
    parts = []
    for section in range(6):
        parts.append(f"<h2>{section + 1} Section {section + 1}</h2>")
        for paragraph in range(3):
            start = section * 3 + paragraph
            parts.append("<p>" + " ".join(sentences[(start + k) % len(sentences)] for k in range(3)) + "</p>")
    return "".join(parts)


def _born_digital() -> pymupdf.Document:
    story = pymupdf.Story(html=_body_html(), user_css=CSS)
    buffer = io.BytesIO()
    writer = pymupdf.DocumentWriter(buffer)
    device = writer.begin_page(pymupdf.Rect(0, 0, *LETTER))
    for x0, x1 in COLUMNS:  # the story flows from the left column into the right one
        story.place(pymupdf.Rect(x0, BODY_TOP, x1, BODY_BOTTOM))
        story.draw(device)
    writer.end_page()
    writer.close()
    document = pymupdf.open("pdf", buffer.getvalue())
    page = document[0]
    page.insert_text((54, 40), "Journal of Document Engineering, Vol. 12, No. 3", fontsize=8, fontname="helv")
    page.insert_text((54, 80), ARTICLE_TITLE, fontsize=18, fontname="hebo")
    page.insert_text((54, 100), "A. Author and B. Author", fontsize=10, fontname="helv")
    page.insert_text((302, 770), "1", fontsize=8, fontname="helv")
    return document


def write_scanned_article(path: str | Path) -> Path:
    """Write the scanned page as a one-page PDF at ``path``."""
    with _born_digital() as source:
        pixmap = source[0].get_pixmap(dpi=SCAN_DPI, colorspace="gray")
    scan = Image.frombytes("L", (pixmap.width, pixmap.height), pixmap.samples)
    scan = scan.rotate(0.5, resample=Image.Resampling.BICUBIC, fillcolor=255)
    # Greyish paper, toner a little short of black, and the scanner's noise.
    pixels = np.asarray(scan, dtype=np.float32) * 0.92 + 8
    pixels += np.random.default_rng(3).normal(0, 8, pixels.shape)
    jpeg = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(jpeg, format="JPEG", quality=70)
    with pymupdf.open() as document:
        page = document.new_page(width=LETTER[0], height=LETTER[1])
        page.insert_image(page.rect, stream=jpeg.getvalue())
        document.save(path, garbage=3, deflate=True)
    return Path(path)
