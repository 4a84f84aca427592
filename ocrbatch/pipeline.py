"""The batch job: discover → rasterize → encode (vision) → decode (llama.cpp) → store.

:func:`run_job` plans the work from the checkpoint (pages already finished are
skipped), renders pages on a background thread into a bounded queue, encodes
them in vision batches on the main thread, and hands the embeddings to a
:class:`WorkerPool` whose processes decode several pages at once. Finished
pages are committed to the checkpoint and written to the output as they
complete. Memory stays bounded: at most ``queue`` rendered pages wait for the
encoder, and at most ``max_in_flight`` embedded pages wait for the workers.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .discover import Document, discover
from .errors import InputError, OcrbatchError
from .output import open_output
from .rasterize import PageImage, count_pages, iter_pages
from .store import Store, checkpoint_path_for

log = logging.getLogger("ocrbatch")

EXIT_OK = 0
EXIT_SOME_FAILED = 1
EXIT_FATAL = 3
EXIT_LOCKED = 4


class JobLocked(OcrbatchError):
    """Another run holds the job's lock."""


@dataclass
class JobOptions:
    """Everything ``ocrbatch run`` can be told; defaults suit a small CPU machine."""

    paths: list[Path]
    out: Path
    output_format: str | None = None
    checkpoint: Path | None = None
    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    retry_failed: bool = False
    max_retries: int = 2
    max_page_error_rate: float = 0.5
    model: str = "PaddlePaddle/PaddleOCR-VL"
    quant: str = "Q4_K_M"
    gguf: str | None = None
    task: str = "ocr"
    max_tokens: int = 1024
    workers: int = 1
    seqs_per_worker: int = 4
    dpi: float = 150
    max_pixels: int | None = None
    batch_size: int = 4
    max_batch_patches: int = 24576
    vision_dtype: str = "float32"
    device: str = "cpu"
    threads: int | None = None
    cache_dir: str | None = None
    markdown_dir: Path | None = None
    progress: bool = True
    ignore_eos: bool = False  # decode exactly max_tokens per page: for benchmarks
    flush_rows: int = 32
    flush_seconds: float = 10.0

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint or checkpoint_path_for(self.out)


@dataclass
class JobSummary:
    pages_ok: int = 0
    pages_failed: int = 0
    pages_skipped: int = 0
    documents: int = 0
    elapsed_s: float = 0.0
    worker_crashes: int = 0

    @property
    def exit_code(self) -> int:
        return EXIT_SOME_FAILED if self.pages_failed else EXIT_OK

    def line(self, out: Path) -> str:
        done = self.pages_ok + self.pages_failed
        rate = done / self.elapsed_s * 60 if self.elapsed_s > 0 else 0.0
        return (f"ocrbatch: {done} pages processed ({self.pages_ok} ok, {self.pages_failed} failed), "
                f"{self.pages_skipped} already done, {self.documents} documents, "
                f"{self.elapsed_s:.1f} s, {rate:.1f} pages/min -> {out}")


@dataclass
class _WorkItem:
    document: Document
    pages: list[int]
    page_count: int


class JobLock:
    """An exclusive, non-blocking lock beside the checkpoint; the OS drops it if the process dies."""

    def __init__(self, checkpoint: Path):
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


def _failure_row(page: int, page_count: int, task: str, error: str, model: str, quant: str) -> dict:
    return {"page": page, "page_count": page_count, "task": task, "text": "", "status": "failed",
            "error": error, "model": model, "quant": quant,
            "created_at": datetime.now(timezone.utc).isoformat()}


