"""``ocrbatch report``: a static HTML report of a job, readable offline and from a file share.

The folder holds ``index.html`` (counts, failed pages with their reasons,
throughput over time, the slowest documents, the list of page views) and
``pages/``: one HTML file and one JPEG per page view. A page view shows the
page as the job rendered it with its boxes (SVG over the image, styled as
:mod:`ocrbatch.report.overlay` draws them) beside its Markdown, one section per block, each
box linking to its section and back. Markdown becomes HTML with markdown-it
(tables, which the job writes as HTML, kept), sanitised with nh3: the text is
what a model or a PDF said, so it may hold anything. Nothing is fetched: no
URL leaves the folder (nh3 drops links to other schemes than ``data``) and a
Content-Security-Policy forbids the browser any request outside it.

Page views are bounded by ``max_pages``: failed pages first, then the slowest,
then a sample spread evenly over the rest, so a huge job's report stays small.
"""

from __future__ import annotations

import html
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import OcrbatchError
from ..job.units import recorded_blocks
from ..layout.markdown import page_pieces
from ..records.rows import read_rows
from ..records.stats import JobStats, job_stats, work_seconds
from .overlay import STYLES, PageBox, page_boxes, render_recorded_page

log = logging.getLogger("ocrbatch")

PAGE_IMAGE_MAX_SIDE = 1200  # pixels of a page view's JPEG; its boxes are in page pixels, scaled with it
JPEG_QUALITY = 80
TEMPLATES = Path(__file__).parent / "templates"


@dataclass
class Section:
    """A part of a page view's text: the HTML of what the page wrote for one block, or for the whole page."""

    anchor: str  # its id in the page view
    box: PageBox | None  # the block's box; None for the text of a page without blocks
    html: str
    left_out: bool  # written nowhere in the Markdown (page furniture, pictures): shown muted, with its raw text


@dataclass
class PageView:
    number: int  # the view's number, naming its files
    row: dict
    image: str | None  # the JPEG's file name; None when the document could not be rendered
    image_problem: str
    boxes: list[PageBox]
    sections: list[Section]

    @property
    def name(self) -> str:
        return f"{self.number:04d}.html"

    def target(self, box: PageBox) -> str:
        """The section a box links to: its block's, or the page's text for boxes of a page without blocks."""
        if self.row.get("blocks"):
            return f"b{box.number}"
        return "text"


def markdown_html(text: str) -> str:
    """Markdown (with HTML tables) → sanitised HTML that links to nothing outside the report."""
    import nh3
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(text or "")
    return nh3.clean(rendered, url_schemes={"data"}, link_rel="noopener noreferrer")


