"""The batch job: plan → render → encode (vision) → decode (llama.cpp) → record.

:func:`run_job` only wires the stages, each in its own module:
:mod:`ocrbatch.job.plan` decides the pages from the checkpoint, :mod:`ocrbatch.job.render` renders
them in a child process into a bounded queue, :mod:`ocrbatch.job.encode` batches them
through the vision encoder on this thread, :mod:`ocrbatch.backends.decoder` runs them on the
worker pool, and :mod:`ocrbatch.records.recorder` commits each finished page to the checkpoint
and the output. Memory stays bounded: at most ``queue`` rendered pages wait
for the encoder, and at most ``max_in_flight`` embedded pages for the workers.

Errors are kept where they belong: a bad document or page becomes a failed
row and the run goes on; a failure of a stage or of the worker pool stops the
run with the unfinished pages left ``pending`` (exit 3), so the next run
takes them up. SIGINT or SIGTERM stop the run cleanly: no new pages start,
pages being decoded get ``stop_grace`` seconds to finish, and the output is
written; a second signal stops at once. Either way the checkpoint is intact.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import queue
import signal
import threading
import time
from concurrent.futures import CancelledError, Future

from ..backends.decoder import PAGE_FAILURES, LocalDecoder, RemoteDecoder
from ..errors import OcrbatchError
from ..job.encode import encode_units, next_batch
from ..job.options import JobOptions
from ..job.plan import Plan, plan_job
from ..job.render import LayoutSettings, RenderJob, RenderStage, StageFailed, TextLayerSettings, iter_pages
from ..job.units import PageWork, Unit
from ..model.prompt import TASK_PROMPTS
from ..records.output import open_output
from ..records.recorder import JobSummary, OutputError, Recorder, markdown_images_folder
from ..records.sqlite import Store
from ..sources.rasterize import PageImage, page_pixel_cap

log = logging.getLogger("ocrbatch")

class JobLocked(OcrbatchError):
    """Another run holds the job's lock."""


class PipelineError(OcrbatchError):
    """A stage of the job broke (not a page): the run stops, unfinished pages stay pending."""


class JobLock:
    """An exclusive, non-blocking lock beside the checkpoint; the OS drops it if the process dies."""

    def __init__(self, checkpoint):
        self.path = checkpoint.with_name(checkpoint.name + ".lock")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise JobLocked(f"{self.path}: another ocrbatch run (pid {holder}) is working on this output") from None
        self.handle.truncate(0)
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


