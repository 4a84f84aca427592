"""Discovery: walking folders for PDFs and images, with content-based document ids.

A document's id is the SHA-256 of its bytes, so a moved or renamed file is
recognised as done and an edited file is processed again. Hashing is skipped
for files whose size and modification time the checkpoint already knows.
A file still being written (modified less than ``min_file_age`` seconds ago,
or changed while it was hashed) is deferred to a later run, so a half-written
upload is never processed; the size and time kept with its id come from the
same stat that brackets the hash.
Symbolic links are followed, each real folder visited once (no loops); a
broken link, a link loop or an unreadable file becomes a failed document
with the reason, never a crash.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

PDF_SUFFIXES = {".pdf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}
SUPPORTED_SUFFIXES = PDF_SUFFIXES | IMAGE_SUFFIXES


@dataclass(frozen=True)
class Document:
    """A file to OCR, or the reason it cannot be."""

    path: Path
    doc_id: str | None
    size: int = 0
    error: str | None = None
    mtime_ns: int = 0
    deferred: str | None = None  # why it is left for a later run (still being written)

    @property
    def kind(self) -> str:
        return "pdf" if self.path.suffix.lower() in PDF_SUFFIXES else "image"


def failed_document_id(path: Path) -> str:
    """An id for a file that cannot be read: derived from its path, as there is no content."""
    return "path:" + hashlib.sha256(str(path).encode()).hexdigest()[:32]


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def _matches(relative: str, patterns: Iterable[str]) -> bool:
    name = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(name, p) for p in patterns)


def _link_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be followed, if it cannot."""
    try:
        path.stat()
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        if exc.errno == errno.ENOENT:
            return f"broken symbolic link (points to {os.readlink(path)})"
        return f"cannot follow symbolic link ({exc.strerror})"


def _candidate_files(root: Path) -> Iterator[tuple[Path, str | None]]:
    """Yield ``(path, problem)`` for files under ``root``, following links without looping."""
    if root.is_symlink() and _link_problem(root):
        yield root, _link_problem(root)
        return
    if root.is_file():
        yield root, None
        return
    if not root.exists():
        yield root, "no such file or folder"
        return
    seen_dirs: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
        except OSError as exc:
            yield folder, f"cannot read folder ({exc.strerror})"
            continue
        if (info.st_dev, info.st_ino) in seen_dirs:
            continue  # reached again through a link: already walked
        seen_dirs.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield folder, f"cannot list folder ({exc.strerror})"
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                problem = _link_problem(path)
                if problem:
                    yield path, problem
                    continue
            if entry.is_dir(follow_symlinks=True):
                subfolders.append(path)
            elif entry.is_file(follow_symlinks=True):
                yield path, None
        stack.extend(reversed(subfolders))


def _identify(path: Path, known_id, min_file_age: float) -> Document:
    """The document at ``path`` with its content id, or why it is deferred or unreadable."""
    try:
        before = path.stat()
        age = time.time() - before.st_mtime
        if age < min_file_age:
            return Document(path, None, deferred=f"modified {max(age, 0):.1f} s ago (--min-file-age {min_file_age:g})")
        doc_id = known_id(path, before.st_size, before.st_mtime_ns) if known_id else None
        if doc_id is None:
            doc_id = hash_file(path)
            after = path.stat()
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                return Document(path, None, deferred="changed while being read")
    except PermissionError:
        return Document(path, failed_document_id(path), error=f"{path}: permission denied")
    except FileNotFoundError:
        return Document(path, None, deferred="disappeared while being read")
    except OSError as exc:
        return Document(path, failed_document_id(path), error=f"{path}: cannot read ({exc.strerror or exc})")
    return Document(path, doc_id, size=before.st_size, mtime_ns=before.st_mtime_ns)


def discover(paths: Iterable[str | Path], include: Iterable[str] = (), exclude: Iterable[str] = (),
             known_id: Callable[[Path, int, int], str | None] | None = None,
             min_file_age: float = 0.0) -> Iterator[Document]:
    """Yield the documents under ``paths``: supported files matching the globs, in path order.

    ``include`` and ``exclude`` are glob patterns matched against the path
    relative to the given root and against the file name. ``known_id(path,
    size, mtime_ns)`` may return a remembered id to skip hashing. Files
    modified less than ``min_file_age`` seconds ago, or changing while they
    are read, come back with ``deferred`` set.
    """
    include, exclude = list(include), list(exclude)
    for root in map(Path, paths):
        for path, problem in _candidate_files(root):
            relative = path.relative_to(root).as_posix() if path != root else path.name
            if exclude and _matches(relative, exclude):
                continue
            suffix_ok = path.suffix.lower() in SUPPORTED_SUFFIXES
            if include and not _matches(relative, include):
                continue
            if not include and not suffix_ok and problem is None:
                continue
            if problem is not None:
                yield Document(path, failed_document_id(path), error=f"{path}: {problem}")
                continue
            if not suffix_ok:
                yield Document(path, failed_document_id(path), error=f"{path}: unsupported file type {path.suffix!r}")
                continue
            yield _identify(path, known_id, min_file_age)
