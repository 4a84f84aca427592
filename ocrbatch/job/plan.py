"""The plan stage: which pages of which documents a run processes.

Discovered documents are matched against the job's record through one
interface (:class:`~ocrbatch.records.base.JobRecord`): the SQLite checkpoint
of the local engine or the Parquet dataset of the Ray engine, for which
:func:`plan_dataset` lays the same plan out as a manifest. Finished pages are
skipped, and each content id (``doc_id``) becomes at most one work item, so
overlapping PATHS and copies of one file at several paths are decoded once.
The output has one row set per ``doc_id``, under the first path found in
discovery order; copies at other paths are logged, not repeated. Files that
are not regular files (FIFOs, devices) are listed, never opened. Any error
while planning a document makes that document a failed one with the reason;
it never stops the plan.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..errors import InputError, OcrbatchError
from ..records.base import JobRecord, RecordedPages
from ..records.dataset import DatasetRecord
from ..sources.discover import Document, discover, escaped
from ..sources.rasterize import count_pages
from ..sources.textlayer import route
from ..sources.video import VideoSurvey, survey
from ..storage import ObjectPath, StorageError
from .options import JobOptions

log = logging.getLogger("ocrbatch")


@dataclass
class WorkItem:
    """The pages of one document that this run processes."""

    document: Document
    pages: list[int]
    page_count: int
    video: VideoSurvey | None = None  # a video counted by this plan: its duration and frames


@dataclass
class Plan:
    work: list[WorkItem] = field(default_factory=list)
    unreadable: list[tuple[Document, str]] = field(default_factory=list)  # documents that cannot be opened
    skipped: int = 0  # pages (or unopenable documents) already done
    deferred: list[Document] = field(default_factory=list)  # still being written: left for a later run
    copies: list[tuple[Document, Path]] = field(default_factory=list)  # (copy, the path processed instead)
    special: list[Document] = field(default_factory=list)  # FIFOs, devices, sockets: never opened

    @property
    def pages(self) -> int:
        return sum(len(item.pages) for item in self.work)

    def listing(self, options: JobOptions) -> Iterator[str]:
        """``--dry-run``'s lines, tab-separated: pages per document (with the text layer's routes and a
        video's frames), then unreadable, deferred, copied and special files, each with its reason."""
        for item in sorted(self.work, key=lambda item: str(item.document.path)):
            yield f"{len(item.pages)}\t{escaped(item.document.path)}{_routes(item, options)}{_video_note(item, options)}"
        for document, error in sorted(self.unreadable, key=lambda entry: str(entry[0].path)):
            yield f"unreadable\t{escaped(document.path)}\t{escaped(error)}"
        for document in self.deferred:
            yield f"deferred\t{escaped(document.path)}\t{document.deferred}"
        for document, original in self.copies:
            yield f"copy\t{escaped(document.path)}\tsame content as {escaped(original)}"
        for document in self.special:
            yield f"special\t{escaped(document.path)}\t{escaped(document.special)}: not a regular file, skipped"

    def total_line(self) -> str:
        special = f", {len(self.special)} special files skipped" if self.special else ""
        return f"{self.pages} pages to process{special}"


def plan_job(options: JobOptions, record: JobRecord | None, apply: bool = True, absolute: bool = False) -> Plan:
    """Decide which pages to process, from ``record`` (the checkpoint or the dataset; ``None``: nothing done).

    With ``apply`` the record is brought in line with the documents found
    (:meth:`~ocrbatch.records.base.JobRecord.prepare`) and keeps their page
    counts; without it (``--dry-run``) it is only read. ``absolute`` plans
    absolute paths, for actors that may run elsewhere. With ``--retry-failed``
    only documents with a failed page are planned (their failed and pending pages); the finished pages of
    the others count as skipped.
    """
    plan = Plan()
    retry_ids = record.failed_document_ids() if (record and options.retry_failed) else None
    found: dict[str, Document] = {}
    known = record.known_id if record else None
    for document in _regular_files(options, plan.deferred, plan.special, known_id=known, absolute=absolute):
        first = found.setdefault(document.doc_id, document)
        if first is not document and first.path != document.path:
            log.info("%s: same content as %s, processed once under that path", escaped(document.path),
                     escaped(first.path))
            plan.copies.append((document, first.path))
    pages = record.prepare(found, [copy for copy, _ in plan.copies], retry_ids, apply) if record else None
    for doc_id, document in found.items():
        if retry_ids is not None and doc_id not in retry_ids:  # nothing failed: what it has done counts as skipped
            plan.skipped += sum(state != "pending" for state in pages.page_states(doc_id).values()) if pages else 0
            continue
        try:
            _plan_document(plan, document, options, pages, apply)
        except StorageError:
            raise  # the object store failed, not the document: the run stops, nothing is failed
        except Exception as exc:  # whatever a file does to the planner, it fails alone
            plan.unreadable.append((document, f"{document.path}: cannot be planned ({type(exc).__name__}: {exc})"))
    if record and apply:
        record.commit()
    return plan


