"""A pool of llama.cpp worker processes, shared by the batch job and the server.

Each worker is a separate process that owns one :class:`LanguageModel`
context and decodes several sequences at once, admitting new requests as
others finish. Processes rather than threads, because llama.cpp aborts the
whole process on some internal errors and because a worker may be killed
from outside: when a worker dies, the requests it held are sent to a fresh
worker (up to ``max_retries`` times each) and the pool carries on. Requests
and results cross a pipe per worker; a request's embeddings are a few MB,
small next to the seconds its decoding takes.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from pathlib import Path

from .errors import OcrbatchError
from .language import GenerationRequest

log = logging.getLogger(__name__)


class WorkerCrashed(OcrbatchError):
    """A request's worker process died more often than the retry limit allows."""


@dataclass
class WorkerSettings:
    gguf_path: Path
    n_ctx: int
    n_seq_max: int
    threads: int | None


def _worker_main(conn, settings: WorkerSettings) -> None:
    """Worker process: decode requests from ``conn`` and send results back."""
    import os
    import signal

    from .language import LanguageModel

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    try:
        model = LanguageModel(settings.gguf_path, n_ctx=settings.n_ctx, n_seq_max=settings.n_seq_max,
                              n_threads=settings.threads)
    except Exception as exc:
        conn.send(("fatal", None, f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None, os.getpid()))
    scheduler = model.scheduler()
    try:
        while True:
            # Block only when there is nothing to decode.
            while conn.poll(0 if scheduler.busy else None):
                message = conn.recv()
                if message is None:
                    return
                if message[0] == "cancel":
                    scheduler.cancel(message[1])
                    continue
                key, request, stream = message
                if stream:
                    request.on_token = lambda token, key=key: conn.send(("token", key, token))
                scheduler.submit(key, request)
            for key, result in scheduler.step():
                conn.send(("done", key, result))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the parent went away
    finally:
        model.close()


@dataclass
class _Job:
    request: GenerationRequest
    future: Future
    attempts: int = 0


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: object
    jobs: dict = field(default_factory=dict)
    ready: bool = False


