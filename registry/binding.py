"""Which artifact store a registry belongs to: recorded in the database, confirmed by the store.

A registry records its store once, in the one-row table ``artifact_store``, when it is first
opened for writing (a new registry, or one upgraded from before revision 0005):

* a store the user named (``--artifacts`` / ``TAPS_CL_ARTIFACTS``) gets a marker object
  (``store.MARKER``) holding a new store id, and the id is recorded with the store's URL;
* the default ``<home>/artifacts`` gets no marker, so a default home looks as it always did,
  and is known by its directory.

A local store inside the SQLite file's directory is recorded by a path relative to it (the
default as ``artifacts``): a moved or copied home keeps working. Every open then resolves and
checks the store before any artifact is touched. Without a named store the recorded one is used,
so a team member needs only the database URL; a named store must carry the recorded id (the same
store through another mount path or URL is fine), or be the recorded directory for a store
without a marker. Anything else, and an unreachable store, is one error line at open.

Readers never write: a registry with no record yet reads the named (or default) store as is.
A store that already carries another id is adopted only by a registry whose base weights it
holds (the registry recorded it before a downgrade), else refused: two registries sharing one
store would delete each other's files in `gc`.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Optional

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from registry import db
from registry.entities import StoreRecord
from registry.errors import StoreError, StoreMismatch
from registry.models import ArtifactRow, ArtifactStoreRow
from registry.store import MARKER, ArtifactStore

log = logging.getLogger(__name__)

MARKER_FORMAT = "taps-cl artifact store"
DEFAULT_STORE = "artifacts"  # the default store's directory, under the home

SessionFactory = Callable[..., AbstractContextManager[Session]]


def open_store(
    session: SessionFactory,
    *,
    home: Path,
    db_dir: Optional[Path],
    artifacts: Optional[str | os.PathLike[str]],
    create: bool,
) -> tuple[ArtifactStore, Optional[StoreRecord]]:
    """The registry's artifact store, checked against its record (which a writer makes first).

    ``db_dir`` is the SQLite file's directory (None for server databases): recorded relative
    paths are relative to it. ``artifacts`` is the store the user named, or None.
    """
    named = artifacts is not None and os.fspath(artifacts) != ""
    row = _recorded(session)
    if row is None:
        store = ArtifactStore(artifacts if named else home / DEFAULT_STORE)  # type: ignore
        if not create:
            return store, None
        row = _adopt(session, store, named=named, db_dir=db_dir)
    url, store_id = row
    recorded = _resolve(url, db_dir, home)
    store = ArtifactStore(artifacts if named else recorded)  # type: ignore[arg-type]
    _check(session, store, store_id, recorded, named=named)
    location = str(store.root) if store.is_local else store.url
    return store, StoreRecord(url=url, store_id=store_id, location=location)


def _recorded(session: SessionFactory) -> Optional[tuple[str, Optional[str]]]:
    with session() as s:
        row = s.get(ArtifactStoreRow, 1)
        return None if row is None else (row.url, row.store_id)


def _adopt(
    session: SessionFactory, store: ArtifactStore, *, named: bool, db_dir: Optional[Path]
) -> tuple[str, Optional[str]]:
    """Record ``store`` as the registry's (with a marker if it was named); returns the record.

    Runs under the database's write lock, so concurrent first writers record one store; one
    that finds a record made meanwhile returns that record instead.
    """
    with session(write=True) as s:
        if s.get_bind().dialect.name == "postgresql":
            s.execute(text("LOCK TABLE artifact_store IN SHARE ROW EXCLUSIVE MODE"))
        row = s.get(ArtifactStoreRow, 1)
        if row is not None:
            return row.url, row.store_id
        store_id = _marker_id(store)
        if store_id is not None:
            if not _holds_registry(s, store):
                raise StoreMismatch(
                    f"artifact store {store.url} belongs to another registry (store id "
                    f"{store_id}); if it does not, remove its {MARKER} and try again"
                )
            log.info("adopting artifact store %s (store id %s)", store.url, store_id)
        elif named:
            new_id = uuid.uuid4().hex
            if not store.write_marker(_marker(new_id)):
                raise StoreMismatch(f"artifact store {store.url} was just claimed by another "
                                    "registry")
            store_id = new_id
        url = _record_url(store, db_dir)
        s.add(ArtifactStoreRow(id=1, store_id=store_id, url=url))
        log.info("recorded artifact store %s%s", url, f" (store id {store_id})" if store_id else "")
        return url, store_id


def _check(
    session: SessionFactory,
    store: ArtifactStore,
    store_id: Optional[str],
    recorded: str | Path,
    *,
    named: bool,
) -> None:
    """Refuse a store that is not the recorded one, or that cannot be reached."""
    mismatch = StoreMismatch(
        f"artifact store {store.url} is not this registry's store (recorded: {recorded})")
    missing = StoreError(f"artifact store {store.url} is unreachable: no such directory"
                         + (f" (recorded: {recorded})" if named else ""))
    if store_id is None:  # a store without a marker: known by its directory
        if named and not _same_directory(store, recorded):
            raise missing if store.is_local and not Path(store.root).is_dir() else mismatch
        if not Path(store.root).is_dir() and _has_artifacts(session):
            raise missing
        return
    try:
        found = _marker_id(store)
    except StoreError as exc:
        raise StoreError(f"artifact store {store.url} is unreachable: {exc}") from exc
    if found != store_id:
        if found is None and store.is_local and not Path(store.root).is_dir():
            raise missing
        raise mismatch


def _marker(store_id: str) -> bytes:
    return json.dumps({"format": MARKER_FORMAT, "store_id": store_id}, indent=1).encode()


def _marker_id(store: ArtifactStore) -> Optional[str]:
    """The store id in the store's marker; None when it has no marker."""
    data = store.read_marker()
    if data is None:
        return None
    try:
        content = json.loads(data)
        store_id = content["store_id"] if content.get("format") == MARKER_FORMAT else None
    except (ValueError, TypeError, AttributeError, KeyError):
        store_id = None
    if not isinstance(store_id, str) or not store_id:
        raise StoreMismatch(f"artifact store {store.url} has a {MARKER} that is not a taps-cl "
                            "store marker")
    return store_id


