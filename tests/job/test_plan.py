"""The planner reads both records through one interface: the same history gives the same plan."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path

import pytest
from helpers import write_pdf

from ocrbatch.job.options import JobOptions
from ocrbatch.job.plan import plan_dataset, plan_job
from ocrbatch.records.dataset import DatasetRecord
from ocrbatch.records.sqlite import Store
from ocrbatch.sources.discover import hash_file

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def inbox(tmp_path):
    """a.pdf (3 pages: 1 ok, 2 failed, 3 not done), b.pdf (2 pages, both ok), c.pdf (never run),
    a copy of a.pdf, and an empty file."""
    docs = tmp_path / "docs"
    docs.mkdir()
    write_pdf(docs / "a.pdf", 3)
    write_pdf(docs / "b.pdf", 2, text="Other")
    write_pdf(docs / "c.pdf", 1, text="New")
    shutil.copy(docs / "a.pdf", docs / "copy-of-a.pdf")
    (docs / "zero.png").write_bytes(b"")
    return docs


HISTORY = [("a.pdf", 3, 1, "ok"), ("a.pdf", 3, 2, "failed"), ("b.pdf", 2, 1, "ok"), ("b.pdf", 2, 2, "ok")]


def checkpoint_with_history(docs: Path, path: Path) -> Store:
    store = Store(path)
    for name, page_count, page, status in HISTORY:
        doc_id = hash_file(docs / name)
        store.upsert_document(doc_id, docs / name)
        store.set_page_count(doc_id, page_count)
        store.record_page(doc_id, page, status, {"text": name}, None if status == "ok" else "broke")
    store.commit()
    return store


def dataset_with_history(docs: Path, folder: Path) -> DatasetRecord:
    record = DatasetRecord(folder)
    record.write([{"path": str(docs / name), "doc_id": hash_file(docs / name), "page": page, "page_count": count,
                   "status": status, "error": None if status == "ok" else "broke", "text": name, "created_at": T0}
                  for name, count, page, status in HISTORY], "part-1-00001.parquet")
    return record


def summary(plan) -> tuple:
    """What a plan decides, by file name (the local engine plans relative paths, the Ray engine absolute ones)."""
    return (sorted((item.document.path.name, item.pages, item.page_count) for item in plan.work),
            sorted(document.path.name for document, _ in plan.unreadable), plan.skipped,
            sorted((copy.path.name, original.name) for copy, original in plan.copies))


@pytest.mark.parametrize("retry", [False, True])
def test_the_checkpoint_and_the_dataset_give_the_same_plan(inbox, tmp_path, retry):
    options = JobOptions(paths=[inbox], out=tmp_path / "out.parquet", min_file_age=0, retry_failed=retry)
    store = checkpoint_with_history(inbox, tmp_path / "job.db")
    dataset = dataset_with_history(inbox, tmp_path / "dataset")

    local = plan_job(options, store, apply=False)
    ray = plan_job(options, dataset, apply=False, absolute=True)
    if retry:  # only a.pdf has a failed page: its failed and pending pages; a's and b's ok pages are skipped
        expected = ([("a.pdf", [2, 3], 3)], [], 3, [("copy-of-a.pdf", "a.pdf")])
    else:  # what is not done: a's page 3, all of c, and the empty file (unreadable)
        expected = ([("a.pdf", [3], 3), ("c.pdf", [1], 1)], ["zero.png"], 4, [("copy-of-a.pdf", "a.pdf")])
    assert summary(local) == summary(ray) == expected
    assert all(item.document.path.is_absolute() for item in ray.work)

    # Applied, each record keeps what the planner learnt, and the next plan is the same.
    assert summary(plan_job(options, store)) == expected
    assert summary(plan_job(options, dataset, absolute=True)) == expected
    assert summary(plan_job(options, store)) == expected
    if retry:
        # The dataset removes a retried page's failed row once the retry is planned (no row is ever there
        # twice), so a run killed before redoing it leaves the page absent: pending, as the next plain run sees.
        plain = JobOptions(paths=[inbox], out=options.out, min_file_age=0)
        assert summary(plan_job(plain, dataset, absolute=True))[0] == [("a.pdf", [2, 3], 3), ("c.pdf", [1], 1)]
    else:
        assert summary(plan_job(options, dataset, absolute=True)) == expected
    copy = inbox / "copy-of-a.pdf"
    assert store.known_id(copy, copy.stat().st_size, copy.stat().st_mtime_ns) == hash_file(copy)  # not hashed again
    if not retry:
        assert store.page_states(hash_file(inbox / "c.pdf")) == {1: "pending"}  # its count is kept


def test_the_ray_manifest_is_the_same_plan_page_by_page(inbox, tmp_path):
    options = JobOptions(paths=[inbox], out=tmp_path / "dataset", min_file_age=0)
    dataset = dataset_with_history(inbox, tmp_path / "dataset")
    plan = plan_dataset(options, dataset, dry_run=True)
    assert [(Path(item["path"]).name, item["page"], item["page_count"]) for item in plan.manifest] == [
        ("a.pdf", 3, 3), ("c.pdf", 1, 1)]
    assert (plan.skipped, plan.documents, plan.deferred, plan.special) == (4, 3, 0, 0)
    assert [document.path.name for document, _ in plan.unreadable] == ["zero.png"]
