"""The page flow: a rendered page → its units → (encoded) → decoded → its row, the same for every engine.

The local engine (:mod:`ocrbatch.engines.local`), the Ray engine's actors
(:mod:`ocrbatch.engines.ray`) and ``ocrbatch ocr`` (:class:`ocrbatch.Engine`)
drive the same three steps and differ only in where each runs and where
the rows go:

1. :meth:`PageFlow.start`: a rendered page becomes its :class:`PageWork`
   (units: the whole page, or its layout blocks, stitched), or its finished
   row when it needs no model (it failed to render, it was read from its
   text layer, or its layout holds nothing to recognise);
2. :meth:`PageFlow.encode`: the units through this machine's vision encoder
   in batches under the patch budget, for a backend that takes embeddings
   (or :meth:`PageFlow.unencoded`, the units as images, for one that does not);
3. :meth:`PageFlow.settle`: each unit's :class:`~ocrbatch.backends.base.Decoded`
   into its page, which gets its row once every unit is done, or at the
   first unit that fails.

A page fails alone: a degenerate layout box, an image the encoder refuses or
a unit the backend fails all become the page's failed row naming the page
(and block) and the reason.
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..backends.base import PAGE_FAILURES, Decoded, Decoder
from ..records.base import PageRecorder
from ..records.recorder import OutputError, markdown_images_folder
from ..sources.rasterize import PageImage
from .encode import encode_units
from .rows import failure_row, keyed, text_layer_row
from .units import PageWork, Unit

log = logging.getLogger("ocrbatch")


@dataclass
class FinishedPage:
    """A page's output row, with the page it belongs to."""

    page: PageImage
    row: dict


@dataclass
class PageFlow:
    """One job's way of turning rendered pages into rows."""

    task: str
    prompt: str  # the task's prompt text, for whole pages
    model_name: str
    quant: str
    stitch: bool = True  # pieces of text share one image (see ocrbatch.layout.stitch)
    markdown_dir: Path | None = None  # where a layout page's picture crops are saved, beside its Markdown

    def start(self, page: PageImage) -> PageWork | FinishedPage:
        """The page's units for the model, or its row when it needs none.

        The page image is dropped here: its units hold the images they need.
        """
        if page.error:
            return self.failed(page, page.error)
        if page.text_layer is not None:
            return FinishedPage(page, text_layer_row(page, self.task, self.model_name, self.quant))
        images = None
        if self.markdown_dir is not None and page.blocks is not None:
            images = markdown_images_folder(self.markdown_dir, page.document.path, page.document.doc_id)
        try:
            work = PageWork.of(page, self.prompt, images, stitch=self.stitch)
        except ValueError as exc:  # a degenerate layout box
            return self.failed(page, f"{page.document.path} page {page.page}: {exc}")
        except OSError as exc:
            raise OutputError(f"{images}: cannot save a picture crop ({exc.strerror or exc})") from None
        page.image_size, page.image = page.image.size, None
        if not work.units:  # a layout page with nothing to recognise (blank, or pictures only)
            return FinishedPage(page, work.row(self.task, self.model_name, self.quant))
        return work

    def encode(self, vision, works: list[PageWork], max_batch_patches: int
               ) -> Iterator[tuple[PageWork, Unit] | FinishedPage]:
        """Every unit of ``works`` with its embeddings, ready for the decoder, as each forward pass ends.

        A caller that submits each unit as it comes has it decoding while the
        next pass runs. A unit the encoder refuses fails its page: the page's
        row comes out in its place, and the page's other units do not.
        """
        units = [(work, unit) for work in works for unit in work.units]
        for index, result in encode_units(vision, [unit for _, unit in units], max_batch_patches):
            work, unit = units[index]
            if work.failed:
                continue
            if result.error:
                yield self.unit_failed(work, None, result.error)
                continue
            unit.encoded, unit.n_image_tokens, unit.vision_s = result.encoded, result.encoded.n_tokens, result.vision_s
            unit.image = None
            yield work, unit

    def unencoded(self, works: list[PageWork]) -> Iterator[tuple[PageWork, Unit]]:
        """Every unit of ``works`` as an image, for a backend that encodes it itself (a remote server)."""
        for work in works:
            for unit in work.units:
                unit.n_image_tokens = unit.vision_s = None  # the backend's to count, if it says
                yield work, unit

    def settle(self, work: PageWork, unit: Unit, decoded: Decoded) -> FinishedPage | None:
        """A unit's result into its page: the page's row once it is finished or failed, else None."""
        if work.failed:
            return None  # a sibling unit failed the page already
        if decoded.error:
            return self.unit_failed(work, unit, decoded.error)
        if decoded.n_image_tokens is not None:  # counted by the backend (a remote server's usage)
            unit.n_image_tokens = decoded.n_image_tokens
        unit.columns = decoded.columns()
        if work.done:
            return FinishedPage(work.page, work.row(self.task, self.model_name, self.quant))
        return None

    def unit_failed(self, work: PageWork, unit: Unit | None, error: str) -> FinishedPage | None:
        """Fail the unit's page (``unit`` None: the page as a whole); None when it failed already."""
        if work.failed:
            return None
        work.failed = True
        page = work.page
        block = f" block {unit.block.order}" if unit is not None and unit.block else ""
        return self.failed(page, f"{page.document.path} page {page.page}{block}: {error}")

    def failed(self, page: PageImage, error: str) -> FinishedPage:
        """The page's failed row; ``error`` names the page already."""
        return FinishedPage(page, failure_row(page.page, page.page_count, self.task, error, self.model_name,
                                              self.quant))


