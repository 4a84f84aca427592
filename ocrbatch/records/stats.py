"""A job's progress from its rows: how many pages, read how, how fast, and which documents took longest.

Rows carry when each page finished (``created_at``) and the seconds each stage
spent on it, so the same figures come out of a finished job, a running one
(read from its checkpoint) and a Ray dataset. The seconds of work of a
document are the sum of its pages' stage times: pages overlap in the
pipeline, so this is work, not wall-clock time.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

STAGE_COLUMNS = ("render_s", "layout_s", "vision_s", "prefill_s", "decode_s")
# Bucket widths for throughput over time, in minutes: the first that gives at most MAX_BUCKETS bars.
BUCKET_MINUTES = (1, 2, 5, 10, 15, 30, 60, 120, 360, 720, 1440)
MAX_BUCKETS = 60
SLOWEST = 10


def work_seconds(row: dict) -> float:
    """Seconds the job's stages spent on one page."""
    return sum(row.get(column) or 0.0 for column in STAGE_COLUMNS)


@dataclass(frozen=True)
class DocumentTime:
    path: str
    pages: int
    seconds: float


@dataclass
class JobStats:
    pages: int = 0
    ok: int = 0
    failed: int = 0
    text_layer: int = 0  # ok pages read from their PDF text layer
    model: int = 0  # ok pages read by the model
    first: datetime | None = None  # when the first page finished
    last: datetime | None = None
    bucket_minutes: int = 1
    throughput: list[tuple[datetime, int]] = field(default_factory=list)  # (bucket start, pages finished in it)
    slowest: list[DocumentTime] = field(default_factory=list)

    def share(self, count: int) -> float:
        return count / self.pages if self.pages else 0.0

    @property
    def pages_per_min(self) -> float | None:
        """Pages finished per minute between the first and the last; None before there are two."""
        if self.first is None or self.last is None or self.last <= self.first:
            return None
        return (self.pages - 1) / ((self.last - self.first).total_seconds() / 60)


def job_stats(rows: list[dict]) -> JobStats:
    stats = JobStats(pages=len(rows))
    seconds: dict[str, float] = defaultdict(float)
    pages: dict[str, int] = defaultdict(int)
    for row in rows:
        if row["status"] == "ok":
            stats.ok += 1
            if row.get("source") == "text-layer":
                stats.text_layer += 1
            else:
                stats.model += 1
        else:
            stats.failed += 1
        seconds[row["path"]] += work_seconds(row)
        pages[row["path"]] += 1
    times = sorted(row["created_at"] for row in rows if row.get("created_at"))
    if times:
        stats.first, stats.last = times[0], times[-1]
        stats.bucket_minutes, stats.throughput = _throughput(times)
    ranked = sorted(seconds, key=lambda path: -seconds[path])[:SLOWEST]
    stats.slowest = [DocumentTime(path, pages[path], seconds[path]) for path in ranked if seconds[path] > 0]
    return stats


def _throughput(times: list[datetime]) -> tuple[int, list[tuple[datetime, int]]]:
    span_minutes = (times[-1] - times[0]).total_seconds() / 60
    minutes = next((m for m in BUCKET_MINUTES if span_minutes / m < MAX_BUCKETS), BUCKET_MINUTES[-1])
    width = timedelta(minutes=minutes)
    start = times[0]
    counts = [0] * (int(math.floor(span_minutes / minutes)) + 1)
    for moment in times:
        counts[min(len(counts) - 1, int((moment - start) / width))] += 1
    return minutes, [(start + index * width, count) for index, count in enumerate(counts)]
