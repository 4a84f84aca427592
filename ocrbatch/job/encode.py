"""The encode stage: pages and layout crops → image embeddings, in vision batches under a patch budget."""

from __future__ import annotations

import queue
import time
import traceback
from dataclasses import dataclass
from typing import Iterator

from ..model.vision import EncodedImage
from .render import END, StageFailed


@dataclass
class EncodedUnit:
    """A unit's embeddings, or why the vision encoder failed on it."""

    encoded: EncodedImage | None
    vision_s: float
    error: str | None = None


def next_batch(pages: queue.Queue, batch_size: int, max_batch_patches: int, count_patches,
               wait_s: float) -> tuple[list, object]:
    """Up to ``batch_size`` rendered pages within the patch budget, and the end marker if it came.

    Waits at most ``wait_s`` for the first page, so the caller stays responsive;
    the second value is ``None`` while more pages may come, else :data:`END`
    or a :class:`StageFailed`.
    """
    batch, patches = [], 0
    while len(batch) < batch_size:
        try:
            page = pages.get(timeout=0.05 if batch else wait_s)
        except queue.Empty:
            break
        if page is END or isinstance(page, StageFailed):
            return batch, page
        if page.image is not None:
            patches += count_patches(*page.image.size)
        batch.append(page)
        if patches >= max_batch_patches:
            break
    return batch, None


def encode_units(vision, units: list, max_batch_patches: int) -> Iterator[tuple[int, EncodedUnit]]:
    """Encode the units (page images or layout crops) of a batch of pages: ``(index, result)`` per unit.

    Units with the same resize bounds share forward passes of at most
    ``max_batch_patches`` patches; a failing pass is retried unit by unit.
    Each pass's units are yielded as soon as it is done, so that their
    decoding can start while the next pass runs.
    """
    groups: dict = {}
    for index, unit in enumerate(units):
        groups.setdefault(unit.pixel_bounds, []).append(index)
    for bounds, indices in groups.items():
        chunk, patches = [], 0
        for index in indices + [None]:
            size = 0 if index is None else vision.n_patches_for(*units[index].image.size, bounds)
            if chunk and (index is None or patches + size > max_batch_patches):
                yield from zip(chunk, _encode_images(vision, [units[i].image for i in chunk], bounds))
                chunk, patches = [], 0
            if index is not None:
                chunk.append(index)
                patches += size


def _encode_images(vision, images: list, bounds) -> list[EncodedUnit]:
    started = time.perf_counter()
    try:
        encoded = vision.encode(images, bounds)
        each = (time.perf_counter() - started) / len(images)
        return [EncodedUnit(item, each) for item in encoded]
    except Exception:
        if len(images) == 1:
            reason = traceback.format_exc().strip().splitlines()[-1]
            return [EncodedUnit(None, 0.0, f"vision encoder failed ({reason})")]
        return [result for image in images for result in _encode_images(vision, [image], bounds)]
