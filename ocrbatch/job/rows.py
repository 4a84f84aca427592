"""A page's output row, for every engine: the columns every row has, a failed page's, a text layer's.

A page recognised by the model gets its row from its units
(:meth:`ocrbatch.job.units.PageWork.row`, on :func:`page_row`'s columns).
"""

from __future__ import annotations

from datetime import datetime, timezone

from ..sources.discover import Document, escaped


def page_row(page: int, page_count: int, task: str, model: str, quant: str, **columns) -> dict:
    """The columns every row has, with ``columns`` added, stamped now."""
    return {"page": page, "page_count": page_count, "task": task, "model": model, "quant": quant, **columns,
            "created_at": datetime.now(timezone.utc).isoformat()}


def failure_row(page: int, page_count: int, task: str, error: str, model: str, quant: str) -> dict:
    """The output row of a page (or, as page 0, a document) that failed.

    ``error`` names the file as Python keeps its name; it is written :func:`escaped`, one line of UTF-8.
    """
    return page_row(page, page_count, task, model, quant, text="", status="failed", error=escaped(error))


def text_layer_row(page, task: str, model: str, quant: str) -> dict:
    """The output row of a PDF page taken from its text layer (``--pdf-text``): no tokens, no model time."""
    width, height = page.image_size
    return page_row(page.page, page.page_count, task, model, quant, text=page.text_layer, status="ok", error=None,
                    n_image_tokens=0, n_output_tokens=0, finish_reason="stop", width=width, height=height,
                    render_s=0.0, vision_s=0.0, prefill_s=0.0, decode_s=0.0, source="text-layer")


def keyed(document: Document, row: dict) -> dict:
    """``row`` with its document's path (escaped: one line of UTF-8) and content id first, as the output has them."""
    return {"path": escaped(document.path), "doc_id": document.doc_id, **row}
