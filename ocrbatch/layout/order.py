"""The official pipeline's block filters, and reading order by recursive XY-cut.

Every detector's boxes go through :func:`filter_blocks`: NMS, the
page-sized-picture filter, removal of boxes inside title, formula and
chart boxes, and of tiny and duplicate boxes. A detector without a reading
order of its own (CDLA) orders its blocks with :func:`reading_order`:
columns read left to right, running headers first and footers last.
Coordinates are pixels of the image the detector saw.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from .blocks import Block

HEADER_LABELS = frozenset({"header", "header_image"})


FOOTER_LABELS = frozenset({"footer", "footer_image", "number"})


# Boxes lying inside a box of one of these labels are dropped (the official
# "large" merge mode): a title or formula box is recognised whole.
CONTAINER_LABELS = frozenset({"chart", "display_formula", "inline_formula", "formula", "doc_title", "paragraph_title"})


MIN_BOX_SIDE = 4  # pixels; narrower or lower boxes are dropped


_NMS_SAME_LABEL_IOU = 0.6


_NMS_OTHER_LABEL_IOU = 0.98


_CONTAINED_SHARE = 0.9


_DUPLICATE_SHARE = 0.7


def _iou(a: Block, b: Block) -> float:
    inter = _intersection(a, b)
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def _intersection(a: Block, b: Block) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _nms(blocks: list[Block]) -> list[Block]:
    """Drop a box overlapping a better-scored one: IoU 0.6 within a label, 0.98 across labels."""
    kept: list[int] = []
    for i in sorted(range(len(blocks)), key=lambda i: -blocks[i].score):
        block = blocks[i]
        if all(_iou(block, blocks[k]) < (_NMS_SAME_LABEL_IOU if block.label == blocks[k].label
                                         else _NMS_OTHER_LABEL_IOU) for k in kept):
            kept.append(i)
    return [blocks[i] for i in sorted(kept)]


def _drop_page_sized_pictures(blocks: list[Block], width: float, height: float) -> list[Block]:
    """A picture box covering nearly the whole page is the page itself, not a figure on it."""
    if len(blocks) < 2:
        return blocks
    limit = (0.82 if width > height else 0.93) * width * height
    kept = [b for b in blocks if b.label != "image" or b.area <= limit]
    return kept or blocks


def _drop_contained(blocks: list[Block]) -> list[Block]:
    """Drop boxes lying (90 % of their area) inside a larger title, formula or chart box.

    Unlike the official rule, a box is never dropped for lying inside a box
    no larger than itself, so two near-identical boxes of container labels
    do not remove each other.
    """
    def inside(block: Block, container: Block) -> bool:
        return (container is not block and container.label in CONTAINER_LABELS and block.area > 0
                and container.area > block.area
                and _intersection(block, container) >= _CONTAINED_SHARE * block.area)

    return [b for b in blocks if not any(inside(b, c) for c in blocks)]


def _drop_small_and_duplicates(blocks: list[Block]) -> list[Block]:
    """The pipeline's last filter: no ``reference`` regions, no boxes under 4 px, no duplicates.

    Of two boxes sharing more than 70 % of the smaller one's area, the
    smaller is dropped, unless exactly one of them is a picture (a figure
    and its caption or a table may legitimately overlap it), or both have
    polygons that share no more than 70 % of the smaller one.
    """
    candidates = [b for b in blocks if b.label != "reference"]
    dropped = {i for i, b in enumerate(candidates) if b.width < MIN_BOX_SIDE or b.height < MIN_BOX_SIDE}
    for i, a in enumerate(candidates):
        for j in range(i + 1, len(candidates)):
            if i in dropped or j in dropped:
                continue
            b = candidates[j]
            smaller = min(a.area, b.area)
            if smaller <= 0 or _intersection(a, b) <= _DUPLICATE_SHARE * smaller:
                continue
            if a.label != b.label and "image" in (a.label, b.label):
                continue
            if a.polygon and b.polygon and _polygon_overlap(a, b) <= _DUPLICATE_SHARE:
                continue  # boxes of slanted blocks overlap where the blocks themselves do not
            dropped.add(j if a.area >= b.area else i)
    return [b for i, b in enumerate(candidates) if i not in dropped]


def _polygon_overlap(a: Block, b: Block) -> float:
    """The share of the smaller of two blocks' polygons that the other covers, measured in whole pixels."""
    left, top = math.floor(min(a.x0, b.x0)), math.floor(min(a.y0, b.y0))
    size = (math.ceil(max(a.x1, b.x1)) - left + 1, math.ceil(max(a.y1, b.y1)) - top + 1)
    masks = []
    for block in (a, b):
        mask = Image.new("1", size, 0)
        ImageDraw.Draw(mask).polygon([(x - left, y - top) for x, y in block.polygon], fill=1)
        masks.append(np.asarray(mask))
    smaller = min(int(mask.sum()) for mask in masks)
    return int((masks[0] & masks[1]).sum()) / smaller if smaller else 0.0


