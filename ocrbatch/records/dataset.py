"""A Parquet dataset as a job's record: ``--out DIR`` without a checkpoint database.

The rows in ``DIR`` are the only record of what a run has done, so whatever
reads them (duckdb's ``read_parquet('DIR/*.parquet')``, ``pyarrow.dataset``,
pandas) and whatever plans the next run see the same thing. The layout:

``part-<run>-<n>.parquet``
    rows as a run finishes them, one file per flush;
``run-<run>.parquet``
    a run's parts (and any a killed run left) merged when it finishes;
``.<name>.tmp``
    a file being written, moved into place with :func:`os.replace`;
``.ocrbatch.lock``
    held by the run that writes ``DIR``.

``DIR`` may be a folder in object storage (an :class:`~ocrbatch.storage.ObjectPath`,
``s3://bucket/results/``): each file is then written locally and uploaded whole,
which an object store makes visible only once complete (so no hidden name and
rename), a rewrite replaces the object whole, and the lock is a file on this
machine (in :func:`~ocrbatch.storage.local_state_folder`): one machine drives
a dataset in object storage at a time.

Files are written whole under a hidden name and renamed, so a reader or a
killed run never meets half a file; names ending in ``.tmp`` and starting
with ``.`` are skipped by ``*.parquet`` globs and by pyarrow alike. Every file
carries the job's settings (task, model, quant, max_tokens) in its Parquet
metadata, so a run with other settings is refused, as the SQLite checkpoint does.

A page is keyed by ``(doc_id, page)``; its ``path`` is the document's current
one. Each change to ``DIR`` rewrites one file atomically, and no change ever
adds a second row for a key: a page to redo (``--retry-failed``) or a
document edited in place (same path, new content) has its old rows removed
*before* the run starts, so a crash in between leaves the page absent, which
the next run treats as not done. A moved document keeps its rows, rewritten in
place with the new path. Only two things can leave a key twice: a crash
between renaming a compacted file into place and deleting the parts it
merged (identical rows), or two writers on a shared file system whose locks
do not work. :meth:`DatasetRecord.recover`, run first by every run, resolves
both by one rule: an ``ok`` row beats a ``failed`` one, then the newer
``created_at``, then the file whose name sorts last (a run file over its
parts); the losing rows are removed from their files.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import OcrbatchError
from ..sources.discover import Document, escaped
from ..storage import ObjectPath, list_objects, local_state_folder, reading, upload
from .lock import JobLock
from .output import COLUMNS, SCHEMA

log = logging.getLogger("ocrbatch")

SETTINGS_KEY = b"ocrbatch.settings"
LOCK_NAME = ".ocrbatch"  # the lock file is this name plus ".lock"
# The columns planning and status need; the text stays on disk.
INDEX_COLUMNS = ["path", "doc_id", "page", "page_count", "status", "error", "created_at"]


def new_run_id() -> str:
    """A run's id: its start time (so names sort by age) and process id (so two runs never clash)."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{os.getpid()}"


@dataclass(frozen=True)
class Entry:
    """Where one page's row lives and what it says."""

    file: Path | ObjectPath
    row: int  # index within the file
    path: str
    doc_id: str
    page: int
    page_count: int | None
    status: str
    error: str | None
    created_at: datetime | None

    @property
    def key(self) -> tuple[str, int]:
        return self.doc_id, self.page

    def rank(self) -> tuple:
        """Larger wins: ok over failed, then newer, then the later file name."""
        created = self.created_at or datetime.min.replace(tzinfo=timezone.utc)
        return self.status == "ok", created, self.file.name, self.row


def _rows_table(rows: Iterable[dict]) -> pa.Table:
    normalised = []
    for row in rows:
        row = {column: row.get(column) for column in COLUMNS}
        if isinstance(row["created_at"], str):
            row["created_at"] = datetime.fromisoformat(row["created_at"])
        normalised.append(row)
    return pa.Table.from_pylist(normalised, schema=SCHEMA)


