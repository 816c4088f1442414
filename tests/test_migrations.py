"""Alembic: models match migrations, round-trips keep rows, old databases are refused.

Every test runs on SQLite and on PostgreSQL (tests.servers.db_url).
"""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, select, text

from registry import Registry, SchemaOutOfDate, db
from registry.models import Base
from tests.test_registry import add_base, begin, finish

# Columns revision 0003 adds: a downgrade drops them (a finished run's token is not needed).
RUN_COLUMNS = ("run_token", "run_host", "run_pid", "heartbeat_at")
# Columns revision 0004 adds: its upgrade recomputes them from the rows (registry.chain).
CHAIN_COLUMNS = ("chain_prev_sha256", "chain_sha256")
SIGNATURE_COLUMNS = ("signature_artifact_id",)  # added by 0006


def test_schema_head_names_the_newest_migration():
    # Opening a registry compares with SCHEMA_HEAD by plain SQL (no alembic import).
    assert db.SCHEMA_HEAD == db.head_revision()


def test_models_match_migrations(tmp_path, db_url):
    reg = Registry(tmp_path, db_url)
    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    reg.close()
    assert diff == []


def test_downgrade_upgrade_roundtrip_with_rows(tmp_path, db_url):
    reg = Registry(tmp_path, db_url)
    add_base(reg)
    begin(reg, "t1")
    finish(reg, "t1")
    begin(reg, "t2")  # a run in progress (no position) survives the round trip too
    engine = reg.engine
    names = ("artifacts", "base_models", "tasks", "task_layers", "evaluations")
    tables = [Base.metadata.tables[name] for name in names]
    with engine.connect() as conn:  # typed reads and writes: JSON columns round-trip as values
        dump_before = {
            table: [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]
            for table in tables
        }
    # Keep the rows across the round trip: copy them out, downgrade to base, upgrade, copy back.
    db.downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    db.upgrade(engine)
    with engine.begin() as conn:
        for table, rows in dump_before.items():
            if rows:
                conn.execute(table.insert(), rows)
    reg.close()
    again = Registry(tmp_path, db_url)
    assert [(t.name, t.position) for t in again.list_tasks()] == [("t1", 1), ("t2", None)]
    assert again.get_task("t1").active_layers == 1
    assert again.get_task("t2").run_token == dump_before[tables[2]][1]["run_token"]
    again.close()


def _dump(engine, without=()):
    with engine.connect() as conn:
        dump = {}
        for t in ("artifacts", "base_models", "tasks", "task_layers", "evaluations"):
            result = conn.execute(text(f"SELECT * FROM {t} ORDER BY id"))
            keep = [i for i, c in enumerate(result.keys()) if c not in without]
            dump[t] = [tuple(row[i] for i in keep) for row in result]
        return dump


def test_step_downgrade_and_upgrade_keep_rows(tmp_path, db_url):
    reg = Registry(tmp_path, db_url)
    add_base(reg)
    begin(reg, "t1")
    finish(reg, "t1")
    begin(reg, "t2")
    finish(reg, "t2", b"two")
    before = _dump(reg.engine, without=RUN_COLUMNS + CHAIN_COLUMNS + SIGNATURE_COLUMNS)
    chained = _dump(reg.engine, without=RUN_COLUMNS)
    for step in ("0005", "0004", "0003", "0002", "0001", "0002", "0003", "0004", "0005", "head"):
        current = db.current_revision(reg.engine)
        (db.upgrade if step == "head" or step > current else db.downgrade)(reg.engine, step)
        assert db.current_revision(reg.engine) == (db.head_revision() if step == "head" else step)
        assert _dump(reg.engine, without=RUN_COLUMNS + CHAIN_COLUMNS + SIGNATURE_COLUMNS) == before
    # 0004's upgrade recomputed the chain columns it dropped: the same values came back (these
    # tasks have no signature, so 0006's round trip leaves their links as they were).
    assert _dump(reg.engine, without=RUN_COLUMNS) == chained
    assert reg.chain_problems("b") == {}
    reg.close()


