"""Recognised blocks → Markdown, following PaddleOCR-VL's own document pipeline.

Each block's model output is formatted by its kind (see :mod:`ocrbatch.layout.blocks`):
the document title becomes ``#``; section titles get their level from their
numbering (``2.1 Scope`` → ``###``), or, unnumbered, from their height among
the other titles (:class:`HeadingLevels`); tables arrive as OTSL and leave as
HTML with their row and column spans, pictures inside them as ``<img>``
links (:mod:`ocrbatch.layout.tables`); formulas are wrapped in ``$$…$$`` (display,
with the formula number that follows them folded in as ``\\tag*{…}``) or
``$…$`` (inline); text keeps one paragraph per line; LaTeX's ``\\(…\\)`` /
``\\[…\\]`` become dollar delimiters in every kind; images become links to
their saved crops. A page is its blocks in reading order, blank-line
separated, leaving out page furniture (headers, footers, page numbers,
footnotes, side notes). A document is its pages in order, each after a
``<!-- page N -->`` marker, with the passes that need every page: tables
continued across pages merged, title levels sized over the whole document.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from .blocks import OMITTED_FROM_MARKDOWN, Block
from .tables import figure_tokens, figures_in, link_figures, merge_continued_tables, otsl_to_html

# Section numbering at the start of a title: "2", "2.1", "2.1.3", "A.1", "A.",
# optionally closed by a dot ("3."), then a space. A lone capital is a word ("A note").
_NUMBERING = re.compile(r"\s*(\d+(?:\.\d+)*|[A-Z](?:\.\d+)+|[A-Z](?=\.))\.?\s")
_INLINE_MATH = re.compile(r"\\\((.+?)\\\)", re.DOTALL)
_DISPLAY_MATH = re.compile(r"\\\[(.+?)\\\]", re.DOTALL)
_FORMULA_WRAPPERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"))
# Title line heights within this ratio of the next taller one are one type size.
_SAME_SIZE = 1.15

Item = tuple[Block, str] | tuple[Block, str, str | None]  # a block, its output, the link to its saved crop


def normalise_math(text: str) -> str:
    """Turn LaTeX's ``\\(…\\)`` and ``\\[…\\]`` in running text into ``$…$`` and ``$$…$$``."""
    text = _DISPLAY_MATH.sub(lambda m: f"$${m.group(1).strip()}$$", text)
    return _INLINE_MATH.sub(lambda m: f"${m.group(1).strip()}$", text)


def _unwrapped(text: str) -> str:
    """A formula without whatever delimiters the model put around it (``$$``, ``\\[``, ``\\(``, ``$``)."""
    body = text.strip()
    unwrapped = True
    while unwrapped:
        unwrapped = False
        for opening, closing in _FORMULA_WRAPPERS:
            if len(body) >= len(opening) + len(closing) and body.startswith(opening) and body.endswith(closing):
                body = body[len(opening):len(body) - len(closing)].strip()
                unwrapped = True
                break
    return body


def normalise_formula(text: str, display: bool, number: str = "") -> str:
    """A formula block's output as ``$$\\n…\\n$$`` (display) or ``$…$`` (inline).

    The model's own delimiters are removed first, so they are never doubled.
    A display formula's ``number`` (the text of the ``formula_number`` block
    beside it, such as ``(3)``) is written with it as ``\\tag*{(3)}``. Empty
    output stays empty.
    """
    body = _unwrapped(text)
    if not body:
        return ""
    if not display:
        return f"${body}$"
    number = _unwrapped(number)
    return f"$$\n{body} \\tag*{{{number}}}\n$$" if number else f"$$\n{body}\n$$"


def _numbered_level(title: str) -> int | None:
    """2 plus one per level of the title's section numbering (at most 6); ``None`` when it has none."""
    match = _NUMBERING.match(title + " ")
    return min(2 + match.group(1).count("."), 6) if match else None


def heading_level(title: str) -> int:
    """Markdown heading level of a section title from its numbering alone: 2 plus one per level, at most 6.

    ``Introduction`` and ``3 Results`` → 2, ``2.1 Scope`` → 3, ``A.1.2 Data`` → 4.
    (Level 1 is the document title's.)
    """
    return _numbered_level(title) or 2


def _line_height(block: Block, text: str) -> float:
    """A title's type size as the page shows it: its box height over its lines of text."""
    lines = sum(1 for line in text.splitlines() if line.strip())
    return round(block.height / max(1, lines), 1)


class HeadingLevels:
    """Markdown levels of section titles: from their numbering first, then from their height.

    A numbered title ("2.1 Scope") is one level deeper per level of its
    numbering (``##`` for "2", ``###`` for "2.1"), as PaddleX's semantic
    rule has it. An unnumbered one is sized against the titles in scope (a
    page, or a whole document): their line heights are grouped into type
    sizes, tallest first; a size that numbered titles also have takes their
    commonest level, any other size one level below the next taller size,
    ``##`` for the tallest.
    """

    def __init__(self, titles: Iterable[tuple[Block, str]]):
        titles = [(block, text) for block, text in titles if block.kind == "heading" and text.strip()]
        sizes: list[list[float]] = []
        for height in sorted({_line_height(block, text) for block, text in titles}, reverse=True):
            if sizes and sizes[-1][-1] <= height * _SAME_SIZE:
                sizes[-1].append(height)
            else:
                sizes.append([height])
        self._levels: dict[float, int] = {}
        above = 1  # the document title's level
        for size in sizes:
            numbered = Counter(level for block, text in titles if _line_height(block, text) in size
                               and (level := _numbered_level(text)) is not None)
            level = min(numbered, key=lambda n: (-numbered[n], n)) if numbered else min(above + 1, 6)
            self._levels.update(dict.fromkeys(size, level))
            above = level

    def level(self, block: Block, text: str) -> int:
        return _numbered_level(text) or self._levels.get(_line_height(block, text), 2)


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


