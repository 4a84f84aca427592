"""The vision stage: PaddleOCR-VL's NaViT encoder and projector in PyTorch.

Only the vision tower and the ``mlp_AR`` projector are built and loaded; the
language-model weights never enter PyTorch memory. Images of different sizes
are encoded in one forward pass (patches packed back to back, attention kept
within each image), and each image comes back as its own embedding matrix,
one row per language-model token.

``int8`` runs every linear layer of the encoder and projector as an int8
matrix multiply (weights per output channel, activations per row, scales
computed on the fly) and the rest in float32: on CPUs with VNNI it encodes
about 2.4 times as fast as float32 and holds a quarter of the weight memory.
Its layers are compiled with ``torch.compile`` because eager PyTorch spends
as long on the quantize/rescale/GELU passes between the int8 matrix
multiplies as on the multiplies themselves; where compiling fails (no C++
compiler, say) the encoder logs why and runs eagerly.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import ModelError
from .weights import PROJECTOR_PREFIX, VISION_PREFIX, ModelWeights

DTYPES = ("float32", "bfloat16", "int8")
CHOICES = (*DTYPES, "auto")  # auto: measured on this machine (ocrbatch.model.precision)

log = logging.getLogger(__name__)


@dataclass
class EncodedImage:
    """Image embeddings ready for the language model."""

    embeddings: np.ndarray  # (n_tokens, n_embd) float32
    grid_thw: tuple[int, int, int]  # patch grid before the 2x2 merge

    @property
    def n_tokens(self) -> int:
        return self.embeddings.shape[0]


class VisionEncoder:
    """Preprocesses images with the model's image processor and encodes them."""

    def __init__(self, model: ModelWeights | str | Path, dtype: str = "float32", device: str = "cpu",
                 cache: str | Path | None = None):
        """``dtype`` ``auto`` takes the precision :func:`~ocrbatch.model.precision.choose_precision`
        measures for this machine (remembered in ``cache``, the conversion cache by default);
        :attr:`precision` says which and why."""
        import torch
        from transformers import AutoImageProcessor
        from transformers.initialization import no_init_weights
        from transformers.models.paddleocr_vl.modeling_paddleocr_vl import (
            PaddleOCRProjector,
            PaddleOCRVisionModel,
        )

        from .int8 import Int8Linear, swap_linears

        from .gguf import cache_dir
        from .precision import AUTO, PrecisionChoice, choose_precision

        if dtype not in CHOICES:
            raise ModelError(f"unknown vision dtype {dtype!r}; choose one of {', '.join(CHOICES)}")
        self.weights = model if isinstance(model, ModelWeights) else ModelWeights.open(model)
        self.device = torch.device(device)
        if dtype == AUTO:
            self.precision = choose_precision(self.weights.config.vision_config, self.device.type,
                                              torch.get_num_threads(), cache_dir(cache))
            log.info("vision precision: %s (%s)", self.precision.dtype, self.precision.reason)
            dtype = self.precision.dtype
        else:
            self.precision = PrecisionChoice(dtype, {}, "asked for")
        # int8 quantizes the linear layers only; everything else runs in float32.
        self.dtype = torch.float32 if dtype == "int8" else getattr(torch, dtype)
        config = self.weights.config
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(self.weights.path)
        except Exception as exc:
            raise ModelError(f"{self.weights.path}: cannot load the image processor ({exc})") from None
        self.merge_size = config.vision_config.spatial_merge_size

        # Build the modules directly in the target dtype and copy weights in one
        # tensor at a time: peak memory is the vision tower once, not three times.
        # no_init_weights leaves the tensors untouched, so for int8 the float32
        # linear weights swapped out below never become resident. The dtype is
        # passed too: a release's config names its own (bfloat16), which
        # transformers would otherwise build in.
        with _default_dtype(self.dtype), no_init_weights():
            visual = PaddleOCRVisionModel._from_config(config.vision_config, dtype=self.dtype)
            projector = PaddleOCRProjector(config)
        quantized: dict[str, Int8Linear] = {}
        if dtype == "int8":
            if self.device.type != "cpu":
                raise ModelError("int8 vision runs on the CPU only; use bfloat16 on a GPU")
            quantized.update(swap_linears(visual, VISION_PREFIX))
            quantized.update(swap_linears(projector, PROJECTOR_PREFIX))
        targets = {VISION_PREFIX + k: v for k, v in visual.state_dict().items()}
        targets.update({PROJECTOR_PREFIX + k: v for k, v in projector.state_dict().items()})
        targets = {name: t for name, t in targets.items() if not name.endswith(Int8Linear.DERIVED)}
        loaded = set()
        with torch.no_grad():
            for name, tensor in self.weights.tensors((VISION_PREFIX, PROJECTOR_PREFIX)):
                layer, target = quantized.get(name), targets.get(name)
                shape = layer.weight_shape if layer is not None else getattr(target, "shape", None)
                if shape is None or tuple(shape) != tuple(tensor.shape):
                    raise ModelError(f"{self.weights.path}: weight {name} does not match the config")
                if layer is not None:
                    layer.load_weight(tensor)
                else:
                    target.copy_(tensor)
                loaded.add(name)
        expected = [*targets, *quantized]
        missing = [n for n in expected if n not in loaded and not n.endswith(("position_ids", "inv_freq"))]
        if missing:
            raise ModelError(f"{self.weights.path}: vision weights missing from the model ({missing[:3]})")
        self.visual = visual.to(self.device, self.dtype).eval()
        self.projector = projector.to(self.device, self.dtype).eval()
        self._compiled_blocks = _compile_int8_blocks(self.visual, self.projector) if dtype == "int8" else []

    def n_patches_for(self, width: int, height: int, pixel_bounds: tuple[int, int] | None = None) -> int:
        """Encoder patches for an image of this size after the processor's resize (within ``pixel_bounds``)."""
        if pixel_bounds:
            bounds = {"min_pixels": pixel_bounds[0], "max_pixels": pixel_bounds[1]}
            return self.image_processor.get_number_of_image_patches(height, width, images_kwargs=bounds)
        return self.image_processor.get_number_of_image_patches(height, width)

    def n_tokens_for(self, width: int, height: int) -> int:
        """Language-model tokens for an image of this size."""
        return self.n_patches_for(width, height) // (self.merge_size ** 2)

    def preprocess(self, images: Sequence, pixel_bounds: tuple[int, int] | None = None):
        size = {"shortest_edge": pixel_bounds[0], "longest_edge": pixel_bounds[1]} if pixel_bounds else None
        return self.image_processor(images=list(images), return_tensors="pt", **({"size": size} if size else {}))

    def encode(self, images: Sequence, pixel_bounds: tuple[int, int] | None = None) -> list[EncodedImage]:
        """Encode PIL images (any sizes) in one batched forward pass.

        ``pixel_bounds`` (min, max pixels) replaces the processor's own resize
        bounds: layout blocks are resized within the pipeline's block bounds.
        """
        import torch

        if not images:
            return []
        inputs = self.preprocess(images, pixel_bounds)
        grid_thw = inputs["image_grid_thw"].to(self.device)
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype).unsqueeze(0)
        with torch.inference_mode():
            try:
                embeddings = self._forward(pixel_values, grid_thw)
            except torch._dynamo.exc.TorchDynamoException as exc:
                if not self._compiled_blocks:
                    raise
                log.warning("compiling the int8 vision encoder failed, running it eagerly: %s",
                            str(exc).strip().splitlines()[0])
                self.run_eagerly()
                embeddings = self._forward(pixel_values, grid_thw)
        sizes = (grid_thw.prod(-1) // self.merge_size ** 2).tolist()
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        chunks = np.split(embeddings, np.cumsum(sizes)[:-1])
        return [EncodedImage(np.ascontiguousarray(chunk), grid) for chunk, grid in zip(chunks, grids)]

    def run_eagerly(self) -> None:
        """Put back the uncompiled modules that ``torch.compile`` wrapped (int8 only)."""
        from .int8 import replace_submodule

        for root, name, module in self._compiled_blocks:
            replace_submodule(root, name, module)
        self._compiled_blocks = []

    def _forward(self, pixel_values, grid_thw) -> np.ndarray:
        hidden = self.visual(pixel_values=pixel_values, grid_thw=grid_thw).last_hidden_state
        return self.projector(hidden, grid_thw).float().cpu().numpy()


@contextmanager
def _default_dtype(dtype):
    """Build modules in ``dtype``; torch's default is put back after (it is the process's)."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_tower(vision_config, dtype: str):
    """A vision tower with random weights in ``dtype``, run as :class:`VisionEncoder` runs the model's
    (int8 linears, compiled): for timing a precision (:mod:`ocrbatch.model.precision`)."""
    import torch
    from transformers.models.paddleocr_vl.modeling_paddleocr_vl import PaddleOCRVisionModel

    from .int8 import swap_linears

    torch.manual_seed(0)
    # A release's config names its own dtype (bfloat16), which transformers builds in unless
    # told otherwise: the tower is built in the precision being timed instead.
    visual = PaddleOCRVisionModel._from_config(vision_config,
                                               dtype=torch.float32 if dtype == "int8" else getattr(torch, dtype))
    if dtype == "int8":
        weights = {f"{name}.weight": module.weight for name, module in visual.named_modules()
                   if isinstance(module, torch.nn.Linear)}
        for name, layer in swap_linears(visual, "").items():
            layer.load_weight(weights[name])
        _compile_int8_blocks(visual)
    return visual.eval()


def _compile_int8_blocks(*modules) -> list[tuple]:
    """Compile each MLP block whole and every other int8 linear layer alone.

    Only these pieces, not whole encoder layers: the attention splits the
    packed sequence per image with data-dependent sizes, which would make
    ``torch.compile`` recompile for every distinct number of images in a
    batch. The pieces compiled here only vary in their row count
    (``dynamic=True``), so a few compilations serve every batch.
    Returns ``(root, name, eager module)`` triples to undo it.
    """
    import torch

    from .int8 import Int8Linear, replace_submodule

    replaced = []
    for root in modules:
        for name, module in list(root.named_modules()):
            is_mlp = name.rpartition(".")[2] == "mlp"
            in_mlp = ".mlp." in f".{name}"
            if is_mlp or (isinstance(module, Int8Linear) and not in_mlp):
                replace_submodule(root, name, torch.compile(module, dynamic=True))
                replaced.append((root, name, module))
    return replaced
