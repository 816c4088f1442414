"""Content-addressed artifact store: files named by sha256, written atomically, verified on read."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from registry.errors import IntegrityFailure

SUFFIX = ".safetensors"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


class ArtifactStore:
    """Files under ``root/ab/abcdef….safetensors``; identical content is stored once, never rewritten."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def relative_path(self, sha256: str) -> str:
        return f"{sha256[:2]}/{sha256}{SUFFIX}"

    def path_of(self, relative: str) -> Path:
        return self.root / relative

    def write(self, data: bytes) -> tuple[str, str]:
        """Store ``data`` (temp file → fsync → rename) and return ``(sha256, relative path)``.

        An existing file with the right content is left alone: artifacts are never rewritten.
        """
        digest = sha256_bytes(data)
        relative = self.relative_path(digest)
        final = self.path_of(relative)
        if final.exists():
            if self._file_digest(final) != digest:
                # Never rewrite an artifact: a damaged one is evidence for `--verify`.
                raise IntegrityFailure(f"artifact file {final} exists but is corrupt")
            return digest, relative
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._fsync_dir(final.parent)
        return digest, relative

    def read(self, relative: str, sha256: str) -> bytes:
        """Return the file's bytes after checking them against ``sha256``."""
        path = self.path_of(relative)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IntegrityFailure(f"artifact file {path} cannot be read: {exc.strerror}") from exc
        actual = sha256_bytes(data)
        if actual != sha256:
            raise IntegrityFailure(
                f"artifact file {path} is corrupt: sha256 {actual[:12]}… != recorded {sha256[:12]}…"
            )
        return data

    def verify(self, relative: str, sha256: str) -> None:
        """Raise IntegrityFailure unless the file exists and hashes to ``sha256``."""
        self.read(relative, sha256)

    @staticmethod
    def _file_digest(path: Path) -> str:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
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
