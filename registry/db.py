"""Engine and sessions; schema revision check; Alembic upgrade with a SQLite backup first."""

from __future__ import annotations

import logging
import sqlite3
from datetime import datetime, timezone
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, OperationalError

from registry.errors import RegistryError, SchemaOutOfDate

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
UPGRADE_HINT = "run `taps-cl db upgrade`"


def sqlite_url(path: str | Path) -> str:
    """SQLAlchemy URL for a SQLite file."""
    return f"sqlite:///{Path(path).resolve()}"


def make_engine(url: str) -> Engine:
    """Create an engine; SQLite gets WAL, foreign keys and a busy timeout on every connection."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise RegistryError(f"invalid database URL {url!r}") from exc
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url, connect_args={"timeout": 30} if is_sqlite else {})
    except Exception as exc:  # missing driver, bad options
        raise RegistryError(f"cannot open database {parsed.render_as_string()}: {exc}") from exc
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def alembic_config(engine: Engine) -> Config:
    """Alembic config bound to ``engine``, pointing at the migrations shipped in this package."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    config.attributes["engine"] = engine
    return config


def head_revision() -> str:
    """The newest migration revision."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    head = script.get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's Alembic revision, or None for a database without one."""
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except DatabaseError as exc:
        raise RegistryError(f"cannot read database {engine.url}: {_reason(exc)}") from exc


def ensure_schema(engine: Engine) -> None:
    """Create a new database at head; refuse one at another revision or not made by taps-cl."""
    try:
        tables = set(inspect(engine).get_table_names())
    except (DatabaseError, OperationalError) as exc:
        raise RegistryError(f"cannot read database {engine.url}: {_reason(exc)}") from exc
    if not tables:
        log.info("creating a new registry at revision %s", head_revision())
        command.upgrade(alembic_config(engine), "head")
        return
    if "alembic_version" not in tables:
        raise RegistryError(f"database {engine.url} is not a taps-cl registry (no schema revision)")
    current = current_revision(engine)
    head = head_revision()
    if current != head:
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
    before = current_revision(engine)
    head = head_revision()
    try:
        tables = set(inspect(engine).get_table_names())
    except (DatabaseError, OperationalError) as exc:
        raise RegistryError(f"cannot read database {engine.url}: {_reason(exc)}") from exc
    if tables and "alembic_version" not in tables:
        raise RegistryError(f"database {engine.url} is not a taps-cl registry (no schema revision)")
    known = {rev.revision for rev in ScriptDirectory(str(MIGRATIONS_DIR)).walk_revisions()}
    if before is not None and before not in known:
        raise SchemaOutOfDate(f"database revision {before} is unknown to this taps-cl (newer release?)")
    if before == head and revision == "head":
        return before, head, None  # nothing to do: no backup, no writes
    backup = None
    database = engine.url.database
    if engine.url.get_backend_name() == "sqlite" and database and Path(database).exists():
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        backup = Path(f"{database}.{before or 'empty'}.{stamp}.bak")
        _backup_sqlite(engine, backup)
    command.upgrade(alembic_config(engine), revision)
    return before, current_revision(engine) or "", backup


def downgrade(engine: Engine, revision: str) -> None:
    """Downgrade to ``revision`` (``base`` removes every table)."""
    command.downgrade(alembic_config(engine), revision)


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
    "make_engine",
    "sqlite_url",
    "upgrade",
]
