"""Engine and sessions; schema revision check; Alembic upgrade with a SQLite backup first.

SQLite transactions are begun by SQLAlchemy's "begin" event rather than by pysqlite (which
only issues BEGIN before the first write): a writer asks for ``BEGIN IMMEDIATE`` through
:func:`writer`, so read-then-write transactions are serialised and wait on the busy timeout
instead of failing with "database is locked" when they upgrade their lock.

PostgreSQL (``postgresql+psycopg://``) runs at READ COMMITTED: a write that reads before it
writes locks what it depends on (``SELECT … FOR UPDATE`` of a row, or ``LOCK TABLE artifacts``)
and waits for it; migrations queue on an advisory lock (migrations/env.py). ``db upgrade``
copies only a SQLite file aside: a server's database is backed up by its own tools.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError

from registry.errors import NoRegistry, RegistryError, SchemaOutOfDate

if TYPE_CHECKING:
    from alembic.config import Config

# The newest migration's revision. Opening a registry compares the database with it by plain
# SQL, so reads never import alembic (a fifth of a CLI call's start-up); tests/test_migrations.py
# checks that it names alembic's head.
SCHEMA_HEAD = "0006"

log = logging.getLogger(__name__)

UPGRADE_HINT = "run `taps-cl db upgrade`"
CREATE_HINT = "`taps-cl base add` creates one"
# Execution option read by the SQLite "begin" listener: DEFERRED (readers) or IMMEDIATE (writers).
BEGIN_OPTION = "taps_cl_begin"
SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_MIN_PAGE = 512  # bytes: SQLite's smallest page size


def migrations_dir() -> Path:
    """The Alembic scripts: ``registry/migrations`` if installed, else ``../migrations`` (source)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "migrations", here.parent / "migrations"):
        if (candidate / "env.py").is_file():
            return candidate
    raise RegistryError(f"the schema migrations are missing from this installation ({here})")


MIGRATIONS_DIR = migrations_dir()


def sqlite_url(path: str | Path) -> str:
    """SQLAlchemy URL for a SQLite file."""
    return f"sqlite:///{Path(path).resolve()}"


def sqlite_path(url: str | URL) -> Optional[Path]:
    """The file of a SQLite URL (plain or ``file:`` URI); None for other backends and memory."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() != "sqlite":
        return None
    database = parsed.database or ""
    if str(parsed.query.get("uri", "")).lower() in ("true", "1") and database.startswith("file:"):
        from urllib.parse import unquote, urlsplit

        split = urlsplit(database)
        if "mode=memory" in split.query:
            return None
        database = unquote(split.path)
    if not database or database == ":memory:":
        return None
    return Path(database)


def make_engine(url: str, *, create: bool = True) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout on every connection.

    With ``create`` the directory of a SQLite file is made; a read-only open never creates it.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise RegistryError(f"invalid database URL {url!r}") from exc
    is_sqlite = parsed.get_backend_name() == "sqlite"
    path = sqlite_path(parsed)
    if create and path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryError(
                f"cannot create the registry directory {path.parent}: {exc.strerror or exc}"
            ) from exc
    try:
        if is_sqlite:
            engine = create_engine(url, connect_args={"timeout": 30})
        else:  # a server may drop idle connections while a long `task add` trains
            engine = create_engine(url, pool_pre_ping=True)
    except ImportError as exc:  # the URL's driver is not installed
        hint = ""
        if parsed.get_backend_name() == "postgresql":
            hint = " (PostgreSQL: pip install 'taps-cl[postgres]' and use postgresql+psycopg://)"
        raise RegistryError(
            f"cannot open database {parsed.render_as_string()}: {exc}{hint}") from exc
    except Exception as exc:  # bad options
        raise RegistryError(f"cannot open database {parsed.render_as_string()}: {exc}") from exc
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


def writer(engine: Engine) -> Engine:
    """``engine`` for write transactions: on SQLite they start with ``BEGIN IMMEDIATE``.

    Taking the write lock up front makes a read-then-write transaction atomic against other
    writers, and a writer that has to wait does so on the busy timeout.
    """
    return engine.execution_options(**{BEGIN_OPTION: "IMMEDIATE"})


def _sqlite_begin(conn) -> None:  # type: ignore[no-untyped-def]
    mode = conn.get_execution_options().get(BEGIN_OPTION, "DEFERRED")
    if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
        raise RegistryError(f"unknown SQLite transaction mode {mode!r}")
    conn.exec_driver_sql(f"BEGIN {mode}")


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # pysqlite must not begin transactions itself (it would do so only before the first
    # write); the "begin" listener emits BEGIN instead (SQLAlchemy's documented recipe).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config(engine: Engine) -> Config:
    """Alembic config bound to ``engine``, pointing at the migrations shipped in this package."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    # One migration at a time: two processes creating a new registry at once queue up.
    config.attributes["engine"] = writer(engine)
    return config