def _tasks(engine):
    with engine.connect() as conn:
        return {row.name: (row.position, row.status) for row in conn.execute(
            text("SELECT name, position, status FROM tasks"))}


def test_0003_downgrade_places_unfinished_tasks_and_upgrade_unplaces_them(tmp_path, db_url):
    reg = Registry(tmp_path, db_url)
    add_base(reg)
    add_base(reg, "other", weights=b"w2")
    finish(reg, begin(reg, "t1"), b"one")
    begin(reg, "t2")  # training: no position
    finish(reg, begin(reg, "t3"), b"three")
    begin(reg, "o1", base="other")  # the only task of its base, still training
    begin(reg, "t4")
    assert _tasks(reg.engine) == {
        "t1": (1, "ready"), "t3": (2, "ready"),
        "t2": (None, "training"), "t4": (None, "training"), "o1": (None, "training"),
    }
    db.downgrade(reg.engine, "0002")
    # Unplaced rows take the next free positions of their base, in the order they were begun.
    assert _tasks(reg.engine) == {
        "t1": (1, "ready"), "t3": (2, "ready"),
        "t2": (3, "training"), "t4": (4, "training"), "o1": (1, "training"),
    }
    columns = {column["name"]: column for column in inspect(reg.engine).get_columns("tasks")}
    assert not set(RUN_COLUMNS) & set(columns)
    assert columns["position"]["nullable"] is False  # NOT NULL again at 0002
    db.upgrade(reg.engine)
    # Upgrading: a task that is not ready has no position (it gets one when it finishes).
    assert _tasks(reg.engine) == {
        "t1": (1, "ready"), "t3": (2, "ready"),
        "t2": (None, "training"), "t4": (None, "training"), "o1": (None, "training"),
    }
    reg.close()
    with Registry(tmp_path, db_url) as again:
        with again.engine.begin() as conn:  # the leftovers have no run: give t2 one to finish
            conn.execute(text("UPDATE tasks SET run_token = 'tok-t2' WHERE name = 't2'"))
        assert finish(again, again.get_task("t2"), b"two").position == 3
        assert [t.name for t in again.list_tasks("b")] == ["t1", "t3", "t2", "t4"]
        assert [e.task for e in again.list_evaluations("b") if e.after_task == "t2"] == [
            "t2", "t1", "t3"]


def _check_backup(backup, db_url, tmp_path) -> None:
    """`db upgrade` copies a SQLite file aside; a PostgreSQL database is left to its server."""
    if db_url is None:
        assert backup is not None and backup.exists()
    else:
        assert backup is None
        assert not list(tmp_path.rglob("*.bak"))


def test_older_database_is_refused_with_hint(tmp_path, db_url):
    reg = Registry(tmp_path, db_url)
    url = reg.url
    add_base(reg)
    db.downgrade(reg.engine, "0001")
    reg.close()
    with pytest.raises(SchemaOutOfDate, match="taps-cl db upgrade"):
        Registry(tmp_path, db_url)
    engine = db.make_engine(url)
    before, after, backup = db.upgrade(engine)
    engine.dispose()
    assert (before, after) == ("0001", db.head_revision())
    _check_backup(backup, db_url, tmp_path)
    assert [b.name for b in Registry(tmp_path, db_url).list_bases()] == ["b"]


def test_unknown_revision_is_refused(tmp_path, db_url):
    reg = Registry(tmp_path, db_url)
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    reg.close()
    with pytest.raises(SchemaOutOfDate, match="unknown"):
        Registry(tmp_path, db_url)


def test_upgrade_from_empty_copies_only_sqlite_aside(tmp_path, db_url):
    reg = Registry(tmp_path, db_url)
    url = reg.url
    add_base(reg)
    db.downgrade(reg.engine, "base")
    reg.close()
    engine = db.make_engine(url)
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() is None
    before, after, backup = db.upgrade(engine)
    assert before is None and after == db.head_revision()
    _check_backup(backup, db_url, tmp_path)
    engine.dispose()