class DatasetRecord:
    """Read, extend and repair the Parquet dataset in ``folder``."""

    def __init__(self, folder: str | Path | ObjectPath, settings: dict[str, str] | None = None):
        """``settings`` are stored in every file this object writes (see :meth:`check_settings`)."""
        self.folder = folder if isinstance(folder, ObjectPath) else Path(folder)
        self.settings = dict(settings or {})

    @property
    def in_object_storage(self) -> bool:
        return isinstance(self.folder, ObjectPath)

    # -- files -----------------------------------------------------------------------

    def files(self) -> list[Path | ObjectPath]:
        """The dataset's visible Parquet files, in name order; hidden and partial files are not part of it."""
        if self.in_object_storage:
            self.folder.fs.invalidate_cache(self.folder.key.rstrip("/"))  # this run's own writes must show
            found = [path for path, _ in list_objects(self.folder)]
        elif self.folder.is_dir():
            found = [p for p in self.folder.iterdir() if p.is_file()]
        else:
            return []
        return sorted((p for p in found if p.suffix == ".parquet" and not p.name.startswith((".", "_"))),
                      key=lambda p: p.name)

    def lock(self):
        """The run's exclusive lock on ``folder`` (:class:`ocrbatch.records.lock.JobLock`, exit code 4 when held)."""
        if self.in_object_storage:
            state = local_state_folder(self.folder)
            state.mkdir(parents=True, exist_ok=True)
            return JobLock(state / LOCK_NAME)
        if self.folder.exists() and not self.folder.is_dir():
            raise OcrbatchError(f"{self.folder}: not a folder; the ray engine writes a Parquet dataset folder")
        self.folder.mkdir(parents=True, exist_ok=True)
        return JobLock(self.folder / LOCK_NAME)

    def _write_atomically(self, target: Path | ObjectPath, table: pa.Table) -> None:
        """Write ``table`` under a hidden name, flush it to disk, and rename it over ``target`` (or upload it whole)."""
        metadata = {SETTINGS_KEY: json.dumps(self.settings, sort_keys=True).encode()}
        table = table.replace_schema_metadata(metadata)
        staging = local_state_folder(self.folder) if self.in_object_storage else self.folder
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f".{target.name}.{os.getpid()}.tmp"
        try:
            pq.write_table(table, tmp, compression="zstd")
            if self.in_object_storage:
                upload(tmp, target)
                return
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_folder(self.folder)

    def _delete(self, file: Path | ObjectPath) -> None:
        if isinstance(file, ObjectPath):
            with reading(file):
                file.fs.rm_file(file.key)
        else:
            file.unlink()

    def write(self, rows: list[dict], name: str) -> Path | ObjectPath:
        """Write ``rows`` (output rows; other keys are dropped) as the new file ``name``."""
        target = self.folder / name
        if target.fs.exists(target.key) if self.in_object_storage else target.exists():
            raise OcrbatchError(f"{target}: already exists; a record file is never overwritten by a new batch")
        self._write_atomically(target, _rows_table(rows))
        return target

    def rewrite(self, file: Path, changes: dict[int, str | None]) -> None:
        """Rewrite ``file`` atomically with ``changes``: row number → its new path, or ``None`` to drop it.

        A file left with no rows is deleted.
        """
        table = _read_table(file, schema=SCHEMA)
        paths = table.column("path").to_pylist()
        keep = [changes.get(number, paths[number]) is not None for number in range(table.num_rows)]
        new_paths = [changes.get(number, path) for number, path in enumerate(paths) if keep[number]]
        table = table.filter(pa.array(keep, pa.bool_()))
        if table.num_rows == 0:
            self._delete(file)
            if not self.in_object_storage:
                _fsync_folder(self.folder)
            return
        table = table.set_column(COLUMNS.index("path"), "path", pa.array(new_paths, pa.string()))
        self._write_atomically(file, table)

    # -- reading ---------------------------------------------------------------------

    def entries(self) -> list[Entry]:
        """Every row of every file, duplicates included (see :meth:`index` for one per page)."""
        entries = []
        for file in self.files():
            table = _read_table(file, columns=INDEX_COLUMNS)
            for number, row in enumerate(table.to_pylist()):
                entries.append(Entry(file, number, row["path"], row["doc_id"], row["page"], row["page_count"],
                                     row["status"], row["error"], row["created_at"]))
        return entries

    def index(self) -> dict[tuple[str, int], Entry]:
        """``(doc_id, page)`` → the row that counts for it, by the precedence rule."""
        return best_entries(self.entries())

    def table(self) -> pa.Table:
        """All rows, one per page even before :meth:`recover` has removed duplicates."""
        keep: dict[Path | ObjectPath, list[int]] = defaultdict(list)
        for entry in self.index().values():
            keep[entry.file].append(entry.row)
        parts = [_read_table(file, schema=SCHEMA).take(sorted(rows))
                 for file, rows in sorted(keep.items(), key=lambda item: item[0].name)]
        table = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
        return table.sort_by([("path", "ascending"), ("page", "ascending")])

    def stored_settings(self) -> dict[str, str]:
        """The settings written into the dataset's files (the first file that has any)."""
        for file in self.files():
            metadata = _read_schema(file).metadata or {}
            if SETTINGS_KEY in metadata:
                return json.loads(metadata[SETTINGS_KEY])
        return {}

    def check_settings(self, settings: dict[str, str]) -> None:
        """Refuse to add to a dataset made with other settings; adopt ``settings`` for the files written from now."""
        stored = self.stored_settings()
        for key, value in settings.items():
            if key in stored and stored[key] != value:
                raise OcrbatchError(
                    f"{self.folder}: this dataset was made with {key}={stored[key]}, not {value}; "
                    "use another --out for a different setting")
        self.settings = dict(settings)

    # -- planning (the planner's JobRecord interface) ---------------------------------

    def known_id(self, path: Path, size: int, mtime_ns: int) -> str | None:
        return None  # the dataset keeps no file table: discovery hashes every file

    def failed_document_ids(self) -> set[str]:
        return {entry.doc_id for entry in self.index().values() if entry.status == "failed"}

    def prepare(self, found: dict[str, Document], copies: list[Document], retry_ids: set[str] | None,
                apply: bool) -> DatasetPages:
        """:meth:`reconcile` the rows with the documents found (copies need nothing: rows are per content id)."""
        current = {doc_id: escaped(document.path) for doc_id, document in found.items()}
        changes, remaining = self.reconcile(current, retry_ids or set(), apply=apply)
        if changes and apply:
            log.info("dataset brought up to date: %s", ", ".join(f"{n} rows {what}" for what, n in changes.items()))
        return DatasetPages(best_entries(remaining).values())

    def commit(self) -> None:
        pass  # every change is a whole file, written when made

    # -- changes ---------------------------------------------------------------------

    def recover(self) -> int:
        """Clean up after killed runs: drop partial files and duplicate rows. Returns rows removed.

        Call with the lock held: a partial file of a live writer would be lost.
        """
        if not self.in_object_storage and self.folder.is_dir():
            for stale in self.folder.glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        entries = self.entries()
        best = best_entries(entries)
        losers: dict[Path | ObjectPath, dict[int, None]] = defaultdict(dict)
        for entry in entries:
            if best[entry.key] != entry:
                losers[entry.file][entry.row] = None
        for file, changes in losers.items():
            self.rewrite(file, changes)
        return sum(len(changes) for changes in losers.values())

    def reconcile(self, current: dict[str, str], retry_ids: set[str] = frozenset(),
                  apply: bool = True) -> tuple[dict[str, int], list[Entry]]:
        """Bring rows in line with the documents found now, before a run plans its pages.

        ``current`` maps each discovered ``doc_id`` to its path. Rows of a
        document found at a new path get that path; rows of a document whose
        path now holds other content (edited in place) are removed; ``failed``
        rows of the documents in ``retry_ids`` are removed, so their pages are
        done again. Rows of documents not found at all stay, as in the local
        engine's output. Returns counts of ``moved``, ``superseded`` and
        ``retried`` rows, and the entries that remain (with their new paths,
        their files and rows as before); ``apply=False`` (a dry run) returns
        the same and changes nothing.
        """
        path_owner = {path: doc_id for doc_id, path in current.items()}
        counts: Counter[str] = Counter()
        changes: dict[Path | ObjectPath, dict[int, str | None]] = defaultdict(dict)
        remaining = []
        for entry in self.entries():
            if entry.doc_id not in current and path_owner.get(entry.path, entry.doc_id) != entry.doc_id:
                counts["superseded"] += 1
                changes[entry.file][entry.row] = None
            elif entry.doc_id in retry_ids and entry.status == "failed":
                counts["retried"] += 1
                changes[entry.file][entry.row] = None
            elif current.get(entry.doc_id, entry.path) != entry.path:
                counts["moved"] += 1
                changes[entry.file][entry.row] = current[entry.doc_id]
                remaining.append(replace(entry, path=current[entry.doc_id]))
            else:
                remaining.append(entry)
        if apply:
            for file, file_changes in changes.items():  # files without changes are not even read in full
                self.rewrite(file, file_changes)
        return dict(counts), remaining

    def compact(self, run_id: str) -> Path | None:
        """Merge every part file (this run's and any a killed run left) into ``run-<run_id>.parquet``.

        The merged file is renamed into place before the parts are deleted, so
        a crash in between leaves each of their rows twice, never zero times;
        :meth:`recover` removes the part copies on the next run.
        """
        parts = [file for file in self.files() if file.name.startswith("part-")]
        if not parts:
            return None
        table = pa.concat_tables([_read_table(file, schema=SCHEMA) for file in parts])
        target = self.folder / f"run-{run_id}.parquet"
        self._write_atomically(target, table.sort_by([("path", "ascending"), ("page", "ascending")]))
        for file in parts:
            self._delete(file)
        if not self.in_object_storage:
            _fsync_folder(self.folder)
        return target

    # -- reporting -------------------------------------------------------------------

    def counts(self, max_page_error_rate: float = 0.5) -> dict[str, dict[str, int]]:
        """Pages per status, and documents per status (``failed`` when too many of their pages failed).

        The same shape as :meth:`ocrbatch.records.sqlite.Store.counts`, for ``ocrbatch status``.
        """
        index = self.index()
        pages = Counter(entry.status for entry in index.values())
        per_document: dict[str, Counter] = defaultdict(Counter)
        for entry in index.values():
            per_document[entry.doc_id][entry.status] += 1
        documents: Counter[str] = Counter()
        for statuses in per_document.values():
            total = sum(statuses.values())
            documents["failed" if statuses["failed"] / total > max_page_error_rate else "ok"] += 1
        return {"pages": dict(pages), "documents": dict(documents)}

    def failed_pages(self) -> list[tuple[str, int, str]]:
        """``(path, page, error)`` of every failed page, in path and page order."""
        failed = [(e.path, e.page, e.error) for e in self.index().values() if e.status == "failed"]
        return sorted(failed)


