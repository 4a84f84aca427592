"""The batch job on real inboxes: bad files, crashes, hangs, signals, kills and full disks.

Each test here failed on the pipeline before these guarantees were built; the
events they provoke (a kill, a crash, a signal) are checked to have landed
mid-run, not at a harmless moment.
"""

import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import time
from functools import partial
from pathlib import Path

import pytest
from fault_workers import (
    crashing_worker_main,
    failing_prefill_worker_main,
    hanging_worker_main,
    segfault_on_every_request_worker_main,
    segfaulting_renderer,
)
from helpers import (
    job_options,
    llama_workers,
    page_states,
    popen,
    read_rows,
    run_cli,
    settle,
    settled_pdfs,
    slow_run_args,
    wait_for_ok_pages,
    write_lying_pdf,
    write_pdf,
)

from ocrbatch.backends.pool import PoolFailed, WorkerCrashed, WorkerPool
from ocrbatch.engines.local import PipelineError, run_job
from ocrbatch.records.sqlite import checkpoint_path_for

options = partial(job_options, max_tokens=8, workers=1, seqs_per_worker=2, dpi=72, layout="none")
cli = run_cli





@pytest.fixture(scope="module")
def engine(tiny_model):
    from ocrbatch.engine import Engine

    return Engine(tiny_model, quant="F32", max_tokens=8, with_language=False)


def image_tokens_of_pdf_page(engine, path: Path, dpi: float = 72) -> int:
    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import iter_pages

    [page] = iter_pages(Document(path, "x"), [1], dpi=dpi)
    return engine.vision.n_tokens_for(*page.image.size)


def pool_for(engine, worker_main, **settings) -> WorkerPool:
    settings = {"workers": 1, "n_seq_max": 2, "max_retries": 1, **settings}
    return WorkerPool(engine.gguf_path, n_ctx=engine.context_size(settings["n_seq_max"]), worker_main=worker_main,
                      **settings)


# -- bad documents ------------------------------------------------------------------------

@pytest.mark.slow
def test_a_pdf_whose_page_tree_lies_fails_its_missing_pages_and_the_run_goes_on(tiny_model, docs, tmp_path):
    write_lying_pdf(docs / "doc1-liar.pdf", kids=1, count=3)  # between doc1 and doc2 in discovery order
    settle(docs)
    out = tmp_path / "out.parquet"
    result = cli("run", docs, "--out", out, "--model", tiny_model, "--quant", "F32", "--max-tokens", "6",
                 "--dpi", "72", "--layout", "none")
    assert result.returncode == 1, result.stderr
    rows = {(Path(r["path"]).name, r["page"]): r for r in read_rows(out)}
    good = {(f"doc{i}.pdf", p) for i in range(3) for p in (1, 2)}
    assert good <= rows.keys() and all(rows[key]["status"] == "ok" for key in good)
    assert rows[("doc1-liar.pdf", 1)]["status"] == "ok"
    for page in (2, 3):
        row = rows[("doc1-liar.pdf", page)]
        assert row["status"] == "failed"
        assert f"doc1-liar.pdf page {page}: cannot render (IndexError" in row["error"]
    assert len(rows) == 9
    assert "6 already done" not in result.stderr and "(7 ok, 2 failed)" in result.stderr


@pytest.mark.slow
def test_a_document_that_crashes_the_renderer_twice_is_quarantined(tiny_model, engine, docs, tmp_path):
    write_pdf(docs / "doc1-segfault.pdf", 2)
    settle(docs)
    out = tmp_path / "out.parquet"
    summary = run_job(options(tiny_model, [docs], out), engine=engine, render_pages=segfaulting_renderer)
    assert summary.render_crashes == 2
    rows = {(Path(r["path"]).name, r["page"]): r for r in read_rows(out)}
    assert len(rows) == 8
    assert all(rows[(f"doc{i}.pdf", p)]["status"] == "ok" for i in range(3) for p in (1, 2))
    for page in (1, 2):
        error = rows[("doc1-segfault.pdf", page)]["error"]
        assert "render process died on this document 2 times (killed by SIGSEGV); quarantined" in error
    assert summary.exit_code == 1


