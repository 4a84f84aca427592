"""The render stage: planned pages → rendered images, in a child process, into a bounded queue.

PDF and image decoders are large C libraries fed untrusted files; one of them
crashing (a MuPDF segfault, an abort) must not take the job down. So pages
are rendered in a child process: if it dies while rendering a document, the
document's remaining pages are tried once more in a fresh child, and a
document that kills the renderer twice is failed ("quarantined") instead of
crashing this and every later run. A thread in the job's process feeds the
child one document at a time and puts :class:`PageImage`\\ s on a bounded
queue, so memory stays bounded however many pages are planned.

The queue carries pages, then exactly one end marker: :data:`END` when every
planned page went through, or a :class:`StageFailed` when the stage itself
broke, so the job never mistakes a failure for the end of its input.
"""

from __future__ import annotations

import logging
import multiprocessing
import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Callable, Iterator

from PIL import Image

from ..errors import InputError
from ..sources.discover import Document
from ..sources.rasterize import PageImage, fetched, iter_pages, open_pdf_file, pdf_zoom
from ..storage import StorageError

log = logging.getLogger("ocrbatch")

class _End:
    def __repr__(self) -> str:
        return "END"


END = _End()  # the end marker: every planned page went through
# Deaths of the render process on one document before its remaining pages are failed.
RENDER_CRASH_LIMIT = 2

RenderPages = Callable[[Document, list[int], float, int], Iterator[PageImage]]


@dataclass
class RenderJob:
    """Pages of one document to render."""

    document: Document
    pages: list[int]
    page_count: int


@dataclass(frozen=True)
class TextLayerSettings:
    """``--pdf-text`` and ``--trust-ocr-layer``: which PDF pages are read from their text layer."""

    mode: str = "never"
    trust_ocr_layer: bool = False


@dataclass(frozen=True)
class LayoutSettings:
    """``--layout``, ``--layout-model``, ``--charts`` and ``--seals``: the layout detector run on each rendered page."""

    name: str = "none"
    model: str | None = None
    threads: int | None = None
    later_release: bool = True  # the recognition model is PaddleOCR-VL 1.5+: pp-doclayout is V3 by default
    recognised: frozenset[str] = frozenset()  # picture labels sent to the model: chart, seal

    def load(self):
        from ..layout.detect import load_layout

        return load_layout(self.name, self.model, threads=self.threads, later_release=self.later_release,
                           recognised=self.recognised)


class RenderUnavailable(Exception):
    """The render process cannot go on (the layout model did not load, the object store failed):
    the stage fails, the pages stay pending."""


@dataclass
class StageFailed:
    """Put on a stage's queue instead of the end marker when the stage itself broke."""

    stage: str
    error: str


def _text_layer_pages(conn, document: Document, pages: list[int], dpi: float, max_pixels: int,
                      settings: TextLayerSettings) -> list[int]:
    """Send the pages taken from the PDF's text layer (or failed for lack of one); return the rest."""
    import pymupdf

    from ..sources.textlayer import iter_routes

    if settings.mode == "never" or document.kind != "pdf":
        return pages
    model_pages = []
    with open_pdf_file(document.path) as pdf:
        # Each page is sent as soon as it is read: a long document's first pages do not wait for its last.
        for number, chosen in iter_routes(document.path, pages, settings.mode, settings.trust_ocr_layer):
            if chosen.error:
                conn.send(("error", number, pdf.page_count, f"{document.path} page {number}: {chosen.error}"))
            elif chosen.source == "text-layer":
                rect = pdf[number - 1].rect
                zoom = pdf_zoom(rect.width, rect.height, dpi, max_pixels)
                box = (rect * pymupdf.Matrix(zoom, zoom)).irect  # rounded as MuPDF sizes a render
                size = (box.width, box.height)
                conn.send(("text", number, pdf.page_count, size, chosen.markdown))
            else:
                model_pages.append(number)
    return model_pages


def _render_main(conn, render_pages: RenderPages, text_layer: TextLayerSettings, layout: LayoutSettings) -> None:
    """Child process: render the documents asked for on ``conn``, find their layout, send the pages back."""
    import signal
    import time

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the job decides when to stop; EOF ends us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        detector = layout.load()
    except Exception as exc:
        conn.send(("fatal", f"cannot load the layout model: {type(exc).__name__}: {exc}"))
        return
    try:
        while True:
            message = conn.recv()
            if message is None:
                return
            document, pages, dpi, max_pixels = message
            try:
                # One download of a PDF object for its text layer and its render; gone once its pages are sent.
                with fetched(document) as document:
                    pages = _text_layer_pages(conn, document, pages, dpi, max_pixels, text_layer)
                    for page in render_pages(document, pages, dpi, max_pixels) if pages else ():
                        if page.error:
                            conn.send(("error", page.page, page.page_count, page.error))
                            continue
                        blocks, started = None, time.perf_counter()
                        if detector is not None:
                            try:
                                blocks = detector.detect(page.image)
                            except Exception as exc:  # the page fails; the next one may do better
                                conn.send(("error", page.page, page.page_count, f"{document.path} page "
                                           f"{page.page}: layout analysis failed ({type(exc).__name__}: {exc})"))
                                continue
                        conn.send(("page", page.page, page.page_count, page.image.size, page.image.tobytes(),
                                   page.render_s, blocks, time.perf_counter() - started, page.timestamp_s))
            except StorageError as exc:  # not the document's fault: no page of it may be failed for this
                conn.send(("fatal", str(exc)))
                return
            except InputError as exc:
                conn.send(("document", str(exc)))
            except Exception as exc:
                conn.send(("document", f"{document.path}: cannot render ({type(exc).__name__}: {exc})"))
            conn.send(("done",))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return


