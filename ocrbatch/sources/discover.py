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
with the reason, never a crash. Special files (FIFOs, devices, sockets, also
behind a link) are never opened: reading one could block or never end; they
are reported as skipped. The command line refuses a PATH that names no file
or folder (:func:`check_paths`): a typo or an unmounted share is not a
failed document.

Paths are kept as Python keeps file names, with the bytes that are not UTF-8
as lone surrogates (``os.fsdecode``); :func:`escaped` writes them as text.

A PATH in object storage (an :class:`~ocrbatch.storage.ObjectPath`, ``s3://...``)
is listed by prefix; its documents' ``path`` is the object's URL, its
content id the same hash read in ranges, the age and "changed while being
read" judged by the object's modification time, size and version tag.
"""

from __future__ import annotations

import codecs
import errno
import fnmatch
import hashlib
import logging
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from ..errors import OcrbatchError
from ..storage import ObjectPath, ObjectStat, hash_object, list_objects

log = logging.getLogger("ocrbatch")

PDF_SUFFIXES = {".pdf"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi"}
SUPPORTED_SUFFIXES = PDF_SUFFIXES | IMAGE_SUFFIXES | VIDEO_SUFFIXES


@dataclass(frozen=True)
class Document:
    """A file to OCR, or the reason it cannot be."""

    path: Path | ObjectPath
    doc_id: str | None
    size: int = 0
    error: str | None = None
    mtime_ns: int = 0
    deferred: str | None = None  # why it is left for a later run (still being written)
    special: str | None = None  # what it is when not a regular file ("a FIFO (named pipe)"): skipped

    @property
    def kind(self) -> str:
        suffix = self.path.suffix.lower()
        return "pdf" if suffix in PDF_SUFFIXES else "video" if suffix in VIDEO_SUFFIXES else "image"


class PathError(OcrbatchError):
    """PATHS given to the job that name no file or folder: a bad command line, so nothing is written."""


# What text cannot hold as it is: the backslash (the escape itself); control characters (C0, DEL,
# C1) and the line and paragraph separators, which would break a line; and lone surrogates, which
# is how os.fsdecode keeps the bytes of a file name that are not UTF-8.
_NEEDS_ESCAPE = re.compile(r"[\\\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escape(match: re.Match) -> str:
    char = match.group()
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    if 0xDC80 <= code <= 0xDCFF:  # a byte of a file name that is not UTF-8
        return f"\\x{code - 0xDC00:02x}"
    if 0xD800 <= code <= 0xDFFF:  # a lone surrogate that no file name holds: it has no bytes
        return f"\\u{code:04x}"
    return "".join(f"\\x{byte:02x}" for byte in char.encode())


def escaped(text: str | Path) -> str:
    """``text`` (a path, or a message naming one) as one line of valid UTF-8 that reads back to its bytes.

    Each byte of a path that is not UTF-8 is written ``\\xHH``, a control character ``\\n``,
    ``\\t``, ``\\r`` or ``\\xHH`` (its UTF-8 bytes), a backslash ``\\\\``; every other character
    is itself. These are a Python bytes literal's escapes, so ``codecs.escape_decode(text.encode())[0]``
    gives a path's bytes back. The output's ``path`` column, error messages, ``ocrbatch status``
    and ``--dry-run`` show paths this way.
    """
    return _NEEDS_ESCAPE.sub(_escape, str(text))


def unescaped(text: str) -> Path:
    """The path that :func:`escaped` wrote as ``text``, with its bytes exactly as they were."""
    return Path(os.fsdecode(codecs.escape_decode(text.encode())[0]))


def failed_document_id(path: Path | ObjectPath) -> str:
    """An id for a file that cannot be read: derived from its path, as there is no content."""
    return "path:" + hashlib.sha256(os.fsencode(str(path))).hexdigest()[:32]


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


_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _special_kind(path: Path, mode: int) -> str | None:
    """What ``path`` is when it is neither a regular file nor a folder; None when it is one of those."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    kind = next((name for is_kind, name in _SPECIAL_KINDS if is_kind(mode)), "a special file")
    if path.is_symlink():
        kind += f" (through a symbolic link to {os.readlink(path)})"
    return kind


def _examine(path: Path) -> tuple[str | None, int]:
    """``(problem, st_mode)``: why ``path`` cannot be reached, or its mode (links followed)."""
    if path.is_symlink() and (problem := _link_problem(path)):
        return problem, 0
    try:
        return None, path.stat().st_mode
    except FileNotFoundError:
        return "no such file or folder", 0
    except OSError as exc:
        return f"cannot be read ({exc.strerror})", 0


def path_problem(path: Path) -> str | None:
    """Why a PATH given to the job names no file or folder to walk (missing, a broken link, a FIFO)."""
    problem, mode = _examine(path)
    if problem:
        return problem
    kind = _special_kind(path, mode)
    return f"{kind}, not a file or folder" if kind else None


def check_paths(paths: Iterable[str | Path]) -> None:
    """Raise :class:`PathError` naming every PATH that names no file or folder, before anything is written."""
    # Object storage is checked by asking the store (storage.check_reachable), which is the job's business.
    problems = [f"{path}: {problem}" for path in paths
                if not isinstance(path, ObjectPath) and (problem := path_problem(Path(path)))]
    if problems:
        raise PathError(escaped("; ".join(problems)))


def _candidate_files(root: Path) -> Iterator[tuple[Path, str | None, str | None]]:
    """Yield ``(path, problem, special)`` for files under ``root``, following links without looping.

    ``problem`` says why a file cannot be reached; ``special`` what a file that is not a regular
    file is (it is never opened: a FIFO blocks, a device may never end).
    """
    problem, mode = _examine(root)
    if problem or not stat.S_ISDIR(mode):
        yield root, problem, None if problem else _special_kind(root, mode)
        return
    seen_dirs: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            info = folder.stat()
        except OSError as exc:
            yield folder, f"cannot read folder ({exc.strerror})", None
            continue
        if (info.st_dev, info.st_ino) in seen_dirs:
            continue  # reached again through a link: already walked
        seen_dirs.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield folder, f"cannot list folder ({exc.strerror})", None
            continue
        subfolders = []
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                problem = _link_problem(path)
                if problem:
                    yield path, problem, None
                    continue
            if entry.is_dir(follow_symlinks=True):
                subfolders.append(path)
            elif entry.is_file(follow_symlinks=True):
                yield path, None, None
            else:
                problem, mode = _examine(path)
                yield path, problem, None if problem else _special_kind(path, mode)
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
    except ValueError as exc:  # a name some library cannot take (a UnicodeError): this file alone fails
        return Document(path, failed_document_id(path), error=f"{path}: cannot read ({type(exc).__name__}: {exc})")
    return Document(path, doc_id, size=before.st_size, mtime_ns=before.st_mtime_ns)


def _identify_object(path: ObjectPath, listed: ObjectStat, known_id, min_file_age: float) -> Document:
    """:func:`_identify` for an object: its listing's stat brackets the hash as a file's stat does."""
    age = time.time() - listed.mtime_ns / 1e9
    if age < min_file_age:
        return Document(path, None, deferred=f"modified {max(age, 0):.1f} s ago (--min-file-age {min_file_age:g})")
    doc_id = known_id(path, listed.size, listed.mtime_ns) if known_id else None
    if doc_id is None:
        try:
            doc_id = hash_object(path)
            after = path.stat()
        except FileNotFoundError:
            return Document(path, None, deferred="disappeared while being read")
        except PermissionError:
            return Document(path, failed_document_id(path), error=f"{path}: access refused")
        if after != listed:
            return Document(path, None, deferred="changed while being read")
    return Document(path, doc_id, size=listed.size, mtime_ns=listed.mtime_ns)


def _discover_objects(root: ObjectPath, include: list[str], exclude: list[str], known_id,
                      min_file_age: float) -> Iterator[Document]:
    prefix = root.key.rstrip("/") + "/"
    listed_any = False
    for path, listed in list_objects(root):
        listed_any = True
        relative = path.key[len(prefix):] if path.key.startswith(prefix) else path.name
        if exclude and _matches(relative, exclude):
            continue
        suffix_ok = path.suffix.lower() in SUPPORTED_SUFFIXES
        if include and not _matches(relative, include) or not include and not suffix_ok:
            continue
        if not suffix_ok:
            yield Document(path, failed_document_id(path), error=f"{path}: unsupported file type {path.suffix!r}")
            continue
        yield _identify_object(path, listed, known_id, min_file_age)
    if not listed_any:  # a prefix holds nothing until an object is put under it: it may be a typo, or empty yet
        log.warning("%s: no objects under this prefix", root)


def discover(paths: Iterable[str | Path | ObjectPath], include: Iterable[str] = (), exclude: Iterable[str] = (),
             known_id: Callable[[Path, int, int], str | None] | None = None,
             min_file_age: float = 0.0) -> Iterator[Document]:
    """Yield the documents under ``paths``: supported files matching the globs, in path order.

    ``include`` and ``exclude`` are glob patterns matched against the path
    relative to the given root and against the file name. ``known_id(path,
    size, mtime_ns)`` may return a remembered id to skip hashing. Files
    modified less than ``min_file_age`` seconds ago, or changing while they
    are read, come back with ``deferred`` set, and files that are not
    regular files (FIFOs, devices, sockets) with ``special``.
    """
    include, exclude = list(include), list(exclude)
    for root in paths:
        if isinstance(root, ObjectPath):
            yield from _discover_objects(root, include, exclude, known_id, min_file_age)
            continue
        root = Path(root)
        for path, problem, special in _candidate_files(root):
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
            if special is not None:
                yield Document(path, None, special=special)
                continue
            if not suffix_ok:
                yield Document(path, failed_document_id(path), error=f"{path}: unsupported file type {path.suffix!r}")
                continue
            yield _identify(path, known_id, min_file_age)