@pytest.mark.slow
def test_a_broken_stage_is_a_fatal_error_not_the_end_of_input(tiny_model, engine, docs, tmp_path, monkeypatch):
    from ocrbatch.job.render import RenderStage

    render_document = RenderStage._render_document

    def breaks_on_the_second_document(self, job, process):
        if job.document.path.name == "doc1.pdf":
            raise RuntimeError("simulated bug in the render stage")
        return render_document(self, job, process)

    monkeypatch.setattr(RenderStage, "_render_document", breaks_on_the_second_document)
    out = tmp_path / "out.parquet"
    with pytest.raises(PipelineError, match="render stage failed: RuntimeError: simulated bug"):
        run_job(options(tiny_model, [docs], out), engine=engine)
    states = page_states(out)
    assert states.get("pending", 0) == 4 and states.get("failed", 0) == 0  # doc1 and doc2: left for the next run
    monkeypatch.undo()
    summary = run_job(options(tiny_model, [docs], out), engine=engine)
    assert summary.pages_ok == 4 and summary.exit_code == 0
    assert len(read_rows(out)) == 6


def test_planning_errors_fail_the_document_alone(tiny_model, docs, tmp_path, monkeypatch):
    from ocrbatch.job import plan as plan_module

    count_pages = plan_module.count_pages

    def corrupt_tiff_like(document):
        if document.path.name == "doc1.pdf":
            raise OSError("-2: decoder error")  # what PIL's n_frames raised on a corrupt TIFF
        return count_pages(document)

    monkeypatch.setattr(plan_module, "count_pages", corrupt_tiff_like)
    plan = plan_module.plan_job(options(tiny_model, [docs], tmp_path / "o.parquet"), None)
    assert [item.document.path.name for item in plan.work] == ["doc0.pdf", "doc2.pdf"]
    [(document, error)] = plan.unreadable
    assert document.path.name == "doc1.pdf" and "cannot be planned (OSError: -2: decoder error)" in error


# -- the same content twice ----------------------------------------------------------------

@pytest.mark.slow
def test_overlapping_paths_and_copies_are_decoded_once(tiny_model, engine, docs, tmp_path):
    (docs / "sub").mkdir()
    write_pdf(docs / "sub" / "inner.pdf", 1, text="Inner")
    shutil.copy(docs / "doc0.pdf", docs / "sub" / "copy-of-doc0.pdf")
    settle(docs)
    out = tmp_path / "out.jsonl"
    summary = run_job(options(tiny_model, [docs, docs / "sub"], out), engine=engine)
    assert summary.pages_ok == 7  # 3 documents x 2 pages + inner: each content decoded once
    keys = [(r["path"], r["page"]) for r in read_rows(out)]
    assert len(keys) == len(set(keys)) == 7
    assert not any("copy-of-doc0" in path for path, _ in keys)
    assert (str(docs / "doc0.pdf"), 1) in keys


# -- llama.cpp workers ---------------------------------------------------------------------

@pytest.fixture
def poison_docs(docs, engine, monkeypatch):
    """The sample docs plus one page of a size no other page has; its token count marks it."""
    poison = docs / "doc0-poison.pdf"
    write_pdf(poison, 1, width=420, height=260, text="Poison")
    settle(docs)
    tokens = image_tokens_of_pdf_page(engine, poison)
    assert tokens != image_tokens_of_pdf_page(engine, docs / "doc0.pdf")
    monkeypatch.setenv("OCRBATCH_TEST_POISON_TOKENS", str(tokens))
    return docs


@pytest.mark.slow
def test_a_page_that_crashes_its_worker_fails_alone(tiny_model, engine, poison_docs, tmp_path):
    pool = pool_for(engine, crashing_worker_main, max_retries=1)
    try:
        out = tmp_path / "out.parquet"
        summary = run_job(options(tiny_model, [poison_docs], out, max_tokens=200, ignore_eos=True), engine=engine,
                          pool=pool)
        crashes = pool.crashes
    finally:
        pool.close()
    rows = {(Path(r["path"]).name, r["page"]): r for r in read_rows(out)}
    assert rows[("doc0-poison.pdf", 1)]["status"] == "failed"
    assert "crashed (exit code -11) 2 times running this page alone" in rows[("doc0-poison.pdf", 1)]["error"]
    assert all(r["status"] == "ok" for key, r in rows.items() if key[0] != "doc0-poison.pdf")
    assert summary.pages_ok == 6 and summary.worker_crashes == crashes
    # One crash while the worker also held good pages (which were not charged), then two alone.
    assert crashes == 3


