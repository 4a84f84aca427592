"""``--engine ray``: the Parquet dataset as the record, and the job on a real two-node Ray cluster."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import document_image, write_pdf
from helpers import job_options as base_options  # test_ray's job_options adds the Ray tests' defaults

from ocrbatch.engines.local import JobOptions
from ocrbatch.errors import OcrbatchError
from ocrbatch.records.dataset import DatasetRecord
from ocrbatch.records.output import COLUMNS

TESTS = Path(__file__).parent
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def row(doc_id: str, page: int, status: str = "ok", path: str | None = None, minutes: int = 0, **extra) -> dict:
    return {"path": path or f"/docs/{doc_id}.pdf", "doc_id": doc_id, "page": page, "page_count": 3,
            "status": status, "error": None if status == "ok" else f"/docs/{doc_id}.pdf page {page}: broke",
            "text": f"{doc_id}-{page}-{status}", "created_at": T0 + timedelta(minutes=minutes), **extra}


def visible_rows(folder: Path) -> list[dict]:
    """What a plain reader of the dataset sees: every row of every file, duplicates included."""
    import pyarrow.dataset as ds

    return ds.dataset(folder, format="parquet").to_table().to_pylist()


def keys(rows) -> list[tuple[str, int]]:
    return sorted((r["doc_id"], r["page"]) for r in rows)


# -- the dataset as the record (no Ray) --------------------------------------------------------


def test_files_are_written_whole_and_readers_see_exactly_the_output_columns(tmp_path):
    import duckdb

    record = DatasetRecord(tmp_path / "out", {"task": "ocr"})
    record.write([row("a", 1), row("a", 2, "failed")], "part-1-00001.parquet")
    record.write([row("b", 1)], "part-1-00002.parquet")
    # What a writer killed mid-file leaves, and files that are not the dataset's.
    (record.folder / ".part-1-00003.parquet.123.tmp").write_bytes(b"PAR1 half a file")
    (record.folder / "_SUCCESS").write_text("")
    assert [f.name for f in record.files()] == ["part-1-00001.parquet", "part-1-00002.parquet"]
    [(count, failed)] = duckdb.sql(
        f"SELECT count(*), count(*) FILTER (WHERE status = 'failed') FROM read_parquet('{record.folder}/*.parquet')"
    ).fetchall()
    assert (count, failed) == (3, 1)
    rows = visible_rows(record.folder)
    assert list(rows[0]) == COLUMNS and len(rows) == 3
    with pytest.raises(OcrbatchError, match="never overwritten"):
        record.write([row("c", 1)], "part-1-00001.parquet")


def test_one_run_at_a_time_writes_a_dataset_folder(tmp_path):
    from ocrbatch.records.lock import JobLocked

    with DatasetRecord(tmp_path / "out").lock():
        with pytest.raises(JobLocked, match="another ocrbatch run"):
            with DatasetRecord(tmp_path / "out").lock():
                pass
    (tmp_path / "results.parquet").write_bytes(b"a local engine's file")
    with pytest.raises(OcrbatchError, match="not a folder"):
        with DatasetRecord(tmp_path / "results.parquet").lock():
            pass


def test_a_write_that_fails_leaves_no_file(tmp_path):
    record = DatasetRecord(tmp_path)
    with pytest.raises(pa.ArrowInvalid):
        record.write([row("a", 1, page_count="three")], "part-1-00001.parquet")
    assert list(tmp_path.iterdir()) == []


def test_recover_keeps_one_row_per_page_ok_over_failed_then_newest(tmp_path):
    record = DatasetRecord(tmp_path)
    record.write([row("a", 1, "ok", minutes=0), row("a", 2, "failed", minutes=0), row("a", 3, minutes=0)],
                 "part-1-00001.parquet")
    record.write([row("a", 1, "failed", minutes=5), row("a", 2, "failed", minutes=5)], "part-2-00001.parquet")
    record.write([row("a", 3, "ok", minutes=9)], "part-3-00001.parquet")
    (tmp_path / ".part-4-00001.parquet.99.tmp").write_bytes(b"partial")
    best = record.index()
    assert best[("a", 1)].created_at == T0  # ok beats a newer failure
    assert best[("a", 2)].created_at == T0 + timedelta(minutes=5)  # among failures, the newest
    assert best[("a", 3)].created_at == T0 + timedelta(minutes=9)
    assert record.table().num_rows == 3  # the de-duplicated view, before any repair

    assert record.recover() == 3
    rows = visible_rows(tmp_path)
    assert keys(rows) == [("a", 1), ("a", 2), ("a", 3)]
    assert {(r["page"], r["status"], r["created_at"]) for r in rows} == {
        (1, "ok", T0), (2, "failed", T0 + timedelta(minutes=5)), (3, "ok", T0 + timedelta(minutes=9))}
    assert [f.name for f in record.files()] == ["part-1-00001.parquet", "part-2-00001.parquet",
                                                 "part-3-00001.parquet"]
    assert not list(tmp_path.glob(".*.tmp"))
    assert record.recover() == 0


def test_a_crash_in_compaction_leaves_copies_that_recover_removes(tmp_path, monkeypatch):
    record = DatasetRecord(tmp_path)
    record.write([row("a", 1), row("a", 2)], "part-r1-00001.parquet")
    record.write([row("b", 1, "failed")], "part-r1-00002.parquet")
    record.write([row("c", 1)], "run-r0.parquet")

    unlink = Path.unlink

    def crash(self, missing_ok=False):
        if self.name.startswith("part-"):  # killed after the merged file was renamed into place
            raise KeyboardInterrupt
        unlink(self, missing_ok)
    monkeypatch.setattr(Path, "unlink", crash)
    with pytest.raises(KeyboardInterrupt):
        record.compact("r1")
    monkeypatch.undo()
    assert len(visible_rows(tmp_path)) == 3 + 3 + 1  # every part row twice, never zero times
    assert record.recover() == 3
    assert [f.name for f in record.files()] == ["run-r0.parquet", "run-r1.parquet"]
    assert keys(visible_rows(tmp_path)) == [("a", 1), ("a", 2), ("b", 1), ("c", 1)]


def test_compaction_merges_every_part_into_one_sorted_file(tmp_path):
    record = DatasetRecord(tmp_path, {"task": "ocr", "quant": "F32"})
    record.write([row("b", 2), row("b", 1)], "part-r1-00001.parquet")  # a killed run's
    record.write([row("a", 1)], "part-r2-00001.parquet")
    assert record.compact("r2") == tmp_path / "run-r2.parquet"
    assert [f.name for f in record.files()] == ["run-r2.parquet"]
    assert [(r["path"], r["page"]) for r in visible_rows(tmp_path)] == [
        ("/docs/a.pdf", 1), ("/docs/b.pdf", 1), ("/docs/b.pdf", 2)]
    assert record.stored_settings() == {"task": "ocr", "quant": "F32"}
    assert record.compact("r3") is None


def test_reconcile_follows_moves_and_edits_and_retries(tmp_path):
    record = DatasetRecord(tmp_path)
    record.write([row("moved", 1, path="/old/place.pdf"), row("moved", 2, "failed", path="/old/place.pdf"),
                  row("edited", 1, path="/docs/report.pdf"), row("gone", 1, path="/docs/deleted.pdf"),
                  row("flaky", 1, "failed"), row("flaky", 2)], "part-1-00001.parquet")
    record.write([row("edited", 2, path="/docs/report.pdf")], "part-1-00002.parquet")
    current = {"moved": "/new/place.pdf", "edited-v2": "/docs/report.pdf", "flaky": "/docs/flaky.pdf"}

    before = {file: file.read_bytes() for file in record.files()}
    preview = record.reconcile(current, retry_ids={"flaky"}, apply=False)
    assert {file: file.read_bytes() for file in record.files()} == before  # a dry run changes nothing
    changes, remaining = record.reconcile(current, retry_ids={"flaky"})
    assert (changes, remaining) == preview
    assert changes == {"moved": 2, "superseded": 2, "retried": 1}
    assert sorted((e.doc_id, e.page, e.path) for e in remaining) == [
        ("flaky", 2, "/docs/flaky.pdf"), ("gone", 1, "/docs/deleted.pdf"), ("moved", 1, "/new/place.pdf"),
        ("moved", 2, "/new/place.pdf")]
    rows = {(r["doc_id"], r["page"]): r for r in visible_rows(tmp_path)}
    assert set(rows) == {("moved", 1), ("moved", 2), ("gone", 1), ("flaky", 2)}
    assert rows[("moved", 1)]["path"] == rows[("moved", 2)]["path"] == "/new/place.pdf"
    assert rows[("moved", 2)]["status"] == "failed"  # only retried documents lose their failures
    assert rows[("gone", 1)]["path"] == "/docs/deleted.pdf"  # not found now: kept, as the local engine does
    assert rows[("moved", 1)]["text"] == "moved-1-ok"
    assert [f.name for f in record.files()] == ["part-1-00001.parquet"]  # the emptied file is gone
    assert record.reconcile(current, retry_ids={"flaky"})[0] == {}


def test_status_counts_and_failed_pages(tmp_path):
    record = DatasetRecord(tmp_path)
    record.write([row("a", 1), row("a", 2), row("a", 3, "failed"), row("b", 1, "failed"), row("b", 2)],
                 "part-1-00001.parquet")
    record.write([row("b", 1, "failed", minutes=1)], "part-2-00001.parquet")  # a duplicate counts once
    assert record.counts() == {"pages": {"ok": 3, "failed": 2}, "documents": {"ok": 2}}
    assert record.counts(max_page_error_rate=0.4) == {"pages": {"ok": 3, "failed": 2},
                                                      "documents": {"ok": 1, "failed": 1}}
    assert record.failed_pages() == [("/docs/a.pdf", 3, "/docs/a.pdf page 3: broke"),
                                     ("/docs/b.pdf", 1, "/docs/b.pdf page 1: broke")]


def test_a_dataset_made_with_other_settings_is_refused(tmp_path):
    DatasetRecord(tmp_path, {"model": "m", "quant": "F32"}).write([row("a", 1)], "part-1-00001.parquet")
    DatasetRecord(tmp_path).check_settings({"model": "m", "quant": "F32"})
    with pytest.raises(OcrbatchError, match="made with quant=F32, not Q4_K_M"):
        DatasetRecord(tmp_path).check_settings({"model": "m", "quant": "Q4_K_M"})


def test_plan_skips_finished_pages_and_a_dry_run_changes_nothing(tmp_path):
    from ocrbatch.job.plan import plan_dataset
    from ocrbatch.sources.discover import hash_file

    docs = tmp_path / "docs"
    docs.mkdir()
    write_pdf(docs / "a.pdf", 3)
    write_pdf(docs / "b.pdf", 2, text="Other")
    (docs / "zero.png").write_bytes(b"")
    a = hash_file(docs / "a.pdf")
    record = DatasetRecord(tmp_path / "out")
    record.write([row(a, 1, path=str(docs / "a.pdf")), row(a, 2, "failed", path=str(docs / "before-a-move.pdf"))],
                 "part-1-00001.parquet")
    before = {file: file.read_bytes() for file in record.files()}

    plan = plan_dataset(JobOptions(paths=[docs], out=record.folder, min_file_age=60), record, dry_run=True)
    assert (plan.manifest, plan.unreadable, plan.deferred) == ([], [], 3)  # all three were written just now

    # --retry-failed takes up only the documents with a failed page, as the local engine does: a's failed and
    # pending pages, not b (never run) nor the empty file.
    plan = plan_dataset(JobOptions(paths=[docs], out=record.folder, retry_failed=True, min_file_age=0), record,
                      dry_run=True)
    assert sorted((Path(i["path"]).name, i["page"], i["page_count"]) for i in plan.manifest) == [
        ("a.pdf", 2, 3), ("a.pdf", 3, 3)]
    assert (plan.unreadable, plan.skipped, plan.documents) == ([], 1, 1)  # a's page 1 (the failed page 2 is redone)
    assert {file: file.read_bytes() for file in record.files()} == before

    plan = plan_dataset(JobOptions(paths=[docs], out=record.folder, min_file_age=0), record)  # no retry: it stands
    assert sorted((Path(i["path"]).name, i["page"]) for i in plan.manifest) == [("a.pdf", 3), ("b.pdf", 1),
                                                                                ("b.pdf", 2)]
    assert [(d.path.name, error) for d, error in plan.unreadable] == [("zero.png", f"{docs / 'zero.png'}: empty "
                                                                                   "file (0 bytes)")]
    assert (plan.skipped, plan.documents) == (2, 3)
    assert {r["path"] for r in visible_rows(record.folder)} == {str(docs / "a.pdf")}  # the move was applied


def test_the_command_line_gives_the_ray_engine_layout_and_text_layers(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ocrbatch.cli.main import main
    from ocrbatch.job import plan as planner

    asked = []

    def plan_dataset(options, record, dry_run):
        asked.append((options.layout, options.pdf_text))
        return planner.DatasetPlan()

    monkeypatch.setattr(planner, "plan_dataset", plan_dataset)
    run = ["run", str(tmp_path), "--out", str(tmp_path / "out"), "--engine", "ray", "--dry-run"]
    for extra in ([], ["--layout", "pp-doclayout", "--pdf-text", "auto"]):
        result = CliRunner().invoke(main, run + extra)
        assert result.exit_code == 0, result.output
    assert asked == [("cdla", "never"), ("pp-doclayout", "auto")]  # the local engine's defaults, and as asked


def test_the_command_line_lays_out_the_actors_as_asked(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ocrbatch.cli.main import main
    from ocrbatch.engines import ray as ray_engine

    asked = []

    def run_ray_job(options, address=None, settings=None):
        asked.append((address, settings, options.workers, options.seqs_per_worker))
        return ray_engine.RayJobSummary()

    monkeypatch.setattr(ray_engine, "run_ray_job", run_ray_job)
    run = ["run", str(tmp_path), "--out", str(tmp_path / "out"), "--engine", "ray", "--workers", "3",
           "--seqs-per-worker", "5"]
    extra = ["--ray-address", "auto", "--ray-vision-actors", "2", "--ray-vision-cpus", "4", "--ray-vision-gpus",
             "0.5", "--ray-decode-cpus", "2"]
    for arguments in (run, run + extra):
        result = CliRunner().invoke(main, arguments)
        assert result.exit_code == 0, result.output
    default, chosen = asked
    assert default == (None, ray_engine.RaySettings(), 3, 5)
    assert chosen == ("auto", ray_engine.RaySettings(vision_actors=2, vision_cpus=4, vision_gpus=0.5, decode_cpus=2),
                      3, 5)


def test_without_ray_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    from ocrbatch.engines.ray import run_ray_job

    monkeypatch.setitem(sys.modules, "ray", None)  # as if it were not installed
    with pytest.raises(OcrbatchError, match=r"pip install 'ocrbatch\[ray\]'"):
        run_ray_job(JobOptions(paths=[tmp_path], out=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# -- the job on Ray --------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def loopback_ray():
    """Ray on this machine's loopback only, reporting nothing to its makers.

    Without the first setting Ray advertises the machine's network address. Both are read by
    Ray's processes when they start, and inherited by the subprocesses the tests start.
    """
    settings = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    yield
    for name, value in saved.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def cluster(loopback_ray):
    """A real Ray cluster of two nodes (two raylets, 2 logical CPUs each) on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 150 << 20,
                                                            "include_dashboard": False})
    cluster.add_node(num_cpus=2, object_store_memory=150 << 20)
    cluster.wait_for_nodes()
    yield cluster
    ray_processes = ray_processes_of(os.getpid())
    cluster.shutdown()
    end(ray_processes)


