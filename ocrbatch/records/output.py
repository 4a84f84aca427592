"""Output writers: one row per page, to Parquet (pyarrow) or JSONL.

A run writes to a hidden partial file beside the target, in row groups as
work completes, and renames it over the target when the run ends. A killed
run leaves the previous output untouched; its partial file is removed by the
next run, which rebuilds the full output from the checkpoint. A target in
object storage (:class:`~ocrbatch.storage.ObjectPath`) is written the same
way with the partial file in this machine's folder for it
(:func:`~ocrbatch.storage.local_state_folder`), and uploaded whole when the
run ends: the store replaces the object only once the upload is complete.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Protocol

import pyarrow as pa

from ..storage import ObjectPath, local_state_folder, upload

SCHEMA = pa.schema([
    ("path", pa.string()),
    ("doc_id", pa.string()),
    ("page", pa.int32()),
    ("page_count", pa.int32()),
    ("task", pa.string()),
    ("text", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("n_image_tokens", pa.int32()),
    ("n_output_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("model", pa.string()),
    ("quant", pa.string()),
    ("render_s", pa.float64()),
    ("vision_s", pa.float64()),
    ("prefill_s", pa.float64()),
    ("decode_s", pa.float64()),
    ("source", pa.string()),
    ("layout_s", pa.float64()),
    ("blocks", pa.list_(pa.struct([
        ("order", pa.int32()), ("label", pa.string()), ("score", pa.float32()),
        ("x0", pa.float32()), ("y0", pa.float32()), ("x1", pa.float32()), ("y1", pa.float32()),
        ("prompt", pa.string()), ("text", pa.string()), ("n_image_tokens", pa.int32()),
        ("n_output_tokens", pa.int32()), ("finish_reason", pa.string()), ("group", pa.int32()),
    ]))),
    # Task spotting: each piece of text found, with its quadrilateral (x1, y1, ..., x4, y4) in page pixels.
    ("spots", pa.list_(pa.struct([("text", pa.string()), ("quad", pa.list_(pa.float32()))]))),
    # A video's page (a kept frame): seconds from the start of the video; null for PDFs and images.
    ("timestamp_s", pa.float64()),
    ("created_at", pa.timestamp("us", tz="UTC")),
])
COLUMNS = SCHEMA.names
FORMATS = ("parquet", "jsonl")


class OutputWriter(Protocol):
    path: Path | ObjectPath

    def write(self, rows: list[dict]) -> None: ...

    def commit(self) -> None:
        """Finish the file and move it over the target."""

    def abort(self) -> None:
        """Drop the partial file."""


def format_for(path: str | Path | ObjectPath, explicit: str | None = None) -> str:
    if explicit:
        return explicit
    suffix = path.suffix.lower() if isinstance(path, ObjectPath) else Path(path).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    from ..errors import OcrbatchError

    raise OcrbatchError(f"{path}: cannot tell the output format from the suffix; use .parquet, .jsonl or --format")


LIST_COLUMNS = ("blocks", "spots")


def _normalise(row: dict) -> dict:
    return {column: row.get(column, [] if column in LIST_COLUMNS else None) for column in COLUMNS}


class _PartialFile:
    def __init__(self, path: str | Path | ObjectPath):
        self.path = path if isinstance(path, ObjectPath) else Path(path)
        folder = local_state_folder(path) if isinstance(path, ObjectPath) else self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".{self.path.name}.*.partial"):
            stale.unlink(missing_ok=True)  # left by a killed run; the caller holds the job lock
        self.partial = folder / f".{self.path.name}.{os.getpid()}.partial"

    def _close(self) -> None:
        raise NotImplementedError

    def commit(self) -> None:
        self._close()
        if isinstance(self.path, ObjectPath):
            upload(self.partial, self.path)
            self.partial.unlink()
        else:
            os.replace(self.partial, self.path)

    def abort(self) -> None:
        self._close()
        self.partial.unlink(missing_ok=True)


# Rows are gathered into row groups of this many before they are written: the writer keeps metadata
# for each row group until it closes, and one per flush (32 rows) grew the parent by about 1 KB a page
# over a long run (benchmarks/ceiling.py). The partial file is rebuilt from the checkpoint after a
# crash, so rows waiting here are never the only copy.
ROW_GROUP_ROWS = 1024


class ParquetOutput(_PartialFile):
    """Parquet, in row groups of :data:`ROW_GROUP_ROWS` rows."""

    def __init__(self, path: str | Path):
        import pyarrow.parquet as pq

        super().__init__(path)
        self._writer = pq.ParquetWriter(self.partial, SCHEMA, compression="zstd")
        self._waiting: list[dict] = []

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            row = _normalise(row)
            if isinstance(row["created_at"], str):
                row["created_at"] = datetime.fromisoformat(row["created_at"])
            self._waiting.append(row)
        if len(self._waiting) >= ROW_GROUP_ROWS:
            self._write_waiting()

    def _write_waiting(self) -> None:
        if self._waiting:
            self._writer.write_table(pa.Table.from_pylist(self._waiting, schema=SCHEMA))
            self._waiting = []

    def abort(self) -> None:
        self._waiting = []  # dropped, not written: the file goes
        super().abort()

    def _close(self) -> None:
        self._write_waiting()
        self._writer.close()


class JsonlOutput(_PartialFile):
    """JSON Lines, one object per page."""

    def __init__(self, path: str | Path):
        super().__init__(path)
        self._file = open(self.partial, "w", encoding="utf-8")

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            row = _normalise(row)
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._file.flush()

    def _close(self) -> None:
        self._file.close()


def open_output(path: str | Path | ObjectPath, output_format: str | None = None) -> OutputWriter:
    return {"parquet": ParquetOutput, "jsonl": JsonlOutput}[format_for(path, output_format)](path)
