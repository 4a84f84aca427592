"""Tables: the model's OTSL as HTML, figures inside tables, and tables continued across pages.

- :func:`otsl_to_html`: ``Table Recognition:`` output (OTSL) → an HTML table
  with row and column spans.
- Figures inside a table (PaddleX's ``tokenize_figure_of_table``): before
  the table is recognised, each picture lying inside its box is painted
  over with a token (``[F2]``) that the model transcribes in the cell where
  the picture is; in the Markdown the token becomes an ``<img>`` link to the
  picture's saved crop, and the picture is not written again on its own.
- Tables continued across pages (PaddleX's ``merge_tables_across_pages``):
  a table that ends a page and one that starts the next are one table when
  nothing but page furniture is written between them, their widths are
  within 10 % and they have the same number of columns; the continuation's
  rows are appended to the first part, less the header rows it repeats.
"""

from __future__ import annotations

import html
import re
from typing import Protocol, Sequence

from PIL import Image, ImageDraw, ImageFont

from .blocks import Block

_OTSL_TAG = re.compile(r"<(fcel|ecel|lcel|ucel|xcel|nl)>")
_STARTS_CELL = ("fcel", "ecel")
_JOINS_LEFT = ("lcel", "xcel")
_JOINS_UP = ("ucel", "xcel")

Grid = list[list[tuple[str, str]]]  # rows of (tag, cell text), all rows as wide as the widest


def otsl_grid(text: str) -> Grid | None:
    """The rows of a table in OTSL, short rows padded with empty cells; ``None`` when ``text`` is not OTSL.

    OTSL writes a table row by row: ``<fcel>`` opens a cell with text,
    ``<ecel>`` an empty one, ``<lcel>`` continues the cell to its left (column
    span), ``<ucel>`` the cell above (row span), ``<xcel>`` both, and
    ``<nl>`` ends a row. Text before the first tag, or a grid without any
    opening cell, is not a table.
    """
    parts = _OTSL_TAG.split(text)
    if len(parts) == 1 or parts[0].strip():
        return None
    rows: Grid = []
    row: list[tuple[str, str]] = []
    for tag, content in zip(parts[1::2], parts[2::2]):
        if tag == "nl":
            if row:
                rows.append(row)
            row = []
        else:
            row.append((tag, content.strip()))
    if row:
        rows.append(row)
    if not any(tag in _STARTS_CELL for row in rows for tag, _ in row):
        return None
    width = max(len(row) for row in rows)
    return [row + [("ecel", "")] * (width - len(row)) for row in rows]


def otsl_to_html(text: str) -> str | None:
    """Convert a table in OTSL (see :func:`otsl_grid`) to an HTML ``<table>``; ``None`` when it is not OTSL.

    One ``<tr>`` per OTSL row; a merge tag with no cell to merge into becomes
    a cell of its own. When ``None``, the caller keeps the model's raw output.
    """
    grid = otsl_grid(text)
    if grid is None:
        return None
    width = len(grid[0])
    covered = [[False] * width for _ in grid]
    lines = []
    for r, row in enumerate(grid):
        cells = []
        for c in range(width):
            if covered[r][c]:
                continue
            colspan = 1
            while c + colspan < width and row[c + colspan][0] in _JOINS_LEFT and not covered[r][c + colspan]:
                colspan += 1
            rowspan = 1
            while r + rowspan < len(grid) and all(
                grid[r + rowspan][k][0] in _JOINS_UP and not covered[r + rowspan][k] for k in range(c, c + colspan)
            ):
                rowspan += 1
            texts = []
            for rr in range(r, r + rowspan):
                for cc in range(c, c + colspan):
                    covered[rr][cc] = True
                    if grid[rr][cc][1]:
                        texts.append(grid[rr][cc][1])
            spans = (f' rowspan="{rowspan}"' if rowspan > 1 else "") + (f' colspan="{colspan}"' if colspan > 1 else "")
            cells.append(f"<td{spans}>{html.escape(' '.join(texts), quote=False)}</td>")
        lines.append("<tr>" + "".join(cells) + "</tr>")
    return "<table>" + "".join(lines) + "</table>"


# ------------------------------------------------------- figures in tables

FIGURE_MIN_SIDE = 25  # pixels; a smaller picture is left in the crop (too small to carry a legible token)
_TOKEN = re.compile(r"\[F(\d+)\]")


def figures_in(table: Block, blocks: Sequence[Block]) -> list[Block]:
    """The pictures lying wholly inside ``table``'s box, in reading order."""
    return [b for b in blocks if b.kind == "image" and b.x0 >= table.x0 and b.y0 >= table.y0
            and b.x1 <= table.x1 and b.y1 <= table.y1]


