"""Which artifact store a registry belongs to: recorded in the database, confirmed by the store.

A registry records its store once, in the one-row table ``artifact_store``: a new registry
with its first artifact, one that holds artifacts but records no store (upgraded from before
revision 0005) when it is first opened for writing:

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

Opening for reading records nothing: a registry with no record yet reads the named (or
default) store as is. A store that already carries another id is adopted only by a registry
whose files it holds (the registry recorded it before a downgrade), else refused: two
registries sharing one store would delete each other's files in `gc`.

A registry with no artifact yet records its store in the transaction that records its first
artifact (``bind_first``, called by ``ArtifactFiles._record_artifact``), never before: a write
that fails records no store, and the marker it made is removed again. A registry that holds
artifacts but records no store (upgraded from before 0005, or its row was deleted) records one
only if the store holds its files (``_missing_files``): another store is refused at open and
stays unrecorded, so the registry's real store keeps working. ``check_binding`` is what
``report accuracy --verify`` asks: the row is there, names the store in use, and its marker
agrees.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session

from registry import db
from registry.entities import StoreRecord
from registry.errors import IntegrityFailure, RegistryError, StoreError, StoreMismatch
from registry.models import ArtifactRow, ArtifactStoreRow
from registry.store import MARKER, ArtifactStore

log = logging.getLogger(__name__)

MARKER_FORMAT = "taps-cl artifact store"
DEFAULT_STORE = "artifacts"  # the default store's directory, under the home

# How many of the newest artifacts, besides every base's weights, a store must hold before a
# registry that records no store adopts it (each is one existence check, on S3 a request).
NEWEST_CHECKED = 8

SessionFactory = Callable[..., AbstractContextManager[Session]]


@dataclass(frozen=True)
class Pending:
    """A store not recorded yet (``ArtifactStore.pending_binding``): how to record it."""

    named: bool  # named by the user (gets a marker) rather than the default <home>/artifacts
    db_dir: Optional[Path]  # the SQLite file's directory (a local store inside is relative)


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
        if not (create and _has_artifacts(session)):
            # Nothing to record before the first artifact (a new registry), or a reader: the
            # store is recorded, checked, in the transaction of the first artifact written.
            if create and _marker_id(store) is not None:
                raise _claimed(store)  # refused before anything is written
            store.pending_binding = Pending(named=named, db_dir=db_dir)
            return store, None
        row = _adopt(session, store, named=named, db_dir=db_dir)
    url, store_id = row
    recorded = _resolve(url, db_dir, home)
    store = ArtifactStore(artifacts if named else recorded)  # type: ignore[arg-type]
    _check(store, store_id, recorded, named=named, has_artifacts=lambda: _has_artifacts(session))
    return store, _record(store, url, store_id)


def bind_first(s: Session, store: ArtifactStore, *, home: Path,
               created: list[str]) -> Optional[StoreRecord]:
    """Record ``store`` in the write transaction ``s``, if it is pending; its StoreRecord.

    Called before an artifact row is added, so the binding commits with the artifact or not at
    all. A marker this call creates is appended to ``created``: the caller removes it when the
    transaction fails (``remove_unrecorded_marker``). A store another writer recorded meanwhile
    must be this one, else StoreMismatch. None when nothing was pending.
    """
    pending = store.pending_binding
    if not isinstance(pending, Pending):
        return None
    url, store_id = _bind(s, store, named=pending.named, db_dir=pending.db_dir, created=created)
    recorded = _resolve(url, pending.db_dir, home)
    _check(store, store_id, recorded, named=True, has_artifacts=lambda: _any_artifact(s))
    return _record(store, url, store_id)


def check_binding(session: SessionFactory, store: ArtifactStore, *, home: Path,
                  db_dir: Optional[Path]) -> None:
    """Raise (IntegrityFailure, StoreMismatch, StoreError) unless the binding is whole.

    Whole: a registry that holds artifacts records its store (the ``artifact_store`` row), the
    record names ``store`` (the one in use), and the store's marker carries the recorded id (a
    store recorded without an id carries no marker of another registry).
    """
    row = _recorded(session)
    if row is None:
        if _has_artifacts(session):
            raise IntegrityFailure(
                "the registry holds artifacts but records no artifact store (its "
                "artifact_store row is missing); the next write that opens the store holding "
                "its files records it again")
        return
    url, store_id = row
    recorded = _resolve(url, db_dir, home)
    _check(store, store_id, recorded, named=True, has_artifacts=lambda: _has_artifacts(session))
    if store_id is None:
        found = _marker_id(store)
        if found is not None:
            raise StoreMismatch(
                f"artifact store {store.url} carries the {MARKER} of store id {found}, but the "
                f"registry records it without one: another registry has claimed it")


def remove_unrecorded_marker(s: Session, store: ArtifactStore) -> None:
    """After a failed first write: remove the marker it made unless a record names its id."""
    try:
        found = _marker_id(store)
    except RegistryError:
        return  # not a marker of ours: never touched
    row = s.get(ArtifactStoreRow, 1)
    if found is not None and (row is None or row.store_id != found):
        store.remove(MARKER)
        log.info("removed the marker of %s, written by a write that did not commit", store.url)


def _record(store: ArtifactStore, url: str, store_id: Optional[str]) -> StoreRecord:
    location = str(store.root) if store.is_local else store.url
    return StoreRecord(url=url, store_id=store_id, location=location)


def _recorded(session: SessionFactory) -> Optional[tuple[str, Optional[str]]]:
    with session() as s:
        row = s.get(ArtifactStoreRow, 1)
        return None if row is None else (row.url, row.store_id)


def _adopt(
    session: SessionFactory, store: ArtifactStore, *, named: bool, db_dir: Optional[Path]
) -> tuple[str, Optional[str]]:
    """Record ``store`` as the registry's (with a marker if it was named); returns the record.

    Runs under the database's write lock, so concurrent first writers record one store; one
    that finds a record made meanwhile returns that record instead. A marker made here is
    removed again when the record does not commit.
    """
    created: list[str] = []
    try:
        with session(write=True) as s:
            return _bind(s, store, named=named, db_dir=db_dir, created=created)
    except BaseException:
        if created:
            with session() as s:
                remove_unrecorded_marker(s, store)
        raise


def _bind(s: Session, store: ArtifactStore, *, named: bool, db_dir: Optional[Path],
          created: list[str]) -> tuple[str, Optional[str]]:
    """The recorded store, recording ``store`` in the write transaction ``s`` if there is none.

    A registry that holds artifacts adopts only a store that holds its files; one without any
    only a store that no other registry has marked.
    """
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("LOCK TABLE artifact_store IN SHARE ROW EXCLUSIVE MODE"))
    row = s.get(ArtifactStoreRow, 1)
    if row is not None:
        return row.url, row.store_id
    store_id = _marker_id(store)
    missing = _missing_files(s, store)
    if missing:
        raise StoreMismatch(
            f"the registry records no artifact store, and {store.url} does not hold its files "
            f"({len(missing)} missing, e.g. {missing[0]}): open it with the store that does "
            "(--artifacts); nothing was recorded")
    if missing is None and store_id is not None:
        raise _claimed(store, store_id)
    if store_id is not None:
        log.info("adopting artifact store %s (store id %s)", store.url, store_id)
    elif named:
        new_id = uuid.uuid4().hex
        if not store.write_marker(_marker(new_id)):
            raise StoreMismatch(f"artifact store {store.url} was just claimed by another "
                                "registry")
        created.append(MARKER)
        store_id = new_id
    url = _record_url(store, db_dir)
    s.add(ArtifactStoreRow(id=1, store_id=store_id, url=url))
    s.flush()
    log.info("recorded artifact store %s%s", url, f" (store id {store_id})" if store_id else "")
    return url, store_id


def _claimed(store: ArtifactStore, store_id: Optional[str] = None) -> StoreMismatch:
    store_id = store_id or _marker_id(store)
    return StoreMismatch(
        f"artifact store {store.url} belongs to another registry (store id "
        f"{store_id}); if it does not, remove its {MARKER} and try again"
    )


def _check(
    store: ArtifactStore,
    store_id: Optional[str],
    recorded: str | Path,
    *,
    named: bool,
    has_artifacts: Callable[[], bool],
) -> None:
    """Refuse a store that is not the recorded one, or that cannot be reached."""
    mismatch = StoreMismatch(
        f"artifact store {store.url} is not this registry's store (recorded: {recorded})")
    missing = StoreError(f"artifact store {store.url} is unreachable: no such directory"
                         + (f" (recorded: {recorded})" if named else ""))
    if store_id is None:  # a store without a marker: known by its directory
        if named and not _same_directory(store, recorded):
            raise missing if store.is_local and not Path(store.root).is_dir() else mismatch
        if not Path(store.root).is_dir() and has_artifacts():
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


def _missing_files(s: Session, store: ArtifactStore) -> Optional[list[str]]:
    """Which of the registry's files the store lacks (every base's weights and the newest
    artifacts); None when the registry holds no artifact yet."""
    bases = s.scalars(select(ArtifactRow.path).where(ArtifactRow.kind == "base")).all()
    newest = s.scalars(select(ArtifactRow.path).order_by(ArtifactRow.id.desc())
                       .limit(NEWEST_CHECKED)).all()
    paths = list(dict.fromkeys([*bases, *newest]))
    if not paths:
        return None
    return [path for path in paths if not store.exists(path)]


def _any_artifact(s: Session) -> bool:
    return s.scalar(select(ArtifactRow.id).limit(1)) is not None


def _has_artifacts(session: SessionFactory) -> bool:
    with session() as s:
        return _any_artifact(s)


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
