"""The checkpoint: a SQLite file recording every document and page of a job.

It is the source of truth for resuming. A page is ``pending`` until its
result (or failure) is committed here; the output file is rebuilt from these
rows on every run, so a run killed at any moment and re-run yields every page
exactly once.

Paths are kept as text, or as their bytes (a BLOB) when they are not UTF-8,
which SQLite text must be: every path is kept exactly, and a checkpoint
written before keeps working.
"""

from __future__ import annotations

import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from ..errors import OcrbatchError
from ..sources.discover import Document, escaped
from ..storage import ObjectPath, local_state_folder

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents (
    doc_id TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    page_count INTEGER,
    status TEXT NOT NULL DEFAULT 'pending',   -- pending, ok, failed, superseded
    error TEXT,
    updated_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS pages (
    doc_id TEXT NOT NULL REFERENCES documents(doc_id),
    page INTEGER NOT NULL,                     -- 1-based; 0 for a document that cannot be opened
    status TEXT NOT NULL DEFAULT 'pending',   -- pending, ok, failed
    error TEXT,
    result TEXT,                               -- JSON of the output row, less path and doc_id
    updated_at TEXT NOT NULL,
    PRIMARY KEY (doc_id, page)
);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, doc_id TEXT);
CREATE INDEX IF NOT EXISTS pages_status ON pages(status);
-- upsert_document supersedes older versions by path: without it, planning N documents scans N rows N times.
CREATE INDEX IF NOT EXISTS documents_path ON documents(path);
"""


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _stored_path(path: Path) -> str | bytes:
    """``path`` as the checkpoint keeps it: its text, or its bytes when they are not UTF-8."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # os.fsdecode kept bytes that are not UTF-8 as lone surrogates
        return os.fsencode(path)
    return text


def checkpoint_path_for(target: str | Path | ObjectPath) -> Path:
    """The checkpoint file for an output path (or the path itself if it is a checkpoint).

    An output in object storage keeps its checkpoint on this machine, in its
    :func:`~ocrbatch.storage.local_state_folder`: SQLite needs a local disk.
    """
    if isinstance(target, ObjectPath):
        return local_state_folder(target) / f"{target.name}.ocrbatch.db"
    target = Path(target)
    if target.suffix == ".db":
        return target
    return target.with_name(target.name + ".ocrbatch.db")