def ray_processes_of(pid: int) -> list:
    """The Ray processes below ``pid``: its raylets, GCS, agents and workers."""
    import psutil

    found = []
    for process in psutil.Process(pid).children(recursive=True):
        try:
            if "ray" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.NoSuchProcess:
            pass
    return found


def end(processes, grace_s: float = 5.0) -> None:
    """Kill what is left of ``processes``: workers can outlive raylets that are stopped first."""
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass


# The job as the Ray tests run it: two decode actors of two sequences, pages two to a vision batch.
job_options = partial(base_options, max_tokens=8, workers=2, seqs_per_worker=2, batch_size=2, dpi=72, max_retries=1)

def setup_worker():
    """Ray worker setup hook, one for every test (Ray refuses a second hook in a driver): $OCRBATCH_TEST_HOOK picks.

    ``poison``: a decode actor dies, as in a llama.cpp abort, on a batch with a 'poison' page;
    ``slow_vision``: each forward pass of the vision encoder takes 2 s longer, as a real-size one does.
    """
    from ocrbatch.engines import ray as ray_engine
    from ocrbatch.job import encode

    hook = os.environ.get("OCRBATCH_TEST_HOOK")
    if hook == "poison":
        decode_rows = ray_engine.decode_rows

        def poisoned(stage, rows):
            if any("poison" in row["path"] for row in rows):
                os._exit(1)
            return decode_rows(stage, rows)

        ray_engine.decode_rows = poisoned
    elif hook == "slow_vision":
        encode_images = encode._encode_images

        def slowed(vision, images, bounds):
            time.sleep(2)
            return encode_images(vision, images, bounds)

        encode._encode_images = slowed


