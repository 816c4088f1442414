"""Files of an artifact store that lives on an fsspec filesystem other than this machine's disk.

``ArtifactStore`` (store.py) owns the layout, the path checks and the local-directory code path;
this module owns the plumbing of every other backend (``s3://bucket/prefix`` through s3fs,
``memory://…``, chained URLs): opening the filesystem from a URL, and reading, listing, creating
and removing objects under the store's prefix.

Object storage (S3 and the like) has no rename and no fsync, so a write goes to a temp object in
the same prefix (``TEMP_PREFIX``) and is then moved to its final name (on S3 a copy and a
delete: the final object appears whole). Nothing here overwrites on purpose: the caller creates
a name only after finding it missing, and as names are content hashes a racing writer can only
put the same bytes there. Reads return raw bytes; checking them against the recorded sha256 is
the caller's job.
Backend exceptions (botocore, aiohttp, OSError …) surface as one-line StoreErrors naming the
object's URL; a store that does not answer (a refused or dropped connection, a timeout) as a
StoreUnreachable saying so; a missing object that should be there is an IntegrityFailure.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import PurePosixPath
from typing import Any

from registry.errors import IntegrityFailure, RegistryError, StoreError, StoreUnreachable

log = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"  # an in-progress (or abandoned) write, renamed to its final name when done


class ObjectFiles:
    """The objects under one prefix of an fsspec filesystem, named by paths relative to it.

    Relative paths must already be checked by the caller (``ArtifactStore.path_of``).
    """

    def __init__(self, fs: Any, base: str, url: str) -> None:
        self.fs = fs  # the fsspec filesystem
        self.base = base  # the store's root in that filesystem, without a trailing "/"
        self.url = url  # what the store was opened with, for messages

    def path(self, relative: str) -> str:
        """The filesystem path of a stored object."""
        return f"{self.base}/{relative}" if self.base else relative

    def where(self, relative: str) -> str:
        """An object's URL (with its protocol), for messages."""
        return f"{self.url.rstrip('/')}/{relative}"

    def exists(self, relative: str) -> bool:
        """Whether the object is there (asked of the backend, not of fsspec's listing cache)."""
        target = self.path(relative)
        try:
            self.fs.invalidate_cache(target)
            return bool(self.fs.exists(target))
        except Exception as exc:
            raise self._error("cannot look up", relative, exc) from exc

    def modified(self, relative: str) -> float | None:
        """The object's modification time (POSIX seconds); None when it is gone."""
        target = self.path(relative)
        try:
            self.fs.invalidate_cache(target)
            return _mtime(self.fs.info(target))
        except FileNotFoundError:
            return None
        except Exception as exc:
            raise self._error("cannot look at", relative, exc) from exc

    def read(self, relative: str) -> bytes:
        """The bytes of an object that must exist: a missing one is an IntegrityFailure."""
        try:
            return self.fs.cat_file(self.path(relative))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise IntegrityFailure(
                f"artifact file {self.where(relative)} cannot be read: it is missing") from exc
        except Exception as exc:
            raise self._error("cannot read artifact", relative, exc) from exc

    def read_if_any(self, relative: str) -> bytes | None:
        """The bytes of an object that may not exist (yet); None when it does not."""
        try:
            return self.fs.cat_file(self.path(relative))
        except FileNotFoundError:
            return None
        except Exception as exc:
            # The marker's reader (registry.binding) says "artifact store … is unreachable".
            raise self._error("cannot read", relative, exc, named=False) from exc

    def create(self, relative: str, data: bytes) -> None:
        """Write ``data`` to a temp object beside ``relative``, then move it to that name.

        Readers never see a partial object under the final name. Two writers of the same
        content-addressed name write the same bytes, so the later move changes nothing.
        """
        parent = PurePosixPath(relative).parent.as_posix()
        suffix = PurePosixPath(relative).suffix
        temp = f"{TEMP_PREFIX}{uuid.uuid4().hex}{suffix}"
        temp = temp if parent == "." else f"{parent}/{temp}"
        try:
            if on_local_disk(self.fs) and parent != ".":
                # A chained URL over this machine's disk (simplecache::file://…) writes plain
                # files (with the process's umask, as any file its user creates), but into
                # directories that must exist; object storage has none to make.
                self.fs.makedirs(self.path(parent), exist_ok=True)
            self.fs.pipe_file(self.path(temp), data)
            self.fs.mv(self.path(temp), self.path(relative))
        except BaseException as exc:
            try:
                self.fs.rm_file(self.path(temp))
            except Exception as cleanup:  # noqa: BLE001  (never mask the write's error)
                # Gone already, or the store is unreachable: gc removes it once it is old.
                log.debug("temp object %s not removed: %s", temp, _reason(cleanup))
            if isinstance(exc, Exception) and not isinstance(exc, RegistryError):
                raise self._error("cannot write", relative, exc) from exc
            raise
        finally:
            self.fs.invalidate_cache(self.path(parent) if parent != "." else self.base)

    def files(self) -> Iterator[tuple[str, int, float]]:
        """Every object under the prefix as ``(relative path, bytes, mtime)``, sorted."""
        prefix = f"{self.base}/" if self.base else ""
        try:
            self.fs.invalidate_cache()
            found = self.fs.find(self.base or "/", detail=True)
        except FileNotFoundError:
            return
        except Exception as exc:
            if unreachable(exc):
                raise StoreUnreachable(f"artifact store {self.url} is unreachable: cannot list "
                                       f"it: {_reason(exc)}") from exc
            raise StoreError(f"cannot list artifact store {self.url}: {_reason(exc)}") from exc
        for name in sorted(found):
            info = found[name]
            path = str(name).lstrip("/") if not prefix.startswith("/") else str(name)
            if info.get("type", "file") != "file" or not path.startswith(prefix):
                continue
            yield path[len(prefix):], int(info.get("size") or 0), _mtime(info)

    def remove(self, relative: str) -> int:
        """Delete one object; returns the bytes freed (0 if it was already gone)."""
        target = self.path(relative)
        try:
            self.fs.invalidate_cache(target)
            size = int(self.fs.info(target).get("size") or 0)
            self.fs.rm_file(target)
        except FileNotFoundError:
            return 0
        except Exception as exc:
            raise self._error("cannot remove", relative, exc) from exc
        return size

    def _error(self, doing: str, relative: str, exc: BaseException,
               named: bool = True) -> StoreError:
        """One-line StoreError for a backend's exception (botocore, aiohttp, OSError …).

        When the store did not answer, a StoreUnreachable that says so first (unless ``named``
        is False: the caller names the store itself).
        """
        if unreachable(exc):
            if not named:
                return StoreUnreachable(f"{doing} {self.where(relative)}: {_reason(exc)}")
            return StoreUnreachable(f"artifact store {self.url} is unreachable: {doing} "
                                    f"{relative}: {_reason(exc)}")
        return StoreError(f"{doing} {self.where(relative)}: {_reason(exc)}")


