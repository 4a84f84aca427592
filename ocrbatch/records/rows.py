"""A finished (or running) job's rows, from whatever it wrote: Parquet, JSONL or a Ray dataset folder.

``ocrbatch inspect`` and ``ocrbatch report`` read a job through here. A local
job's checkpoint is read when it is there, since it holds every page finished
so far while the job still runs (the output file is written at the end); its
output file otherwise.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from ..errors import OcrbatchError
from ..sources.discover import unescaped
from .output import COLUMNS, format_for


def read_rows(out: str | Path) -> list[dict]:
    """Every page row of the job whose output is ``out``, in path and page order."""
    out = Path(out)
    if out.is_dir():
        from .dataset import DatasetRecord

        rows = DatasetRecord(out).table().to_pylist()
    else:
        rows = _checkpoint_rows(out)
        if rows is None:
            rows = _file_rows(out)
    for row in rows:
        if isinstance(row.get("created_at"), str):
            row["created_at"] = datetime.fromisoformat(row["created_at"])
    return sorted(rows, key=lambda row: (row["path"], row["page"]))


def _checkpoint_rows(out: Path) -> list[dict] | None:
    from .sqlite import Store, checkpoint_path_for

    checkpoint = checkpoint_path_for(out)
    if not checkpoint.is_file():
        return None
    store = Store(checkpoint, readonly=True)
    try:
        return [{column: row.get(column) for column in COLUMNS} for row in store.rows()]
    finally:
        store.close()


def _file_rows(out: Path) -> list[dict]:
    if not out.is_file():
        raise OcrbatchError(f"{out}: no such output, checkpoint or dataset folder")
    if format_for(out) == "parquet":
        import pyarrow.parquet as pq

        return pq.read_table(out).to_pylist()
    with open(out, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def find_row(rows: list[dict], path: str | Path, page: int) -> dict:
    """The row of ``page`` of the document at ``path``: its recorded path, the same file, or a unique name."""
    wanted = Path(path)
    candidates = [row for row in rows if row["page"] == page]
    for same in (lambda row: row["path"] == str(path),
                 lambda row: _same_file(unescaped(row["path"]), wanted),
                 lambda row: unescaped(row["path"]).name == wanted.name):
        found = [row for row in candidates if same(row)]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(row["path"] for row in found)
            raise OcrbatchError(f"{path} page {page}: several documents match ({names}); give the full path")
    documents = sorted({row["path"] for row in rows if _same_file(unescaped(row["path"]), wanted)
                        or unescaped(row["path"]).name == wanted.name})
    if documents:
        raise OcrbatchError(f"{path}: the job has no page {page} of it")
    raise OcrbatchError(f"{path}: not a document of this job")


def _same_file(recorded: Path, wanted: Path) -> bool:
    try:
        return os.path.samefile(recorded, wanted)
    except OSError:
        return False
