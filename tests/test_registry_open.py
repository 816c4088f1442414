"""Opening a registry: reads never create; a schema is never written over someone else's file."""

from __future__ import annotations

import sqlite3

import pytest

from registry import NoRegistry, NotFound, Registry, RegistryError, db
from tests.test_registry import add_base


def test_read_open_of_a_missing_registry_creates_nothing(tmp_path):
    home = tmp_path / "no-such-home"
    with pytest.raises(NoRegistry, match=r"no registry at .*registry\.db yet.*taps-cl base add"):
        Registry(home, create=False)
    assert not home.exists()
    other = tmp_path / "dir" / "x.db"
    with pytest.raises(NotFound):  # NoRegistry is a NotFound
        Registry(tmp_path / "h", f"sqlite:///{other}", create=False)
    assert not other.parent.exists() and not (tmp_path / "h").exists()


def test_read_open_of_an_empty_file_leaves_it_empty(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    with pytest.raises(NoRegistry):
        Registry(tmp_path, f"sqlite:///{empty}", create=False)
    assert empty.read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]
    with Registry(tmp_path, f"sqlite:///{empty}") as reg:  # a write open may use a 0-byte file
        add_base(reg)
    with Registry(tmp_path, f"sqlite:///{empty}", create=False) as reg:
        assert [b.name for b in reg.list_bases()] == ["b"]


@pytest.mark.parametrize("content", [b"x", b"\x00", b"SQLite format 3", b"some notes\n" * 50])
@pytest.mark.parametrize("create", [True, False])
def test_non_empty_foreign_files_are_left_alone(tmp_path, content, create):
    path = tmp_path / "notes.db"
    path.write_bytes(content)
    with pytest.raises(RegistryError, match="not a taps-cl registry"):
        Registry(tmp_path, f"sqlite:///{path}", create=create)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]


@pytest.mark.parametrize("create", [True, False])
def test_other_apps_sqlite_databases_are_byte_identical_afterwards(tmp_path, create):
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE people (id INTEGER, name TEXT)")
        conn.execute("INSERT INTO people VALUES (1, 'ada')")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(RegistryError, match="not a taps-cl registry"):
        Registry(tmp_path, f"sqlite:///{path}", create=create)
    assert path.read_bytes() == before  # not even switched to WAL


def test_sqlite_file_without_tables(tmp_path):
    path = tmp_path / "blank.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (x)")
    conn.execute("DROP TABLE t")
    conn.commit()
    conn.close()
    before = path.read_bytes()
    assert before  # a valid SQLite file with no tables
    with pytest.raises(NoRegistry):
        Registry(tmp_path, f"sqlite:///{path}", create=False)
    with pytest.raises(RegistryError, match="not a taps-cl registry"):
        Registry(tmp_path, f"sqlite:///{path}")
    with pytest.raises(RegistryError, match="not a taps-cl registry"):
        db.upgrade(db.make_engine(f"sqlite:///{path}", create=False))
    assert path.read_bytes() == before


def test_read_helpers_do_not_create(tmp_path):
    path = tmp_path / "sub" / "registry.db"
    engine = db.make_engine(db.sqlite_url(path), create=False)
    assert db.current_revision(engine) is None
    engine.dispose()
    assert not path.parent.exists()


def test_sqlite_path_of_urls(tmp_path):
    assert db.sqlite_path(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"
    assert db.sqlite_path(f"sqlite:///file:{tmp_path}/a.db?mode=ro&uri=true") == tmp_path / "a.db"
    assert db.sqlite_path("sqlite://") is None
    assert db.sqlite_path("sqlite:///:memory:") is None
    assert db.sqlite_path("postgresql+psycopg://u:p@h/db") is None