class WorkerPool:
    """Runs :class:`GenerationRequest`s on worker processes and returns futures."""

    def __init__(self, gguf_path: str | Path, workers: int = 1, n_seq_max: int = 4, n_ctx: int = 8192,
                 threads: int | None = None, max_retries: int = 2, queue_per_worker: int | None = None):
        self.settings = WorkerSettings(Path(gguf_path), n_ctx, n_seq_max, threads)
        self.max_retries = max_retries
        # Keep a little more than the worker's slots queued, so it never idles between requests.
        self.queue_per_worker = queue_per_worker or n_seq_max + 1
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._queue: deque[tuple[int, _Job]] = deque()
        self._keys = itertools.count()
        self._workers: list[_Worker] = []
        self._closed = False
        self._fatal: str | None = None
        self.crashes = 0
        self._startup_failures = 0
        wake_reader, self._wake = self._context.Pipe(duplex=False)
        self._wake_reader = wake_reader
        for _ in range(workers):
            self._workers.append(self._spawn())
        self._thread = threading.Thread(target=self._dispatch, name="ocrbatch-pool", daemon=True)
        self._thread.start()

    # -- public -----------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Future:
        """Queue ``request``; the future resolves to its :class:`GenerationResult`.

        ``request.on_token``, if set, is called from the pool's thread for each token.
        """
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise OcrbatchError("the worker pool is closed")
            if self._fatal:
                raise OcrbatchError(self._fatal)
            self._queue.append((next(self._keys), _Job(request, future)))
        self._wake.send(b"")
        return future

    def cancel(self, future: Future) -> None:
        """Stop working on the request behind ``future`` (it resolves with reason ``cancelled``)."""
        with self._lock:
            for index, (_, job) in enumerate(self._queue):
                if job.future is future:
                    del self._queue[index]
                    future.cancel()
                    return
            for worker in self._workers:
                for key, job in worker.jobs.items():
                    if job.future is future:
                        try:
                            worker.conn.send(("cancel", key))
                        except (BrokenPipeError, OSError):
                            pass
                        return

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return len(self._queue) + sum(len(w.jobs) for w in self._workers)

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.send(b"")
        self._thread.join(timeout=30)
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- dispatcher thread ------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(child_conn, self.settings),
                                        name="ocrbatch-worker", daemon=True)
        process.start()
        child_conn.close()
        return _Worker(process, parent_conn)

    def _assign(self) -> None:
        with self._lock:
            for worker in self._workers:
                while worker.ready and self._queue and len(worker.jobs) < self.queue_per_worker:
                    key, job = self._queue.popleft()
                    if not job.future.running() and not job.future.set_running_or_notify_cancel():
                        continue  # cancelled while queued
                    request = replace(job.request, on_token=None)
                    try:
                        worker.conn.send((key, request, job.request.on_token is not None))
                    except (BrokenPipeError, OSError):
                        self._queue.appendleft((key, job))
                        break
                    worker.jobs[key] = job

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self._fatal = message
            jobs = [job for _, job in self._queue] + [j for w in self._workers for j in w.jobs.values()]
            self._queue.clear()
            for worker in self._workers:
                worker.jobs.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(OcrbatchError(message))

    def _replace(self, worker: _Worker) -> None:
        """Requeue a dead worker's requests and start a fresh worker in its place."""
        worker.process.join(timeout=5)
        exitcode = worker.process.exitcode
        self.crashes += 1
        if not worker.ready:
            self._startup_failures += 1
            if self._startup_failures >= 3:
                self._fail_all(f"llama.cpp worker died while starting (exit code {exitcode}), 3 times in a row")
                with self._lock:
                    self._workers.remove(worker)
                return
        else:
            self._startup_failures = 0
        log.warning("llama.cpp worker %s died (exit code %s); retrying its %d request(s) on a fresh worker",
                    worker.process.pid, exitcode, len(worker.jobs))
        with self._lock:
            for key, job in sorted(worker.jobs.items(), reverse=True):
                job.attempts += 1
                if job.attempts > self.max_retries:
                    job.future.set_exception(WorkerCrashed(
                        f"worker process crashed (exit code {exitcode}) {job.attempts} times on this request"))
                else:
                    self._queue.appendleft((key, job))
            worker.jobs.clear()
            index = self._workers.index(worker)
            self._workers[index] = self._spawn()

    def _dispatch(self) -> None:
        try:
            self._dispatch_loop()
        except Exception as exc:  # never leave callers waiting on futures forever
            log.exception("worker pool dispatcher failed")
            self._fail_all(f"worker pool failed: {exc}")

    def _dispatch_loop(self) -> None:
        while True:
            self._assign()
            with self._lock:
                if self._closed:
                    return
                workers = list(self._workers)
            by_conn = {w.conn: w for w in workers}
            by_sentinel = {w.process.sentinel: w for w in workers}
            ready = wait([self._wake_reader, *by_conn, *by_sentinel])
            for handle in ready:
                if handle is self._wake_reader:
                    while self._wake_reader.poll():
                        self._wake_reader.recv()
                elif handle in by_conn:
                    self._receive(by_conn[handle])
                elif handle in by_sentinel and by_sentinel[handle] in self._workers:
                    worker = by_sentinel[handle]
                    # Drain results it sent before dying, then requeue the rest.
                    self._receive(worker)
                    if self._fatal:
                        with self._lock:
                            self._workers.remove(worker)
                    elif worker in self._workers:
                        self._replace(worker)

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                kind, key, payload = worker.conn.recv()
                if kind == "ready":
                    worker.ready = True
                elif kind == "fatal":
                    self._fail_all(f"llama.cpp worker could not start: {payload}")
                elif kind == "token":
                    job = worker.jobs.get(key)
                    if job is not None and job.request.on_token is not None:
                        job.request.on_token(payload)
                elif kind == "done":
                    with self._lock:
                        job = worker.jobs.pop(key, None)
                    if job is not None and not job.future.done():
                        job.future.set_result(payload)
        except (EOFError, OSError):
            pass  # the sentinel reports the death