class Store:
    """Read and write a job's checkpoint."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        if readonly:
            if not self.path.is_file():
                raise OcrbatchError(f"{self.path}: no such checkpoint")
            self.db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        self.db.row_factory = sqlite3.Row

    def close(self) -> None:
        self.db.close()

    # -- settings ---------------------------------------------------------------------

    def check_settings(self, settings: dict[str, str]) -> None:
        """Record the job's settings, or refuse settings that differ from the recorded ones."""
        stored = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        for key, value in settings.items():
            if key in stored and stored[key] != value:
                raise OcrbatchError(
                    f"{self.path}: this checkpoint was made with {key}={stored[key]}, not {value}; "
                    "use another --out or --checkpoint for a different setting")
        with self.db:
            self.db.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", settings.items())

    # -- discovery --------------------------------------------------------------------

    def known_id(self, path: Path, size: int, mtime_ns: int) -> str | None:
        row = self.db.execute("SELECT doc_id FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
                              (_stored_path(path), size, mtime_ns)).fetchone()
        return row["doc_id"] if row else None

    def remember_file(self, path: Path, size: int, mtime_ns: int, doc_id: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                        (_stored_path(path), size, mtime_ns, doc_id))

    def prepare(self, found: dict[str, Document], copies: list[Document], retry_ids: set[str] | None,
                apply: bool) -> Store:
        """Remember every readable file's content id and note each document to process at its path
        (see :class:`~ocrbatch.records.base.JobRecord`); the store itself answers for its pages."""
        if apply:
            for document in [*found.values(), *copies]:
                if not document.error:
                    self.remember_file(document.path, document.size, document.mtime_ns, document.doc_id)
            for doc_id, document in found.items():
                if not document.error and (retry_ids is None or doc_id in retry_ids):
                    self.upsert_document(doc_id, document.path)
        return self

    def upsert_document(self, doc_id: str, path: Path) -> None:
        """Note a document at ``path``; an older version of the same path is superseded."""
        with self.db:
            self.db.execute(
                "INSERT INTO documents (doc_id, path, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT(doc_id) DO UPDATE SET path = excluded.path, "
                "status = CASE WHEN status = 'superseded' THEN 'pending' ELSE status END",
                (doc_id, _stored_path(path), now()))
            self.db.execute("UPDATE documents SET status = 'superseded', updated_at = ? "
                            "WHERE path = ? AND doc_id != ?", (now(), _stored_path(path), doc_id))

    def set_page_count(self, doc_id: str, page_count: int) -> None:
        with self.db:
            self.db.execute("UPDATE documents SET page_count = ?, error = NULL WHERE doc_id = ?",
                            (page_count, doc_id))
            self.db.execute("DELETE FROM pages WHERE doc_id = ? AND page = 0", (doc_id,))
            self.db.executemany(
                "INSERT OR IGNORE INTO pages (doc_id, page, updated_at) VALUES (?, ?, ?)",
                [(doc_id, page, now()) for page in range(1, page_count + 1)])

    def page_count(self, doc_id: str) -> int | None:
        row = self.db.execute("SELECT page_count FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        return row["page_count"] if row else None

    def page_states(self, doc_id: str) -> dict[int, str]:
        rows = self.db.execute("SELECT page, status FROM pages WHERE doc_id = ?", (doc_id,))
        return {row["page"]: row["status"] for row in rows}

    # -- results ----------------------------------------------------------------------

    def record_page(self, doc_id: str, page: int, status: str, result: dict, error: str | None = None) -> None:
        with self.db:
            self.db.execute(
                "INSERT INTO pages (doc_id, page, status, error, result, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(doc_id, page) DO UPDATE SET "
                "status = excluded.status, error = excluded.error, "
                "result = excluded.result, updated_at = excluded.updated_at",
                (doc_id, page, status, error, json.dumps(result, ensure_ascii=False), now()))

    def record_document_failure(self, doc_id: str, path: Path, error: str, result: dict) -> None:
        """A document that cannot be opened: one failed row, page 0."""
        with self.db:
            self.db.execute(
                "INSERT INTO documents (doc_id, path, page_count, status, error, updated_at) "
                "VALUES (?, ?, 0, 'failed', ?, ?) ON CONFLICT(doc_id) DO UPDATE SET "
                "path = excluded.path, status = 'failed', error = excluded.error, updated_at = excluded.updated_at",
                (doc_id, _stored_path(path), error, now()))
        self.record_page(doc_id, 0, "failed", result, error)

    def finish_document(self, doc_id: str, max_page_error_rate: float) -> str:
        """Set a document's status from its pages: failed when too many of them failed."""
        rows = self.db.execute("SELECT status, COUNT(*) AS n FROM pages WHERE doc_id = ? GROUP BY status",
                               (doc_id,)).fetchall()
        counts = {row["status"]: row["n"] for row in rows}
        total = sum(counts.values())
        if counts.get("pending"):
            return "pending"
        failed = counts.get("failed", 0)
        status = "failed" if total and failed / total > max_page_error_rate else "ok"
        error = f"{failed} of {total} pages failed" if failed else None
        with self.db:
            self.db.execute("UPDATE documents SET status = ?, error = ?, updated_at = ? WHERE doc_id = ?",
                            (status, error, now(), doc_id))
        return status

    def rows(self, exclude: set[tuple[str, int]] = frozenset()) -> Iterator[dict]:
        """Output rows for every finished page of every current document, in path and page order.

        Paths are written :func:`~ocrbatch.sources.discover.escaped`: text that reads back to their bytes.
        """
        query = ("SELECT d.path, p.doc_id, p.page, p.result FROM pages p JOIN documents d USING (doc_id) "
                 "WHERE p.status != 'pending' AND d.status != 'superseded' ORDER BY d.path, p.page")
        for row in self.db.execute(query):
            if (row["doc_id"], row["page"]) in exclude:
                continue
            yield {"path": escaped(os.fsdecode(row["path"])), "doc_id": row["doc_id"], **json.loads(row["result"])}

    def document_pages(self, doc_id: str) -> list[dict]:
        rows = self.db.execute("SELECT page, status, result FROM pages WHERE doc_id = ? ORDER BY page", (doc_id,))
        return [{"page": r["page"], "status": r["status"], **json.loads(r["result"] or "{}")} for r in rows]

    # -- reporting --------------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        pages = dict(self.db.execute(
            "SELECT p.status, COUNT(*) FROM pages p JOIN documents d USING (doc_id) "
            "WHERE d.status != 'superseded' GROUP BY p.status").fetchall())
        documents = dict(self.db.execute("SELECT status, COUNT(*) FROM documents GROUP BY status").fetchall())
        return {"pages": pages, "documents": documents}

    def failed_pages(self) -> list[tuple[str, int, str]]:
        """``(path, page, error)`` of every failed page, the path escaped as in the output."""
        query = ("SELECT d.path, p.page, p.error FROM pages p JOIN documents d USING (doc_id) "
                 "WHERE p.status = 'failed' AND d.status != 'superseded' ORDER BY d.path, p.page")
        return [(escaped(os.fsdecode(row[0])), row[1], row[2]) for row in self.db.execute(query)]

    def failed_document_ids(self) -> set[str]:
        query = ("SELECT DISTINCT doc_id FROM pages JOIN documents USING (doc_id) "
                 "WHERE pages.status = 'failed' AND documents.status != 'superseded'")
        return {row[0] for row in self.db.execute(query)}

    def finished_document_ids(self) -> list[str]:
        return [row[0] for row in self.db.execute(
            "SELECT doc_id FROM documents WHERE status IN ('ok', 'failed') AND page_count > 0")]

    def document_path(self, doc_id: str) -> Path | None:
        row = self.db.execute("SELECT path FROM documents WHERE doc_id = ?", (doc_id,)).fetchone()
        return Path(os.fsdecode(row["path"])) if row else None

    def commit(self) -> None:
        self.db.commit()
