"""The vision stage: PaddleOCR-VL's NaViT encoder and projector in PyTorch.

Only the vision tower and the ``mlp_AR`` projector are built and loaded; the
language-model weights never enter PyTorch memory. Images of different sizes
are encoded in one forward pass (patches packed back to back, attention kept
within each image), and each image comes back as its own embedding matrix,
one row per language-model token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .checkpoint import PROJECTOR_PREFIX, VISION_PREFIX, Checkpoint
from .errors import ModelError

DTYPES = ("float32", "bfloat16")


@dataclass
class EncodedImage:
    """Image embeddings ready for the language model."""

    embeddings: np.ndarray  # (n_tokens, n_embd) float32
    grid_thw: tuple[int, int, int]  # patch grid before the 2x2 merge

    @property
    def n_tokens(self) -> int:
        return self.embeddings.shape[0]


class VisionEncoder:
    """Preprocesses images with the checkpoint's image processor and encodes them."""

    def __init__(self, checkpoint: Checkpoint | str | Path, dtype: str = "float32", device: str = "cpu"):
        import torch
        from transformers import AutoImageProcessor
        from transformers.initialization import no_init_weights
        from transformers.models.paddleocr_vl.modeling_paddleocr_vl import (
            PaddleOCRProjector,
            PaddleOCRVisionModel,
        )

        if dtype not in DTYPES:
            raise ModelError(f"unknown vision dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        self.checkpoint = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint.open(checkpoint)
        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        config = self.checkpoint.config
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(self.checkpoint.path)
        except Exception as exc:
            raise ModelError(f"{self.checkpoint.path}: cannot load the image processor ({exc})") from None
        self.merge_size = config.vision_config.spatial_merge_size

        # Build the modules directly in the target dtype and copy weights in one
        # tensor at a time: peak memory is the vision tower once, not three times.
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with no_init_weights():
                visual = PaddleOCRVisionModel._from_config(config.vision_config)
                projector = PaddleOCRProjector(config)
        finally:
            torch.set_default_dtype(default_dtype)
        targets = {VISION_PREFIX + k: v for k, v in visual.state_dict().items()}
        targets.update({PROJECTOR_PREFIX + k: v for k, v in projector.state_dict().items()})
        loaded = set()
        with torch.no_grad():
            for name, tensor in self.checkpoint.tensors((VISION_PREFIX, PROJECTOR_PREFIX)):
                target = targets.get(name)
                if target is None or target.shape != tensor.shape:
                    raise ModelError(f"{self.checkpoint.path}: weight {name} does not match the config")
                target.copy_(tensor)
                loaded.add(name)
        missing = [n for n in targets if n not in loaded and not n.endswith(("position_ids", "inv_freq"))]
        if missing:
            raise ModelError(f"{self.checkpoint.path}: vision weights missing from the checkpoint ({missing[:3]})")
        self.visual = visual.to(self.device, self.dtype).eval()
        self.projector = projector.to(self.device, self.dtype).eval()

    def n_patches_for(self, width: int, height: int) -> int:
        """Encoder patches for an image of this size after the processor's resize."""
        return self.image_processor.get_number_of_image_patches(height, width)

    def n_tokens_for(self, width: int, height: int) -> int:
        """Language-model tokens for an image of this size."""
        return self.n_patches_for(width, height) // (self.merge_size ** 2)

    def preprocess(self, images: Sequence):
        return self.image_processor(images=list(images), return_tensors="pt")

    def encode(self, images: Sequence) -> list[EncodedImage]:
        """Encode PIL images (any sizes) in one batched forward pass."""
        import torch

        if not images:
            return []
        inputs = self.preprocess(images)
        grid_thw = inputs["image_grid_thw"].to(self.device)
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype).unsqueeze(0)
        with torch.inference_mode():
            hidden = self.visual(pixel_values=pixel_values, grid_thw=grid_thw).last_hidden_state
            embeddings = self.projector(hidden, grid_thw).float().cpu().numpy()
        sizes = (grid_thw.prod(-1) // self.merge_size ** 2).tolist()
        grids = [tuple(int(v) for v in row) for row in grid_thw.tolist()]
        chunks = np.split(embeddings, np.cumsum(sizes)[:-1])
        return [EncodedImage(np.ascontiguousarray(chunk), grid) for chunk, grid in zip(chunks, grids)]