def is_url(location: str) -> bool:
    """Whether a store location names an fsspec protocol (``s3://…``, chained ``a::b://…``)."""
    return "://" in location or "::" in location


def open_filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem and path of ``url``; a missing backend or bad URL is a StoreError."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as exc:
        raise StoreError(f"artifact store {url} needs fsspec (pip install fsspec)") from exc
    try:
        return url_to_fs(url)
    except ImportError as exc:  # e.g. "Install s3fs to access S3"
        raise StoreError(f"artifact store {url} needs a missing package: {_reason(exc)}") from exc
    except Exception as exc:  # unknown protocol, bad options
        raise StoreError(f"invalid artifact store URL {url}: {_reason(exc)}") from exc


def is_local_filesystem(fs: Any) -> bool:
    """Whether an fsspec filesystem is this machine's disk (``file://``, ``local://``)."""
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def on_local_disk(fs: Any) -> bool:
    """Whether a filesystem, or one it wraps (a cache's target), keeps files on this disk."""
    for _ in range(8):  # wrappers nest a few levels at most
        if fs is None:
            return False
        if is_local_filesystem(fs):
            return True
        fs = getattr(fs, "fs", None)
    return False


@functools.lru_cache(maxsize=1)
def _connection_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean the store did not answer, of the backends that are installed."""
    kinds: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from fsspec.exceptions import FSTimeoutError

        kinds.append(FSTimeoutError)
    except ImportError:
        pass
    try:  # S3 through s3fs: botocore's connection errors (refused, closed, timed out)
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        kinds += [BotoConnectionError, HTTPClientError]
    except ImportError:
        pass
    try:  # s3fs, gcsfs, http: aiohttp's (server disconnected, connection reset, payload cut)
        from aiohttp import ClientConnectionError, ClientPayloadError

        kinds += [ClientConnectionError, ClientPayloadError]
    except ImportError:
        pass
    try:  # backends on requests (webdav, some http ones)
        from requests.exceptions import ConnectionError as RequestsConnectionError
        from requests.exceptions import Timeout

        kinds += [RequestsConnectionError, Timeout]
    except ImportError:
        pass
    return tuple(kinds)


def unreachable(exc: BaseException) -> bool:
    """Whether a backend's exception, or one it was raised from, says the store did not answer.

    Such a failure says nothing about the file asked for: it is neither missing nor corrupt.
    """
    kinds = _connection_errors()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, StoreUnreachable) or (
                isinstance(current, kinds) and not isinstance(current, RegistryError)):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def _mtime(info: dict[str, Any]) -> float:
    """Modification time from an fsspec info dict (S3: LastModified; memory: created)."""
    for key in ("mtime", "LastModified", "last_modified", "modified", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
    # Unknown: treated as new. A temp object of a write in progress must never be collected;
    # on a backend that gives no times an abandoned one stays (it is only garbage).
    return time.time()


def _reason(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
