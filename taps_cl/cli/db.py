"""`taps-cl db`: the schema revision of a registry and its upgrade."""

from __future__ import annotations

import click

from registry import db
from registry.binding import recorded_url
from registry.transactions import DB_FILENAME
from taps_cl.cli.render import (
    Context,
    line,
    pass_ctx,
)


@click.group("db")
def db_group() -> None:
    """Database schema: current revision and upgrades."""


def _engine(c: Context, create: bool):  # type: ignore[no-untyped-def]
    m = c.manager
    return db.make_engine(m.db_url or db.sqlite_url(m.home / DB_FILENAME), create=create)


@db_group.command("current")
@pass_ctx
def db_current(c: Context) -> None:
    """Show the database's schema revision and the newest one."""
    engine = _engine(c, create=False)
    try:
        current, head = db.current_revision(engine), db.head_revision()
        store = recorded_url(engine)
    finally:
        engine.dispose()
    c.emit({"current": current, "head": head, "up_to_date": current == head, "artifacts": store},
           lambda: line(f"current: {current or '(none)'}  head: {head}"
                              + ("" if current == head else "  → run `taps-cl db upgrade`")
                              + (f"\nartifacts: {store}" if store else "")))


@db_group.command("upgrade")
@pass_ctx
def db_upgrade(c: Context) -> None:
    """Upgrade the schema to the newest revision (a SQLite file is copied aside first)."""
    engine = _engine(c, create=True)
    try:
        before, after, backup = db.upgrade(engine)
    finally:
        engine.dispose()
    c.emit({"from": before, "to": after, "backup": str(backup) if backup else None},
           lambda: line(f"upgraded {before or '(empty)'} → {after}"
                              + (f"; backup at {backup}" if backup else "")))