def block_markdown(block: Block, text: str, image_link: str | None = None, level: int | None = None,
                   number: str = "") -> str:
    """Markdown for one block, given the model's output for it (``""`` if it had none).

    ``image_link`` is where the block's crop was saved, relative to the
    Markdown file; image blocks (and charts or seals that were not
    recognised) without one produce nothing. ``level`` is a section title's
    heading level (default: from its numbering), ``number`` a display
    formula's number.
    """
    kind = block.kind
    text = text.strip()
    if kind in ("image", "chart", "seal") and not text:
        return f"![{block.label}]({image_link})" if image_link else ""
    if not text:
        return ""
    if kind == "formula":
        return normalise_formula(text, display=block.label != "inline_formula", number=number)
    text = normalise_math(text)
    if kind == "title":
        return "# " + _one_line(text)
    if kind == "heading":
        return "#" * (level or heading_level(text)) + " " + _one_line(text)
    if kind == "table":
        return otsl_to_html(text) or text
    if kind == "chart":
        return _pipe_table(text)
    if kind == "contents":
        # A table of contents keeps its lines, as hard line breaks.
        return "  \n".join(line.strip() for line in text.splitlines() if line.strip())
    return _paragraphs(text)


@dataclass
class Piece:
    """What a page writes for one of its blocks: ``markdown`` is empty for a block that writes nothing."""

    block: Block
    text: str  # the model's output
    markdown: str


def page_pieces(items: Sequence[Item], headings: HeadingLevels | None = None) -> list[Piece]:
    """Every block of a page in reading order, with what the page's Markdown writes for it.

    ``items`` are ``(block, text)`` or ``(block, text, image_link)``.
    Blocks with labels in :data:`~ocrbatch.layout.blocks.OMITTED_FROM_MARKDOWN`
    write nothing, nor do pictures inside a table (the table links them);
    a display formula takes the number of the ``formula_number`` block that
    follows it. ``headings`` sizes unnumbered section titles (default: against
    this page's titles).
    """
    ordered = sorted(items, key=lambda item: item[0].order)
    blocks = [item[0] for item in ordered]
    texts = [item[1] for item in ordered]
    links = {item[0].order: item[2] for item in ordered if len(item) > 2 and item[2]}
    headings = headings or HeadingLevels(zip(blocks, texts))
    in_tables = {figure.order for block in blocks if block.kind == "table" for figure in figures_in(block, blocks)}
    pieces = []
    for index, (block, text) in enumerate(zip(blocks, texts)):
        if block.label in OMITTED_FROM_MARKDOWN or block.order in in_tables:
            pieces.append(Piece(block, text, ""))
            continue
        following = blocks[index + 1] if index + 1 < len(blocks) else None
        number = texts[index + 1] if following is not None and following.label == "formula_number" else ""
        markdown = block_markdown(block, text, links.get(block.order),
                                  level=headings.level(block, text) if block.kind == "heading" else None,
                                  number=number)
        if block.kind == "table":
            markdown = link_figures(markdown, figure_tokens(block, blocks), links)
        pieces.append(Piece(block, text, markdown))
    return pieces


def _joined(pieces: Iterable[Piece]) -> str:
    return "\n\n".join(piece.markdown for piece in pieces if piece.markdown)


def page_markdown(items: Sequence[Item], headings: HeadingLevels | None = None) -> str:
    """A page's Markdown from its blocks with their outputs (see :func:`page_pieces`)."""
    return _joined(page_pieces(items, headings))


@dataclass
class DocumentPage:
    """One page of a document for its Markdown file."""

    number: int
    text: str  # the page's Markdown as recorded: what is written for a page without blocks
    items: Sequence[Item] | None = None  # a layout page's blocks with their outputs and crop links


def document_markdown(pages: Sequence[DocumentPage]) -> str:
    """A document's Markdown: its pages in order, each after a ``<!-- page N -->`` marker.

    Layout pages are written from their blocks, with section titles sized
    against every title of the document and tables continued across pages
    merged into their first part; other pages as recorded.
    """
    pages = sorted(pages, key=lambda page: page.number)
    headings = HeadingLevels((item[0], item[1]) for page in pages for item in page.items or ())
    pieces = [page_pieces(page.items, headings) if page.items else None for page in pages]
    merge_continued_tables(pieces)
    sections = []
    for page, page_parts in zip(pages, pieces):
        text = (_joined(page_parts) if page_parts is not None else page.text).strip()
        marker = f"<!-- page {page.number} -->"
        sections.append(f"{marker}\n\n{text}" if text else marker)
    return "\n\n".join(sections) + "\n" if sections else ""


def image_filename(page: int, block: Block, extension: str = "png") -> str:
    """A file name for a block's crop that is unique within its document (page and block order)."""
    return f"page{page:04d}-block{block.order:03d}-{block.label}.{extension}"