class UnitsInFlight:
    """The units handed to the decoder and not yet back, and what becomes of each one that comes back:
    settled in ``flow``, each finished page's row added to ``recorder`` (the local engine's recorder, or a
    Ray actor's batch of rows)."""

    def __init__(self, decoder: Decoder, flow: PageFlow, recorder: PageRecorder):
        self.decoder, self.flow, self.recorder = decoder, flow, recorder
        self.in_flight: dict[Future, tuple[PageWork, Unit]] = {}
        self.finished: queue.Queue = queue.Queue()  # futures as they finish, from the decoder's threads

    @property
    def units(self) -> int:
        return len(self.in_flight)

    def submit(self, work: PageWork, unit: Unit) -> None:
        future = self.decoder.submit(unit)
        unit.image = unit.encoded = None  # the backend has what it needs
        self.in_flight[future] = (work, unit)
        future.add_done_callback(self.finished.put)

    def record(self, done: FinishedPage | None) -> None:
        if done is not None:
            self.recorder.add(keyed(done.page.document, done.row))

    def take(self, wait_s: float) -> None:
        """Settle every unit that has come back, waiting up to ``wait_s`` for the first."""
        try:
            future = self.finished.get(timeout=wait_s) if wait_s else self.finished.get_nowait()
        except queue.Empty:
            return
        while True:
            self._settle(future)
            try:
                future = self.finished.get_nowait()
            except queue.Empty:
                return

    def wind_down(self, grace_s: float) -> None:
        """Stopping: ``grace_s`` seconds for the units being decoded, then the rest cancelled (pending)."""
        deadline = time.monotonic() + grace_s
        while self.in_flight and time.monotonic() < deadline:
            self.take(0.2)
        for future in list(self.in_flight):
            self.decoder.cancel(future)
        if self.in_flight:
            log.warning("stopped with %d pages unfinished; they stay pending for the next run",
                        len({id(work) for work, _ in self.in_flight.values()}))

    def _settle(self, future: Future) -> None:
        work, unit = self.in_flight.pop(future)
        try:
            decoded = future.result()
        except CancelledError:
            return  # stopped before it ran: the page stays pending
        except PAGE_FAILURES as exc:
            self.record(self.flow.unit_failed(work, unit, str(exc)))
            return
        # Anything else (the pool failed, the model cannot load) is not this page's fault: it propagates.
        if decoded.finish_reason == "cancelled":
            return  # stopped while decoding: the page stays pending
        self.record(self.flow.settle(work, unit, decoded))
