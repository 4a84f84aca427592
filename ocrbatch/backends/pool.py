"""A pool of llama.cpp worker processes, shared by the batch job and the server.

Each worker is a separate process that owns one :class:`LanguageModel`
context and decodes several sequences at once, admitting new requests as
others finish. Processes rather than threads, because llama.cpp aborts the
whole process on some internal errors and because a worker may be killed
from outside. Requests and results cross a pipe per worker; a request's
embeddings are a few MB, small next to the seconds its decoding takes.

Failures are kept apart by who caused them:

* a request that llama.cpp rejects (decode failure, context full) resolves
  with ``result.error`` set and the worker goes on with the others;
* a worker that dies holding several requests charges none of them: they are
  retried one at a time on fresh workers, so only a request that kills its
  worker while running alone is charged, and fails after ``max_retries``.
  Until some request has finished, though, a lone crash may be the build's
  fault: untried requests are run alone first, and a request past its retries
  waits uncharged until a request finishes (then it is charged), the pool fails
  (below), or the pool has had nothing else to try for ``lone_crash_wait_s``
  (pages reach the pool one by one as they are encoded);
* a request with no result after ``request_timeout`` seconds on a worker
  fails with :class:`RequestTimedOut`; a worker that does not let go of it is
  killed and replaced, and its other requests are retried uncharged;
* a pool that cannot run at all fails every future with :class:`PoolFailed`,
  which callers treat as fatal, not as a fault of the request: workers that
  cannot load the model or die before they are ready (each worker decodes a
  short warm-up through the quant's kernels before it counts as started, so a
  llama.cpp build this CPU cannot run fails here), a worker killed by SIGILL,
  SIGBUS or SIGSYS (a build or machine fault, never a page's), or
  :data:`LONE_CRASH_LIMIT` different requests in a row each killing a worker
  while running alone with none finished since the pool started.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable

from ..errors import OcrbatchError
from ..model.language import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

# How long a worker may take to drop a timed-out request before it counts as stuck.
STUCK_GRACE_S = 10.0
# A dead worker that never got ready this many times in a row means the model cannot load.
MAX_STARTUP_FAILURES = 3
# This many different requests, each killing a worker while running alone, with no request finished
# since the pool started: the build or the machine is broken, not every one of those pages.
LONE_CRASH_LIMIT = 3
# How long a request past its retries waits uncharged, before any request has finished, for another
# page to show whether the build is at fault: longer than a vision pass takes to bring the next page.
LONE_CRASH_WAIT_S = 120.0
# Signals that say the llama.cpp build or the machine is at fault (an instruction this CPU lacks, a
# bad memory mapping, a forbidden system call), whatever request the worker held.
BROKEN_BUILD_SIGNALS = (signal.SIGILL, signal.SIGBUS, signal.SIGSYS)
DOCTOR_HINT = "run `ocrbatch doctor` to check this machine's llama.cpp build"


class WorkerCrashed(OcrbatchError):
    """A request killed its worker process, running alone, more often than the retry limit allows."""


class RequestTimedOut(OcrbatchError):
    """A request had no result within the pool's ``request_timeout``."""


class PoolFailed(OcrbatchError):
    """The pool itself cannot decode anything (model not loadable, workers not starting, closed)."""


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

    from ..model.language import LanguageModel

    # The parent decides when to stop (a Ctrl-C or a service stop reaches the whole process
    # group); a worker leaves when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        model = LanguageModel(settings.gguf_path, n_ctx=settings.n_ctx, n_seq_max=settings.n_seq_max,
                              n_threads=settings.threads)
        model.warm_up()  # through the quant's kernels before it counts as started (see the module docstring)
    except Exception as exc:
        conn.send(("fatal", None, f"{type(exc).__name__}: {exc}"))
        return
    scheduler = model.scheduler()
    held: set = set()
    try:
        conn.send(("ready", None, os.getpid()))
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
                conn.send(("received", key, None))  # starts the request's clock in the pool
                if stream:
                    request.on_token = lambda token, key=key: conn.send(("token", key, token))
                scheduler.submit(key, request)
                held.add(key)
            try:
                finished = scheduler.step()
            except Exception as exc:  # a fault the scheduler could not pin on one request
                reason = f"llama.cpp worker error: {type(exc).__name__}: {exc}"
                finished = [(key, GenerationResult([], "error", 0, 0.0, 0.0, reason)) for key in held]
                scheduler = model.scheduler()  # clears the context's memory
            for key, result in finished:
                held.discard(key)
                conn.send(("done", key, result))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return  # the parent went away
    finally:
        model.close()


