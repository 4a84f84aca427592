"""The local engine: plan → render → the page flow (encode, decode) → record, in this process.

:func:`run_job` only wires the stages, each in its own room:
:mod:`ocrbatch.job.plan` decides the pages from the checkpoint,
:mod:`ocrbatch.job.render` renders them in a child process into a bounded
queue, :mod:`ocrbatch.job.flow` cuts each page into units and encodes them on
this thread, a :class:`~ocrbatch.backends.base.Decoder` decodes them (the
llama.cpp worker pool, or a remote server with ``--backend openai``), and
:class:`~ocrbatch.records.recorder.Recorder` commits each finished page to the
checkpoint and the output. Memory stays bounded: at most ``queue`` rendered
pages wait for the encoder, and at most ``max_in_flight`` units for the decoder.

Errors are kept where they belong: a bad document or page becomes a failed
row and the run goes on; a failure of a stage or of the worker pool stops the
run with the unfinished pages left ``pending`` (exit 3), so the next run
takes them up. SIGINT or SIGTERM stop the run cleanly: no new pages start,
pages being decoded get ``stop_grace`` seconds to finish, and the output is
written; a second signal stops at once. Either way the checkpoint is intact.
"""

from __future__ import annotations

import functools
import logging
import queue
import signal
import threading
import time

from ..backends.base import Decoder
from ..backends.local import LocalDecoder
from ..backends.remote import RemoteDecoder
from ..errors import OcrbatchError
from ..job.encode import next_batch
from ..job.flow import FinishedPage, PageFlow, UnitsInFlight
from ..job.options import JobOptions
from ..job.plan import Plan, plan_job
from ..job.render import LayoutSettings, RenderJob, RenderStage, StageFailed, TextLayerSettings, iter_pages
from ..model.prompt import TASK_PROMPTS
from ..records.lock import JobLock
from ..records.output import open_output
from ..records.recorder import JobSummary, OutputError, Recorder
from ..records.sqlite import Store
from ..sources.rasterize import page_pixel_cap

log = logging.getLogger("ocrbatch")

class PipelineError(OcrbatchError):
    """A stage of the job broke (not a page): the run stops, unfinished pages stay pending."""


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
        _write_earlier_rows(store, recorder, redo)
        for document, error in plan.unreadable:
            recorder.document_failed(document, error)
        if plan.work and not stop.requested:
            for item in plan.work:
                recorder.expect(item.document, len(item.pages))
            if recognizer is not None:
                max_pixels = page_pixel_cap(options.layout, recognizer.model_pixel_bounds[1], options.max_pixels,
                                            options.task)
                decoder = RemoteDecoder(recognizer, options.max_tokens, options.ignore_eos)
            else:
                engine, pool, max_pixels = _local_backend(options, quant, engine, pool)
                decoder = LocalDecoder(engine, pool, options.max_tokens, options.ignore_eos)
            _process(recorder, engine, decoder, plan, max_pixels, stop, render_pages)
            if pool is not None:
                summary.worker_crashes = pool.crashes
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


def _write_earlier_rows(store: Store, recorder: Recorder, redo: set[tuple[str, int]]) -> None:
    """Earlier runs' results first, rebuilt from the checkpoint, except the pages this run does again."""
    batch = []
    for row in store.rows(exclude=redo):
        batch.append(row)
        if len(batch) >= 1024:
            recorder.write(batch)
            batch = []
    recorder.write(batch)


def _local_backend(options: JobOptions, quant: str, engine, pool):
    """The vision engine, worker pool and page pixel cap of a run on this machine (those given, or new ones).

    A task the model was not trained for (seal, spotting on 1.0) is refused here, before any page runs.
    """
    from ..backends.pool import WorkerPool
    from ..engine import Engine

    if engine is None:
        engine = Engine(options.model, quant=quant, gguf=options.gguf, vision_dtype=options.vision_dtype,
                        device=options.device, max_tokens=options.max_tokens, threads=options.threads,
                        cache_dir=options.cache_dir, with_language=False)
    for task in {options.task} | ({"seal"} if options.seals else set()):
        engine.prompt_text(task)
    max_pixels = page_pixel_cap(options.layout, engine.vision.image_processor.size.longest_edge, options.max_pixels,
                                options.task)
    if pool is None:
        pool = WorkerPool(engine.gguf_path, workers=options.workers, n_seq_max=options.seqs_per_worker,
                          n_ctx=engine.context_size(options.seqs_per_worker), threads=options.threads,
                          max_retries=options.max_retries, request_timeout=options.effective_page_timeout)
    return engine, pool, max_pixels


def _process(recorder: Recorder, engine, decoder: Decoder, plan: Plan, max_pixels: int, stop: GracefulStop,
             render_pages) -> None:
    """Stream the planned pages through render (+ layout), the page flow and the decoder, into the recorder."""
    options = recorder.options
    pages: queue.Queue = queue.Queue(maxsize=max(2, options.batch_size * 2))
    halt = threading.Event()
    renderer = RenderStage([RenderJob(item.document, item.pages, item.page_count) for item in plan.work],
                           options.dpi, max_pixels, pages, halt, render_pages,
                           TextLayerSettings(options.pdf_text, options.trust_ocr_layer),
                           # Without the model here (a remote server), the current releases' V3 is the default.
                           LayoutSettings(options.layout, options.layout_model, options.threads,
                                          later_release=engine.prompts.supports_later_tasks if engine else True,
                                          recognised=options.recognised_pictures))
    renderer.start()
    flow = PageFlow(options.task, TASK_PROMPTS[options.task], recorder.model_name, recorder.quant,
                    stitch=options.stitch, markdown_dir=options.markdown_dir)
    decoding = UnitsInFlight(decoder, flow, recorder)
    rendering = True
    failure: StageFailed | None = None
    try:
        while (rendering or decoding.units) and not stop.requested:
            decoding.take(0)
            if not rendering or decoding.units >= options.max_in_flight:
                decoding.take(0.5)
                continue
            batch, end = next_batch(pages, options.batch_size, options.max_batch_patches,
                                    engine.vision.n_patches_for if engine else _no_patches, wait_s=0.5)
            if isinstance(end, StageFailed):
                failure = end  # pages already rendered and in flight still finish
            rendering = end is None
            works = []
            for page in batch:
                started = flow.start(page)
                if isinstance(started, FinishedPage):
                    decoding.record(started)
                else:
                    works.append(started)
            if decoder.needs_embeddings:
                ready = flow.encode(engine.vision, works, options.max_batch_patches)
            else:
                ready = flow.unencoded(works)
            for item in ready:
                if isinstance(item, FinishedPage):
                    decoding.record(item)
                else:
                    decoding.submit(*item)
        if stop.requested:
            halt.set()
            decoding.wind_down(options.stop_grace)
        if failure is not None:
            raise PipelineError(f"the {failure.stage} stage failed: {failure.error}; unfinished pages stay pending")
    finally:
        halt.set()
        renderer.join(timeout=10)
        recorder.summary.render_crashes = renderer.crashes


def _no_patches(width: int, height: int) -> int:
    return 0  # no local vision encoder: batches are bounded by --batch-size alone


def dry_run(options: JobOptions) -> Plan:
    """What a run would process, as the planner decides it; changes nothing."""
    path = options.checkpoint_path
    store = Store(path, readonly=True) if path.is_file() else None
    try:
        return plan_job(options, store, apply=False)
    finally:
        if store:
            store.close()