def hook_env(hook: str) -> dict:
    """The runtime_env that runs :func:`setup_worker` as ``hook``: this module, imported by each Ray worker
    from this folder, with the tests' shared helpers beside it."""
    path = os.pathsep.join([str(TESTS), str(TESTS.parent)])
    return {"env_vars": {"PYTHONPATH": path, "OCRBATCH_TEST_HOOK": hook},
            "worker_process_setup_hook": "test_ray.setup_worker"}


POISON_ENV = hook_env("poison")
SLOW_VISION_ENV = hook_env("slow_vision")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The sample documents and scans of two, bad files, and a good image that kills decode actors when poisoned.

    The sample PDFs are born-digital, so with ``--pdf-text auto`` they come from their text layers;
    the scans of the purchase order (a table) and the two-column article go through layout and the model.
    """
    import pymupdf

    from ocrbatch.dev.samples import make_samples

    folder = tmp_path_factory.mktemp("inputs")
    make_samples(folder)
    for name in ("purchase-order-table", "two-column-article"):
        with pymupdf.open(folder / f"{name}.pdf") as pdf:
            pdf[0].get_pixmap(dpi=110).save(folder / f"{name}-scan.png")
    write_pdf(folder / "long.pdf", 6)  # enough pages that every actor of a pool gets some
    (folder / "corrupt.pdf").write_bytes(b"%PDF-1.4\n" + os.urandom(300))
    (folder / "zero.png").write_bytes(b"")
    truncated = folder / "truncated.png"
    document_image(300, 300, 9).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:400])
    document_image(280, 200, 11).save(folder / "poison.png")
    bad = {"corrupt.pdf": "not a readable PDF", "zero.png": "empty file (0 bytes)",
           "truncated.png": "corrupt or truncated image"}
    return folder, bad


def expected_tokens(engine, rows, max_tokens: int) -> dict:
    """The local engine's token ids for each ok row's page, rendered the same way."""
    from ocrbatch.sources.discover import Document
    from ocrbatch.sources.rasterize import iter_pages

    longest = engine.vision.image_processor.size.longest_edge
    expected = {}
    for r in rows:
        [page] = iter_pages(Document(Path(r["path"]), r["doc_id"]), [r["page"]], 72, longest)
        [result] = engine.ocr([page.image], max_tokens=max_tokens)
        expected[(r["path"], r["page"])] = (result.token_ids, result.text)
    return expected


def comparable(rows) -> dict:
    """What a page's row says, by ``(path, page)``, without timings, dates and the wording of errors."""
    return {(r["path"], r["page"]): (r["status"], r["source"], r["text"],
                                     [(b["label"], b["prompt"], b["text"]) for b in r["blocks"] or []])
            for r in rows}


