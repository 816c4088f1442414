"""Alembic environment: uses the engine handed over by registry.db, else the configured URL."""

from alembic import context
from sqlalchemy import create_engine, text

from registry.models import Base

target_metadata = Base.metadata
# PostgreSQL advisory lock held by a migration's transaction (the bytes of "taps-cl"): processes
# creating or upgrading one database at once queue on it, and each reads the schema revision
# only once the one before has committed, so a second creator finds the schema made.
MIGRATION_LOCK = 0x746170732D636C


def run_migrations_offline() -> None:
    context.configure(
        url=context.config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = context.config.attributes.get("engine")
    if engine is None:
        engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        is_sqlite = connection.dialect.name == "sqlite"
        # PRAGMA foreign_keys is a no-op inside a transaction, and registry.db's engine begins one
        # before any statement it executes: so these pragmas go to the driver's connection,
        # outside SQLAlchemy's transaction.
        raw = connection.connection.dbapi_connection if is_sqlite else None
        if raw is not None:
            # A batch migration drops and re-creates tables; with foreign keys on, SQLite would
            # cascade those drops into the rows that reference them.
            raw.execute("PRAGMA foreign_keys=OFF")
        # render_as_batch lets ALTER-style migrations work on SQLite (copy-and-move tables).
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": MIGRATION_LOCK})
            context.run_migrations()
        connection.commit()
        if raw is not None:
            broken = raw.execute("PRAGMA foreign_key_check").fetchall()
            raw.execute("PRAGMA foreign_keys=ON")
            if broken:
                raise RuntimeError(f"migration left dangling foreign keys: {broken[:3]}")


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
