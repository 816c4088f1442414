"""Content-addressed artifact store: files named by sha256, written atomically, verified on read.

The store is a local directory or any fsspec URL (``file://…`` on a shared mount, ``s3://bucket/
prefix`` through s3fs, ``memory://…``). Local directories keep the POSIX path here: temp file →
fsync → rename, symlink escapes refused. Other filesystems go through ``registry.objects``
(a temp object moved to its final name); a final name that exists is never written again, and
as names are content hashes it can only hold that content. Every read, on every backend, is
checked against its sha256 here.

Paths come from the database, so they are checked before use: a path must be the layout of its
sha256 and stay inside the store. OS and backend errors surface as StoreError naming the user's
path or URL.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePath, PurePosixPath
from typing import Any, Optional

from registry.errors import IntegrityFailure, StoreError
from registry.objects import (
    TEMP_PREFIX,
    ObjectFiles,
    is_local_filesystem,
    is_url,
    open_filesystem,
)

__all__ = ["MARKER", "SUFFIX", "TEMP_PREFIX", "ArtifactStore", "sha256_bytes"]

SUFFIX = ".safetensors"
# The object at the store's root that names the registry it belongs to (registry.binding).
MARKER = ".taps-cl-store.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_LAYOUT = re.compile(r"([0-9a-f]{2})/([0-9a-f]{64})" + re.escape(SUFFIX))


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Files under ``root/ab/abcdef….safetensors``; identical content is stored once, never rewritten.

    ``location`` is a local path or an fsspec URL. ``url`` is what the store was opened with
    (a local path as given); ``root`` is a ``Path`` for local stores and the filesystem's
    ``PurePosixPath`` (``bucket/prefix``) for others; ``is_local`` tells them apart. Opening
    contacts nothing: an unreachable store fails at its first operation, as a StoreError.
    """

    def __init__(self, location: str | os.PathLike[str]) -> None:
        self._objects: ObjectFiles | None = None  # the files of a non-local store
        # Set by registry.binding while the registry records no store yet: what recording this
        # store with the registry's first artifact needs. None once recorded (or never needed).
        self.pending_binding: Any = None
        text = os.fspath(location)
        if isinstance(location, os.PathLike) or not is_url(text):
            self.root: PurePath = Path(text)
            self.url = text
            return
        fs, path = open_filesystem(text)
        self.url = text
        if is_local_filesystem(fs):  # file://, local:// — the local code path, with fsync
            self.root = Path(path)
            return
        self._objects = ObjectFiles(fs, path.rstrip("/"), text)
        self.root = PurePosixPath(self._objects.base or "/")

    @property
    def is_local(self) -> bool:
        """Whether the store is a directory of this machine (POSIX writes, symlink checks)."""
        return self._objects is None

    def __repr__(self) -> str:
        return f"ArtifactStore({self.url!r})"

    def relative_path(self, sha256: str) -> str:
        """Where content with this sha256 lives, (``ab/abcdef….safetensors``)."""
        return f"{sha256[:2]}/{sha256}{SUFFIX}"

    def where(self, relative: str) -> str:
        """A stored file's location for messages: a local path, or a URL with its protocol."""
        if self._objects is None:
            return str(self.root / relative)
        return self._objects.where(relative)

    def path_of(self, relative: str) -> PurePath:
        """The absolute path of a stored file; a path that would leave the store is refused.

        Raises IntegrityFailure for an absolute path, one with ``..`` or one that resolves
        (through a symlink) outside the root: such a path can only come from an edited row.
        Local stores give a ``Path``; others the object's ``PurePosixPath`` in their filesystem
        (object storage has no symlinks: the check is the lexical one).
        """
        pure = PurePosixPath(relative)
        if (
            not relative
            or "\\" in relative
            or "\x00" in relative
            or pure.is_absolute()
            or ".." in pure.parts
        ):
            raise IntegrityFailure(f"artifact path {relative!r} escapes the store {self.root}")
        if self._objects is not None:
            return PurePosixPath(self._objects.path(relative))
        assert isinstance(self.root, Path)
        path = self.root / pure
        try:
            inside = path.resolve().is_relative_to(self.root.resolve())
        except (OSError, RuntimeError) as exc:  # a symlink loop
            raise IntegrityFailure(f"artifact path {relative!r} cannot be resolved: {exc}") from exc
        if not inside:
            raise IntegrityFailure(f"artifact path {relative!r} escapes the store {self.root}")
        return path

    def check_layout(self, relative: str, sha256: str) -> Path:
        """The file's path, after checking ``relative`` is where ``sha256`` content belongs."""
        if not _SHA256.fullmatch(sha256 or ""):
            raise IntegrityFailure(f"recorded sha256 {sha256!r} is not a sha256 hex digest")
        if relative != self.relative_path(sha256):
            raise IntegrityFailure(
                f"artifact path {relative!r} is not where content {sha256[:12]}… is stored "
                f"({self.relative_path(sha256)}): the row was edited"
            )
        return self.path_of(relative)

    def write(self, data: bytes) -> tuple[str, str]:
        """Store ``data`` (temp file → fsync → rename) and return ``(sha256, relative path)``.

        An existing file with the right content is left alone: artifacts are never rewritten.
        """
        digest, relative, _created = self.put(data)
        return digest, relative

    def put(self, data: bytes) -> tuple[str, str, bool]:
        """Like :meth:`write`, also saying whether this call created the file.

        A caller whose database transaction then fails removes only files it created.
        """
        digest = sha256_bytes(data)
        relative = self.relative_path(digest)
        final = self.path_of(relative)
        if self._objects is not None:
            return digest, relative, self._put_object(self._objects, relative, data, digest)
        assert isinstance(final, Path)
        try:
            exists = final.exists()
        except OSError as exc:
            raise StoreError(f"cannot look up artifact {final}: {exc.strerror or exc}") from exc
        if exists:
            if self._file_digest(final) != digest:
                # Never rewrite an artifact: a damaged one is evidence for `--verify`.
                raise IntegrityFailure(f"artifact file {final} exists but is corrupt")
            return digest, relative, False
        tmp = None
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = create_temp(final.parent, SUFFIX)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            _unlink_quietly(tmp)
            raise StoreError(
                f"cannot write artifact into {final.parent}: {exc.strerror or exc}"
            ) from exc
        except BaseException:
            _unlink_quietly(tmp)
            raise
        self._fsync_dir(final.parent)
        return digest, relative, True

    def read(self, relative: str, sha256: str) -> bytes:
        """Return the file's bytes after checking its path and content against ``sha256``."""
        path = self.check_layout(relative, sha256)
        if self._objects is not None:
            data = self._objects.read(relative)
            actual = sha256_bytes(data)
            if actual != sha256:
                raise IntegrityFailure(
                    f"artifact file {self.where(relative)} is corrupt: sha256 {actual[:12]}… "
                    f"!= recorded {sha256[:12]}…"
                )
            return data
        assert isinstance(path, Path)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise IntegrityFailure(f"artifact file {path} cannot be read: {exc.strerror}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read artifact {path}: {exc.strerror or exc}") from exc
        actual = sha256_bytes(data)
        if actual != sha256:
            raise IntegrityFailure(
                f"artifact file {path} is corrupt: sha256 {actual[:12]}… != recorded {sha256[:12]}…"
            )
        return data

    def files(self) -> Iterator[tuple[str, int, float]]:
        """Every regular file under the root as ``(relative path, bytes, mtime)``; no symlinks."""
        if self._objects is not None:
            yield from self._objects.files()
            return
        assert isinstance(self.root, Path)
        if not self.root.is_dir():
            return
        for directory, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for filename in sorted(filenames):
                path = Path(directory) / filename
                try:
                    stat = path.lstat()
                except OSError:  # removed meanwhile
                    continue
                if not path.is_symlink() and path.is_file():
                    yield path.relative_to(self.root).as_posix(), stat.st_size, stat.st_mtime

    @staticmethod
    def layout_sha256(relative: str) -> str | None:
        """The sha256 a path names if it has the layout ``ab/ab….safetensors``, else None."""
        match = _LAYOUT.fullmatch(relative)
        if match is None or not match.group(2).startswith(match.group(1)):
            return None
        return match.group(2)

    @staticmethod
    def is_temp(relative: str) -> bool:
        """Whether the path is a temp file of a write (``ab/.tmp-….safetensors``)."""
        return PurePosixPath(relative).name.startswith(TEMP_PREFIX)

    def remove(self, relative: str) -> int:
        """Delete one file; returns the bytes freed (0 if it was already gone)."""
        path = self.path_of(relative)
        if self._objects is not None:
            return self._objects.remove(relative)
        assert isinstance(path, Path)
        try:
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"cannot remove {path}: {exc.strerror or exc}") from exc
        return size

    def exists(self, relative: str) -> bool:
        """Whether a stored file is there (asked of the store itself, not of a cached listing)."""
        path = self.path_of(relative)
        if self._objects is not None:
            return self._objects.exists(relative)
        try:
            return Path(path).exists()
        except OSError as exc:
            raise StoreError(f"cannot look up artifact {path}: {exc.strerror or exc}") from exc

    def modified(self, relative: str) -> Optional[float]:
        """A stored file's modification time (POSIX seconds); None when it is gone."""
        path = self.path_of(relative)
        if self._objects is not None:
            return self._objects.modified(relative)
        try:
            return Path(path).lstat().st_mtime
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"cannot look at {path}: {exc.strerror or exc}") from exc

    # ------------------------------------------------------------------ the marker
    def read_marker(self) -> Optional[bytes]:
        """The content of the store's MARKER object; None when the store has none (yet).

        Raises StoreError when the store cannot be asked (unreachable, no credentials).
        """
        if self._objects is not None:
            return self._objects.read_if_any(MARKER)
        assert isinstance(self.root, Path)
        try:
            return (self.root / MARKER).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(
                f"cannot read {self.root / MARKER}: {exc.strerror or exc}") from exc

    def write_marker(self, data: bytes) -> bool:
        """Create the MARKER object (atomically, never over an existing one); False if there is one.

        A local store's directory is created when missing.
        """
        if self._objects is not None:
            if self.exists(MARKER):
                return False
            self._objects.create(MARKER, data)
            return True
        assert isinstance(self.root, Path)
        final = self.root / MARKER
        tmp = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, tmp = create_temp(self.root, ".json")
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, final)  # unlike rename, a link never replaces an existing name
        except FileExistsError:
            return False
        except OSError as exc:
            raise StoreError(f"cannot write {final}: {exc.strerror or exc}") from exc
        finally:
            _unlink_quietly(tmp)
        self._fsync_dir(self.root)
        return True

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _put_object(objects: ObjectFiles, relative: str, data: bytes, digest: str) -> bool:
        """:meth:`put` on a non-local store; returns whether this call created the object."""
        if objects.exists(relative):
            if sha256_bytes(objects.read(relative)) != digest:
                # Never rewrite an artifact: a damaged one is evidence for `--verify`.
                raise IntegrityFailure(
                    f"artifact file {objects.where(relative)} exists but is corrupt")
            return False
        objects.create(relative, data)
        return True

    @staticmethod
    def _file_digest(path: Path) -> str:
        digest = hashlib.sha256()
        try:
            with path.open("rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as exc:
            raise StoreError(f"cannot read artifact {path}: {exc.strerror or exc}") from exc
        return digest.hexdigest()

    @staticmethod
    def _fsync_dir(directory: Path) -> None:
        # The rename is durable only once the directory entry is flushed (POSIX).
        try:
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


def create_temp(directory: Path, suffix: str) -> tuple[int, str]:
    """A new temp file of a write in ``directory`` (``.tmp-<random><suffix>``), open for writing.

    Created with mode 0666 less the process's umask (and under a directory's default ACL), as
    any file its user creates, so a team reads the store on a shared mount; mkstemp would make
    it 0600 whatever the umask. O_EXCL (and O_NOFOLLOW) with a random name: a file or symlink
    planted there is never followed or reused.
    """
    flags = (os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
             | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
    for _ in range(100):
        path = os.path.join(directory, f"{TEMP_PREFIX}{uuid.uuid4().hex}{suffix}")
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise OSError(f"no free temp file name in {directory}")


def _unlink_quietly(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except OSError:
            pass