@pytest.mark.slow
def test_two_node_cluster_run_with_layout_and_text_layers_matches_the_local_engine(cluster, tiny_model, inputs,
                                                                                  tmp_path):
    from ocrbatch.engines.local import run_job
    from ocrbatch.engines.ray import RaySettings, run_ray_job
    from ocrbatch.sources.discover import discover
    from ocrbatch.sources.rasterize import count_pages

    folder, bad = inputs
    out = tmp_path / "dataset"
    mode = dict(layout="cdla", pdf_text="auto")
    options = job_options(tiny_model, [folder], out, **mode)
    settings = RaySettings(vision_actors=2, decode_actors=2, runtime_env=POISON_ENV)
    seen = []
    summary = run_ray_job(options, address=cluster.address, settings=settings, on_row=seen.append)

    # Both pools worked on both nodes: every row names the node of each of its stages.
    cluster_nodes = {node.node_id for node in cluster.list_all_nodes()}
    assert len(cluster_nodes) == 2
    assert set(summary.nodes["vision"]) == set(summary.nodes["decode"]) == cluster_nodes, summary.nodes

    rows = visible_rows(out)
    by_name = {}
    for r in rows:
        by_name.setdefault(Path(r["path"]).name, []).append(r)
    pages = {d.path.name: count_pages(d) for d in discover([folder]) if d.path.name not in bad}
    assert len(rows) == len(seen) == sum(pages.values()) + len(bad)
    assert len({(r["path"], r["page"]) for r in rows}) == len(rows)
    for name, reason in bad.items():
        [failed] = by_name[name]
        assert failed["status"] == "failed" and reason in failed["error"] and name in failed["error"], failed
    [poisoned] = by_name["poison.png"]
    assert poisoned["status"] == "failed" and "lost with its Ray actor, also when run alone" in poisoned["error"]
    assert summary.lost_pages >= 1

    ok = [r for r in seen if r["status"] == "ok"]
    assert {Path(r["path"]).name for r in ok} == set(pages) - {"poison.png"}
    assert all(r["page_count"] == pages[Path(r["path"]).name] for r in ok)
    # The born-digital PDFs came from their text layers, the images through layout and the model.
    assert {r["source"] for r in ok if r["path"].endswith(".pdf")} == {"text-layer"}
    assert summary.pages_text_layer == sum(count for name, count in pages.items() if name.endswith(".pdf"))
    [order] = by_name["purchase-order-table-scan.png"]
    assert [b["prompt"] for b in order["blocks"] if b["label"] == "table"] == ["Table Recognition:"]
    [article] = by_name["two-column-article-scan.png"]
    assert len(article["blocks"]) > 5
    # Layout pages keep their size (110 dpi): the model's pixel cap is for whole pages only.
    assert (article["width"], article["height"]) == (935, 1210)
    for r in ok:
        if r["source"] == "model":  # the page's generated ids are its blocks', in reading order
            assert len(r["token_ids"]) == r["n_output_tokens"] == sum(b["n_output_tokens"] for b in r["blocks"]) > 0

    before = {(r["path"], r["page"]): r for r in rows}
    retried = run_ray_job(job_options(tiny_model, [folder], out, retry_failed=True, **mode), address=cluster.address,
                          settings=RaySettings(vision_actors=2, decode_actors=2))
    # Every failed page was tried again: the poisoned one now decodes, the bad files fail again.
    assert (retried.pages_ok, retried.pages_failed) == (1, len(bad))
    assert retried.pages_skipped == len(rows) - len(bad) - 1
    after = {(r["path"], r["page"]): r for r in visible_rows(out)}
    assert after.keys() == before.keys()
    for key, r in after.items():
        if before[key]["status"] == "ok":
            assert r["created_at"] == before[key]["created_at"]  # not redone
        else:
            assert r["created_at"] > before[key]["created_at"]
    assert after[(poisoned["path"], poisoned["page"])]["status"] == "ok"
    assert DatasetRecord(out).counts()["pages"] == {"ok": len(rows) - len(bad), "failed": len(bad)}

    # The same rows as the local engine's, page for page and block for block.
    local = tmp_path / "local.parquet"
    run_job(job_options(tiny_model, [folder], local, **mode))
    assert comparable(after.values()) == comparable(pq.read_table(local).to_pylist())

    # The dataset belongs to its layout, as a checkpoint does.
    with pytest.raises(OcrbatchError, match="made with layout=cdla, not none"):
        run_ray_job(job_options(tiny_model, [folder], out, layout="none"))
    with pytest.raises(OcrbatchError, match="made with stitch=on, not off"):
        run_ray_job(job_options(tiny_model, [folder], out, **{**mode, "stitch": False}))


