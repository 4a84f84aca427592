"""The interfaces every engine's record implements: what is done, and where finished pages go.

A job's record is the SQLite checkpoint (:class:`~ocrbatch.records.sqlite.Store`,
the local engine) or the Parquet dataset (:class:`~ocrbatch.records.dataset.DatasetRecord`,
the Ray engine, where the dataset is its own record). The planner
(:func:`ocrbatch.job.plan.plan_job`) reads either through :class:`JobRecord`,
and ``ocrbatch status`` reports either through it.

The local engine's :class:`~ocrbatch.records.recorder.Recorder` commits each
row to the SQLite checkpoint and then to the output file; the Ray engine's
:class:`~ocrbatch.records.dataset.DatasetRecorder` writes rows to the Parquet
dataset in whole files. Either way a row reaches the record once its page is
finished (ok or failed), keyed by its path and content id
(:func:`~ocrbatch.job.rows.keyed`), and is counted in the run's
:class:`~ocrbatch.records.recorder.JobSummary`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol

from ..sources.discover import Document
from ..storage import ObjectPath


class RecordedPages(Protocol):
    """What a record holds of each document's pages, as the planner sees it once the record is prepared."""

    def page_count(self, doc_id: str) -> int | None:
        """The document's page count, when a run has counted it (``None`` or 0: not yet)."""
        ...

    def page_states(self, doc_id: str) -> dict[int, str]:
        """Page number → ``ok``, ``failed`` or ``pending`` (page 0: the document could not be opened)."""
        ...

    def set_page_count(self, doc_id: str, page_count: int) -> None:
        """Keep a count the planner made, so that its pages are pending from now on."""
        ...


class JobRecord(Protocol):
    """A job's record: its settings, what is done, and the counts ``ocrbatch status`` prints."""

    def check_settings(self, settings: dict[str, str]) -> None:
        """Adopt ``settings``, or raise :class:`~ocrbatch.errors.OcrbatchError` when the record was made with others."""
        ...

    def known_id(self, path: Path, size: int, mtime_ns: int) -> str | None:
        """The content id of a file seen before at this size and time, so that discovery need not hash it."""
        ...

    def failed_document_ids(self) -> set[str]:
        """Documents with a failed page: what ``--retry-failed`` takes up."""
        ...

    def prepare(self, found: dict[str, Document], copies: list[Document], retry_ids: set[str] | None,
                apply: bool) -> RecordedPages:
        """Bring the record in line with the documents found now, before pages are planned.

        ``found`` maps each content id to the document processed for it (its first path); ``copies`` are
        the same contents found at other paths; ``retry_ids`` is ``None`` unless the run retries failed
        documents. ``apply=False`` (a dry run) changes nothing and answers as if it had.
        """
        ...

    def commit(self) -> None:
        """Make what :meth:`prepare` and the planner wrote durable."""
        ...

    def counts(self) -> dict[str, dict[str, int]]:
        """``{"pages": {status: n}, "documents": {status: n}}``."""
        ...

    def failed_pages(self) -> list[tuple[str, int, str]]:
        """``(path, page, error)`` of every failed page, in path and page order, the path escaped."""
        ...


class PageRecorder(Protocol):
    """Where an engine sends each finished page's row."""

    summary: object  # the run's JobSummary, counted as rows arrive

    def add(self, row: dict) -> None:
        """Record one finished page (ok or failed), with its ``path`` and ``doc_id``."""
        ...

    def flush(self) -> None:
        """Write what is buffered: after it, every row added so far survives a kill."""
        ...

    def close(self) -> None:
        """End the run's progress display; buffered rows are the caller's to flush first."""
        ...


@contextmanager
def opened_record(target: Path | ObjectPath) -> Iterator[JobRecord]:
    """The record of the job whose output is ``target``, to read: a Ray dataset folder is its own record;
    an output file's record is its checkpoint (for an output in object storage, this machine's)."""
    is_dataset = (target.is_folder_url() or not target.suffix) if isinstance(target, ObjectPath) else target.is_dir()
    if is_dataset:
        from .dataset import DatasetRecord

        yield DatasetRecord(target)
        return
    from .sqlite import Store, checkpoint_path_for

    store = Store(checkpoint_path_for(target), readonly=True)
    try:
        yield store
    finally:
        store.close()
