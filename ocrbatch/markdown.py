"""Recognised blocks → Markdown, following PaddleOCR-VL's own document pipeline.

Each block's model output is formatted by its kind (see :mod:`ocrbatch.layout`):
the document title becomes ``#``, section titles one ``#`` more than the
depth of their numbering (``2.1 Scope`` → ``###``), tables arrive as OTSL
and leave as HTML with their row and column spans, formulas are wrapped in
``$$…$$`` (display) or ``$…$`` (inline), text keeps one paragraph per line
with ``\\(…\\)`` / ``\\[…\\]`` turned into dollar delimiters, and images
become links to their saved crops. A page is its blocks in reading order,
blank-line separated, leaving out page furniture (headers, footers, page
numbers, footnotes, side notes); a document is its pages in order, each
after a ``<!-- page N -->`` marker.
"""

from __future__ import annotations

import html
import re
from typing import Sequence

from .layout import OMITTED_FROM_MARKDOWN, Block

_OTSL_TAG = re.compile(r"<(fcel|ecel|lcel|ucel|xcel|nl)>")
_STARTS_CELL = ("fcel", "ecel")
_JOINS_LEFT = ("lcel", "xcel")
_JOINS_UP = ("ucel", "xcel")

# Section numbering at the start of a title: "2", "2.1", "2.1.3", "A.1",
# optionally closed by a dot ("3."), then a space.
_NUMBERING = re.compile(r"\s*((?:\d+|[A-Z])(?:\.\d+)*)\.?\s")
_INLINE_MATH = re.compile(r"\\\((.+?)\\\)", re.DOTALL)
_DISPLAY_MATH = re.compile(r"\\\[(.+?)\\\]", re.DOTALL)
_FORMULA_WRAPPERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))


def otsl_to_html(text: str) -> str | None:
    """Convert a table in OTSL to an HTML ``<table>``; ``None`` when ``text`` is not OTSL.

    OTSL writes a table row by row: ``<fcel>`` opens a cell with text,
    ``<ecel>`` an empty one, ``<lcel>`` continues the cell to its left (column
    span), ``<ucel>`` the cell above (row span), ``<xcel>`` both, and
    ``<nl>`` ends a row. Short rows are padded with empty cells; a merge tag
    with no cell to merge into becomes a cell of its own. Text before the
    first tag, or a grid without any opening cell, is not a table: the
    caller keeps the model's raw output.
    """
    parts = _OTSL_TAG.split(text)
    if len(parts) == 1 or parts[0].strip():
        return None
    rows: list[list[tuple[str, str]]] = []
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
    grid = [row + [("ecel", "")] * (width - len(row)) for row in rows]
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


def normalise_math(text: str) -> str:
    """Turn LaTeX's ``\\(…\\)`` and ``\\[…\\]`` in running text into ``$…$`` and ``$$…$$``."""
    text = _DISPLAY_MATH.sub(lambda m: f"$${m.group(1).strip()}$$", text)
    return _INLINE_MATH.sub(lambda m: f"${m.group(1).strip()}$", text)


def normalise_formula(text: str, display: bool) -> str:
    """A formula block's output as ``$$\\n…\\n$$`` (display) or ``$…$`` (inline).

    Whatever delimiters the model put around the formula (``$$``, ``\\[``,
    ``\\(``, ``$``) are removed first, so they are never doubled. Empty
    output stays empty.
    """
    body = text.strip()
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for opening, closing in _FORMULA_WRAPPERS:
            if len(body) >= len(opening) + len(closing) and body.startswith(opening) and body.endswith(closing):
                body = body[len(opening):len(body) - len(closing)].strip()
                unwrapped = True
                break
    if not body:
        return ""
    return f"$$\n{body}\n$$" if display else f"${body}$"


def heading_level(title: str) -> int:
    """Markdown heading level of a section title: 2, plus one per level of its numbering, at most 6.

    ``Introduction`` and ``3 Results`` → 2, ``2.1 Scope`` → 3, ``A.1.2 Data`` → 4.
    (Level 1 is the document title's.)
    """
    match = _NUMBERING.match(title + " ")
    depth = match.group(1).count(".") if match else 0
    return min(2 + depth, 6)


def _one_line(text: str) -> str:
    return " ".join(text.replace("-\n", "").split())


def _paragraphs(text: str) -> str:
    """One Markdown paragraph per output line, as the official pipeline writes text blocks."""
    lines = [line.strip() for line in text.splitlines()]
    return "\n\n".join(line for line in lines if line)


def _pipe_table(text: str) -> str:
    """Chart output (``a | b`` rows, header first) as a Markdown table."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines() if line.strip()]
    if not rows:
        return ""
    width = max(len(row) for row in rows)
    rows = [row + [""] * (width - len(row)) for row in rows]
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + " --- |" * width)
    return "\n".join(lines)


def block_markdown(block: Block, text: str, image_link: str | None = None) -> str:
    """Markdown for one block, given the model's output for it (``""`` if it had none).

    ``image_link`` is where the block's crop was saved, relative to the
    Markdown file; image blocks (and charts or seals that were not
    recognised) without one produce nothing.
    """
    kind = block.kind
    text = text.strip()
    if kind in ("image", "chart", "seal") and not text:
        return f"![{block.label}]({image_link})" if image_link else ""
    if not text:
        return ""
    if kind == "title":
        return "# " + _one_line(text)
    if kind == "heading":
        return "#" * heading_level(text) + " " + _one_line(text)
    if kind == "table":
        return otsl_to_html(text) or text
    if kind == "formula":
        return normalise_formula(text, display=block.label != "inline_formula")
    if kind == "chart":
        return _pipe_table(text)
    if kind == "contents":
        # A table of contents keeps its lines, as hard line breaks.
        return "  \n".join(line.strip() for line in text.splitlines() if line.strip())
    return _paragraphs(normalise_math(text))


def page_markdown(blocks_with_text: Sequence[tuple[Block, str] | tuple[Block, str, str | None]]) -> str:
    """A page's Markdown from ``(block, text)`` or ``(block, text, image_link)`` items.

    Blocks are written in reading order (``Block.order``); those with labels
    in :data:`~ocrbatch.layout.OMITTED_FROM_MARKDOWN` and those that format
    to nothing are left out.
    """
    parts = []
    for item in sorted(blocks_with_text, key=lambda item: item[0].order):
        block, text = item[0], item[1]
        if block.label in OMITTED_FROM_MARKDOWN:
            continue
        piece = block_markdown(block, text, item[2] if len(item) > 2 else None)
        if piece:
            parts.append(piece)
    return "\n\n".join(parts)


def document_markdown(pages: list[tuple[int, str]]) -> str:
    """A document's Markdown from ``(page number, page Markdown)`` pairs, in page order."""
    sections = []
    for number, text in sorted(pages, key=lambda page: page[0]):
        marker = f"<!-- page {number} -->"
        sections.append(f"{marker}\n\n{text.strip()}" if text.strip() else marker)
    return "\n\n".join(sections) + "\n" if sections else ""


def image_filename(page: int, block: Block, extension: str = "png") -> str:
    """A file name for a block's crop that is unique within its document (page and block order)."""
    return f"page{page:04d}-block{block.order:03d}-{block.label}.{extension}"