def filter_blocks(blocks: Sequence[Block], width: float, height: float) -> list[Block]:
    """The official pipeline's box filters, in its order; the survivors keep their relative order."""
    kept = _nms(list(blocks))
    kept = _drop_page_sized_pictures(kept, width, height)
    kept = _drop_contained(kept)
    return _drop_small_and_duplicates(kept)


def _shrunk(lo: float, hi: float) -> tuple[float, float]:
    # Detected boxes of neighbouring lines often overlap by a pixel or two;
    # projecting slightly shrunk boxes keeps such overlaps from hiding a gap.
    margin = min(3.0, 0.2 * (hi - lo))
    return lo + margin, hi - margin


def _split(blocks: list[Block], vertical: bool) -> list[list[Block]]:
    """Groups of blocks separated by empty bands across the page (vertical: columns, left to right)."""
    spans = sorted((((_shrunk(b.x0, b.x1) if vertical else _shrunk(b.y0, b.y1)), b) for b in blocks),
                   key=lambda span: span[0])
    groups: list[list[Block]] = []
    reach = -math.inf
    for (lo, hi), block in spans:
        if lo >= reach:
            groups.append([])
        groups[-1].append(block)
        reach = max(reach, hi)
    return groups


def _xy_cut(blocks: list[Block]) -> list[Block]:
    """Recursive XY-cut that prefers columns.

    A set of blocks with an empty vertical band is read column by column.
    Otherwise it is cut into horizontal bands; consecutive bands that
    together still have a column gap (a two-column stretch whose paragraph
    breaks happen to line up) are read as one region, so full-width blocks
    (titles, wide figures) separate column regions but aligned gaps inside
    columns do not.
    """
    if len(blocks) <= 1:
        return list(blocks)
    columns = _split(blocks, vertical=True)
    if len(columns) > 1:
        return [b for column in columns for b in _xy_cut(column)]
    bands = _split(blocks, vertical=False)
    if len(bands) == 1:
        return sorted(blocks, key=lambda b: (b.y0, b.x0))
    regions: list[list[Block]] = []
    for band in bands:
        if regions and len(_split(regions[-1] + band, vertical=True)) > 1:
            regions[-1] = regions[-1] + band
        else:
            regions.append(band)
    return [b for region in regions for b in _xy_cut(region)]


def reading_order(blocks: Sequence[Block]) -> list[Block]:
    """Order blocks for a model without reading order: headers, the body by XY-cut, footers.

    Returns the blocks renumbered from 0.
    """
    headers = [b for b in blocks if b.label in HEADER_LABELS]
    footers = [b for b in blocks if b.label in FOOTER_LABELS]
    body = [b for b in blocks if b.label not in HEADER_LABELS and b.label not in FOOTER_LABELS]
    ordered = _xy_cut(headers) + _xy_cut(body) + _xy_cut(footers)
    return [replace(b, order=i) for i, b in enumerate(ordered)]