@pytest.mark.slow
def test_a_page_decodes_as_soon_as_it_is_encoded_not_after_its_vision_batch(cluster, tiny_model, tmp_path):
    from ocrbatch.engines.ray import RaySettings, run_ray_job

    for number in range(4):
        document_image(280, 200, number).save(tmp_path / f"{number}.png")
    # One vision batch of the four pages, one forward pass each (2 s, see setup_worker).
    options = job_options(tiny_model, [tmp_path], tmp_path / "out", layout="none", batch_size=4, max_batch_patches=1)
    seen = []
    summary = run_ray_job(options, address=cluster.address, on_row=seen.append,
                          settings=RaySettings(vision_actors=1, decode_actors=1, runtime_env=SLOW_VISION_ENV))
    assert summary.pages_ok == 4
    seen.sort(key=lambda r: r["encoded_at"])
    assert [r["encoded_at"] - seen[0]["encoded_at"] for r in seen][1:] >= [1.9, 3.8, 5.7]  # one pass after another
    # The first page was decoded while the batch's last page was still to be encoded.
    assert seen[0]["decoded_at"] < seen[-1]["encoded_at"] - 2, seen


@pytest.mark.slow
def test_an_actor_that_cannot_start_fails_the_run_with_its_reason(cluster, tiny_model, tmp_path):
    from ocrbatch.engines.ray import RaySettings, run_ray_job

    write_pdf(tmp_path / "a.pdf", 1)
    options = job_options(tiny_model, [tmp_path / "a.pdf"], tmp_path / "out", vision_dtype="int8", device="cuda")
    with pytest.raises(OcrbatchError, match="the Ray job failed: .*int8 vision runs on the CPU only"):
        run_ray_job(options, address=cluster.address, settings=RaySettings(actor_start_timeout_s=120))
    assert DatasetRecord(tmp_path / "out").files() == []


def test_a_file_name_that_is_not_utf8_is_read_and_recorded_escaped(cluster, tiny_model, tmp_path):
    from ocrbatch.engines.ray import RaySettings, run_ray_job
    from ocrbatch.sources.discover import unescaped

    docs = tmp_path / "docs"
    docs.mkdir()
    odd = docs / os.fsdecode(b"bad\xff name.pdf")
    write_pdf(docs / "renamed.pdf", 2)  # PyMuPDF cannot save under such a name
    os.rename(docs / "renamed.pdf", odd)
    write_pdf(docs / "good.pdf", 1, text="Other")
    summary = run_ray_job(job_options(tiny_model, [docs], tmp_path / "out", layout="none"), address=cluster.address,
                          settings=RaySettings(actor_start_timeout_s=120))
    assert summary.pages_ok == 3 and summary.pages_failed == 0
    rows = visible_rows(tmp_path / "out")
    assert sorted((r["path"], r["page"], r["status"]) for r in rows) == [
        (f"{docs}/bad\\xff name.pdf", 1, "ok"), (f"{docs}/bad\\xff name.pdf", 2, "ok"), (f"{docs}/good.pdf", 1, "ok")]
    assert {unescaped(r["path"]) for r in rows} == {odd, docs / "good.pdf"}  # the bytes come back exactly


def test_a_node_copy_of_model_files_is_whole_made_once_and_follows_the_drivers_files(cluster, tmp_path, monkeypatch):
    import ray

    from ocrbatch.engines import ray_files
    from ocrbatch.engines.ray_files import FileSet, local_copy, start_file_server

    monkeypatch.setattr(ray_files, "CHUNK_BYTES", 1000)  # several chunks a file
    model = tmp_path / "model"
    (model / "sub").mkdir(parents=True)
    (model / "weights.bin").write_bytes(os.urandom(4500))
    (model / "sub" / "config.json").write_text('{"a": 1}')
    (model / "empty.txt").write_bytes(b"")
    files = FileSet.of(model)
    assert files.visible_here()  # the driver's own node sees its files
    ray.init(address=cluster.address)
    try:
        server = start_file_server(ray, [files])
        cache = tmp_path / "node-cache"
        assert local_copy(files, server, cache) == model  # seen in place: nothing copied
        assert not cache.exists()
        copy = local_copy(files, server, cache, always_copy=True)
        assert copy.parent.parent == cache and copy.name == "model"
        for name in ("weights.bin", "sub/config.json", "empty.txt"):
            assert (copy / name).read_bytes() == (model / name).read_bytes(), name
        made = (copy / "weights.bin").stat().st_mtime_ns
        assert local_copy(files, server, cache, always_copy=True) == copy  # the node's copy is used again
        assert (copy / "weights.bin").stat().st_mtime_ns == made
        with pytest.raises(PermissionError, match="not a model file of this job"):
            ray.get(server.read.remote(str(tmp_path / "elsewhere"), 0, 10))

        (model / "weights.bin").write_bytes(os.urandom(3000))  # the model changed on the driver
        assert not files.visible_here()  # the old listing no longer matches what is there
        changed = FileSet.of(model)
        assert changed.key != files.key
        server = start_file_server(ray, [changed])
        fresh = local_copy(changed, server, cache, always_copy=True)
        assert fresh != copy and (fresh / "weights.bin").read_bytes() == (model / "weights.bin").read_bytes()
        assert not list(cache.glob("*/.partial-*"))  # no half-made copy is left behind
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_actors_run_from_their_nodes_copy_of_the_model_files(cluster, tiny_model, tmp_path):
    """With the copy forced, every actor loads the checkpoint and the GGUF from its node's cache, as on a cluster
    without a shared disk; the copies are the driver's bytes, and the pages read as without copying."""
    from ocrbatch.engines.ray import RaySettings, run_ray_job
    from ocrbatch.model.gguf import convert

    docs = tmp_path / "docs"
    docs.mkdir()
    for n in range(3):
        document_image(240, 160, n + 1).save(docs / f"scan{n}.png")
    cache = tmp_path / "node-cache"
    settings = RaySettings(actor_start_timeout_s=120, node_cache=str(cache), always_copy_models=True)
    summary = run_ray_job(job_options(tiny_model, [docs], tmp_path / "out", layout="none"), address=cluster.address,
                          settings=settings)
    assert summary.pages_ok == 3 and summary.pages_failed == 0
    copies = {marker.parent for marker in cache.glob("*/.complete")}
    assert len(copies) == 2  # the model folder and the GGUF, one copy each on this machine's "nodes"
    [gguf] = [folder / f.name for folder in copies for f in folder.iterdir() if f.suffix == ".gguf"]
    [checkpoint] = [folder / f.name for folder in copies for f in folder.iterdir() if f.is_dir()]
    assert (checkpoint / "config.json").read_bytes() == (Path(tiny_model) / "config.json").read_bytes()
    plain = run_ray_job(job_options(tiny_model, [docs], tmp_path / "plain", layout="none"), address=cluster.address,
                        settings=RaySettings(actor_start_timeout_s=120))
    assert plain.pages_ok == 3
    assert comparable(visible_rows(tmp_path / "out")) == comparable(visible_rows(tmp_path / "plain"))
    assert filecmp.cmp(gguf, convert(tiny_model, "F32"), shallow=False)  # the GGUF the driver converted


