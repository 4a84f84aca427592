"""What every engine's record does with a finished page: the interface both records implement.

The local engine's :class:`~ocrbatch.records.recorder.Recorder` commits each
row to the SQLite checkpoint and then to the output file; the Ray engine's
:class:`~ocrbatch.records.dataset.DatasetRecorder` writes rows to the Parquet
dataset, which is its own record, in whole files. Either way a row reaches
the record once its page is finished (ok or failed), keyed by its path and
content id (:func:`~ocrbatch.job.rows.keyed`), and is counted in the run's
:class:`~ocrbatch.records.recorder.JobSummary`.
"""

from __future__ import annotations

from typing import Protocol


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
