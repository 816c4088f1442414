"""The registry's database and artifact store, and transactions on them: Registry's bottom layer.

Writes run in transactions that take the database's write lock first (SQLite ``BEGIN
IMMEDIATE``; elsewhere a row or table lock the write takes), so a read-then-write is never
raced by another writer.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from registry import db
from registry.errors import RegistryError
from registry.store import ArtifactStore

DB_FILENAME = "registry.db"


class Transactions:
    """Opens the database (and the artifact store) under ``home``; runs transactions on it.

    With ``create=False`` (read commands) a missing or empty database raises NoRegistry and
    nothing is created, neither the file nor the home directory.
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        db_url: Optional[str] = None,
        *,
        create: bool = True,
    ) -> None:
        self.home = Path(home)
        self.url = db_url or db.sqlite_url(self.home / DB_FILENAME)
        self.engine = db.make_engine(self.url, create=create)
        try:
            db.ensure_schema(self.engine, create=create)
        except BaseException:
            self.engine.dispose()
            raise
        self.store = ArtifactStore(self.home / "artifacts")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(db.writer(self.engine), expire_on_commit=False)

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
            except (OperationalError, DatabaseError) as exc:
                # Locked, read-only or full database: a user-facing error, not a traceback.
                session.rollback()
                raise RegistryError(
                    f"database {db.location(self.engine)}: {error_reason(exc)}"
                ) from exc
            except BaseException:
                session.rollback()
                raise


def error_reason(exc: Exception) -> str:
    """The first line of a database error's message (the driver's, when there is one)."""
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]
