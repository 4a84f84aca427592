"""The driver's model files on every Ray node, without a shared file system.

The driver resolves the model model and converts the GGUF on its own
disk. An actor on another node may not see that disk, so the driver lists the
files (:class:`FileSet`: path, size and modification time of each) and starts
a :class:`FileServer` actor on its own node that reads them out in chunks. An
actor calls :func:`local_copy`: where the driver's paths show the same files
(the same node, or a shared file system) it uses them in place; otherwise it
copies them once per node into a cache folder, under a lock, so the actors
of one node share one copy and a later run with the same files copies
nothing. The copy streams through Ray's object store one chunk at a time,
so neither side holds a whole model in memory.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHUNK_BYTES = 32 << 20
# Where a node keeps its copies, unless the job names a folder (RaySettings.node_cache).
DEFAULT_NODE_CACHE = Path(tempfile.gettempdir()) / "ocrbatch-ray-files"


@dataclass(frozen=True)
class FileEntry:
    relative: str  # the file's path below the set's root ("" when the set is one file)
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class FileSet:
    """A file or a folder of files as the driver sees it."""

    root: str  # absolute, on the driver
    entries: tuple[FileEntry, ...]
    is_dir: bool

    @classmethod
    def of(cls, path: str | Path) -> FileSet:
        root = Path(path).absolute()
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file())
            return cls(str(root), tuple(_entry(p, p.relative_to(root).as_posix()) for p in files), True)
        return cls(str(root), (_entry(root, ""),), False)

    @property
    def key(self) -> str:
        """Names this set's files and their versions: a changed file gets a new copy, not a stale one."""
        text = "\n".join([self.root, *(f"{e.relative}\t{e.size}\t{e.mtime_ns}" for e in self.entries)])
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def path_of(self, root: Path, entry: FileEntry) -> Path:
        return root / entry.relative if self.is_dir else root

    def visible_here(self) -> bool:
        """Whether this node sees the driver's files themselves (same node, or a shared file system)."""
        for entry in self.entries:
            try:
                stat = os.stat(self.path_of(Path(self.root), entry))
            except OSError:
                return False
            if stat.st_size != entry.size or stat.st_mtime_ns != entry.mtime_ns:
                return False
        return True


def _entry(path: Path, relative: str) -> FileEntry:
    stat = path.stat()
    return FileEntry(relative, stat.st_size, stat.st_mtime_ns)


class FileServer:
    """Ray actor on the driver's node: reads chunks of the files of the sets it serves, and nothing else."""

    def __init__(self, sets: list[FileSet]):
        self.allowed = {str(s.path_of(Path(s.root), e)) for s in sets for e in s.entries}

    def read(self, path: str, offset: int, size: int) -> bytes:
        if path not in self.allowed:
            raise PermissionError(f"{path}: not a model file of this job")
        with open(path, "rb") as file:
            file.seek(offset)
            return file.read(size)


def start_file_server(ray, sets: list[FileSet]):
    """A :class:`FileServer` pinned to this (the driver's) node, reserving no CPU."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    actor = ray.remote(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False))(FileServer)
    return actor.remote(sets)


def local_copy(files: FileSet, server, cache: Path = DEFAULT_NODE_CACHE, always_copy: bool = False) -> Path:
    """A path on this node holding ``files``: the driver's own where visible, else this node's copy."""
    if not always_copy and files.visible_here():
        return Path(files.root)
    import ray

    name = Path(files.root).name
    target = cache / files.key / name
    done = target.parent / ".complete"
    if done.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{files.key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the node's other actors wait for this copy instead of making theirs
        if done.exists():
            return target
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
        try:
            for entry in files.entries:
                source = str(files.path_of(Path(files.root), entry))
                destination = files.path_of(partial / name, entry)
                destination.parent.mkdir(parents=True, exist_ok=True)
                with open(destination, "wb") as out:
                    for offset in range(0, entry.size, CHUNK_BYTES):
                        out.write(ray.get(server.read.remote(source, offset, CHUNK_BYTES)))
                if destination.stat().st_size != entry.size:
                    raise OSError(f"{source}: copied {destination.stat().st_size} bytes of {entry.size}")
            shutil.rmtree(target, ignore_errors=True)
            os.replace(partial / name, target)
            done.touch()
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return target