def plan(options: JobOptions, store: Store | None) -> tuple[list[_WorkItem], list[tuple[Document, str]], int]:
    """Decide which pages to process: ``(work, unreadable documents, pages already done)``.

    With a writable ``store`` the discovered documents and their pages are recorded.
    """
    work, unreadable, skipped = [], [], 0
    retry = options.retry_failed
    retry_ids = set(store.failed_document_ids()) if (store and retry) else None
    wanted = ("failed", "pending") if retry else ("pending",)
    known = store.known_id if store else None
    for document in discover(options.paths, options.include, options.exclude, known_id=known):
        if retry_ids is not None and document.doc_id not in retry_ids:
            continue
        states = store.page_states(document.doc_id) if store else {}
        could_not_open = states.get(0) == "failed"
        if document.error:
            if could_not_open and not retry:
                skipped += 1
                continue
            unreadable.append((document, document.error))
            continue
        page_count = None
        if store:
            info = document.path.stat()
            store.remember_file(document.path, info.st_size, info.st_mtime_ns, document.doc_id)
            store.upsert_document(document.doc_id, document.path)
            page_count = store.page_count(document.doc_id)
        if not page_count:  # new, or could not be opened last time
            if could_not_open and not retry:
                skipped += 1
                continue
            try:
                page_count = count_pages(document)
            except InputError as exc:
                unreadable.append((document, str(exc)))
                continue
            if store:
                store.set_page_count(document.doc_id, page_count)
                states = store.page_states(document.doc_id)
        pages = [p for p in range(1, page_count + 1) if states.get(p, "pending") in wanted]
        skipped += page_count - len(pages)
        if pages:
            work.append(_WorkItem(document, pages, page_count))
    if store:
        store.commit()
    return work, unreadable, skipped


