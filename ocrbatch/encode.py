"""The encode stage: rendered pages → image embeddings, in vision batches under a patch budget."""

from __future__ import annotations

import queue
import time
import traceback
from dataclasses import dataclass

from .rasterize import PageImage
from .render import END, StageFailed
from .vision import EncodedImage


@dataclass
class EncodedPage:
    """A page's embeddings, or why the vision encoder failed on it."""

    page: PageImage
    encoded: EncodedImage | None
    vision_s: float
    error: str | None = None


def next_batch(pages: queue.Queue, batch_size: int, max_batch_patches: int, count_patches,
               wait_s: float) -> tuple[list[PageImage], object]:
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


def encode_pages(vision, pages: list[PageImage]) -> list[EncodedPage]:
    """Encode a batch; if the batch fails, encode page by page to find the culprit."""
    if not pages:
        return []
    started = time.perf_counter()
    try:
        encoded = vision.encode([p.image for p in pages])
        per_page = (time.perf_counter() - started) / len(pages)
        return [EncodedPage(page, enc, per_page) for page, enc in zip(pages, encoded)]
    except Exception:
        if len(pages) == 1:
            page = pages[0]
            reason = traceback.format_exc().strip().splitlines()[-1]
            return [EncodedPage(page, None, 0.0,
                                f"{page.document.path} page {page.page}: vision encoder failed ({reason})")]
        return [result for page in pages for result in encode_pages(vision, [page])]