def _cancel(future: Future) -> None:
    """Cancel a queued future so that ``concurrent.futures.wait`` sees it too."""
    if future.cancel():
        future.set_running_or_notify_cancel()


@dataclass
class _Job:
    request: GenerationRequest
    future: Future
    attempts: int = 0  # deaths of a worker that ran this request alone
    suspect: bool = False  # held by a worker that died: run alone until it succeeds
    sent_at: float | None = None
    received_at: float | None = None  # when the worker took it: the page timeout counts from here
    timed_out: bool = False


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: object
    jobs: dict = field(default_factory=dict)
    ready: bool = False
    killed_by_pool: bool = False
    stuck_since: float | None = None
    outbox: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)

    def start_sender(self) -> None:
        """Send the outbox's messages on a thread of their own.

        A request is megabytes and a pipe holds 64 KB, so a send waits until the
        worker reads; a hung worker never does. Only this thread waits then, never
        the dispatcher, which must stay free to time the request out and kill the worker.
        """
        threading.Thread(target=self._send_all, name="ocrbatch-pool-send", daemon=True).start()

    def _send_all(self) -> None:
        """Send until the closing ``None`` or a dead pipe, then close the pipe: it is this thread's."""
        try:
            while True:
                message = self.outbox.get()
                self.conn.send(message)
                if message is None:
                    return
        except (BrokenPipeError, OSError):
            return  # the worker is gone; the dispatcher sees its sentinel
        finally:
            self.conn.close()