def _holds_registry(s: Session, store: ArtifactStore) -> bool:
    """Whether the store holds every base weights file of the registry (at least one)."""
    paths = s.scalars(select(ArtifactRow.path).where(ArtifactRow.kind == "base")).all()
    return bool(paths) and all(store.exists(path) for path in paths)


def _has_artifacts(session: SessionFactory) -> bool:
    with session() as s:
        return s.scalar(select(ArtifactRow.id).limit(1)) is not None


def _record_url(store: ArtifactStore, db_dir: Optional[Path]) -> str:
    """How the store is recorded: its URL, or a local path (relative to ``db_dir`` if inside)."""
    if not store.is_local:
        return store.url
    path = Path(os.path.abspath(store.root))
    if db_dir is not None:
        try:
            return path.relative_to(os.path.abspath(db_dir)).as_posix()
        except ValueError:
            pass
    return str(path)


def _resolve(url: str, db_dir: Optional[Path], home: Path) -> str | Path:
    """Where a recorded store is for this client (the home's default stays ``home/artifacts``)."""
    if "://" in url or "::" in url or Path(url).is_absolute():
        return url
    path = (db_dir if db_dir is not None else home) / url
    default = home / DEFAULT_STORE
    if os.path.abspath(path) == os.path.abspath(default):
        return default  # the same directory, named as before 0005 (tests and messages use it)
    return path


def _same_directory(store: ArtifactStore, recorded: str | Path) -> bool:
    if not store.is_local or "://" in str(recorded):
        return False
    try:
        return os.path.samefile(store.root, recorded)
    except OSError:  # either one missing: compare the paths
        return os.path.abspath(store.root) == os.path.abspath(recorded)


def recorded_url(engine: Engine) -> Optional[str]:
    """The store URL a database recorded, as recorded; None when none is (or before 0005).

    A relative path is relative to the SQLite file's directory.
    """
    if db.current_revision(engine) is None:
        return None
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT url FROM artifact_store WHERE id = 1")).scalar()
    except DatabaseError:  # a schema from before the table existed
        return None