@pytest.fixture(scope="module")
def s3_store():
    """A real S3 API on loopback (moto's server) and the storage options that reach it.

    The credentials travel as storage options, not environment variables: the cluster's raylets,
    started first, would not pass later variables on to the actors.
    """
    moto_server = pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    yield options, s3fs.S3FileSystem(**options, skip_instance_cache=True)
    server.stop()


@pytest.mark.slow
def test_a_bucket_inbox_into_a_bucket_dataset_on_two_nodes_equals_the_job_on_local_folders(cluster, tiny_model,
                                                                                          s3_store, tmp_path):
    """Documents read from a bucket by the actors and the dataset written whole into a bucket: the same rows
    as the same job on local folders; a re-run finds everything done; a missing bucket stops before any write."""
    from ocrbatch.engines.ray import RaySettings, run_ray_job
    from ocrbatch.storage import ObjectPath, StorageError

    options, fs = s3_store
    docs = tmp_path / "docs"
    (docs / "scans").mkdir(parents=True)
    write_pdf(docs / "letter.pdf", 2, text="Letter")
    document_image(300, 200, 3).save(docs / "scans" / "receipt.png")
    document_image(200, 320, 4).save(docs / "scans" / "note.jpg")
    fs.mkdir("ray-inbox")
    fs.mkdir("ray-results")
    for path in docs.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"ray-inbox/in/{path.relative_to(docs).as_posix()}")
    inbox, results = ObjectPath.of("s3://ray-inbox/in", options), ObjectPath.of("s3://ray-results/ocr/", options)
    settings = RaySettings(actor_start_timeout_s=120)
    summary = run_ray_job(job_options(tiny_model, [inbox], results, layout="none"), address=cluster.address,
                          settings=settings)
    assert summary.pages_ok == 4 and summary.pages_failed == 0
    local = run_ray_job(job_options(tiny_model, [docs], tmp_path / "local", layout="none"), address=cluster.address,
                        settings=settings)
    assert local.pages_ok == 4

    fs.invalidate_cache()
    files = [key for key in fs.find("ray-results/ocr") if key.endswith(".parquet")]
    assert files and all(key.rsplit("/", 1)[1].startswith("run-") for key in files)  # compacted, parts gone
    in_bucket = [row for key in files for row in pq.read_table(fs.open(key, "rb")).to_pylist()]

    def by_relative_path(rows, root):
        return {(r["path"][len(root):].lstrip("/"), r["page"]): (r["status"], r["text"], r["doc_id"]) for r in rows}

    assert len(in_bucket) == 4
    assert by_relative_path(in_bucket, "s3://ray-inbox/in") == by_relative_path(visible_rows(tmp_path / "local"),
                                                                               str(docs))
    again = run_ray_job(job_options(tiny_model, [inbox], results, layout="none"), address=cluster.address,
                        settings=settings)
    assert again.pages_skipped == 4 and again.pages_ok == 0
    from click.testing import CliRunner

    from ocrbatch.cli.main import main

    storage = [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]
    status = CliRunner().invoke(main, ["status", "s3://ray-results/ocr/", *storage])
    assert status.exit_code == 0 and "pages: 4 ok" in status.output, status.output

    missing = ObjectPath.of("s3://no-such-bucket/ocr/", options)
    with pytest.raises(StorageError, match="bucket 'no-such-bucket': no such bucket"):
        run_ray_job(job_options(tiny_model, [inbox], missing, layout="none"), address=cluster.address,
                    settings=settings)


def test_a_dry_run_on_a_missing_bucket_is_fatal_naming_it(s3_store, tiny_model, tmp_path):
    from click.testing import CliRunner

    from ocrbatch.cli.main import main

    options, fs = s3_store
    fs.mkdir("dry-inbox")
    fs.pipe("dry-inbox/in/a.png", b"not looked at")
    storage = [arg for key, value in options.items() for arg in ("--storage-option", f"{key}={value}")]
    result = CliRunner().invoke(main, ["run", "s3://dry-inbox/in", "--out", "s3://no-such-dataset/ocr/", "--engine",
                                       "ray", "--model", str(tiny_model), "--dry-run", *storage])
    assert result.exit_code == 3, result.output
    assert "bucket 'no-such-dataset': no such bucket" in result.output


# -- the job on Ray in front of a model server (--backend openai) -----------------------------------


# Whole pages' bounds the stub server reports: far below a real model's, so a page sent within them shows that
# each actor took them from the server, as the local engine does, and not the client's defaults.
SERVER_PIXEL_BOUNDS = (784, 150000)
# Timings and dates differ from run to run; the planner's words for an unreadable file are its own.
UNCOMPARED = {"render_s", "vision_s", "prefill_s", "decode_s", "layout_s", "created_at", "error"}


def same_columns(rows) -> dict:
    """Each page's row by ``(path, page)``, every column but :data:`UNCOMPARED` (blocks with their boxes and text;
    no blocks or spots are an empty list in the local engine's file, none in the dataset's)."""
    return {(r["path"], r["page"]): {k: [] if v is None and k in ("blocks", "spots") else v for k, v in r.items()
                                     if k in COLUMNS and k not in UNCOMPARED}
            for r in rows}