class DatasetPages:
    """The pages a dataset's rows record, indexed by document (:class:`~ocrbatch.records.base.RecordedPages`)."""

    def __init__(self, entries: Iterable[Entry]):
        self._pages: dict[str, dict[int, Entry]] = defaultdict(dict)
        for entry in entries:
            self._pages[entry.doc_id][entry.page] = entry

    def page_count(self, doc_id: str) -> int | None:
        return next((entry.page_count for entry in self._pages.get(doc_id, {}).values() if entry.page_count), None)

    def page_states(self, doc_id: str) -> dict[int, str]:
        return {page: entry.status for page, entry in self._pages.get(doc_id, {}).items()}

    def set_page_count(self, doc_id: str, page_count: int) -> None:
        pass  # a count rides on every row the run writes; pages without rows are the ones to do


def best_entries(entries: Iterable[Entry]) -> dict[tuple[str, int], Entry]:
    """The winning entry of each page by :meth:`Entry.rank`."""
    best: dict[tuple[str, int], Entry] = {}
    for entry in entries:
        if entry.key not in best or entry.rank() > best[entry.key].rank():
            best[entry.key] = entry
    return best


def _read_table(file: Path | ObjectPath, **options) -> pa.Table:
    if isinstance(file, ObjectPath):
        with file.open() as handle, reading(file):
            return pq.read_table(handle, **options)
    return pq.read_table(file, **options)