def _plan_document(plan: Plan, document: Document, options: JobOptions, pages: RecordedPages | None,
                   apply: bool) -> None:
    retry = options.retry_failed
    states = pages.page_states(document.doc_id) if pages else {}
    could_not_open = states.get(0) == "failed"
    if document.error:
        if could_not_open and not retry:
            plan.skipped += 1
        else:
            plan.unreadable.append((document, document.error))
        return
    page_count = pages.page_count(document.doc_id) if pages else None
    video = None
    if not page_count:  # new, or could not be opened last time
        if could_not_open and not retry:
            plan.skipped += 1
            return
        try:
            if document.kind == "video":
                video = survey(document.path, options.video_fps)
                page_count = video.page_count
            else:
                page_count = count_pages(document)
        except InputError as exc:
            plan.unreadable.append((document, str(exc)))
            return
        if pages and apply:
            pages.set_page_count(document.doc_id, page_count)
            states = pages.page_states(document.doc_id)
    wanted = ("failed", "pending") if retry else ("pending",)
    todo = [p for p in range(1, page_count + 1) if states.get(p, "pending") in wanted]
    plan.skipped += page_count - len(todo)
    if todo:
        plan.work.append(WorkItem(document, todo, page_count, video))


@dataclass
class DatasetPlan:
    """The pages a run against a Parquet dataset (``--engine ray``) processes, and what it does not."""

    manifest: list[dict] = field(default_factory=list)  # {"path", "doc_id", "page", "page_count"}
    unreadable: list[tuple[Document, str]] = field(default_factory=list)
    skipped: int = 0
    documents: int = 0
    deferred: int = 0  # files still being written (--min-file-age), left for a later run
    special: int = 0  # FIFOs, devices, sockets: never opened

    def listing(self) -> Iterator[str]:
        """``--dry-run``'s lines: pages per document, then unreadable documents with the reason."""
        for path, pages in sorted(Counter(item["path"] for item in self.manifest).items()):
            yield f"{pages}\t{path}"  # escaped already, as the manifest carries it
        for document, error in self.unreadable:
            yield f"unreadable\t{escaped(document.path)}\t{escaped(error)}"

    def total_line(self) -> str:
        return f"{len(self.manifest)} pages to process"


def plan_dataset(options: JobOptions, record: DatasetRecord, dry_run: bool = False) -> DatasetPlan:
    """:func:`plan_job` against a Parquet dataset, as the Ray engine's manifest: one item per page.

    A content id is processed once, under the first path found; see
    :meth:`~ocrbatch.records.dataset.DatasetRecord.reconcile` for moved, edited and retried documents.
    Paths are absolute (the actors may run elsewhere). ``dry_run`` plans the same pages and changes nothing.
    """
    plan = plan_job(options, record, apply=not dry_run, absolute=True)
    # Paths travel escaped (Arrow strings are UTF-8; a file name need not be) and are unescaped to open.
    manifest = [{"path": escaped(item.document.path), "doc_id": item.document.doc_id, "page": page,
                 "page_count": item.page_count} for item in plan.work for page in item.pages]
    return DatasetPlan(manifest, plan.unreadable, plan.skipped, documents=len(plan.work) + len(plan.unreadable),
                       deferred=len(plan.deferred), special=len(plan.special))


def _regular_files(options: JobOptions, deferred: list, special: list, known_id=None,
                   absolute: bool = False) -> Iterator[Document]:
    """The documents discovery finds under ``options.paths`` that a plan takes.

    Files still being written (``--min-file-age``) go to ``deferred``, FIFOs,
    devices and sockets to ``special``, each logged and never opened.
    """
    roots = options.paths
    if absolute:
        roots = [p if isinstance(p, ObjectPath) else Path(p).absolute() for p in roots]
    for document in discover(roots, options.include, options.exclude, known_id=known_id,
                             min_file_age=options.min_file_age):
        if document.deferred:
            log.info("%s: %s; left for a later run", escaped(document.path), document.deferred)
            deferred.append(document)
        elif document.special:
            log.info("%s: %s, not a regular file; skipped", escaped(document.path), escaped(document.special))
            special.append(document)
        else:
            yield document


def _video_note(item: WorkItem, options: JobOptions) -> str:
    """``--dry-run``'s note of a video: its duration and the frames a run keeps of those it samples."""
    if item.document.kind != "video":
        return ""
    try:
        video = item.video or survey(item.document.path, options.video_fps)  # counted before: decode it again
    except OcrbatchError as exc:
        return f"\tvideo unreadable ({escaped(str(exc))})"
    duration = f"{video.duration_s:.1f} s" if video.duration_s is not None else "duration unknown"
    broken = f"; then fails: {escaped(video.error)}" if video.error else ""
    return (f"\tvideo {duration}, {video.kept} frames kept of {video.sampled} sampled at "
            f"{options.video_fps:g}/s{broken}")


def _routes(item: WorkItem, options: JobOptions) -> str:
    """``--dry-run``'s note of which pages of a PDF the text layer would give, and why the others not."""
    if options.pdf_text == "never" or item.document.kind != "pdf":
        return ""
    try:
        routes = route(item.document.path, item.pages, options.pdf_text, options.trust_ocr_layer)
    except Exception as exc:  # the run itself reports the document's problem
        return f"\troutes unknown ({escaped(f'{type(exc).__name__}: {exc}')})"
    notes = []
    for number, chosen in sorted(routes.items()):
        where = "failed" if chosen.error else chosen.source
        notes.append(f"p{number} {where} ({chosen.verdict.reason})")
    return "\t" + "; ".join(notes)