def test_the_ray_engine_takes_a_model_server_and_needs_its_address(tmp_path):
    from ocrbatch.job.options import OptionError

    JobOptions(paths=[tmp_path], out=tmp_path, backend="openai", base_url="http://127.0.0.1:9/v1").validate("ray")
    with pytest.raises(OptionError, match="needs the server's address") as raised:
        JobOptions(paths=[tmp_path], out=tmp_path, backend="openai").validate("ray")
    assert raised.value.option == "--base-url"


def test_an_unreachable_server_stops_the_ray_run_with_every_page_left_to_do(tmp_path):
    from click.testing import CliRunner
    from helpers import free_port

    from ocrbatch.cli.main import main
    from ocrbatch.job.plan import plan_dataset

    docs = tmp_path / "docs"
    docs.mkdir()
    write_pdf(docs / "a.pdf", 2)
    document_image(200, 150, 1).save(docs / "b.png")
    out = tmp_path / "dataset"
    url = f"http://127.0.0.1:{free_port()}/v1"
    result = CliRunner().invoke(main, ["run", str(docs), "--out", str(out), "--engine", "ray", "--backend", "openai",
                                       "--base-url", url, "--min-file-age", "0", "--model", str(tmp_path / "none")])
    assert result.exit_code == 3, result.output  # fatal, as the local engine's
    assert f"Error: {url}: connection failed" in result.output, result.output
    assert not out.exists()  # nothing planned, written or failed: every page is still to do
    plan = plan_dataset(JobOptions(paths=[docs], out=out, min_file_age=0), DatasetRecord(out), dry_run=True)
    assert sorted((Path(i["path"]).name, i["page"]) for i in plan.manifest) == [("a.pdf", 1), ("a.pdf", 2),
                                                                               ("b.png", 1)]


@pytest.mark.slow
def test_ray_in_front_of_a_model_server_asks_it_what_the_local_engine_asks_and_writes_the_same_rows(
        cluster, inputs, tmp_path):
    """``--engine ray --backend openai`` on two nodes: the actors render and lay out the pages and send each unit
    to the server, loading no model (there is none) and converting nothing; the server is sent the very requests
    the local engine sends it (images and their sizes, prompts, pixel bounds, loop guards) and the rows are the
    local engine's, with layout blocks and with whole pages; a block the server refuses fails its page alone."""
    import math

    from fault_server import FaultServer, Status

    from ocrbatch.engines.local import run_job
    from ocrbatch.engines.ray import RaySettings, run_ray_job

    class TableRefusingServer(FaultServer):
        """The stub server, answering every table block with a 400 (not retried)."""

        def _arrive(self, prompt: str, body: dict):
            action = super()._arrive(prompt, body)
            return Status(400, "no tables here") if prompt == "Table Recognition:" else action

    folder, bad = inputs
    cluster_nodes = {node.node_id for node in cluster.list_all_nodes()}
    settings = RaySettings(vision_actors=2, actor_start_timeout_s=120)
    with TableRefusingServer(pixel_bounds=SERVER_PIXEL_BOUNDS) as server:
        def run(engine, out, **mode) -> tuple[dict, list, object]:
            before = len(server.seen)
            options = job_options(tmp_path / "no-model", [folder], out, backend="openai", base_url=server.url,
                                  concurrency=2, cache_dir=str(tmp_path / "cache"), **mode)
            summary = engine(options)
            rows = visible_rows(out) if out.is_dir() else pq.read_table(out).to_pylist()
            return same_columns(rows), server.seen[before:], summary

        for name, mode in (("layout", dict(layout="cdla", pdf_text="auto")), ("pages", dict(layout="none"))):
            on_ray, asked_by_ray, summary = run(partial(run_ray_job, address=cluster.address, settings=settings),
                                                tmp_path / f"{name}-dataset", **mode)
            local, asked_locally, _ = run(run_job, tmp_path / f"{name}.parquet", **mode)
            assert set(summary.nodes["vision"]) == cluster_nodes, summary.nodes  # actors on both nodes sent pages
            assert not summary.nodes["decode"]  # and there was no decode pool
            assert len(asked_by_ray) == len(asked_locally) > 0, name
            assert sorted(json.dumps(s.body, sort_keys=True) for s in asked_by_ray) == sorted(
                json.dumps(s.body, sort_keys=True) for s in asked_locally), name
            assert on_ray.keys() == local.keys(), name
            assert on_ray == local, {key: {column: (value, local[key][column]) for column, value in row.items()
                                           if value != local[key][column]}
                                     for key, row in on_ray.items() if row != local[key]}
            statuses = [r["status"] for r in on_ray.values()]
            assert statuses.count("failed") >= len(bad) and statuses.count("ok") > 5, (name, statuses)
            assert {r["model"] for r in on_ray.values()} == {"fault-model"}
            assert {r["quant"] for r in on_ray.values()} == {"remote"}
            bodies = [s.body for s in asked_by_ray]
            if name == "layout":
                # Every block carried its loop guard; the refused table failed its page, and only that page.
                assert all(body["repetition_guard"] for body in bodies)
                refused = [key for key, r in on_ray.items() if r["status"] == "failed" and Path(key[0]).name not in bad]
                assert [Path(path).name for path, _ in refused] == ["purchase-order-table-scan.png"], on_ray
                [failed] = [r for r in visible_rows(tmp_path / "layout-dataset") if r["path"] == refused[0][0]]
                assert "block" in failed["error"] and "HTTP 400: no tables here" in failed["error"], failed
                assert any(r["source"] == "model" and r["blocks"] for r in on_ray.values())
                assert any(r["source"] == "text-layer" for r in on_ray.values())
            else:
                # Whole pages within the server's reported bounds, text "OCR: WxH" of the image it was sent.
                sizes = [r["text"].split()[-1] for r in on_ray.values() if r["status"] == "ok"]
                assert sizes and all(math.prod(map(int, size.split("x"))) <= SERVER_PIXEL_BOUNDS[1] for size in sizes)
                assert all(body["mm_processor_kwargs"] == dict(zip(("min_pixels", "max_pixels"), SERVER_PIXEL_BOUNDS))
                           for body in bodies)
    assert not (tmp_path / "cache").exists()  # no GGUF was converted


