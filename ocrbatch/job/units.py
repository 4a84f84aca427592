"""Pages as units of recognition, and a finished page's row from its units.

A page is recognised as one or more units, each an image with a prompt: in
whole-page mode (``--layout none``) the page itself with the task's prompt;
in layout mode one crop per layout block that goes to the model, with the
block's prompt, except that pieces of text the layout model cut apart are
stitched into one image (:mod:`ocrbatch.layout.stitch`, ``--no-stitch`` to send every block
alone) and a table's crop has the pictures inside it painted over with
tokens (:mod:`ocrbatch.layout.tables`). A page is finished, and recorded once, when all its
units are; a unit that fails fails the page. Layout pages become Markdown in
reading order (:mod:`ocrbatch.layout.markdown`) and keep every block, headers and footers
included, in the ``blocks`` column, a stitched unit's output split back
among its blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from ..layout.blocks import BLOCK_MAX_PIXELS, BLOCK_MIN_PIXELS, Block, crop
from ..layout.markdown import image_filename, page_markdown
from ..layout.spotting import SPOTTING_PIXEL_BOUNDS, prepare, read_spots, spotted_text
from ..layout.stitch import Group, Stitched, stack, stitch_groups
from ..layout.tables import paint_figure_tokens
from ..model.prompt import TASK_PROMPTS
from ..model.repetition import PROSE, TABLE, TABLE_PROMPT, LoopSettings
from ..sources.rasterize import PageImage
from .rows import page_row

if TYPE_CHECKING:  # the vision encoder's torch stays out of processes that only cut pages into units
    from ..model.vision import EncodedImage

BLOCK_PIXEL_BOUNDS = (BLOCK_MIN_PIXELS, BLOCK_MAX_PIXELS)
# When several blocks of a page end differently, the page reports the most telling reason.
FINISH_PRIORITY = ("repetition", "length", "stop")


@dataclass
class Unit:
    """One image and prompt of a page for the model."""

    block: Block | None  # None: the whole page; a stitched unit's first block
    image: Image.Image | None
    prompt: str
    pixel_bounds: tuple[int, int] | None  # None: the processor's own
    # Image tokens: counted by this machine's encoder, or by a remote server (its usage; None when it does not say).
    n_image_tokens: int | None = 0
    vision_s: float | None = 0.0  # None: encoded elsewhere (a remote server)
    encoded: EncodedImage | None = None  # the embeddings, between the encode stage and the decoder
    columns: dict | None = None  # the decoded columns, once done
    stitched: Stitched | None = None  # several blocks in one image: whose output is whose

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The layout blocks this unit recognises."""
        if self.stitched is not None:
            return self.stitched.blocks
        return () if self.block is None else (self.block,)

    def texts(self, text: str) -> dict[int, str]:
        """The unit's output for each of its blocks, by ``Block.order``."""
        if self.stitched is not None:
            return self.stitched.split(text)
        return {block.order: text for block in self.blocks}

    @property
    def spotting(self) -> bool:
        """A whole page recognised with ``Spotting:``: its output is read with its location tokens."""
        return self.block is None and self.prompt == TASK_PROMPTS["spotting"]

    @property
    def loop_guard(self) -> LoopSettings | None:
        """Layout blocks are cut when they loop; whole pages decode as the model alone would."""
        if self.block is None:
            return None
        return TABLE if self.prompt == TABLE_PROMPT else PROSE


