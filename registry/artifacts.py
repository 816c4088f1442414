"""Artifact files of the Registry: reading, checking, recording in a write, cleaning up.

Artifact files are written before the transaction that records them; a transaction that fails
removes the files its call created, unless a row references them by then. Files no row needs
are found and removed by garbage collection (find_garbage, remove_garbage).

A registry that records no artifact store yet records it in the transaction of its first
artifact (registry.binding.bind_first): a failed write leaves no binding behind.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Optional

from sqlalchemy import event, func, or_, select, text
from sqlalchemy.orm import Session

from registry import binding, db
from registry.entities import Artifact, GarbageFile, StoreRecord
from registry.errors import IntegrityFailure, RegistryError, StoreError
from registry.models import ARTIFACT_KINDS, ArtifactRow
from registry.rows import to_artifact
from registry.store import MARKER
from registry.transactions import Transactions

log = logging.getLogger(__name__)

# A temp file of a write is garbage only when older than this: a live write's is left alone.
TEMP_GRACE_SECONDS = 600


class ArtifactFiles(Transactions):
    """The Registry's artifact verbs, and the staging and clean-up its writes use."""

    # ----------------------------------------------------------------- artifacts
    def write_artifact_file(self, data: bytes) -> tuple[str, str]:
        """Write content to the store (no row yet); returns (sha256, relative path)."""
        return self.store.write(data)

    def read_artifact(self, artifact: Artifact) -> bytes:
        """The artifact's bytes, verified against its sha256."""
        return self.store.read(artifact.path, artifact.sha256)

    def check_artifact(self, artifact: Artifact) -> bytes:
        """The artifact's bytes after checking every recorded fact a file can confirm.

        Checks the path is the content-addressed place of its sha256 inside the store, the
        content hashes to the sha256, and the row's ``bytes`` (and ``kind``) are right; raises
        IntegrityFailure naming the field otherwise. ``num_params`` needs torch: callers check it.
        """
        data = self.store.read(artifact.path, artifact.sha256)
        if artifact.bytes != len(data):
            raise IntegrityFailure(
                f"artifact {artifact.sha256[:12]}… records bytes={artifact.bytes}, "
                f"but its file holds {len(data)} bytes"
            )
        if artifact.kind not in ARTIFACT_KINDS:
            raise IntegrityFailure(
                f"artifact {artifact.sha256[:12]}… has unknown kind {artifact.kind!r}"
            )
        return data

    def check_store_binding(self) -> None:
        """Raise a RegistryError unless the registry records its artifact store and that record
        names the store in use, as its marker confirms (registry.binding.check_binding)."""
        sqlite_file = db.sqlite_path(self.engine.url)
        binding.check_binding(self._session, self.store, home=self.home,
                              db_dir=sqlite_file.parent if sqlite_file is not None else None)

    def list_artifacts(self) -> list[Artifact]:
        with self._session() as s:
            return [
                to_artifact(row) for row in s.scalars(select(ArtifactRow).order_by(ArtifactRow.id))
            ]

    def _stage(self, data: bytes, created: list[str]) -> tuple[str, str]:
        """Write a file before its transaction; note it in ``created`` if this call made it."""
        sha, relative, made = self.store.put(data)
        if made:
            created.append(relative)
        return sha, relative

    def _record_artifact(
        self,
        s: Session,
        data: bytes,
        staged: tuple[str, str],
        kind: str,
        num_params: int,
        created: list[str],
    ) -> ArtifactRow:
        """Get or create the row of a staged file inside the write transaction ``s``.

        Under the write lock the file is looked at again: a failed concurrent call or gc may
        have removed it since it was staged (neither removes a file a row references), and
        then it is written once more, so a committed row never points at nothing.
        """
        if kind not in ARTIFACT_KINDS:
            raise RegistryError(f"unknown artifact kind {kind!r}")
        _lock_artifacts(s)
        self._bind_store(s, created)
        sha, relative = staged
        if not self.store.exists(relative):
            self._stage(data, created)
        row = s.scalar(select(ArtifactRow).where(ArtifactRow.sha256 == sha))
        if row is None:
            row = ArtifactRow(
                sha256=sha, path=relative, bytes=len(data), num_params=num_params, kind=kind
            )
            s.add(row)
            s.flush()
        return row

    def _bind_store(self, s: Session, created: list[str]) -> None:
        """Record the store in ``s`` if the registry records none yet (its first artifact).

        The record is kept (``store_record``) only once ``s`` commits; a marker made for it is
        in ``created``, removed again if the write fails.
        """
        if self.store.pending_binding is None or s.info.get("store_bound"):
            return
        record = binding.bind_first(s, self.store, home=self.home, created=created)
        if record is None:
            return
        s.info["store_bound"] = True

        def committed(_session: Session) -> None:
            self._store_bound(record)

        event.listen(s, "after_commit", committed, once=True)

    def _store_bound(self, record: StoreRecord) -> None:
        self.store_record = record
        self.store.pending_binding = None

    def _remove_created(self, created: list[str]) -> None:
        """After a failed write: delete the files this call created that no row references.

        Done under the write lock so that a concurrent call that found the file already there
        either committed its row first (the file stays) or writes the file again (see
        _record_artifact). When the database cannot be written at all (read-only), the check
        runs without the lock. A file that cannot be removed (the store is unreachable, or the
        failure is the store's) stays behind for `taps-cl gc`, as a crash would leave it.
        Never raises: the caller is already handling an error.
        """
        if not created:
            return
        for write in (True, False):
            try:
                with self._session(write=write) as s:
                    if write:
                        _lock_artifacts(s)
                    for relative in created:
                        if relative == MARKER:  # a store this failed write would have recorded
                            binding.remove_unrecorded_marker(s, self.store)
                            continue
                        sha = self.store.layout_sha256(relative)
                        if not _referenced(s, relative, sha):
                            self.store.remove(relative)
                            log.info("removed %s, written by a call that did not commit", relative)
                return
            except StoreError as exc:  # asking again, without the lock, cannot help
                # Harmless: no row references them, and `taps-cl gc` lists and removes them.
                # The caller's error (often the same store failure) is what the user is told.
                log.info("files of a failed write stay in the store until `taps-cl gc` removes "
                         "them (%s): %s", ", ".join(created), _first_line(exc))
                return
            except RegistryError as exc:
                log.warning("cannot clean up files of a failed write (%s): %s", created, exc)
            except Exception:  # never mask the caller's error
                log.exception("cannot clean up files of a failed write: %s", created)
                return

    # ------------------------------------------------------------------- garbage
    def find_garbage(self, now: Optional[float] = None) -> list[GarbageFile]:
        """Files in the store that no row needs: artifact files no row references, and temp
        files of writes older than TEMP_GRACE_SECONDS (younger ones may belong to a live write).

        Files that do not have the store's layout are not listed: they are not ours to delete.
        """
        # Files are listed before rows are read: a file recorded meanwhile counts as referenced.
        files = list(self.store.files())
        with self._session() as s:
            paths = set(s.scalars(select(ArtifactRow.path)))
            shas = set(s.scalars(select(ArtifactRow.sha256)))
        now = time.time() if now is None else now
        garbage = []
        for relative, size, mtime in files:
            if self.store.is_temp(relative):
                if now - mtime >= TEMP_GRACE_SECONDS:
                    garbage.append(GarbageFile(relative, size, "temp"))
                continue
            sha = self.store.layout_sha256(relative)
            if sha is None or relative in paths or sha in shas:
                continue
            garbage.append(GarbageFile(relative, size, "unreferenced"))
        return garbage

    def remove_garbage(self, files: Sequence[GarbageFile], now: Optional[float] = None) -> int:
        """Delete the given files, each re-checked under the write lock; returns the bytes freed.

        A file a row references by now, a temp file younger than TEMP_GRACE_SECONDS, or a path
        that is neither an artifact file nor a temp file of the store is left alone.
        """
        freed = 0
        with self._session(write=True) as s:
            _lock_artifacts(s)
            for garbage in files:
                relative = garbage.path
                self.store.path_of(relative)  # refuses paths outside the store
                if self.store.is_temp(relative):
                    mtime = self.store.modified(relative)
                    if mtime is None:
                        continue
                    current = time.time() if now is None else now
                    if current - mtime >= TEMP_GRACE_SECONDS:
                        freed += self.store.remove(relative)
                    continue
                sha = self.store.layout_sha256(relative)
                if sha is None:
                    log.warning("%s is not an artifact file of the store; not removed", relative)
                    continue
                if _referenced(s, relative, sha):
                    log.info("%s is referenced (again); not removed", relative)
                    continue
                freed += self.store.remove(relative)
        return freed


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, or its type when it has none."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _lock_artifacts(s: Session) -> None:
    """Serialise writers of artifact rows and files (SQLite's BEGIN IMMEDIATE does already)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("LOCK TABLE artifacts IN SHARE ROW EXCLUSIVE MODE"))


def _referenced(s: Session, relative: str, sha: Optional[str]) -> bool:
    """Whether a row references this file, by its path or by its content's sha256."""
    used = s.scalar(
        select(func.count())
        .select_from(ArtifactRow)
        .where(or_(ArtifactRow.path == relative, ArtifactRow.sha256 == sha))
    )
    return bool(used)