# Runs the job as `ocrbatch run --engine ray` would, in a process the test can kill; "storage" holds the
# storage options of URL paths.
DRIVER = """
import json, sys
from pathlib import Path
from ocrbatch.engines.local import JobOptions
from ocrbatch.engines.ray import run_ray_job
from ocrbatch.storage import ObjectPath

options = json.loads(sys.argv[1])
storage = options.pop("storage", None)
place = lambda p: ObjectPath.of(p, storage) if "://" in p else Path(p)
run_ray_job(JobOptions(**{**options, "paths": [place(p) for p in options["paths"]], "out": place(options["out"])}))
"""


def rows_in(folder) -> int:
    """Rows in the dataset's files, duplicates included (a local folder or an ObjectPath)."""
    return len(DatasetRecord(folder).entries())


def kill_settings(tiny_model, docs: Path, out: str) -> dict:
    """Four 3-page PDFs, one page per file and one at a time, so that a kill can land between pages."""
    docs.mkdir()
    for i in range(4):
        write_pdf(docs / f"doc{i}.pdf", 3, text=f"Document {i}")
    return dict(paths=[str(docs)], out=out, model=str(tiny_model), quant="F32", max_tokens=30, workers=1,
                seqs_per_worker=1, batch_size=1, dpi=72, progress=False, flush_rows=1, min_file_age=0,
                layout="none")  # whole pages, to compare with the engine's own output


def kill_driver_after_first_rows(settings: dict, out, log_file: Path) -> int:
    """Start the driver, kill -9 it (and its own Ray instance) once rows are in ``out``; the rows there then."""
    import psutil

    with open(log_file, "w") as log:
        driver = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(settings)], stdout=log, stderr=log)
    deadline = time.monotonic() + 300
    while driver.poll() is None and time.monotonic() < deadline and rows_in(out) == 0:
        time.sleep(0.2)
    assert driver.poll() is None, log_file.read_text()[-3000:]
    # The local Ray instance is the driver's: its processes are ended with it.
    ray_processes = psutil.Process(driver.pid).children(recursive=True)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    end(ray_processes)
    return rows_in(out)


@pytest.mark.slow
def test_kill9_of_a_driver_writing_to_a_bucket_then_rerun_gives_every_page_once(tiny_model, engine_f32, s3_store,
                                                                                tmp_path):
    """The dataset in a bucket (moto's S3 on loopback): each file lands whole, so a driver killed mid-run
    leaves whole files only, and a re-run (its own driver) completes every page exactly once."""
    from ocrbatch.storage import ObjectPath

    options, fs = s3_store
    fs.mkdir("kill-results")
    settings = {**kill_settings(tiny_model, tmp_path / "docs", "s3://kill-results/ocr/"), "storage": options}
    out = ObjectPath.of(settings["out"], options)
    at_kill = kill_driver_after_first_rows(settings, out, tmp_path / "driver.log")
    assert 0 < at_kill < 12  # the kill landed after some pages were written and before all
    written = DatasetRecord(out).entries()
    assert len({(entry.doc_id, entry.page) for entry in written}) == len(written)  # never a page twice, even now

    rerun = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(settings)], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    record = DatasetRecord(out)
    rows = record.table().to_pylist()
    assert rows_in(out) == 12  # every page once in the files themselves, not only after de-duplication
    assert sorted((Path(r["path"]).name, r["page"]) for r in rows) == sorted(
        (f"doc{i}.pdf", page) for i in range(4) for page in (1, 2, 3))
    expected = expected_tokens(engine_f32, rows, max_tokens=30)
    assert {(r["path"], r["page"]): r["text"] for r in rows} == {key: text for key, (_, text) in expected.items()}
    # The killed run's part objects were merged with the re-run's into one; nothing partial is left.
    assert [f.name.split("-")[0] for f in record.files()] == ["run"]
    fs.invalidate_cache()
    assert [key for key in fs.find("kill-results") if not key.endswith(".parquet")] == []
    assert record.counts() == {"pages": {"ok": 12}, "documents": {"ok": 4}}


# Last in this file: the re-run below starts and stops a Ray instance of its own in this process, after
# which the module's two-node cluster no longer starts actors.
@pytest.mark.slow
def test_kill9_of_the_driver_then_rerun_gives_every_page_once(tiny_model, engine_f32, tmp_path):
    from ocrbatch.engines.ray import run_ray_job

    out = tmp_path / "dataset"
    settings = kill_settings(tiny_model, tmp_path / "docs", str(out))
    docs = Path(settings["paths"][0])
    at_kill = kill_driver_after_first_rows(settings, out, tmp_path / "driver.log")
    assert 0 < at_kill < 12  # the kill landed after some pages were written and before all
    assert len(set(keys(visible_rows(out)))) == at_kill  # never a page twice, even now

    seen = []
    summary = run_ray_job(JobOptions(**{**settings, "paths": [docs], "out": out}), on_row=seen.append)
    assert (summary.pages_skipped, summary.pages_ok, summary.pages_failed) == (at_kill, 12 - at_kill, 0)
    rows = visible_rows(out)
    assert sorted((Path(r["path"]).name, r["page"]) for r in rows) == sorted(
        (f"doc{i}.pdf", page) for i in range(4) for page in (1, 2, 3))
    expected = expected_tokens(engine_f32, rows, max_tokens=30)
    assert {(r["path"], r["page"]): r["text"] for r in rows} == {key: text for key, (_, text) in expected.items()}
    assert {(r["path"], r["page"]): r["token_ids"] for r in seen} == {
        (r["path"], r["page"]): expected[(r["path"], r["page"])][0] for r in seen}
    # The killed run's part files were merged with the re-run's into one file; nothing partial is left.
    assert [f.name.split("-")[0] for f in DatasetRecord(out).files()] == ["run"]
    assert not list(out.glob(".*.tmp"))
    assert DatasetRecord(out).counts() == {"pages": {"ok": 12}, "documents": {"ok": 4}}