def figure_tokens(table: Block, blocks: Sequence[Block]) -> dict[str, Block]:
    """The token painted over each large enough picture inside ``table``: ``{"[F2]": picture, ...}``.

    Token numbers have no 0, 1 or 9 (read as O, l and g too easily), so the
    model cannot mistake a token for the table's own figures.
    """
    numbers = (n for n in range(2, 10**6) if not set(str(n)) & set("019"))
    return {f"[F{next(numbers)}]": figure for figure in figures_in(table, blocks)
            if min(figure.width, figure.height) >= FIGURE_MIN_SIDE}


def paint_figure_tokens(page: Image.Image, table: Block, blocks: Sequence[Block]) -> Image.Image:
    """The page with each large enough picture inside ``table`` painted white and labelled with its token.

    The page itself when there is none; otherwise a copy, for the table's crop to be taken from.
    """
    tokens = figure_tokens(table, blocks)
    if not tokens:
        return page
    page = page.copy()
    draw = ImageDraw.Draw(page)
    for token, figure in tokens.items():
        box = (figure.x0, figure.y0, figure.x1, figure.y1)
        draw.rectangle(box, fill="white")
        font = _font_fitting(draw, token, 0.9 * figure.width, 0.9 * figure.height)
        draw.text(((figure.x0 + figure.x1) / 2, (figure.y0 + figure.y1) / 2), token, fill="black", font=font,
                  anchor="mm")
    return page


def _font_fitting(draw: ImageDraw.ImageDraw, text: str, width: float, height: float) -> ImageFont.FreeTypeFont:
    size = max(1, int(height))
    while size > 6:
        font = ImageFont.load_default(size=size)
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        if x1 - x0 <= width and y1 - y0 <= height:
            return font
        size = int(size * 0.85)
    return ImageFont.load_default(size=size)


def link_figures(table_html: str, tokens: dict[str, Block], links: dict[int, str]) -> str:
    """The table's Markdown with each figure token replaced by an ``<img>`` of the picture's saved crop.

    ``links`` maps block orders to crop files; a token whose picture has none
    (no ``--markdown-dir``) is dropped, as a picture without a file is.
    """
    def image(match: re.Match) -> str:
        figure = tokens.get(match.group(0))
        if figure is None:
            return match.group(0)  # not one of ours: the table's own text
        link = links.get(figure.order)
        return f'<img src="{html.escape(link)}">' if link else ""

    return _TOKEN.sub(image, table_html)


# ------------------------------------------------ tables continued across pages

_WIDTH_TOLERANCE = 0.1
_MAX_HEADER_ROWS = 5


class Piece(Protocol):
    """What a page writes for one block: the block, the model's output, and its Markdown."""

    block: Block
    text: str
    markdown: str


def merge_continued_tables(pages: Sequence[Sequence[Piece] | None]) -> None:
    """Merge each table continued from one page onto the next into its first part, in place.

    ``pages`` are a document's pages in order, each its pieces in reading
    order (``None`` for a page without blocks, which ends any table). The
    continuation's rows go into the first part's Markdown, its own Markdown
    becomes empty; a table over three pages ends up whole on the first.
    """
    for index in range(len(pages) - 1, 0, -1):
        previous, current = pages[index - 1], pages[index]
        if not previous or not current:
            continue
        last = next((k for k in reversed(range(len(previous))) if previous[k].block.label == "table"), None)
        first = next((k for k in range(len(current)) if current[k].block.label == "table"), None)
        if last is None or first is None:
            continue
        if any(piece.markdown for piece in previous[last + 1:]) or any(piece.markdown for piece in current[:first]):
            continue  # something the reader sees lies between the two
        _merge(previous[last], current[first])


def _merge(head: Piece, tail: Piece) -> None:
    widths = head.block.width, tail.block.width
    if min(widths) <= 0 or abs(widths[0] - widths[1]) / min(widths) >= _WIDTH_TOLERANCE:
        return
    head_grid, tail_grid = otsl_grid(head.text), otsl_grid(tail.text)
    if head_grid is None or tail_grid is None or len(head_grid[0]) != len(tail_grid[0]):
        return
    if not (head.markdown.endswith("</table>") and tail.markdown.startswith("<table>")):
        return
    repeated = _repeated_header_rows(head_grid, tail_grid)
    rows = re.findall(r"<tr>.*?</tr>", tail.markdown[len("<table>"):-len("</table>")], flags=re.DOTALL)
    head.markdown = head.markdown[:-len("</table>")] + "".join(rows[repeated:]) + "</table>"
    tail.markdown = ""


def _repeated_header_rows(head: Grid, tail: Grid) -> int:
    """How many of its first rows the continuation repeats from the table's start (at most five)."""
    def normalised(row):
        return [(tag, "".join(text.split())) for tag, text in row]

    count = 0
    while count < min(_MAX_HEADER_ROWS, len(head), len(tail)) and normalised(head[count]) == normalised(tail[count]):
        count += 1
    return count
