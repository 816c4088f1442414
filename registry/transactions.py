"""The registry's database and artifact store, and transactions on them: Registry's bottom layer.

Writes run in transactions that take the database's write lock first (SQLite ``BEGIN
IMMEDIATE``; elsewhere a row or table lock the write takes), so a read-then-write is never
raced by another writer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from registry import binding, db
from registry.entities import StoreRecord
from registry.errors import RegistryError
from registry.store import ArtifactStore

DB_FILENAME = "registry.db"

log = logging.getLogger(__name__)


class Transactions:
    """Opens the database (and the artifact store) under ``home``; runs transactions on it.

    With ``create=False`` (read commands) a missing or empty database raises NoRegistry and
    nothing is created, neither the file nor the home directory.

    ``artifacts`` names the artifact store (a local path or an fsspec URL); by default the
    store the registry recorded, else ``<home>/artifacts``. A store that is not the recorded
    one, or cannot be reached, is refused here (registry.binding).
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        db_url: Optional[str] = None,
        *,
        create: bool = True,
        artifacts: Optional[str | os.PathLike[str]] = None,
    ) -> None:
        self.home = Path(home)
        self.url = db_url or db.sqlite_url(self.home / DB_FILENAME)
        new_file = db.sqlite_path(self.url)
        if new_file is not None and new_file.exists():
            new_file = None  # not this call's to remove on failure
        self.engine = db.make_engine(self.url, create=create)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(db.writer(self.engine), expire_on_commit=False)
        self.store: ArtifactStore
        self.store_record: Optional[StoreRecord]  # None: a reader of a registry not bound yet
        try:
            db.ensure_schema(self.engine, create=create)
            sqlite_file = db.sqlite_path(self.engine.url)
            try:
                self.store, self.store_record = binding.open_store(
                    self._session, home=self.home, artifacts=artifacts, create=create,
                    db_dir=sqlite_file.parent if sqlite_file is not None else None,
                )
            except RegistryError:
                if new_file is not None:  # the store was refused: leave no empty registry
                    self.engine.dispose()
                    for path in (new_file, *(new_file.with_name(new_file.name + suffix)
                                             for suffix in ("-wal", "-shm"))):
                        path.unlink(missing_ok=True)
                raise
        except BaseException:
            self.engine.dispose()
            raise

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        """A transaction; ``write`` ones take the write lock at BEGIN (SQLite: BEGIN IMMEDIATE)."""
        with (self._write_sessions if write else self._sessions)() as session:
            try:
                yield session
                session.commit()
            except DBAPIError as exc:
                # Locked, read-only or full database, or its server gone (restarted, connection
                # closed: the driver's interface errors too): a user-facing error, not a traceback.
                _rollback(session)
                raise RegistryError(
                    f"database {db.location(self.engine)}: {error_reason(exc)}"
                ) from exc
            except BaseException:
                _rollback(session)
                raise


def _rollback(session: Session) -> None:
    """Roll back after an error without masking it: on a connection the server dropped, the
    rollback itself may fail (the transaction is gone with the connection either way)."""
    try:
        session.rollback()
    except Exception as exc:  # noqa: BLE001 — the caller's error is the one to report
        log.debug("rollback after an error failed too: %s", exc)


def error_reason(exc: Exception) -> str:
    """The first line of a database error's message (the driver's, when there is one)."""
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]
