"""Object storage (``s3://``, ``gs://``, ``az://``, any fsspec protocol) beside plain local paths.

A PATH or ``--out`` written as a URL becomes an :class:`ObjectPath`: the URL
and the ``--storage-option``\\ s of its filesystem, small enough to travel to
the render process. Everything the job does with an object goes through the
few calls here, on fsspec's own APIs: :func:`list_objects` (the listing, with
size and modification time), :meth:`ObjectPath.open` (reading, ranged: a
hash or an image header never loads the whole object),
:meth:`ObjectPath.read_bytes` (an image), :meth:`ObjectPath.downloaded` (a
PDF, which MuPDF reads by random access from bytes or a file only: a
temporary file keeps a large one out of memory, and serves every reader of
the document, so it is downloaded once), :meth:`ObjectPath.stat` and
:func:`upload` (a whole file, which an object store makes visible only once
complete). A local path stays
a :class:`pathlib.Path` and never touches this module's filesystems.

Credentials and endpoints come from each filesystem's usual environment and
configuration (``AWS_*`` variables and ``~/.aws`` for s3fs, and so on), plus
``--storage-option KEY=VALUE``. The SQLite checkpoint of a job whose output
is an object stays on this machine, in :func:`local_state_folder`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any, Iterable, Iterator

from .errors import OcrbatchError
from .model.gguf import cache_dir

_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Keys of a listing's entries that hold the modification time, by filesystem: s3fs, adlfs, gcsfs.
_MTIME_KEYS = ("LastModified", "last_modified", "updated", "mtime")
# Storage options that name the store itself, not how to reach or sign in to it: s3fs, adlfs.
_PLACE_OPTIONS = ("endpoint_url", "account_name")


class StorageError(OcrbatchError):
    """Object storage that cannot be used (no such bucket, access refused, no package): fatal, exit 3."""


def is_url(text: str | os.PathLike) -> bool:
    """Whether ``text`` names an object by URL (``s3://...``); ``file://`` and plain paths are local."""
    match = isinstance(text, str) and _URL.match(text)
    return bool(match) and match.group(1).lower() != "file"


def parse_storage_options(items: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings as filesystem options: ``true``/``false`` as booleans, integers as ints."""
    options: dict[str, Any] = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"{item!r}: expected KEY=VALUE")
        options[key.strip()] = _option_value(value)
    return options


def _option_value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class ObjectStat:
    size: int
    mtime_ns: int
    version: str | None  # the store's tag of this content (an S3 ETag), when it gives one


@dataclass(frozen=True)
class ObjectPath:
    """An object (or a prefix, for a folder) in a fsspec filesystem, with the options to reach it."""

    url: str
    options: tuple[tuple[str, Any], ...] = ()
    # Set only on the path :meth:`downloaded` gives: the name, in this process and inside its block, of
    # the object's content on this machine, which every read then uses instead of the store.
    copy: str | None = field(default=None, compare=False, repr=False)

    @classmethod
    def of(cls, url: str, options: dict[str, Any] | None = None) -> ObjectPath:
        return cls(url, tuple(sorted((options or {}).items())))

    def __str__(self) -> str:
        return self.url

    @property
    def protocol(self) -> str:
        return _URL.match(self.url).group(1).lower()

    @property
    def fs(self):
        """The fsspec filesystem (fsspec keeps one instance per protocol and options)."""
        import fsspec

        try:
            return fsspec.filesystem(self.protocol, **dict(self.options))
        except ImportError as exc:  # fsspec's message names the package: "Install s3fs to access S3"
            raise StorageError(f"{self.url}: {exc}") from None
        except ValueError as exc:
            raise StorageError(f"{self.url}: {exc}") from None

    @property
    def key(self) -> str:
        """The path within the filesystem (``bucket/a/b.pdf``), as fsspec's calls take it."""
        return self.url[len(self.protocol) + 3:]

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return PurePosixPath(self.key).name

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    def is_folder_url(self) -> bool:
        return self.url.endswith("/")

    def child(self, key: str) -> ObjectPath:
        """The object ``key`` (a full ``bucket/...`` key, as listings give) in this filesystem."""
        return ObjectPath(f"{self.protocol}://{key}", self.options)

    def __truediv__(self, name: str) -> ObjectPath:
        return ObjectPath(self.url.rstrip("/") + "/" + name, self.options)

    def open(self, block_size: int = 4 << 20) -> IO[bytes]:
        """The object for reading, fetched in ranges of ``block_size`` as it is read."""
        if self.copy is not None:
            return open(self.copy, "rb")
        with reading(self):
            return self.fs.open(self.key, "rb", block_size=block_size)

    def read_bytes(self) -> bytes:
        if self.copy is not None:
            return Path(self.copy).read_bytes()
        with reading(self):
            return self.fs.cat_file(self.key)

    @contextlib.contextmanager
    def downloaded(self, block: int = 1 << 20) -> Iterator[ObjectPath]:
        """This object with its content downloaded, block by block, to a temporary file on this machine:
        every read of the path given (:attr:`copy`, a file name MuPDF can open) uses the file, not the store.

        The file has no name in any folder (it is reached as ``/proc/self/fd/N``), so a process that dies
        inside the block, as a renderer may on a hostile PDF, leaves nothing behind. A path already
        downloaded is given back as it is.
        """
        if self.copy is not None:
            yield self
            return
        with tempfile.TemporaryFile(prefix="ocrbatch-") as copy:
            with self.open() as source, reading(self):
                shutil.copyfileobj(source, copy, block)
            copy.flush()
            yield replace(self, copy=f"/proc/self/fd/{copy.fileno()}")

    def stat(self) -> ObjectStat:
        """Size, modification time and version tag, asked of the store now (not from a cached listing)."""
        fs = self.fs
        fs.invalidate_cache(self.key)
        with reading(self):
            return object_stat(fs, fs.info(self.key))


@contextlib.contextmanager
def reading(path: ObjectPath):
    """Turn a failure of the store itself (network, server) into :class:`StorageError`.

    A missing object or one we may not read is the document's own problem, as a missing or
    unreadable file is, and stays a :class:`FileNotFoundError` or :class:`PermissionError`;
    anything else is not the document's fault, so it must never be recorded as its failure.
    """
    try:
        yield
    except (FileNotFoundError, PermissionError, StorageError):
        raise
    except Exception as exc:
        raise StorageError(f"{path.url}: cannot read from storage ({type(exc).__name__}: {exc})") from None


def object_stat(fs, info: dict) -> ObjectStat:
    """:class:`ObjectStat` from a fsspec listing entry (``fs.find(..., detail=True)`` or ``fs.info``)."""
    when = next((info[key] for key in _MTIME_KEYS if info.get(key) is not None), None)
    if when is None:  # a filesystem whose listings carry no time: ask for it
        when = fs.modified(info["name"])
    if isinstance(when, str):
        when = datetime.fromisoformat(when.replace("Z", "+00:00"))
    mtime_ns = int(when.timestamp() * 1e9) if isinstance(when, datetime) else int(float(when) * 1e9)
    version = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return ObjectStat(int(info.get("size") or 0), mtime_ns, str(version) if version else None)


def reach_error(path: ObjectPath, exc: Exception) -> StorageError:
    """The fatal error for storage that refused or does not know ``path``'s bucket."""
    if isinstance(exc, FileNotFoundError):
        reason = "no such bucket"
    elif isinstance(exc, PermissionError):
        reason = "access refused"
    else:
        reason = f"cannot be reached ({type(exc).__name__}: {exc})"
    return StorageError(f"{path.url}: bucket {path.bucket!r}: {reason}")


def check_reachable(paths: Iterable[Path | ObjectPath]) -> None:
    """Raise :class:`StorageError` for the first object path whose bucket is missing or refuses us.

    Run before a job marks anything: storage that is not there is not the documents' fault.
    """
    for path in paths:
        if isinstance(path, ObjectPath):
            fs = path.fs
            try:
                fs.info(path.bucket)
            except Exception as exc:
                raise reach_error(path, exc) from None


def list_objects(root: ObjectPath) -> Iterator[tuple[ObjectPath, ObjectStat]]:
    """The objects under ``root`` (or ``root`` itself when it names one), in key order, with their stat.

    Folder placeholders (zero-byte keys ending in ``/``) are not objects to read.
    """
    fs = root.fs
    try:
        found = fs.find(root.key.rstrip("/"), detail=True)
    except Exception as exc:
        raise reach_error(root, exc) from None
    for key in sorted(found):
        info = found[key]
        if info.get("type") == "directory" or key.endswith("/"):
            continue
        yield root.child(key), object_stat(fs, info)


def hash_object(path: ObjectPath, block: int = 1 << 20) -> str:
    """The content id of an object, read in blocks: a large PDF is never all in memory."""
    digest = hashlib.sha256()
    with path.open() as handle, reading(path):
        for chunk in iter(lambda: handle.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()[:32]


def upload(local: Path, target: ObjectPath) -> None:
    """Put the finished file ``local`` at ``target`` whole: the object appears only once complete."""
    try:
        target.fs.put_file(str(local), target.key)
    except Exception as exc:
        raise StorageError(f"{target.url}: cannot upload the output ({type(exc).__name__}: {exc}); "
                           "the checkpoint is intact: run again once this is fixed") from None


def local_state_folder(target: ObjectPath) -> Path:
    """This machine's folder for an object output's checkpoint and partial file.

    Under ``$OCRBATCH_CACHE_DIR`` or ``~/.cache/ocrbatch``, in ``outputs/<hash>``, so the same
    ``--out`` finds the same checkpoint on every run from this machine. The hash is of the URL and
    of the options that say which store it is in (an S3 endpoint, an Azure account): the same
    bucket name on two stores is two outputs; credentials, which change, are left out.
    """
    place = [f"{key}={value}" for key, value in target.options if key in _PLACE_OPTIONS]
    return cache_dir() / "outputs" / hashlib.sha256("\n".join([target.url, *place]).encode()).hexdigest()[:16]


def input_path(text: str, options: dict[str, Any]) -> Path | ObjectPath:
    """A PATH or ``--out`` as the job takes it: an :class:`ObjectPath` for a URL, else a :class:`Path`."""
    if is_url(text):
        return ObjectPath.of(text, options)
    return Path(text[len("file://"):] if text.startswith("file://") else text)
