"""Stitching: pieces of text the layout model cut apart, recognised as one image, their text split back.

PaddleX's PaddleOCR-VL pipeline (``merge_layout_blocks``, on by default)
pastes neighbouring ``text`` crops into one image and sends them to the model
in one call. Walking the blocks in reading order, pictures and tables left
out of the walk, a text block joins the text block before it when either

- the two sit side by side on one line: their columns do not overlap, the
  second starts right of the first, less than 30 % of the wider one's width
  away, and its top is above the first one's bottom; or
- one sits below the other: their columns overlap, the gap between them is
  under half the taller one's height, exactly one of their side edges lines
  up (within :data:`EDGE_TOLERANCE` pixels), and the box around both overlaps
  a picture or a table. That is text running around a figure: the piece
  beside the figure shares one margin with the text above it, not both, so
  ordinary paragraphs (both margins shared) are still recognised one by one.

The crops are stacked top to bottom on white, each step aligned on the edge
the two blocks share (centred for pieces of one line). A group whose stacked
image would be :data:`MAX_ASPECT` or more times as tall as it is wide is sent
block by block, as PaddleX does.

PaddleX keeps a group's whole output on its first block. Here every block
keeps its own text (the page's ``blocks`` column has one entry per detected
block): the output's lines are dealt out in order by height, each line going
to the block whose rows hold the middle of that line's equal share of the
stacked image. A model that joins lines into fewer than it saw moves text
between the group's blocks, never out of the group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from PIL import Image

from .blocks import Block

EDGE_TOLERANCE = 5.0  # pixels of the rendered page
MAX_ASPECT = 3.0  # height / width of the stacked image
_SIDE_GAP_SHARE = 0.3
_VERTICAL_GAP_SHARE = 0.5


def _columns_overlap(a: Block, b: Block) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > 0


def _boxes_overlap(a: tuple[float, float, float, float], b: Block) -> bool:
    return min(a[2], b.x1) > max(a[0], b.x0) and min(a[3], b.y1) > max(a[1], b.y0)


def _aligned(a: float, b: float) -> bool:
    return abs(a - b) <= EDGE_TOLERANCE


def _side_by_side(previous: Block, block: Block) -> bool:
    return (not _columns_overlap(previous, block) and block.x0 > previous.x1 and block.y0 < previous.y1
            and block.x0 - previous.x1 < _SIDE_GAP_SHARE * max(previous.width, block.width))


def _around_an_obstacle(previous: Block, block: Block, obstacles: Sequence[Block]) -> bool:
    if not (_columns_overlap(previous, block) and block.y1 >= previous.y0
            and abs(block.y0 - previous.y1) < _VERTICAL_GAP_SHARE * max(previous.height, block.height)):
        return False
    if _aligned(block.x0, previous.x0) == _aligned(block.x1, previous.x1):
        return False  # both margins shared: two paragraphs; neither: unrelated pieces
    around = (min(previous.x0, block.x0), min(previous.y0, block.y0),
              max(previous.x1, block.x1), max(previous.y1, block.y1))
    return any(_boxes_overlap(around, obstacle) for obstacle in obstacles)


def _alignment(previous: Block, block: Block) -> str:
    if _side_by_side(previous, block):
        return "center"
    return "left" if _aligned(block.x0, previous.x0) else "right"


@dataclass(frozen=True)
class Group:
    """Blocks recognised in one model call; ``aligns[i]`` places ``blocks[i + 1]`` under the ones before."""

    blocks: tuple[Block, ...]
    aligns: tuple[str, ...] = ()


def stitch_groups(blocks: Sequence[Block]) -> list[Group]:
    """The page's blocks that go to the model (``Block.prompt``), grouped into model calls.

    ``blocks`` are all of the page's blocks in reading order (pictures and
    tables are the obstacles text runs around). Groups come in the reading
    order of their first blocks; a block that joins no other is a group of its own.
    """
    obstacles = [b for b in blocks if b.prompt is None or b.label == "table"]
    groups: list[tuple[list[Block], list[str]]] = []
    current: tuple[list[Block], list[str]] | None = None  # the group of the walk's last block
    for block in blocks:
        if block.prompt is None:
            continue
        if block.label == "table":  # recognised alone, and not part of the walk
            groups.append(([block], []))
            continue
        previous = current[0][-1] if current else None
        if (previous is not None and previous.label == block.label == "text"
                and (_side_by_side(previous, block) or _around_an_obstacle(previous, block, obstacles))):
            current[0].append(block)
            current[1].append(_alignment(previous, block))
        else:
            current = ([block], [])
            groups.append(current)
    return [Group(tuple(members), tuple(aligns)) for members, aligns in groups]


@dataclass(frozen=True)
class Stitched:
    """Which rows of a stacked image each of its blocks fills: what it takes to split the output back.

    It keeps no pixels, so a page's units can drop their images once encoded.
    """

    blocks: tuple[Block, ...]
    rows: tuple[tuple[int, int], ...]  # (top, bottom) of each block's crop in the stacked image

    def split(self, text: str) -> dict[int, str]:
        """The model's output for the stacked image, dealt out to the blocks (by ``Block.order``)."""
        lines = [line for line in text.splitlines() if line.strip()]
        height = self.rows[-1][1]
        shares: dict[int, list[str]] = {block.order: [] for block in self.blocks}
        for index, line in enumerate(lines):
            middle = (index + 0.5) * height / len(lines)
            block = next((b for b, (_, bottom) in zip(self.blocks, self.rows) if middle < bottom), self.blocks[-1])
            shares[block.order].append(line)
        return {order: "\n".join(share) for order, share in shares.items()}


def stack(group: Group, crops: Sequence[Image.Image]) -> tuple[Image.Image, Stitched] | None:
    """The group's crops (one per block, in order) stacked; ``None`` when the stack would be too tall."""
    width = max(image.width for image in crops)
    height = sum(image.height for image in crops)
    if height >= MAX_ASPECT * width:
        return None
    stacked, rows = crops[0], [(0, crops[0].height)]
    for image, align in zip(crops[1:], group.aligns):
        wider = max(stacked.width, image.width)
        canvas = Image.new(stacked.mode, (wider, stacked.height + image.height), "white")
        canvas.paste(stacked, (_offset(align, wider, stacked.width), 0))
        canvas.paste(image, (_offset(align, wider, image.width), stacked.height))
        rows.append((stacked.height, canvas.height))
        stacked = canvas
    return stacked, Stitched(group.blocks, tuple(rows))


def _offset(align: str, width: int, part: int) -> int:
    if align == "left":
        return 0
    if align == "right":
        return width - part
    return (width - part) // 2