@dataclass
class PageWork:
    """A rendered page on its way through the model: its units and what came back."""

    page: PageImage
    units: list[Unit]
    image_links: dict[int, str] = field(default_factory=dict)  # block order -> saved crop, for Markdown
    failed: bool = False

    @classmethod
    def of(cls, page: PageImage, prompt: str, images_folder: Path | None = None, stitch: bool = True) -> "PageWork":
        """Units of a rendered page; in layout mode, pictures are saved to ``images_folder`` if given.

        ``stitch`` lets pieces of text share one image (see :mod:`ocrbatch.layout.stitch`).
        Raises ``ValueError`` for a block with no pixels on the page (a degenerate box).
        """
        if page.blocks is None:
            if prompt == TASK_PROMPTS["spotting"]:  # enlarged and given more pixels to place small text
                return cls(page, [Unit(None, prepare(page.image), prompt, SPOTTING_PIXEL_BOUNDS)])
            return cls(page, [Unit(None, page.image, prompt, None)])
        units, crops = layout_units(page.image, page.blocks, stitch)
        links = {}
        for block in page.blocks:
            if block.prompt is None and images_folder is not None:
                images_folder.mkdir(parents=True, exist_ok=True)
                name = image_filename(page.page, block)
                crops[block.order].save(images_folder / name)
                links[block.order] = f"{images_folder.name}/{name}"
        return cls(page, units, links)

    @property
    def done(self) -> bool:
        return all(unit.columns is not None for unit in self.units)

    def row(self, task: str, model: str, quant: str) -> dict:
        """The output row of the finished page."""
        page = self.page
        width, height = page.image_size
        row = page_row(page.page, page.page_count, task, model, quant, status="ok", error=None, width=width,
                       height=height, render_s=page.render_s, source="model", timestamp_s=page.timestamp_s)
        if page.blocks is None:
            [unit] = self.units
            row = {**row, "n_image_tokens": unit.n_image_tokens, "vision_s": unit.vision_s, "blocks": [],
                   **unit.columns}
            if unit.spotting:
                spots = read_spots(row["text"], width, height)
                row.update(text=spotted_text(spots), spots=[spot.to_dict() for spot in spots])
            return row
        by_order = {block.order: unit for unit in self.units for block in unit.blocks}
        image_tokens = {unit.block.order: unit.n_image_tokens for unit in self.units}
        outputs = {order: text for unit in self.units
                   for order, text in unit.texts(unit.columns.get("text", "")).items()}
        blocks, texts = [], []
        for block in page.blocks:
            unit = by_order.get(block.order)
            # A stitched unit's token counts are its first block's; every block names that one as its group.
            columns = unit.columns if unit and unit.block.order == block.order else {}
            text = outputs.get(block.order, "")
            texts.append((block, text, self.image_links.get(block.order)))
            blocks.append({"order": block.order, "label": block.label, "score": block.score, "x0": block.x0,
                           "y0": block.y0, "x1": block.x1, "y1": block.y1, "prompt": unit.prompt if unit else "",
                           "text": text, "n_image_tokens": image_tokens.get(block.order, 0),
                           "n_output_tokens": columns.get("n_output_tokens", 0),
                           "finish_reason": unit.columns.get("finish_reason", "") if unit else "",
                           "group": unit.block.order if unit else block.order})
        reasons = {unit.columns.get("finish_reason") for unit in self.units}
        return {**row, "text": page_markdown(texts), "blocks": blocks,
                "n_image_tokens": _total(image_tokens.values()),
                "n_output_tokens": _total(unit.columns.get("n_output_tokens") for unit in self.units),
                "finish_reason": next((reason for reason in FINISH_PRIORITY if reason in reasons), "stop"),
                "vision_s": _total(unit.vision_s for unit in self.units),
                "prefill_s": _total(unit.columns.get("prefill_s") for unit in self.units),
                "decode_s": _total(unit.columns.get("decode_s") for unit in self.units),
                "layout_s": page.layout_s}


def recorded_blocks(row: dict) -> list[tuple[Block, str]]:
    """A recorded layout page's blocks with their outputs, as :meth:`PageWork.row` wrote them."""
    return [(Block(b["order"], b["label"], b["score"], b["x0"], b["y0"], b["x1"], b["y1"]), b["text"] or "")
            for b in row.get("blocks") or []]


def layout_units(image: Image.Image, blocks: list[Block], stitch: bool = True
                 ) -> tuple[list[Unit], dict[int, Image.Image]]:
    """The units recognising a layout page's blocks, and every block's crop by ``Block.order``.

    A table is cropped with the pictures inside it painted over with tokens;
    the pictures' own crops are whole. Raises ``ValueError`` for a block with
    no pixels on the page.
    """
    crops = {}
    for block in blocks:
        source = paint_figure_tokens(image, block, blocks) if block.label == "table" else image
        crops[block.order] = crop(source, block)
    groups = stitch_groups(blocks) if stitch else [Group((block,)) for block in blocks if block.prompt]
    return [unit for group in groups for unit in _units(group, crops)], crops


def _units(group: Group, crops: dict[int, Image.Image]) -> list[Unit]:
    """The group's units: one stitched image, or each block alone when it is one block or stitches too tall."""
    first = group.blocks[0]
    stacked = stack(group, [crops[block.order] for block in group.blocks]) if len(group.blocks) > 1 else None
    if stacked is not None:
        image, stitched = stacked
        return [Unit(first, image, first.prompt, BLOCK_PIXEL_BOUNDS, stitched=stitched)]
    return [Unit(block, crops[block.order], block.prompt, BLOCK_PIXEL_BOUNDS) for block in group.blocks]


def _total(values):
    """A sum of per-block figures; None when no block has the figure (a remote server that does not say)."""
    values = list(values)
    known = [value for value in values if value is not None]
    return sum(known) if known else (None if values else 0)