@pytest.mark.slow
def test_a_llama_cpp_error_fails_one_page_and_the_worker_goes_on(tiny_model, engine, poison_docs, tmp_path):
    pool = pool_for(engine, failing_prefill_worker_main)
    try:
        pids = pool.worker_pids
        summary = run_job(options(tiny_model, [poison_docs], tmp_path / "out.parquet"), engine=engine, pool=pool)
        assert pool.worker_pids == pids and pool.crashes == 0
    finally:
        pool.close()
    rows = {(Path(r["path"]).name, r["page"]): r for r in read_rows(tmp_path / "out.parquet")}
    assert "prefill failed: llama_decode failed with status 1" in rows[("doc0-poison.pdf", 1)]["error"]
    assert summary.pages_ok == 6 and summary.pages_failed == 1


@pytest.mark.slow
def test_a_hung_worker_times_out_its_page_and_is_replaced(tiny_model, engine, poison_docs, tmp_path):
    pool = pool_for(engine, hanging_worker_main, request_timeout=4, stuck_grace_s=2)
    try:
        first_pids = pool.worker_pids
        summary = run_job(options(tiny_model, [poison_docs], tmp_path / "out.parquet"), engine=engine, pool=pool)
        assert pool.worker_pids != first_pids  # the stuck worker was killed and replaced
    finally:
        pool.close()
    rows = {(Path(r["path"]).name, r["page"]): r for r in read_rows(tmp_path / "out.parquet")}
    assert "no result after 4 s on a llama.cpp worker (page timeout)" in rows[("doc0-poison.pdf", 1)]["error"]
    assert summary.pages_ok == 6 and summary.pages_failed == 1


@pytest.mark.slow
def test_a_pool_that_cannot_load_its_model_leaves_pages_pending(tiny_model, engine, docs, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + os.urandom(4096))
    out = tmp_path / "out.parquet"
    pool = WorkerPool(broken, workers=1, n_seq_max=2, n_ctx=engine.context_size(2))
    try:
        with pytest.raises(PoolFailed, match="could not start"):
            run_job(options(tiny_model, [docs], out), engine=engine, pool=pool)
    finally:
        pool.close()
    assert page_states(out) == {"pending": 6}
    assert not out.exists()
    summary = run_job(options(tiny_model, [docs], out), engine=engine)  # no --retry-failed needed
    assert summary.pages_ok == 6 and summary.pages_skipped == 0
    assert len(read_rows(out)) == 6