class WorkerPool:
    """Runs :class:`GenerationRequest`s on worker processes and returns futures."""

    def __init__(self, gguf_path: str | Path, workers: int = 1, n_seq_max: int = 4, n_ctx: int = 8192,
                 threads: int | None = None, max_retries: int = 2, queue_per_worker: int | None = None,
                 request_timeout: float | None = None, stuck_grace_s: float = STUCK_GRACE_S,
                 lone_crash_wait_s: float = LONE_CRASH_WAIT_S, worker_main: Callable = _worker_main):
        """Start ``workers`` processes, each decoding up to ``n_seq_max`` requests at once.

        ``threads`` is each worker's llama.cpp threads; by default the machine's cores are shared
        among the workers, since more threads than cores only make them wait on each other.
        ``request_timeout`` bounds the seconds from a worker taking a request
        to its result; a worker that has not dropped a timed-out request
        ``stuck_grace_s`` later is killed. ``lone_crash_wait_s``: see the module docstring.
        ``worker_main(conn, settings)`` is the worker process's
        body; tests pass one that misbehaves on purpose.
        """
        threads = threads or max(1, (os.cpu_count() or 1) // workers)
        self.settings = WorkerSettings(Path(gguf_path), n_ctx, n_seq_max, threads)
        self.max_retries = max_retries
        self.request_timeout = request_timeout
        self.stuck_grace_s = stuck_grace_s
        self.lone_crash_wait_s = lone_crash_wait_s
        # Keep a little more than the worker's slots queued, so it never idles between requests.
        self.queue_per_worker = queue_per_worker or n_seq_max + 1
        self._worker_main = worker_main
        self._context = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._started = threading.Condition(self._lock)  # a worker got ready, or the pool failed
        self._queue: deque[tuple[int, _Job]] = deque()
        self._suspects: deque[tuple[int, _Job]] = deque()
        self._keys = itertools.count()
        self._workers: list[_Worker] = []
        self._closed = False
        self._fatal: str | None = None
        self.crashes = 0
        self._startup_failures = 0
        self._finished_any = False  # a request has come back from a worker since the pool started
        self._lone_crashers: set[int] = set()  # requests that killed a worker running alone, since then
        # Requests past their retries before any finished, with the error they are charged with if need be.
        self._parked: list[tuple[_Job, OcrbatchError]] = []
        self._idle_since: float | None = None  # since when only parked requests are left
        self._wake_reader, self._wake = self._context.Pipe(duplex=False)
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
                raise PoolFailed("the worker pool is closed")
            if self._fatal:
                raise PoolFailed(self._fatal)
            self._queue.append((next(self._keys), _Job(request, future)))
        self._wake.send(b"")
        return future

    def cancel(self, future: Future) -> None:
        """Stop working on the request behind ``future`` (it resolves with reason ``cancelled``)."""
        with self._lock:
            for waiting in (self._queue, self._suspects):
                for index, (_, job) in enumerate(waiting):
                    if job.future is future:
                        del waiting[index]
                        _cancel(future)
                        return
            for worker in self._workers:
                for key, job in worker.jobs.items():
                    if job.future is future:
                        self._send_cancel(worker, key)
                        return
            parked = next((entry for entry in self._parked if entry[0].future is future), None)
            if parked is None:
                return
            self._parked.remove(parked)
        # Resolved outside the lock: the future's callbacks may call the pool.
        future.set_result(GenerationResult([], "cancelled", parked[0].request.prompt.n_prompt_tokens, 0.0, 0.0))

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until every worker has loaded the model and passed its warm-up.

        Raises :class:`PoolFailed` when the pool cannot run (see the module
        docstring) or is not ready within ``timeout`` seconds. A server calls
        this before it answers anything.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._started:
            while not self._fatal and not (self._workers and all(w.ready for w in self._workers)):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise PoolFailed(f"the llama.cpp workers did not start within {timeout:.0f} s")
                self._started.wait(remaining)
            if self._fatal:
                raise PoolFailed(self._fatal)

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        with self._lock:
            return (len(self._queue) + len(self._suspects) + len(self._parked)
                    + sum(1 for w in self._workers for j in w.jobs.values() if not j.future.done()))

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers if w.process.pid]

    def close(self) -> None:
        """Stop the workers; every future not yet resolved is cancelled or fails with :class:`PoolFailed`."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._wake.send(b"")
        self._thread.join(timeout=30)
        for worker in self._workers:
            worker.outbox.put(None)
        for worker in self._workers:
            worker.process.join(timeout=10)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join()
        with self._lock:
            waiting = [job for _, job in (*self._queue, *self._suspects)]
            running = [job for w in self._workers for job in w.jobs.values()] + [job for job, _ in self._parked]
            self._queue.clear()
            self._suspects.clear()
            self._parked.clear()
            for worker in self._workers:
                worker.jobs.clear()
        for job in waiting:
            _cancel(job.future)
        for job in running:
            if not job.future.done():
                job.future.set_exception(PoolFailed("the worker pool was closed before this request finished"))
        self._wake.close()
        self._wake_reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- dispatcher thread ------------------------------------------------------------

    def _spawn(self) -> _Worker:
        parent_conn, child_conn = self._context.Pipe()
        process = self._context.Process(target=self._worker_main, args=(child_conn, self.settings),
                                        name="ocrbatch-worker", daemon=True)
        process.start()
        child_conn.close()
        worker = _Worker(process, parent_conn)
        worker.start_sender()
        return worker

    @staticmethod
    def _send(worker: _Worker, key: int, job: _Job) -> None:
        if not job.future.running() and not job.future.set_running_or_notify_cancel():
            return  # cancelled while queued: nothing to send
        worker.outbox.put((key, replace(job.request, on_token=None), job.request.on_token is not None))
        job.sent_at = time.monotonic()
        worker.jobs[key] = job

    def _assign(self) -> None:
        with self._lock:
            ready = [w for w in self._workers if w.ready and not w.killed_by_pool]
            # A suspect runs alone on a worker. While suspects wait, the least busy worker
            # takes no new work so that it empties and can take one.
            draining = min(ready, key=lambda w: len(w.jobs)) if self._suspects and ready else None
            for worker in ready:
                if self._suspects and not worker.jobs:
                    self._send(worker, *self._suspects.popleft())
                    continue
                if worker is draining or any(job.suspect for job in worker.jobs.values()):
                    continue
                while self._queue and len(worker.jobs) < self.queue_per_worker:
                    self._send(worker, *self._queue.popleft())

    @staticmethod
    def _send_cancel(worker: _Worker, key: int) -> None:
        worker.outbox.put(("cancel", key))

    def _check_timeouts(self) -> None:
        """Fail requests past the timeout; kill workers that stop responding.

        A worker is stuck when it does not drop a timed-out request within
        ``stuck_grace_s``, or when it has not even taken a request off its pipe
        within the timeout. Killing it sends its requests through the same
        retry-alone path as a crash (see :meth:`_replace`).
        """
        if self.request_timeout is None:
            return
        now = time.monotonic()
        expired = []
        with self._lock:
            for worker in self._workers:
                if worker.killed_by_pool:
                    continue
                unread = False
                for key, job in worker.jobs.items():
                    if job.received_at is None:
                        unread = unread or (job.sent_at is not None and now - job.sent_at > self.request_timeout)
                    elif not job.timed_out and now - job.received_at > self.request_timeout:
                        job.timed_out = True
                        expired.append(job)
                        self._send_cancel(worker, key)
                        worker.stuck_since = worker.stuck_since or now
                ignored_cancel = worker.stuck_since is not None and now - worker.stuck_since > self.stuck_grace_s
                if (ignored_cancel or unread) and worker.process.is_alive():
                    log.warning("llama.cpp worker %s stopped responding; killing it", worker.process.pid)
                    worker.killed_by_pool = True
                    worker.process.kill()
        for job in expired:
            if not job.future.done():
                job.future.set_exception(RequestTimedOut(self._timeout_message()))

    def _timeout_message(self) -> str:
        return f"no result after {self.request_timeout:.0f} s on a llama.cpp worker (page timeout)"

    def _fail_all(self, message: str) -> None:
        with self._lock:
            self._fatal = message
            self._started.notify_all()
            jobs = [job for _, job in (*self._queue, *self._suspects)]
            jobs += [j for w in self._workers for j in w.jobs.values()] + [job for job, _ in self._parked]
            self._queue.clear()
            self._suspects.clear()
            self._parked.clear()
            for worker in self._workers:
                worker.jobs.clear()
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(PoolFailed(message))

    def _replace(self, worker: _Worker) -> None:
        """Retry a dead worker's requests as the module docstring says, and start a fresh worker."""
        worker.process.join(timeout=5)
        exitcode = worker.process.exitcode
        worker.outbox.put(None)  # ends its sender thread, which closes the pipe
        broken = self._broken_build(worker, exitcode)
        if broken is not None:
            self._fail_all(broken)
            with self._lock:
                self._workers.remove(worker)
            return
        if worker.ready:
            self._startup_failures = 0
        with self._lock:
            live = [(key, job) for key, job in worker.jobs.items() if not job.future.done()]
            worker.jobs.clear()
            if worker.killed_by_pool:
                cause = "stopped responding"
            else:
                self.crashes += 1
                cause = f"died (exit code {exitcode})"
            log.warning("llama.cpp worker %s %s holding %d request(s)", worker.process.pid, cause, len(live))
            if len(live) == 1:
                key, job = live[0]
                job.attempts += 1
                # Until some request has finished, a lone crash may be the build's fault, not the
                # page's (see the module docstring): with LONE_CRASH_LIMIT different lone crashes
                # the pool fails first.
                untried = any(waiting.attempts == 0 for _, waiting in (*self._queue, *self._suspects))
                if job.attempts > self.max_retries and self._finished_any:
                    job.future.set_exception(self._gave_up(job.attempts, worker.killed_by_pool, exitcode))
                elif job.attempts > self.max_retries and not untried:
                    self._parked.append((job, self._gave_up(job.attempts, worker.killed_by_pool, exitcode)))
                elif self._finished_any:
                    job.suspect = True
                    self._suspects.appendleft((key, job))
                else:
                    job.suspect = True
                    self._suspects.append((key, job))
                    self._try_an_untried_request_alone_next()
            else:  # which one did it is unknown: each runs alone next
                for key, job in live:
                    job.suspect = True
                self._suspects.extend(live)
            index = self._workers.index(worker)
            self._workers[index] = self._spawn()

    def _try_an_untried_request_alone_next(self) -> None:
        """Move a queued request that no worker has run to the front of the suspects.

        Suspects run before the queue, so without this a pool whose first requests keep
        crashing alone would retry them forever and never try a third page: neither
        charging them nor counting :data:`LONE_CRASH_LIMIT` different lone crashes.
        Pages reach the pool one by one as they are encoded, so the queue may be all
        that holds the untried ones. Called with the lock held.
        """
        if self._queue and not any(waiting.attempts == 0 for _, waiting in self._suspects):
            key, job = self._queue.popleft()
            job.suspect = True
            self._suspects.appendleft((key, job))

    def _charge_parked(self) -> None:
        with self._lock:
            parked, self._parked = self._parked, []
            self._idle_since = None
        for job, error in parked:
            if not job.future.done():
                job.future.set_exception(error)

    def _check_parked(self) -> None:
        """Charge the parked requests once the pool has had nothing else to run for ``lone_crash_wait_s``."""
        with self._lock:
            if not self._parked or self._queue or self._suspects or any(w.jobs for w in self._workers):
                self._idle_since = None
                return
            now = time.monotonic()
            self._idle_since = self._idle_since or now
            if now - self._idle_since < self.lone_crash_wait_s:
                return
        self._charge_parked()

    def _broken_build(self, worker: _Worker, exitcode) -> str | None:
        """Why this worker's death means the pool cannot work (see the module docstring), or None."""
        if worker.killed_by_pool:
            return None
        if exitcode is not None and -exitcode in BROKEN_BUILD_SIGNALS:
            return (f"llama.cpp worker was killed by {signal.Signals(-exitcode).name} "
                    f"{'while decoding' if worker.ready else 'during its start-up warm-up'}: the llama.cpp build "
                    f"or the machine is at fault, not a page; {DOCTOR_HINT}")
        if not worker.ready:
            self._startup_failures += 1
            if self._startup_failures >= MAX_STARTUP_FAILURES:
                return (f"llama.cpp worker died while starting (exit code {exitcode}), "
                        f"{MAX_STARTUP_FAILURES} times in a row; {DOCTOR_HINT}")
            return None
        live = [key for key, job in worker.jobs.items() if not job.future.done()]
        if len(live) == 1 and not self._finished_any:
            self._lone_crashers.add(live[0])
            if len(self._lone_crashers) >= LONE_CRASH_LIMIT:
                return (f"llama.cpp workers crashed on {len(self._lone_crashers)} different pages, each running "
                        f"alone (last exit code {exitcode}), and none has decoded since the pool started: "
                        f"the build or the machine is at fault, not the pages; {DOCTOR_HINT}")
        return None

    def _gave_up(self, attempts: int, stuck: bool, exitcode) -> OcrbatchError:
        """The error of a request that brought its worker down alone more than ``max_retries`` times."""
        if stuck:
            return RequestTimedOut(f"{self._timeout_message()}; its worker stopped responding {attempts} times "
                                   "on this page alone")
        return WorkerCrashed(f"llama.cpp worker process crashed (exit code {exitcode}) {attempts} times "
                             "running this page alone")

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
            # A worker that died while its sender thread was writing to it has its pipe closed by that
            # thread before this loop sees the death: its sentinel reports it, the pipe is left out.
            by_conn = {w.conn: w for w in workers if not w.conn.closed}
            by_sentinel = {w.process.sentinel: w for w in workers}
            timeout = 1.0 if self.request_timeout is not None or self._parked else None
            try:
                ready = wait([self._wake_reader, *by_conn, *by_sentinel], timeout=timeout)
            except OSError:
                continue  # a pipe closed between the check above and the wait: look again
            for handle in ready:
                if handle is self._wake_reader:
                    while self._wake_reader.poll():
                        self._wake_reader.recv()
                elif handle in by_conn:
                    self._receive(by_conn[handle])
                elif handle in by_sentinel and by_sentinel[handle] in self._workers:
                    worker = by_sentinel[handle]
                    # Take the results it sent before dying, then retry the rest.
                    self._receive(worker)
                    if self._fatal:
                        worker.outbox.put(None)
                        with self._lock:
                            self._workers.remove(worker)
                    elif worker in self._workers:
                        self._replace(worker)
            self._check_timeouts()
            self._check_parked()

    def _receive(self, worker: _Worker) -> None:
        try:
            while worker.conn.poll():
                kind, key, payload = worker.conn.recv()
                if kind == "ready":
                    with self._started:
                        worker.ready = True
                        self._started.notify_all()
                elif kind == "received":
                    job = worker.jobs.get(key)
                    if job is not None:
                        job.received_at = time.monotonic()
                elif kind == "fatal":
                    self._fail_all(f"llama.cpp worker could not start: {payload}")
                elif kind == "token":
                    job = worker.jobs.get(key)
                    if job is not None and job.request.on_token is not None:
                        try:
                            job.request.on_token(payload)
                        except Exception:  # a caller's callback must not take the pool down
                            log.exception("token callback failed")
                elif kind == "done":
                    self._finished_any = True
                    with self._lock:
                        job = worker.jobs.pop(key, None)
                        if job is not None and job.timed_out and not any(j.timed_out for j in worker.jobs.values()):
                            worker.stuck_since = None  # it let go
                    if job is not None and not job.future.done():
                        job.future.set_result(payload)
                    if self._parked:  # a request decoded: the build works, so they were the pages' fault
                        self._charge_parked()
        except (EOFError, OSError):
            pass  # the sentinel reports the death
