"""Report-like PDF pages for the benchmarks: what a batch of office documents looks like.

Each page has a heading, a subheading, as many paragraphs as fit and, on most
pages, a small table, laid out by PyMuPDF's Story as a word processor would,
with a page number at the foot; Letter or A4. A page can also be "scanned":
rendered in grey at :data:`SCAN_DPI` and inserted as a full-page JPEG with no
text layer.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pymupdf

SCAN_DPI = 150  # what an office scanner delivers; the job renders it again at 110
PAPER = {"letter": (612, 792), "a4": (595, 842)}

# -- the documents -----------------------------------------------------------------------

TOPICS = ["Operations", "Finance", "Logistics", "Customer service", "Facilities", "Procurement",
          "Information technology", "Safety and compliance", "Human resources", "Regional sales"]
SENTENCES = [
    "Revenue in the {region} region reached {money} million, {pct} percent above the same quarter last year.",
    "The team closed {count} of the {count2} open items from the last review and expects the rest by {month}.",
    "Average delivery time fell from {days} to {days2} days after the new routing software went live in {month}.",
    "Staff turnover stayed at {pct} percent, below the sector average, while overtime hours rose slightly.",
    "The board approved a budget of {money} million for the renovation of the {region} warehouse.",
    "Energy use per unit shipped dropped by {pct} percent, mostly thanks to the heat pumps installed in {month}.",
    "Two suppliers in the {region} region missed their delivery windows more than {count} times and are under review.",
    "Customer satisfaction, measured on a scale of one to ten, averaged {score} across {count2} surveyed accounts.",
    "Inventory write-offs amounted to {money} million, chiefly packaging that no longer meets the new labelling rules.",
    "The audit found no material weaknesses; {count} minor findings were assigned owners and due dates.",
    "Headcount grew by {count} people, most of them in the {region} service centre that opened in {month}.",
    "Payment terms were harmonised at thirty days for all new contracts signed after {month}.",
    "Unplanned downtime on the main line totalled {days} hours, against a target of no more than {days2}.",
    "The pilot with electric delivery vans covered {count2} routes and will be extended to the {region} depots.",
    "Cash conversion improved by {days} days as overdue receivables were collected more consistently.",
    "Training hours per employee rose to {days}, with a focus on safety procedures and the new ordering system.",
]
REGIONS = ["northern", "southern", "eastern", "western", "central", "coastal"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _sentence(rng: random.Random) -> str:
    return rng.choice(SENTENCES).format(
        region=rng.choice(REGIONS), month=rng.choice(MONTHS), money=f"{rng.uniform(0.4, 48):.1f}",
        pct=rng.randint(2, 19), count=rng.randint(3, 40), count2=rng.randint(41, 400), days=rng.randint(4, 12),
        days2=rng.randint(13, 30), score=f"{rng.uniform(6.5, 9.4):.1f}")


def page_html(seed: int, paragraphs: int) -> str:
    """A report page: a heading, a subheading, ``paragraphs`` paragraphs and, on most pages, a small table."""
    rng = random.Random(seed)
    topic = TOPICS[seed % len(TOPICS)]
    parts = [f"<h1>{seed + 1}. {topic}</h1>",
             f"<h2>Quarterly review, {rng.choice(MONTHS)} {rng.randint(2021, 2025)}</h2>"]
    for index in range(paragraphs):
        parts.append("<p>" + " ".join(_sentence(rng) for _ in range(rng.randint(3, 4))) + "</p>")
        if index == 1 and seed % 3 != 2:
            rows = "".join(f"<tr><td>{region.capitalize()}</td><td>{rng.uniform(1, 30):.1f}</td>"
                           f"<td>{rng.uniform(1, 30):.1f}</td><td>{rng.randint(-9, 15):+d}%</td></tr>"
                           for region in rng.sample(REGIONS, 4))
            parts.append("<table><tr><th>Region</th><th>Last year (M)</th><th>This year (M)</th><th>Change</th></tr>"
                         f"{rows}</table>")
    return "".join(parts)


CSS = """
body { font-family: sans-serif; font-size: 10.5pt; line-height: 1.3; }
h1 { font-size: 18pt; margin-bottom: 4pt; }
h2 { font-size: 12pt; font-style: italic; margin-bottom: 8pt; }
p { margin-bottom: 7pt; text-align: justify; }
table { border-collapse: collapse; margin-bottom: 8pt; }
th, td { border: 0.5pt solid black; padding: 2pt 6pt; font-size: 9.5pt; }
th { background-color: #dddddd; }
"""


def born_digital_page(seed: int, paper: str) -> pymupdf.Document:
    """One page laid out by PyMuPDF's Story (HTML + CSS), with a page number at the foot."""
    import io

    import pymupdf

    width, height = PAPER[paper]
    margin = 64
    for paragraphs in range(9, 0, -1):  # as many as fit: a full page, as in a real report
        story = pymupdf.Story(html=page_html(seed, paragraphs), user_css=CSS)
        buffer = io.BytesIO()
        writer = pymupdf.DocumentWriter(buffer)
        device = writer.begin_page(pymupdf.Rect(0, 0, width, height))
        more, _ = story.place(pymupdf.Rect(margin, margin, width - margin, height - margin - 20))
        story.draw(device)
        writer.end_page()
        writer.close()
        if not more:
            break
    doc = pymupdf.open("pdf", buffer.getvalue())
    doc[0].insert_text((width / 2 - 10, height - margin / 2), f"- {seed + 1} -", fontsize=9, fontname="helv")
    return doc


def figure_page(seed: int, paper: str) -> pymupdf.Document:
    """A report page with text running around a bar chart (see the module's note), a page number at the foot."""
    import io

    import pymupdf

    rng = random.Random(seed)
    width, height = PAPER[paper]
    margin, chart_w, chart_h = 64, 200, 150

    def paragraphs(count: int, sentences: int) -> str:
        return "".join("<p>" + " ".join(_sentence(rng) for _ in range(sentences)) + "</p>" for _ in range(count))

    buffer = io.BytesIO()
    writer = pymupdf.DocumentWriter(buffer)
    device = writer.begin_page(pymupdf.Rect(0, 0, width, height))

    def place(html: str, rect: pymupdf.Rect) -> pymupdf.Rect:
        story = pymupdf.Story(html=html, user_css=CSS)
        _, filled = story.place(rect)
        story.draw(device)
        return pymupdf.Rect(filled)

    above = place(f"<h1>{seed + 1}. {TOPICS[seed % len(TOPICS)]}</h1>" + paragraphs(1, 4),
                  pymupdf.Rect(margin, margin, width - margin, height))
    chart = pymupdf.Rect(width - margin - chart_w, above.y1 + 6, width - margin, above.y1 + 6 + chart_h)
    # Same left margin as the paragraph above, a right edge of its own: the piece stitching joins to it.
    beside = place(paragraphs(1, 5), pymupdf.Rect(margin, above.y1 + 2, chart.x0 - 14, chart.y1 + 4))
    place(paragraphs(6, 3), pymupdf.Rect(margin, max(beside.y1, chart.y1) + 8, width - margin, height - margin - 20))
    writer.end_page()
    writer.close()
    doc = pymupdf.open("pdf", buffer.getvalue())
    page = doc[0]
    page.draw_rect(chart, color=(0, 0, 0), width=0.8)
    for bar in range(6):
        top = chart.y1 - 10 - rng.uniform(0.2, 0.9) * (chart_h - 20)
        x = chart.x0 + 15 + bar * 30
        page.draw_rect(pymupdf.Rect(x, top, x + 18, chart.y1 - 10), color=None, fill=(0.3, 0.4, 0.7))
    page.insert_text((width / 2 - 10, height - margin / 2), f"- {seed + 1} -", fontsize=9, fontname="helv")
    return doc


def add_page(doc: pymupdf.Document, kind: str, seed: int, paper: str) -> None:
    """Append a born-digital (``text``), text-around-a-chart (``figure``) or scanned (``scan``) report page."""
    if kind == "figure":
        with figure_page(seed, paper) as source:
            doc.insert_pdf(source)
        return
    with born_digital_page(seed, paper) as source:
        if kind == "text":
            doc.insert_pdf(source)
            return
        pixmap = source[0].get_pixmap(dpi=SCAN_DPI, colorspace="gray")
    page = doc.new_page(width=PAPER[paper][0], height=PAPER[paper][1])
    page.insert_image(page.rect, stream=pixmap.tobytes("jpeg", jpg_quality=80))


def document_plan(pages: int) -> list[tuple[str, list[str]]]:
    """File names and page kinds: a born-digital report, a scanned one and a mixed one, half of each kind."""
    quarter = pages // 4
    mixed = ["text" if i % 2 == 0 else "scan" for i in range(pages - 2 * quarter)]
    plan = [("report-born-digital.pdf", ["text"] * quarter), ("report-scanned.pdf", ["scan"] * quarter),
            ("report-mixed.pdf", mixed)]
    return [(name, kinds) for name, kinds in plan if kinds]


def make_documents(folder: Path, pages: int) -> list[dict]:
    """Write the mixed folder; return each document's name, paper and page kinds."""
    import pymupdf

    folder.mkdir(parents=True, exist_ok=True)
    documents, seed = [], 0
    for index, (name, kinds) in enumerate(document_plan(pages)):
        paper = "letter" if index % 2 == 0 else "a4"
        with pymupdf.open() as doc:
            for kind in kinds:
                add_page(doc, kind, seed, paper)
                seed += 1
            doc.save(folder / name, garbage=3, deflate=True)
        documents.append({"name": name, "paper": paper, "pages": kinds,
                          "kb": round((folder / name).stat().st_size / 1024, 1)})
    return documents