def choose_pages(rows: list[dict], max_pages: int) -> list[dict]:
    """At most ``max_pages`` rows: failed ones first, then the slowest, then an even sample of the rest."""
    if len(rows) <= max_pages:
        return rows
    failed = [row for row in rows if row["status"] != "ok"][: max_pages // 2]
    rest = [row for row in rows if row["status"] == "ok"]
    slowest = sorted(rest, key=lambda row: -work_seconds(row))[: max_pages // 4]
    chosen = {id(row) for row in failed + slowest}
    others = [row for row in rest if id(row) not in chosen]
    wanted = max_pages - len(chosen)
    step = len(others) / wanted if wanted else 0
    sample = [others[int(index * step)] for index in range(min(wanted, len(others)))]
    picked = {id(row) for row in failed + slowest + sample}
    return [row for row in rows if id(row) in picked]


def page_sections(row: dict, boxes: list[PageBox]) -> list[Section]:
    """The text of a page view: a layout page block by block, any other page's Markdown whole."""
    if row["status"] != "ok":
        return []
    if not row.get("blocks"):
        return [Section("text", None, markdown_html(row.get("text") or ""), False)]
    by_order = {box.number: box for box in boxes}
    sections = []
    for piece in page_pieces(recorded_blocks(row)):
        box = by_order[piece.block.order]
        if piece.markdown:
            sections.append(Section(f"b{box.number}", box, markdown_html(piece.markdown), False))
        else:
            raw = f"<pre>{html.escape(piece.text)}</pre>" if piece.text.strip() else ""
            sections.append(Section(f"b{box.number}", box, raw, True))
    return sections


def _page_view(number: int, row: dict, folder: Path) -> PageView:
    boxes = page_boxes(row)
    image, problem = None, ""
    # Rendered straight at the view's size: no full-size render to shrink. The boxes stay in page pixels.
    side = max(row.get("width") or 0, row.get("height") or 0)
    scale = min(1.0, PAGE_IMAGE_MAX_SIDE / side) if side else 1.0
    try:
        page = render_recorded_page(row, scale=scale)
    except OcrbatchError as exc:
        problem = str(exc)
    else:
        if not row.get("width"):  # a failed page: its boxes (none) need no size, the picture does
            row = {**row, "width": page.width, "height": page.height}
        page.thumbnail((PAGE_IMAGE_MAX_SIDE, PAGE_IMAGE_MAX_SIDE))  # a failed page, of no recorded size
        image = f"{number:04d}.jpg"
        page.save(folder / image, quality=JPEG_QUALITY)
    return PageView(number, row, image, problem, boxes, page_sections(row, boxes))


def _environment():
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                     undefined=jinja2.StrictUndefined)
    environment.globals.update(styles={name: "#%02x%02x%02x" % colour for name, colour in STYLES.items()},
                               throughput_svg=throughput_svg)
    return environment


def throughput_svg(stats: JobStats, width: int = 720, height: int = 160) -> str:
    """Pages finished per time bucket as an inline SVG bar chart (escaped by the caller's template)."""
    if not stats.throughput:
        return ""
    peak = max(count for _, count in stats.throughput) or 1
    bar = width / len(stats.throughput)
    bars = []
    for index, (start, count) in enumerate(stats.throughput):
        tall = (height - 20) * count / peak
        bars.append(f'<rect x="{index * bar:.1f}" y="{height - 20 - tall:.1f}" width="{max(bar - 1, 1):.1f}" '
                    f'height="{tall:.1f}" fill="#3a6ea5"><title>{start:%Y-%m-%d %H:%M} UTC: {count} pages'
                    f'</title></rect>')
    first, last = stats.throughput[0][0], stats.throughput[-1][0]
    labels = (f'<text x="0" y="{height - 4}" font-size="11">{first:%Y-%m-%d %H:%M}</text>'
              f'<text x="{width}" y="{height - 4}" font-size="11" text-anchor="end">{last:%Y-%m-%d %H:%M} UTC</text>'
              f'<text x="{width}" y="12" font-size="11" text-anchor="end">peak {peak} pages per '
              f'{stats.bucket_minutes} min</text>')
    return (f'<svg viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="pages finished over time">{"".join(bars)}{labels}</svg>')


def build_report(out: str | Path, folder: str | Path, max_pages: int = 200) -> Path:
    """Write the report of the job ``out`` into ``folder``; returns its ``index.html``."""
    from markupsafe import Markup

    rows = read_rows(out)
    folder = Path(folder)
    pages_folder = folder / "pages"
    if pages_folder.exists():
        shutil.rmtree(pages_folder)  # views of an earlier report would be listed by nobody
    pages_folder.mkdir(parents=True)
    environment = _environment()
    environment.filters["markup"] = Markup
    views = [_page_view(number, row, pages_folder) for number, row in enumerate(choose_pages(rows, max_pages), 1)]
    view_of = {(view.row["path"], view.row["page"]): view.name for view in views}
    page_template = environment.get_template("report_page.html")
    for index, view in enumerate(views):
        neighbours = {"previous": views[index - 1].name if index else None,
                      "next": views[index + 1].name if index + 1 < len(views) else None}
        (pages_folder / view.name).write_text(page_template.render(view=view, **neighbours), encoding="utf-8")
    stats = job_stats(rows)
    failed = [row for row in rows if row["status"] != "ok"]
    index = folder / "index.html"
    index.write_text(environment.get_template("report_index.html").render(
        out=str(out), stats=stats, failed=failed, views=views, view_of=view_of, total=len(rows)), encoding="utf-8")
    return index