def _render(work: list[_WorkItem], options: JobOptions, max_pixels: int, pages: queue.Queue,
            stop: threading.Event) -> None:
    """Background thread: render planned pages into the bounded ``pages`` queue."""
    try:
        for item in work:
            try:
                for page in iter_pages(item.document, item.pages, options.dpi, max_pixels):
                    while not stop.is_set():
                        try:
                            pages.put(page, timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
            except InputError as exc:
                for number in item.pages:
                    pages.put(PageImage(item.document, number, item.page_count, error=str(exc)))
    finally:
        pages.put(None)


class _Job:
    """State of one run: checkpoint, output, progress, counters."""

    def __init__(self, options: JobOptions, store: Store, writer, model_name: str, quant: str, total: int):
        from tqdm import tqdm

        self.options, self.store, self.writer = options, store, writer
        self.model_name, self.quant = model_name, quant
        self.summary = JobSummary()
        self.buffer: list[dict] = []
        self.last_flush = time.monotonic()
        self.remaining: dict[str, int] = {}
        self.markdown_written: set[str] = set()
        self.progress = tqdm(total=total, unit="page", disable=None if options.progress else True,
                             dynamic_ncols=True, desc="ocrbatch")

    def emit(self, row: dict) -> None:
        self.buffer.append(row)
        if (len(self.buffer) >= self.options.flush_rows
                or time.monotonic() - self.last_flush >= self.options.flush_seconds):
            self.flush()

    def flush(self) -> None:
        self.writer.write(self.buffer)
        self.buffer = []
        self.last_flush = time.monotonic()

    def page_done(self, document: Document, page: int, row: dict) -> None:
        status = row["status"]
        self.store.record_page(document.doc_id, page, status, row, row.get("error"))
        self.emit({"path": str(document.path), "doc_id": document.doc_id, **row})
        if status == "ok":
            self.summary.pages_ok += 1
        else:
            self.summary.pages_failed += 1
            log.warning("%s", row["error"])
        self.progress.update(1)
        self.remaining[document.doc_id] -= 1
        if self.remaining[document.doc_id] == 0:
            self.store.finish_document(document.doc_id, self.options.max_page_error_rate)
            if self.options.markdown_dir:
                write_markdown(self.store, document.doc_id, self.options.markdown_dir)
                self.markdown_written.add(document.doc_id)

    def page_failed(self, page: PageImage, error: str) -> None:
        row = _failure_row(page.page, page.page_count, self.options.task, error, self.model_name, self.quant)
        self.page_done(page.document, page.page, row)


def write_markdown(store: Store, doc_id: str, folder: Path) -> Path:
    """One Markdown file per document, pages in order."""
    folder.mkdir(parents=True, exist_ok=True)
    path = store.document_path(doc_id)
    target = folder / f"{path.stem}-{doc_id[:8]}.md"
    parts = []
    for page in store.document_pages(doc_id):
        body = page.get("text") or f"<!-- page {page['page']} failed: {page.get('error')} -->"
        parts.append(f"<!-- page {page['page']} -->\n\n{body}\n")
    target.write_text("\n".join(parts), encoding="utf-8")
    return target


def run_job(options: JobOptions, engine=None, pool=None) -> JobSummary:
    """Run the batch job described by ``options`` and return its summary.

    ``engine`` (an :class:`Engine` without language model) and ``pool`` (a
    :class:`WorkerPool`) may be given already loaded, to reuse them across
    jobs; otherwise they are made from ``options`` and closed at the end.
    Raises :class:`JobLocked` if another run holds the output, and
    :class:`OcrbatchError` for fatal problems (model, settings).
    """
    started = time.monotonic()
    with JobLock(options.checkpoint_path):
        store = Store(options.checkpoint_path)
        try:
            return _run_locked(options, store, started, engine, pool)
        finally:
            store.close()


def _run_locked(options: JobOptions, store: Store, started: float, engine, pool) -> JobSummary:
    from .engine import Engine
    from .pool import WorkerPool

    model_name, quant = str(options.model), options.quant.upper()
    store.check_settings({"task": options.task, "model": model_name, "quant": quant,
                          "max_tokens": str(options.max_tokens)})
    work, unreadable, skipped = plan(options, store)
    total = sum(len(item.pages) for item in work) + len(unreadable)
    log.info("%d pages to process in %d documents (%d unreadable), %d already done",
             total - len(unreadable), len(work), len(unreadable), skipped)

    redo = {(item.document.doc_id, page) for item in work for page in item.pages}
    redo |= {(document.doc_id, 0) for document, _ in unreadable}
    writer = open_output(options.out, options.output_format)
    job = _Job(options, store, writer, model_name, quant, total)
    job.summary.pages_skipped = skipped
    job.summary.documents = len(work) + len(unreadable)
    own_pool = pool is None
    try:
        batch = []
        for row in store.rows(exclude=redo):  # earlier results first, rebuilt from the checkpoint
            batch.append(row)
            if len(batch) >= 1024:
                writer.write(batch)
                batch = []
        writer.write(batch)

        for document, error in unreadable:
            row = _failure_row(0, 0, options.task, error, model_name, quant)
            store.record_document_failure(document.doc_id, document.path, error, row)
            job.emit({"path": str(document.path), "doc_id": document.doc_id, **row})
            job.summary.pages_failed += 1
            job.progress.update(1)
            log.warning("%s", error)

        if work:
            if engine is None:
                engine = Engine(options.model, quant=quant, gguf=options.gguf, vision_dtype=options.vision_dtype,
                                device=options.device, max_tokens=options.max_tokens, threads=options.threads,
                                cache_dir=options.cache_dir, with_language=False)
            text = engine.prompt_text(options.task)
            processor_max = engine.vision.image_processor.size.longest_edge
            max_pixels = min(options.max_pixels or processor_max, processor_max)
            if pool is None:
                cores = os.cpu_count() or 1
                threads = options.threads or max(1, cores // options.workers)
                pool = WorkerPool(engine.gguf_path, workers=options.workers, n_seq_max=options.seqs_per_worker,
                                  n_ctx=engine.context_size(options.seqs_per_worker), threads=threads,
                                  max_retries=options.max_retries)
            for item in work:
                job.remaining[item.document.doc_id] = len(item.pages)
            _process(job, engine, pool, text, work, max_pixels)
        job.flush()
        if options.markdown_dir:  # documents finished in earlier runs, too
            for doc_id in store.finished_document_ids():
                if doc_id not in job.markdown_written:
                    write_markdown(store, doc_id, options.markdown_dir)
        job.summary.worker_crashes = pool.crashes if pool else 0
        writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        if own_pool and pool is not None:
            pool.close()
        job.progress.close()
    job.summary.elapsed_s = time.monotonic() - started
    return job.summary


def _process(job: _Job, engine, pool, text: str, work: list[_WorkItem], max_pixels: int) -> None:
    options = job.options
    pages: queue.Queue = queue.Queue(maxsize=max(2, options.batch_size * 2))
    stop = threading.Event()
    renderer = threading.Thread(target=_render, args=(work, options, max_pixels, pages, stop),
                                name="ocrbatch-render", daemon=True)
    renderer.start()
    finished: queue.Queue = queue.Queue()
    in_flight = 0
    max_in_flight = options.workers * (options.seqs_per_worker + 1) + options.batch_size
    rendering = True

    def handle(item) -> None:
        page, future, vision_s = item
        try:
            result = future.result()
            error = result.error
        except Exception as exc:  # a worker crashed too often, or the pool failed
            result, error = None, f"{exc}"
        if error or result is None:
            job.page_failed(page, f"{page.document.path} page {page.page}: {error}")
            return
        width, height = page.image_size
        job.page_done(page.document, page.page, {
            "page": page.page, "page_count": page.page_count, "task": options.task,
            "text": engine.prompts.decode(result.token_ids), "status": "ok", "error": None,
            "n_image_tokens": page.n_image_tokens, "n_output_tokens": len(result.token_ids),
            "finish_reason": result.finish_reason, "width": width, "height": height,
            "model": job.model_name, "quant": job.quant, "render_s": page.render_s, "vision_s": vision_s,
            "prefill_s": result.prefill_s, "decode_s": result.decode_s,
            "created_at": datetime.now(timezone.utc).isoformat(),
        })

    try:
        while rendering or in_flight:
            while True:  # results that are ready
                try:
                    item = finished.get_nowait()
                except queue.Empty:
                    break
                in_flight -= 1
                handle(item)
            if not rendering or in_flight >= max_in_flight:
                if in_flight:
                    item = finished.get()
                    in_flight -= 1
                    handle(item)
                continue
            batch, rendering = _next_batch(pages, options, engine)
            for page in batch:
                if page.error:
                    job.page_failed(page, page.error)
            ready = [p for p in batch if not p.error]
            for page, encoded, vision_s, error in _encode(engine, ready):
                if error:
                    job.page_failed(page, error)
                    continue
                page.image_size = page.image.size
                page.n_image_tokens = encoded.n_tokens
                page.image = None  # the embeddings are all that is needed now
                request = engine.request(encoded, text, options.max_tokens)
                if options.ignore_eos:
                    request.stop_ids = ()
                future = pool.submit(request)
                future.add_done_callback(lambda f, p=page, v=vision_s: finished.put((p, f, v)))
                in_flight += 1
    finally:
        stop.set()
        renderer.join(timeout=10)


def _next_batch(pages: queue.Queue, options: JobOptions, engine) -> tuple[list[PageImage], bool]:
    """Up to ``batch_size`` rendered pages within the patch budget; False once rendering is over."""
    batch, patches = [], 0
    while len(batch) < options.batch_size:
        try:
            page = pages.get(timeout=0.05) if batch else pages.get()
        except queue.Empty:
            break
        if page is None:
            return batch, False
        if page.image is not None:
            patches += engine.vision.n_patches_for(*page.image.size)
        batch.append(page)
        if patches >= options.max_batch_patches:
            break
    return batch, True


def _encode(engine, pages: list[PageImage]):
    """Encode a batch; if the batch fails, encode page by page to find the culprit."""
    if not pages:
        return []
    started = time.perf_counter()
    try:
        encoded = engine.vision.encode([p.image for p in pages])
        per_page = (time.perf_counter() - started) / len(pages)
        return [(page, enc, per_page, None) for page, enc in zip(pages, encoded)]
    except Exception:
        if len(pages) == 1:
            page = pages[0]
            import traceback

            reason = traceback.format_exc().strip().splitlines()[-1]
            return [(page, None, 0.0, f"{page.document.path} page {page.page}: vision encoder failed ({reason})")]
        return [result for page in pages for result in _encode(engine, [page])]


def dry_run(options: JobOptions) -> list[tuple[Document, int | None, str | None]]:
    """What a run would process: ``(document, pages to do, error)``; changes nothing."""
    path = options.checkpoint_path
    store = Store(path, readonly=True) if path.is_file() else None
    try:
        work, unreadable, _ = plan(options, None)
        listing: list[tuple[Document, int | None, str | None]] = []
        for item in work:
            pages = item.pages
            if store and item.document.doc_id:
                states = store.page_states(item.document.doc_id)
                wanted = ("failed", "pending") if options.retry_failed else ("pending",)
                pages = [p for p in pages if states.get(p, "pending") in wanted]
            listing.append((item.document, len(pages), None))
        listing += [(document, None, error) for document, error in unreadable]
        return sorted(listing, key=lambda entry: str(entry[0].path))
    finally:
        if store:
            store.close()
