"""One run at a time per job record: an exclusive lock file beside the checkpoint or dataset."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from ..errors import OcrbatchError


class JobLocked(OcrbatchError):
    """Another run holds the job's lock."""


class JobLock:
    """An exclusive, non-blocking lock beside ``record`` (a file or folder); the OS drops it if the process dies."""

    def __init__(self, record: Path):
        self.path = record.with_name(record.name + ".lock")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = self.handle.read().strip() or "unknown"
            self.handle.close()
            raise JobLocked(f"{self.path}: another ocrbatch run (pid {holder}) is working on this output") from None
        self.handle.truncate(0)
        self.handle.write(str(os.getpid()))
        self.handle.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()