def _read_schema(file: Path | ObjectPath) -> pa.Schema:
    if isinstance(file, ObjectPath):
        with file.open() as handle, reading(file):
            return pq.read_schema(handle)
    return pq.read_schema(file)


def _fsync_folder(folder: Path) -> None:
    """Make renames and deletions in ``folder`` durable, not only the files' contents."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


class DatasetRecorder:
    """The Ray engine's record (a :class:`~ocrbatch.records.base.PageRecorder`): finished rows counted and
    written to the dataset, one whole file per flush."""

    def __init__(self, record: DatasetRecord, run_id: str, summary, rows_per_file: int, flush_seconds: float,
                 on_row: Callable[[dict], None] | None, total: int, progress: bool):
        from tqdm import tqdm

        self.record, self.run_id, self.summary = record, run_id, summary
        self.rows_per_file, self.flush_seconds, self.on_row = rows_per_file, flush_seconds, on_row
        self.buffer: list[dict] = []
        self.files = 0
        self.last_flush = time.monotonic()
        self.seen: set[tuple[str, int]] = set()
        self.progress = tqdm(total=total, unit="page", disable=None if progress else True, dynamic_ncols=True,
                             desc="ocrbatch")

    def add(self, row: dict) -> None:
        key = (row["doc_id"], row["page"])
        if key in self.seen:  # a block Ray ran twice: the first copy stands
            return
        self.seen.add(key)
        self.summary.count(row)
        for stage in ("vision", "decode"):
            if row.get(f"{stage}_node"):
                self.summary.nodes[stage][row[f"{stage}_node"]] += 1
        if self.on_row is not None:
            self.on_row(row)
        self.progress.update(1)
        self.buffer.append(row)
        if len(self.buffer) >= self.rows_per_file or time.monotonic() - self.last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self.files += 1
            self.record.write(self.buffer, f"part-{self.run_id}-{self.files:05d}.parquet")
            self.buffer = []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.progress.close()