def head_revision() -> str:
    """The newest migration revision, as alembic reads it from the scripts."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    assert head is not None
    return head


def inspect_sqlite(path: Path) -> Optional[set[str]]:
    """Table names of an existing SQLite file, read without changing it; None if missing or empty.

    Connecting with the engine would create a missing file and switch an existing one to WAL,
    so this looks at the file first and then opens it read-only.
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RegistryError(f"cannot read database {path}: {exc.strerror or exc}") from exc
    if size == 0:
        return None
    if size < SQLITE_MIN_PAGE:  # a database SQLite wrote holds at least one whole page
        raise RegistryError(f"database {path} is not a taps-cl registry (not an SQLite file)")
    # SQLite itself reads the header, never open(): closing any descriptor of the file drops
    # every POSIX lock this process's open connections hold on it, after which another process
    # closing its connection takes itself for the last one and deletes the WAL this process
    # still writes to (its later commits then vanish for everyone else).
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot read database {path}: {exc}") from exc
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
    except sqlite3.DatabaseError as exc:
        if "not a database" in str(exc):  # SQLITE_NOTADB: no SQLite header
            raise RegistryError(
                f"database {path} is not a taps-cl registry (not an SQLite file)") from exc
        raise RegistryError(f"cannot read database {path}: {exc}") from exc
    finally:
        conn.close()
    return {row[0] for row in rows}


@contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) on a directory, held for the block; no lock file.

    Where flock is not available (not POSIX) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise RegistryError(f"cannot open {directory}: {exc.strerror or exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _tables_after_writer(path: Path) -> set[str]:
    """Table names of an SQLite file once no one holds its write lock.

    Another process creating a registry holds the lock from before its first table exists;
    waiting for it tells such a registry-in-the-making from someone else's file without
    tables. BEGIN IMMEDIATE followed by ROLLBACK changes nothing in the file.
    """
    try:
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot read database {path}: {exc}") from exc
    try:
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        raise RegistryError(f"cannot read database {path}: {exc}") from exc
    finally:
        conn.close()
    return {row[0] for row in rows}


def _tables(engine: Engine) -> Optional[set[str]]:
    """Table names; None for a SQLite file that does not exist yet or has 0 bytes."""
    path = sqlite_path(engine.url)
    if path is not None:
        return inspect_sqlite(path)
    try:
        return set(inspect(engine).get_table_names())
    except (DatabaseError, OperationalError) as exc:
        raise RegistryError(f"cannot read database {engine.url}: {_reason(exc)}") from exc


def location(engine: Engine) -> str:
    """Where the database is, for messages: a SQLite file's path, else the URL without password."""
    path = sqlite_path(engine.url)
    return str(path) if path is not None else engine.url.render_as_string()


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision, or None for a database without one (never creates it)."""
    tables = _tables(engine)
    if not tables or "alembic_version" not in tables:
        return None
    try:
        with engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    except DatabaseError as exc:
        raise RegistryError(f"cannot read database {engine.url}: {_reason(exc)}") from exc
    if len(versions) > 1:
        raise RegistryError(f"database {location(engine)} has several schema revisions "
                            f"({', '.join(versions)})")
    return versions[0] if versions else None


def ensure_schema(engine: Engine, *, create: bool = True) -> None:
    """Check the database is a taps-cl registry at head; with ``create``, make a new one.

    A schema is created only in a database without tables that (for SQLite) is a missing or
    0-byte file: a non-empty file is never written over. Without ``create`` a missing or empty
    database raises NoRegistry and nothing is created.
    """
    where = location(engine)
    tables = _tables(engine)
    path = sqlite_path(engine.url)
    if not tables and path is not None and create:
        # Several processes may open a new registry at once: one creates it under a lock on
        # its directory, the others look again once it is done.
        with _directory_lock(path.parent):
            tables = _tables(engine)
            if tables is not None and not tables:
                tables = _tables_after_writer(path)  # maybe a registry in the making
            if tables is None:
                log.info("creating a new registry at revision %s", SCHEMA_HEAD)
                _run_alembic("upgrade", engine, "head")
                return
    if not tables:
        if not create:
            raise NoRegistry(f"no registry at {where} yet ({CREATE_HINT})")
        if tables is not None and path is not None:  # someone else's SQLite file, no tables
            raise RegistryError(f"database {where} is not a taps-cl registry (it has no tables)")
        log.info("creating a new registry at revision %s", SCHEMA_HEAD)
        _run_alembic("upgrade", engine, "head")
        return
    if "alembic_version" not in tables:
        raise RegistryError(f"database {where} is not a taps-cl registry (no schema revision)")
    current = current_revision(engine)
    head = SCHEMA_HEAD
    if current != head:
        from alembic.script import ScriptDirectory

        known = {rev.revision for rev in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}
        if current not in known:
            raise SchemaOutOfDate(
                f"database revision {current} is unknown to this taps-cl (newer release?); "
                f"expected {head}"
            )
        raise SchemaOutOfDate(
            f"database schema is at revision {current}, this taps-cl needs {head}: {UPGRADE_HINT}"
        )


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str, Path | None]:
    """Upgrade to ``revision``; a SQLite file is first copied aside. Returns (from, to, backup)."""
    where = location(engine)
    tables = _tables(engine)
    if tables is not None and sqlite_path(engine.url) is not None and not tables:
        raise RegistryError(f"database {where} is not a taps-cl registry (it has no tables)")
    if tables and "alembic_version" not in tables:
        raise RegistryError(f"database {where} is not a taps-cl registry (no schema revision)")
    from alembic.script import ScriptDirectory

    before = current_revision(engine)
    head = head_revision()
    known = {rev.revision for rev in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}
    if before is not None and before not in known:
        raise SchemaOutOfDate(f"database revision {before} is unknown to this taps-cl (newer release?)")
    if before == head and revision == "head":
        return before, head, None  # nothing to do: no backup, no writes
    backup = None
    database = sqlite_path(engine.url)  # a server's database (PostgreSQL) is not copied
    if database is not None and database.exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        backup = Path(f"{database}.{before or 'empty'}.{stamp}.bak")
        _backup_sqlite(engine, backup)
    _run_alembic("upgrade", engine, revision)
    return before, current_revision(engine) or "", backup


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade to ``revision`` (``base`` removes every table)."""
    _run_alembic("downgrade", engine, revision)


def _run_alembic(action: str, engine: Engine, revision: str) -> None:
    """alembic's `command.upgrade` or `command.downgrade` to `revision` (imported only here)."""
    from alembic import command

    try:
        getattr(command, action)(alembic_config(engine), revision)
    except (DatabaseError, OperationalError) as exc:
        raise RegistryError(f"cannot migrate database {location(engine)}: {_reason(exc)}") from exc


def _backup_sqlite(engine: Engine, target: Path) -> None:
    # sqlite3's backup API copies a consistent snapshot even with a WAL file beside the database.
    with engine.connect() as conn:
        source = conn.connection.dbapi_connection
        with sqlite3.connect(target) as dest:
            source.backup(dest)  # type: ignore[union-attr]
    log.info("copied the database aside to %s", target)


def _reason(exc: Exception) -> str:
    orig = getattr(exc, "orig", None)
    return str(orig or exc).splitlines()[0]


__all__ = [
    "UPGRADE_HINT",
    "alembic_config",
    "current_revision",
    "downgrade",
    "ensure_schema",
    "head_revision",
    "location",
    "make_engine",
    "migrations_dir",
    "inspect_sqlite",
    "sqlite_path",
    "sqlite_url",
    "upgrade",
    "writer",
]