class GracefulStop:
    """SIGINT/SIGTERM handling: the first asks the run to stop cleanly, a second stops it at once.

    Handlers are installed only on the main thread (signals reach no other) and
    the previous ones are put back when the run ends.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now, the checkpoint keeps what is done
        self.signum = signum
        log.warning("%s: finishing the pages being decoded, then stopping (again to stop at once)",
                    signal.Signals(signum).name)


def run_job(options: JobOptions, engine=None, pool=None, render_pages=None) -> JobSummary:
    """Run the batch job described by ``options`` and return its summary.

    ``engine`` (an :class:`Engine` without language model) and ``pool`` (a
    :class:`WorkerPool`) may be given already loaded, to reuse them across
    jobs; otherwise they are made from ``options`` and closed at the end.
    ``render_pages`` renders pages in the render process (default
    :func:`iter_pages` at ``options.video_fps``; tests pass one that
    crashes). Raises :class:`JobLocked` if another run holds the output, and
    :class:`OcrbatchError` for fatal problems (model, pool, output, a stage).
    """
    started = time.monotonic()
    render_pages = render_pages or functools.partial(iter_pages, video_fps=options.video_fps)
    with JobLock(options.checkpoint_path), GracefulStop() as stop:
        store = Store(options.checkpoint_path)
        try:
            summary = _run_locked(options, store, engine, pool, render_pages, stop)
        finally:
            store.close()
    summary.elapsed_s = time.monotonic() - started
    return summary


def _run_locked(options: JobOptions, store: Store, engine, pool, render_pages, stop: GracefulStop) -> JobSummary:
    from ..backends.pool import WorkerPool
    from ..engine import Engine

    recognizer = None
    if options.backend == "openai":
        from ..backends.remote import RemoteRecognizer

        # Before anything is planned or marked: an unreachable server is a fatal error.
        recognizer = RemoteRecognizer(options.base_url, api_key=options.api_key, model=options.remote_model,
                                      concurrency=options.concurrency, timeout_s=options.effective_page_timeout)
        try:
            model_name, quant = recognizer.check(), "remote"
        except BaseException:
            recognizer.close()
            raise
    else:
        model_name, quant = str(options.model), options.quant.upper()
    store.check_settings(options.record_settings(model_name, quant))
    plan = plan_job(options, store)
    total = plan.pages + len(plan.unreadable)
    log.info("%d pages to process in %d documents (%d unreadable), %d already done",
             plan.pages, len(plan.work), len(plan.unreadable), plan.skipped)

    redo = {(item.document.doc_id, page) for item in plan.work for page in item.pages}
    redo |= {(document.doc_id, 0) for document, _ in plan.unreadable}
    try:
        writer = open_output(options.out, options.output_format)
    except OSError as exc:
        raise OutputError(f"{options.out}: cannot write the output ({exc.strerror or exc})") from None
    recorder = Recorder(options, store, writer, model_name, quant, total)
    summary = recorder.summary
    summary.pages_skipped = plan.skipped
    summary.documents = len(plan.work) + len(plan.unreadable)
    summary.deferred_files = len(plan.deferred)
    summary.special_files = len(plan.special)
    own_pool = pool is None
    try:
        batch = []
        for row in store.rows(exclude=redo):  # earlier results first, rebuilt from the checkpoint
            batch.append(row)
            if len(batch) >= 1024:
                recorder.write(batch)
                batch = []
        recorder.write(batch)

        for document, error in plan.unreadable:
            recorder.document_failed(document, error)

        if plan.work and not stop.requested and recognizer is not None:
            for item in plan.work:
                recorder.expect(item.document, len(item.pages))
            max_pixels = page_pixel_cap(options.layout, recognizer.model_pixel_bounds[1], options.max_pixels,
                                        options.task)
            decoder = RemoteDecoder(recognizer, options.max_tokens, options.ignore_eos)
            _process(recorder, None, decoder, plan, max_pixels, stop, render_pages)
        elif plan.work and not stop.requested:
            if engine is None:
                engine = Engine(options.model, quant=quant, gguf=options.gguf, vision_dtype=options.vision_dtype,
                                device=options.device, max_tokens=options.max_tokens, threads=options.threads,
                                cache_dir=options.cache_dir, with_language=False)
            # A task the checkpoint was not trained for (seal, spotting on 1.0) is refused before any page runs.
            for task in {options.task} | ({"seal"} if options.seals else set()):
                engine.prompt_text(task)
            max_pixels = page_pixel_cap(options.layout, engine.vision.image_processor.size.longest_edge,
                                        options.max_pixels, options.task)
            if pool is None:
                pool = WorkerPool(engine.gguf_path, workers=options.workers, n_seq_max=options.seqs_per_worker,
                                  n_ctx=engine.context_size(options.seqs_per_worker), threads=options.threads,
                                  max_retries=options.max_retries, request_timeout=options.effective_page_timeout)
            decoder = LocalDecoder(engine, pool, options.max_tokens, options.ignore_eos)
            for item in plan.work:
                recorder.expect(item.document, len(item.pages))
            _process(recorder, engine, decoder, plan, max_pixels, stop, render_pages)
            summary.worker_crashes = decoder.crashes
        recorder.flush()
        if options.markdown_dir:  # documents finished in earlier runs, too
            for doc_id in store.finished_document_ids():
                if doc_id not in recorder.markdown_written:
                    recorder.markdown(doc_id)
        summary.pages_left = sum(recorder.remaining.values())
        summary.failed_earlier = store.counts()["pages"].get("failed", 0) - summary.pages_failed
        try:
            writer.commit()
        except OSError as exc:
            raise OutputError(f"{options.out}: cannot write the output ({exc.strerror or exc}); "
                              "the checkpoint is intact: run again once this is fixed") from None
    except BaseException:
        try:
            writer.abort()
        except OSError:
            pass  # the output could not be written anyway: the checkpoint is what counts
        raise
    finally:
        if own_pool and pool is not None:
            pool.close()
        if recognizer is not None:
            recognizer.close()
        recorder.close()
    summary.stopped_by = stop.signum
    if summary.pages_left and not stop.requested:
        log.error("%d planned pages were neither finished nor failed; they stay pending for the next run",
                  summary.pages_left)
    return summary


def _process(recorder: Recorder, engine, decoder: LocalDecoder | RemoteDecoder, plan: Plan, max_pixels: int,
             stop: GracefulStop, render_pages) -> None:
    """Stream the planned pages through render (+ layout), vision (for a local decoder) and the decoder."""
    options = recorder.options
    pages: queue.Queue = queue.Queue(maxsize=max(2, options.batch_size * 2))
    halt = threading.Event()
    renderer = RenderStage([RenderJob(item.document, item.pages, item.page_count) for item in plan.work],
                           options.dpi, max_pixels, pages, halt, render_pages,
                           TextLayerSettings(options.pdf_text, options.trust_ocr_layer),
                           # Without a checkpoint here (a remote server), the current releases' V3 is the default.
                           LayoutSettings(options.layout, options.layout_model, options.threads,
                                          later_release=engine.prompts.supports_later_tasks if engine else True,
                                          recognised=options.recognised_pictures))
    renderer.start()
    finished: queue.Queue = queue.Queue()
    in_flight: dict[Future, tuple[PageWork, Unit]] = {}
    max_in_flight = options.workers * (options.seqs_per_worker + 1) + options.batch_size
    prompt = TASK_PROMPTS[options.task]
    rendering = True
    failure: StageFailed | None = None

    def fail(work: PageWork, error: str) -> None:
        if not work.failed:
            work.failed = True
            page = work.page
            recorder.page_failed(page.document, page.page, page.page_count, error)

    def handle(future: Future) -> None:
        work, unit = in_flight.pop(future)
        page = work.page
        where = f"{page.document.path} page {page.page}" + (f" block {unit.block.order}" if unit.block else "")
        try:
            result = future.result()
        except CancelledError:
            return  # stopped before it ran: the page stays pending
        except PAGE_FAILURES as exc:
            fail(work, f"{where}: {exc}")
            return
        # Anything else (the pool failed, the model cannot load) is not this page's fault: it propagates.
        if result.finish_reason == "cancelled" or work.failed:
            return  # stopped while decoding (the page stays pending), or a sibling block failed it
        error, columns = decoder.outcome(result, keep_special_tokens=unit.spotting)
        if error:
            fail(work, f"{where}: {error}")
            return
        unit.columns = columns
        if work.done:
            recorder.page_done(page.document, page.page, work.row(options.task, recorder.model_name, recorder.quant))

    def take_finished(wait_s: float) -> None:
        try:
            future = finished.get(timeout=wait_s) if wait_s else finished.get_nowait()
        except queue.Empty:
            return
        handle(future)
        while True:
            try:
                future = finished.get_nowait()
            except queue.Empty:
                return
            handle(future)

    def track(work: PageWork, unit: Unit, future: Future) -> None:
        in_flight[future] = (work, unit)
        future.add_done_callback(finished.put)

    try:
        while (rendering or in_flight) and not stop.requested:
            take_finished(0)
            if not rendering or len(in_flight) >= max_in_flight:
                take_finished(0.5)
                continue
            batch, end = next_batch(pages, options.batch_size, options.max_batch_patches,
                                    engine.vision.n_patches_for if engine else _no_patches, wait_s=0.5)
            if isinstance(end, StageFailed):
                failure = end  # pages already rendered and in flight still finish
            rendering = end is None
            works = []
            for page in batch:
                if page.error:
                    recorder.page_failed(page.document, page.page, page.page_count, page.error)
                elif page.text_layer is not None:
                    recorder.text_layer_page(page)
                else:
                    work = _page_work(recorder, page, prompt)
                    if work is not None:
                        works.append(work)
            units = [(work, unit) for work in works for unit in work.units]
            for work in works:
                work.page.image_size = work.page.image.size
                work.page.image = None  # the units' images are all that is needed now
                if not work.units:  # a layout page with nothing to recognise (blank, or pictures only)
                    recorder.page_done(work.page.document, work.page.page,
                                       work.row(options.task, recorder.model_name, recorder.quant))
            if decoder.takes_images:
                for work, unit in units:
                    unit.n_image_tokens = unit.vision_s = None
                    track(work, unit, decoder.submit(unit.image, unit.prompt, unit.pixel_bounds, unit.spotting))
                    unit.image = None
                continue
            for (work, unit), encoded in zip(units, encode_units(engine.vision, [u for _, u in units],
                                                                   options.max_batch_patches)):
                if encoded.error:
                    fail(work, f"{work.page.document.path} page {work.page.page}: {encoded.error}")
                    continue
                if work.failed:
                    continue
                unit.n_image_tokens, unit.vision_s, unit.image = encoded.encoded.n_tokens, encoded.vision_s, None
                track(work, unit, decoder.submit(encoded.encoded, unit.prompt, unit.loop_guard))
        if stop.requested:
            halt.set()
            deadline = time.monotonic() + options.stop_grace
            while in_flight and time.monotonic() < deadline:
                take_finished(0.2)
            for future in list(in_flight):
                decoder.cancel(future)
            if in_flight:
                log.warning("stopped with %d pages unfinished; they stay pending for the next run",
                            len({id(work) for work, _ in in_flight.values()}))
        if failure is not None:
            raise PipelineError(f"the {failure.stage} stage failed: {failure.error}; unfinished pages stay pending")
    finally:
        halt.set()
        renderer.join(timeout=10)
        recorder.summary.render_crashes = renderer.crashes


def _page_work(recorder: Recorder, page: PageImage, prompt: str) -> PageWork | None:
    """The page's units, or None after failing the page (a degenerate layout box)."""
    options = recorder.options
    images = None
    if options.markdown_dir is not None and page.blocks is not None:
        images = markdown_images_folder(options.markdown_dir, page.document.path, page.document.doc_id)
    try:
        return PageWork.of(page, prompt, images, stitch=options.stitch)
    except ValueError as exc:
        recorder.page_failed(page.document, page.page, page.page_count,
                             f"{page.document.path} page {page.page}: {exc}")
    except OSError as exc:
        raise OutputError(f"{images}: cannot save a picture crop ({exc.strerror or exc})") from None
    return None


def _no_patches(width: int, height: int) -> int:
    return 0  # no local vision encoder: batches are bounded by --batch-size alone


def dry_run(options: JobOptions) -> Plan:
    """What a run would process, as the planner decides it; changes nothing."""
    path = options.checkpoint_path
    store = Store(path, readonly=True) if path.is_file() else None
    try:
        return plan_job(options, store, record=False)
    finally:
        if store:
            store.close()