def test_workers_share_the_machines_cores_unless_told_their_threads(engine):
    shared = WorkerPool(engine.gguf_path, workers=2, n_seq_max=1, n_ctx=engine.context_size(1))
    told = WorkerPool(engine.gguf_path, workers=2, n_seq_max=1, n_ctx=engine.context_size(1), threads=3)
    try:
        assert shared.settings.threads == max(1, (os.cpu_count() or 1) // 2) and told.settings.threads == 3
    finally:
        shared.close()
        told.close()


def test_a_worker_whose_pipe_closed_before_its_death_was_seen_is_replaced_not_the_pool_failed(engine):
    """A worker that dies while its sender thread writes to it has its pipe closed by that thread before
    the dispatcher sees the death. The dispatcher must leave the closed pipe out of its wait and replace
    the worker; it used to fail the whole pool ("worker pool failed: handle is closed")."""
    import numpy as np

    from ocrbatch.model.language import GenerationRequest

    pool = WorkerPool(engine.gguf_path, workers=1, n_seq_max=1, n_ctx=engine.context_size(1))
    try:
        pool.wait_ready(timeout=120)
        dead = pool._workers[0]
        with pool._lock:  # the dispatcher, woken, waits here: outside its wait, before its next snapshot
            pool._wake.send(b"")
            time.sleep(0.5)
            dead.conn.close()  # as the sender thread does on a broken pipe
            dead.process.kill()
            dead.process.join(10)
        prompt = engine.prompts.build(engine.prompt_text("ocr"), (1, 4, 4))
        embeddings = np.zeros((prompt.n_image_tokens, engine.weights.config.text_config.hidden_size), np.float32)
        result = pool.submit(GenerationRequest(prompt, embeddings, max_tokens=4, stop_ids=())).result(timeout=120)
        assert len(result.token_ids) == 4  # decoded by the worker that replaced the dead one
        assert pool._workers[0] is not dead and pool.crashes == 1
    finally:
        pool.close()


def zero_request(engine, grid=(1, 4, 4), max_tokens=4):
    """A request with blank image embeddings; its ``grid`` sets its image token count."""
    import numpy as np

    from ocrbatch.model.language import GenerationRequest

    prompt = engine.prompts.build(engine.prompt_text("ocr"), grid)
    embeddings = np.zeros((prompt.n_image_tokens, engine.weights.config.text_config.hidden_size), np.float32)
    return GenerationRequest(prompt, embeddings, max_tokens=max_tokens, stop_ids=())


def wait_until(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_pages_reaching_a_pool_that_crashes_on_each_one_by_one_fail_the_pool_not_the_pages(engine):
    """As one-page vision passes feed the job's pool: the first page crashes alone past its retries before
    the next is encoded. It used to be charged, or retried forever ahead of later pages (a hung run);
    it must wait uncharged until three different pages have crashed alone, which fails the pool."""
    pool = pool_for(engine, segfault_on_every_request_worker_main, workers=2, max_retries=2,
                    lone_crash_wait_s=600)
    try:
        pool.wait_ready(timeout=120)
        first = pool.submit(zero_request(engine))
        wait_until(lambda: pool.crashes >= 3, what="3 lone crashes of the first request")
        time.sleep(2)  # room for more crashes, had the pool kept retrying it
        assert pool.crashes == 3 and not first.done() and pool.pending == 1  # past its retries, not charged
        second = pool.submit(zero_request(engine))
        wait_until(lambda: pool.crashes >= 4, what="the second request's crash")
        assert not first.done() and not second.done()
        third = pool.submit(zero_request(engine))
        for future in (first, second, third):
            error = future.exception(timeout=120)
            assert isinstance(error, PoolFailed) and "crashed on 3 different pages" in str(error), error
    finally:
        pool.close()


def test_a_request_waiting_uncharged_is_charged_once_another_decodes_or_the_pool_has_nothing_else(
        engine, monkeypatch):
    poison = zero_request(engine, grid=(1, 6, 4))
    monkeypatch.setenv("OCRBATCH_TEST_POISON_TOKENS", str(poison.prompt.n_image_tokens))
    pool = pool_for(engine, crashing_worker_main, max_retries=1, lone_crash_wait_s=3)
    try:
        pool.wait_ready(timeout=120)
        charged = pool.submit(poison)
        wait_until(lambda: pool.crashes >= 2, what="2 lone crashes")
        assert not charged.done()
        good = pool.submit(zero_request(engine))
        assert len(good.result(timeout=120).token_ids) == 4
        error = charged.exception(timeout=10)
        assert isinstance(error, WorkerCrashed) and "2 times running this page alone" in str(error)
        # A pool where nothing ever decoded: charged after lone_crash_wait_s with nothing else to run.
        alone = pool_for(engine, segfault_on_every_request_worker_main, max_retries=1, lone_crash_wait_s=3)
        try:
            alone.wait_ready(timeout=120)
            lone = alone.submit(zero_request(engine))
            wait_until(lambda: alone.crashes >= 2, what="2 lone crashes")
            waited_from = time.monotonic()
            error = lone.exception(timeout=60)
            assert isinstance(error, WorkerCrashed) and time.monotonic() - waited_from > 2
        finally:
            alone.close()
    finally:
        pool.close()


def test_close_resolves_every_future(engine):
    import numpy as np

    from ocrbatch.model.language import GenerationRequest

    pool = WorkerPool(engine.gguf_path, workers=1, n_seq_max=1, n_ctx=engine.context_size(1))
    prompt = engine.prompts.build(engine.prompt_text("ocr"), (1, 4, 4))
    embeddings = np.zeros((prompt.n_image_tokens, engine.weights.config.text_config.hidden_size), np.float32)
    futures = [pool.submit(GenerationRequest(prompt, embeddings, max_tokens=8, stop_ids=()))
               for _ in range(3)]
    pool.close()
    assert all(future.done() for future in futures)
    assert all(future.cancelled() or isinstance(future.exception(), PoolFailed) for future in futures)


# -- files still being written -------------------------------------------------------------

def test_files_still_being_written_are_deferred(tmp_path, monkeypatch):
    from ocrbatch.sources import discover as discover_module

    write_pdf(tmp_path / "old.pdf", 1)
    settle(tmp_path)
    write_pdf(tmp_path / "fresh.pdf", 1)
    write_pdf(tmp_path / "growing.pdf", 1)
    os.utime(tmp_path / "growing.pdf", (time.time() - 60, time.time() - 60))
    hash_file = discover_module.hash_file

    def hash_while_it_grows(path):
        digest = hash_file(path)
        if path.name == "growing.pdf":
            with open(path, "ab") as handle:
                handle.write(b"% more bytes arriving\n")
        return digest

    monkeypatch.setattr(discover_module, "hash_file", hash_while_it_grows)
    found = {d.path.name: d for d in discover_module.discover([tmp_path], min_file_age=5)}
    assert found["old.pdf"].doc_id and not found["old.pdf"].deferred
    assert "(--min-file-age 5)" in found["fresh.pdf"].deferred
    assert found["growing.pdf"].deferred == "changed while being read"


@pytest.mark.slow
def test_a_fresh_file_is_picked_up_by_the_next_run(tiny_model, engine, docs, tmp_path):
    write_pdf(docs / "arriving.pdf", 1)
    out = tmp_path / "out.parquet"
    first = run_job(options(tiny_model, [docs], out, min_file_age=30), engine=engine)
    assert first.deferred_files == 1 and first.pages_ok == 6
    assert not any("arriving" in r["path"] for r in read_rows(out))
    settle(docs)
    second = run_job(options(tiny_model, [docs], out, min_file_age=30), engine=engine)
    assert second.pages_ok == 1 and second.pages_skipped == 6
    assert len(read_rows(out)) == 7


# -- signals and kills ---------------------------------------------------------------------

@pytest.fixture
def many_pages(tmp_path):
    return settled_pdfs(tmp_path / "many", 6, 4)


@pytest.mark.slow
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_the_run_cleanly_and_the_next_run_resumes(tiny_model, many_pages, tmp_path, signum, code):
    out = tmp_path / "out.jsonl"
    args = slow_run_args(tiny_model, many_pages, out)
    process = popen(args)
    wait_for_ok_pages(out, process, at_least=2)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    assert "stopped early by a signal" in stderr
    states = page_states(out)
    assert states.get("pending", 0) > 0 and states.get("failed", 0) == 0  # it landed mid-run
    rows = read_rows(out)  # the output was written, with every page finished so far
    assert len(rows) == states["ok"]
    final = cli(*args)
    assert final.returncode == 0, final.stderr
    keys = [(Path(r["path"]).name, r["page"]) for r in read_rows(out)]
    assert len(keys) == len(set(keys)) == 24


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_stays_resumable(tiny_model, docs, tmp_path):
    out = tmp_path / "out.jsonl"
    args = slow_run_args(tiny_model, docs, out, tokens=2000)
    process = popen([*args, "--stop-grace", "300"])
    wait_for_ok_pages(out, process, at_least=1)
    process.send_signal(signal.SIGINT)
    time.sleep(1)
    assert process.poll() is None  # still finishing the page in flight (2000 tokens, 300 s of grace)
    second = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert time.monotonic() - second < 20
    assert "Stopped at once by a second signal" in stderr
    assert page_states(out).get("pending", 0) > 0
    final = cli(*args)
    assert final.returncode == 0, final.stderr
    keys = [(Path(r["path"]).name, r["page"]) for r in read_rows(out)]
    assert len(keys) == len(set(keys)) == 6


@pytest.mark.slow
def test_kill_9_at_20_random_moments_then_every_page_exactly_once(tiny_model, many_pages, tmp_path):
    tokens = 300
    clean_out = tmp_path / "clean.jsonl"
    out = tmp_path / "out.jsonl"
    clean = cli(*slow_run_args(tiny_model, many_pages, clean_out, tokens=tokens))
    assert clean.returncode == 0, clean.stderr
    clean_rows = read_rows(clean_out)
    reference = {(Path(r["path"]).name, r["page"]): (r["status"], r["text"]) for r in clean_rows}
    assert len(reference) == 24
    # How long a worker takes over one page on this machine. Each kill lands at a random moment
    # within the first half of the page after a new one was checkpointed: the next pages are then
    # being decoded whatever the machine's speed, and a run finishes about one page before its kill,
    # so 20 kills do not run out of pages (fixed delays did on fast machines: 8 and 9 kills landed).
    page_s = statistics.median(r["prefill_s"] + r["decode_s"] for r in clean_rows)

    rng = random.Random(20)
    mid_decode = 0
    for _ in range(20):
        before = page_states(out).get("ok", 0) if checkpoint_path_for(out).exists() else 0
        if before == 24:
            break
        process = popen(slow_run_args(tiny_model, many_pages, out, tokens=tokens))
        try:
            wait_for_ok_pages(out, process, at_least=before + 1)  # decoding is under way
            time.sleep(rng.uniform(0, page_s / 2))
        except AssertionError:
            pass  # it finished first; counted as not mid-decode below
        decoding = llama_workers(process)  # llama.cpp workers alive: a page is being decoded
        killed_while_running = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait()
        states = page_states(out)
        if killed_while_running and decoding and states.get("ok", 0) > before and states.get("pending", 0):
            mid_decode += 1
        time.sleep(0.3)  # orphaned workers see their pipe close and exit
    assert mid_decode >= 12, f"only {mid_decode} kills landed mid-decode"
    final = cli(*slow_run_args(tiny_model, many_pages, out, tokens=tokens))
    assert final.returncode == 0, final.stderr
    rows = read_rows(out)
    keys = [(Path(r["path"]).name, r["page"]) for r in rows]
    assert len(keys) == len(set(keys)) == 24
    assert {key: (r["status"], r["text"]) for key, r in zip(keys, rows)} == reference
    assert not list(tmp_path.glob(".out.jsonl.*.partial"))


@pytest.mark.slow
def test_the_run_resuming_a_killed_one_exits_1_over_its_failed_page(tiny_model, docs, tmp_path):
    (docs / "notes.pdf").write_text("not a PDF")
    settle(docs)
    out = tmp_path / "out.jsonl"
    args = slow_run_args(tiny_model, docs, out)
    process = popen(args)
    wait_for_ok_pages(out, process, at_least=1)  # notes.pdf is failed first, before any page decodes
    process.send_signal(signal.SIGKILL)
    process.wait()
    states = page_states(out)
    assert states["failed"] == 1 and states.get("pending", 0) > 0, states
    resumed = cli(*args)
    # This run's pages were all ok, but the output it wrote holds the killed run's failed row.
    assert resumed.returncode == 1, resumed.stderr
    assert "1 failed pages from earlier runs in the output" in resumed.stderr.splitlines()[-1]
    write_pdf(docs / "notes.pdf", 1, text="Notes")  # fixed: its failed row is superseded
    settle(docs)
    fixed = cli(*args)
    assert fixed.returncode == 0, fixed.stderr
    assert all(r["status"] == "ok" for r in read_rows(out)) and len(read_rows(out)) == 7


# -- output failures -----------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs, filled to the last byte."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    filler = mount / "filler"
    with open(filler, "wb", buffering=0) as handle:  # unbuffered: nothing left to fail on close
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError:
            pass
    yield mount, filler
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.slow
def test_a_full_disk_exits_3_and_a_rerun_writes_everything(tiny_model, docs, tmp_path, tiny_disk):
    mount, filler = tiny_disk
    out = mount / "out.jsonl"
    checkpoint = tmp_path / "job.db"
    args = ["run", docs, "--out", out, "--checkpoint", checkpoint, "--model", tiny_model, "--quant", "F32",
            "--max-tokens", "6", "--dpi", "72", "--layout", "none"]
    failed = cli(*args)
    assert failed.returncode == 3, failed.stderr
    assert "cannot write the output (No space left on device); the checkpoint is intact" in failed.stderr
    with sqlite3.connect(checkpoint) as db:
        states = dict(db.execute("SELECT status, count(*) FROM pages GROUP BY status").fetchall())
    # The first write failed: what was finished is in the checkpoint, the rest still pending.
    done = states.get("ok", 0)
    assert done >= 1 and "failed" not in states and done + states.get("pending", 0) == 6
    assert not out.exists()
    filler.unlink()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    # Nothing decoded twice: the re-run does only the pending pages and writes all six.
    assert f"{6 - done} pages processed ({6 - done} ok, 0 failed), {done} already done" in again.stderr
    assert len(read_rows(out)) == 6