class _RenderProcess:
    """One child render process and its pipe."""

    def __init__(self, render_pages: RenderPages, text_layer: TextLayerSettings, layout: LayoutSettings):
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_render_main, args=(child, render_pages, text_layer, layout),
                                       name="ocrbatch-render", daemon=True)
        self.process.start()
        child.close()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()

    def exit_reason(self) -> str:
        self.process.join(timeout=5)
        code = self.process.exitcode
        if code is not None and code < 0:
            import signal

            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"exit code {code}"
        return f"exit code {code}"


class RenderStage:
    """Renders :class:`RenderJob`\\ s on a background thread into ``pages`` (a bounded queue)."""

    def __init__(self, jobs: list[RenderJob], dpi: float, max_pixels: int, pages: queue.Queue,
                 stop: threading.Event, render_pages: RenderPages = iter_pages,
                 text_layer: TextLayerSettings = TextLayerSettings(), layout: LayoutSettings = LayoutSettings()):
        self.jobs, self.dpi, self.max_pixels = jobs, dpi, max_pixels
        self.pages, self.stop = pages, stop
        self.render_pages, self.text_layer, self.layout = render_pages, text_layer, layout
        self.crashes = 0
        self._thread = threading.Thread(target=self._run, name="ocrbatch-render", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _put(self, item) -> bool:
        """Put ``item`` on the queue unless the job stops first; False if it stopped."""
        while not self.stop.is_set():
            try:
                self.pages.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        end = END
        process = None
        try:
            for job in self.jobs:
                if self.stop.is_set():
                    break
                process = self._render_document(job, process)
        except BaseException as exc:  # reported to the job as an error, never as the end of input
            log.debug("render stage failed:\n%s", traceback.format_exc())
            end = StageFailed("render", f"{type(exc).__name__}: {exc}")
        finally:
            if process is not None:
                process.close()
            self._put(end)

    def _render_document(self, job: RenderJob, process: _RenderProcess | None) -> _RenderProcess | None:
        # Page numbers still owed, in order; a dict, as a 10,000-page document must not cost a list scan a page.
        remaining = dict.fromkeys(sorted(set(job.pages)))
        crashes = 0
        while remaining and not self.stop.is_set():
            process = process or _RenderProcess(self.render_pages, self.text_layer, self.layout)
            try:
                process.conn.send((job.document, list(remaining), self.dpi, self.max_pixels))
                while True:
                    message = process.conn.recv()
                    kind = message[0]
                    if kind == "done":
                        break
                    if kind == "fatal":
                        raise RenderUnavailable(message[1])
                    if kind == "document":
                        for number in remaining:
                            if not self._put(PageImage(job.document, number, job.page_count, error=message[1])):
                                return process
                        remaining = {}
                        continue
                    remaining.pop(message[1], None)
                    if not self._put(self._page(job, message)):
                        return process
            except (EOFError, BrokenPipeError, ConnectionResetError):
                reason = process.exit_reason()
                process.close()
                process = None
                crashes += 1
                self.crashes += 1
                if crashes >= RENDER_CRASH_LIMIT:
                    error = (f"{job.document.path}: the render process died on this document "
                             f"{crashes} times ({reason}); quarantined")
                    log.warning("%s", error)
                    for number in remaining:
                        if not self._put(PageImage(job.document, number, job.page_count,
                                                   error=f"{error} (page {number})")):
                            break
                    return None
                log.warning("%s: the render process died (%s); trying its %d remaining page(s) once more",
                            job.document.path, reason, len(remaining))
                continue
            for number in remaining:  # the renderer said done without them
                self._put(PageImage(job.document, number, job.page_count,
                                    error=f"{job.document.path} page {number}: the renderer gave no result"))
            remaining = {}
        return process

    @staticmethod
    def _page(job: RenderJob, message) -> PageImage:
        # Pages carry the planned count: a video's renderer only knows it at the video's end.
        if message[0] == "error":
            _, number, _, error = message
            return PageImage(job.document, number, job.page_count, error=error)
        if message[0] == "text":
            _, number, _, size, markdown = message
            return PageImage(job.document, number, job.page_count, image_size=size, text_layer=markdown)
        _, number, _, size, data, render_s, blocks, layout_s, timestamp_s = message
        return PageImage(job.document, number, job.page_count, image=Image.frombytes("RGB", size, data),
                         render_s=render_s, blocks=blocks, layout_s=layout_s, timestamp_s=timestamp_s)
