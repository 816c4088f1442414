"""Alembic: models match migrations, round-trips keep rows, old databases are refused."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from registry import Registry, SchemaOutOfDate, db
from registry.models import Base
from tests.test_registry import add_base, begin, finish


def test_models_match_migrations(tmp_path):
    reg = Registry(tmp_path)
    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    reg.close()
    assert diff == []


def test_downgrade_upgrade_roundtrip_with_rows(tmp_path):
    reg = Registry(tmp_path)
    add_base(reg)
    begin(reg, "t1")
    finish(reg, "t1")
    engine = reg.engine
    dump_before = _dump(engine)
    # Keep the rows across the round trip: copy them out, downgrade to base, upgrade, copy back.
    db.downgrade(engine, "base")
    with engine.connect() as conn:
        tables = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master WHERE type='table'"))}
    assert tables <= {"alembic_version"}
    db.upgrade(engine)
    with engine.begin() as conn:
        for table, rows in dump_before.items():
            for row in rows:
                cols = ", ".join(row._fields)
                marks = ", ".join(f":{c}" for c in row._fields)
                conn.execute(text(f"INSERT INTO {table} ({cols}) VALUES ({marks})"), row._asdict())
    reg.close()
    again = Registry(tmp_path)
    assert [t.name for t in again.list_tasks()] == ["t1"]
    assert again.get_task("t1").active_layers == 1
    again.close()


def _dump(engine):
    with engine.connect() as conn:
        return {
            t: conn.execute(text(f"SELECT * FROM {t} ORDER BY id")).all()
            for t in ("artifacts", "base_models", "tasks", "task_layers", "evaluations")
        }


def test_step_downgrade_and_upgrade_keep_rows(tmp_path):
    reg = Registry(tmp_path)
    add_base(reg)
    begin(reg, "t1")
    finish(reg, "t1")
    before = _dump(reg.engine)
    for step in ("0001", "head"):
        (db.downgrade if step != "head" else db.upgrade)(reg.engine, step)
        assert _dump(reg.engine) == before
    reg.close()


def test_older_database_is_refused_with_hint(tmp_path):
    reg = Registry(tmp_path)
    add_base(reg)
    db.downgrade(reg.engine, "0001")
    reg.close()
    with pytest.raises(SchemaOutOfDate, match="taps-cl db upgrade"):
        Registry(tmp_path)
    engine = db.make_engine(db.sqlite_url(tmp_path / "registry.db"))
    before, after, backup = db.upgrade(engine)
    engine.dispose()
    assert (before, after) == ("0001", db.head_revision())
    assert backup is not None and backup.exists()
    assert [b.name for b in Registry(tmp_path).list_bases()] == ["b"]


def test_unknown_revision_is_refused(tmp_path):
    reg = Registry(tmp_path)
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
    reg.close()
    with pytest.raises(SchemaOutOfDate, match="unknown"):
        Registry(tmp_path)


def test_upgrade_copies_sqlite_aside(tmp_path):
    reg = Registry(tmp_path)
    add_base(reg)
    db.downgrade(reg.engine, "base")
    reg.close()
    engine = db.make_engine(db.sqlite_url(tmp_path / "registry.db"))
    with engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() is None
    before, after, backup = db.upgrade(engine)
    assert before is None and after == db.head_revision()
    assert backup is not None and backup.exists()
    engine.dispose()
