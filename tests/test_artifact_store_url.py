"""The artifact store addressed by URL and recorded in the registry (registry.binding).

Local forms (path, ``file://``), ``memory://`` through fsspec, refusal of another store, an
unreachable store, a moved home, migration 0005's round trip, and two homes sharing one
database and one store.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import text

from registry import (
    IntegrityFailure,
    NoRegistry,
    Registry,
    SchemaOutOfDate,
    StoreError,
    StoreMismatch,
    binding,
    db,
)
from registry.store import MARKER, TEMP_PREFIX
from tests.test_cli import assert_one_line_error, run
from tests.test_registry import add_base, begin, finish


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def marker_id(root: Path) -> str:
    return json.loads((root / MARKER).read_text())["store_id"]


@pytest.mark.parametrize("form", ["path", "file_url"])
def test_local_store_url_forms(tmp_path, form):
    store = tmp_path / "shared" / "store"
    named = str(store) if form == "path" else store.as_uri()
    with Registry(tmp_path / "home", artifacts=named) as reg:
        base = add_base(reg)
        assert reg.store.is_local and Path(reg.store.root) == store
        assert reg.store_record is not None and reg.store_record.store_id == marker_id(store)
        record_id = reg.store_record.store_id
    assert (store / base.weights.path).read_bytes() == b"weights-1"
    assert not (tmp_path / "home" / "artifacts").exists()
    # Without --artifacts the recorded store is used; the other spelling is the same store.
    other = store.as_uri() if form == "path" else str(store)
    for artifacts in (None, other):
        with Registry(tmp_path / "home", create=False, artifacts=artifacts) as reg:
            assert reg.check_artifact(reg.get_base("b").weights) == b"weights-1"
            assert reg.store_record.store_id == record_id


def test_same_store_through_another_mount_path_is_accepted(tmp_path):
    store = tmp_path / "store"
    with Registry(tmp_path / "home", artifacts=str(store)) as reg:
        add_base(reg)
    mount = tmp_path / "mnt"
    mount.symlink_to(store)  # the same directory under another name, as a second mount shows it
    with Registry(tmp_path / "home", create=False, artifacts=str(mount)) as reg:
        assert reg.check_artifact(reg.get_base("b").weights) == b"weights-1"
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)  # a copy carries the marker: it is the same store's content
    with Registry(tmp_path / "home", create=False, artifacts=str(copy)) as reg:
        assert reg.check_artifact(reg.get_base("b").weights) == b"weights-1"


def test_default_store_is_recorded_relative_and_a_moved_home_works(tmp_path):
    home = tmp_path / "home"
    with Registry(home) as reg:
        base = add_base(reg)
        finish(reg, begin(reg, "t1"))
        assert reg.store_record.url == "artifacts" and reg.store_record.store_id is None
    assert not (home / "artifacts" / MARKER).exists()  # a default home looks as it always did
    assert binding.recorded_url(reg.engine) == "artifacts"
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(home), str(moved))
    with Registry(moved, create=False) as reg:
        assert Path(reg.store.root) == moved / "artifacts"
        assert reg.check_artifact(reg.get_base("b").weights) == b"weights-1"
        assert reg.get_task("t1").position == 1
    # The default store named explicitly is accepted; another directory is not.
    with Registry(moved, create=False, artifacts=str(moved / "artifacts")) as reg:
        assert reg.get_base("b").weights == base.weights
    with pytest.raises(StoreError, match="unreachable: no such directory"):
        Registry(moved, create=False, artifacts=str(tmp_path / "other"))
    (tmp_path / "other").mkdir()
    with pytest.raises(StoreMismatch, match="is not this registry's store"):
        Registry(moved, create=False, artifacts=str(tmp_path / "other"))


def test_a_different_store_is_refused_in_one_line_and_nothing_is_written(capsys, tmp_path):
    home, store, wrong = tmp_path / "home", tmp_path / "store", tmp_path / "wrong"
    code, _, err = run(capsys, "--home", str(home), "--artifacts", str(store),
                       "base", "add", "b", "--model", "timm:test_resnet")
    assert code == 0, err
    wrong.mkdir()
    before = files_under(store)
    pattern = rf"artifact store {wrong} is not this registry's store \(recorded: {store}\)"
    for command in (("base", "add", "b2", "--model", "timm:test_resnet"), ("base", "list")):
        code, out, err = run(capsys, "--home", str(home), "--artifacts", str(wrong), *command)
        assert code == 1 and out == ""
        assert_one_line_error(err, pattern)
    assert files_under(wrong) == {} and files_under(store) == before
    code, out, _ = run(capsys, "--home", str(home), "--json", "base", "list")
    assert code == 0 and [b["name"] for b in json.loads(out)] == ["b"]
    code, _, err = run(capsys, "--home", str(home), "base", "list")  # recorded store: fine
    assert code == 0, err
    code, out, err = run(capsys, "--home", str(home), "--json", "db", "current")
    assert code == 0 and json.loads(out)["artifacts"] == str(store), err


def test_environment_variable_names_the_store(capsys, tmp_path, monkeypatch):
    home, store = tmp_path / "home", tmp_path / "store"
    monkeypatch.setenv("TAPS_CL_ARTIFACTS", str(store))
    code, _, err = run(capsys, "--home", str(home), "base", "add", "b", "--model",
                       "timm:test_resnet")
    assert code == 0, err
    assert marker_id(store) and len(list(store.rglob("*.safetensors"))) == 1
    monkeypatch.setenv("TAPS_CL_ARTIFACTS", str(tmp_path / "wrong"))
    code, _, err = run(capsys, "--home", str(home), "base", "list")
    assert code == 1
    assert_one_line_error(err, rf"unreachable: no such directory \(recorded: {store}\)")
    (tmp_path / "wrong").mkdir()
    code, _, err = run(capsys, "--home", str(home), "base", "list")
    assert code == 1
    assert_one_line_error(err, "is not this registry's store")


def test_unreachable_store_is_one_line_at_open(capsys, tmp_path):
    home, store = tmp_path / "home", tmp_path / "store"
    code, _, err = run(capsys, "--home", str(home), "--artifacts", str(store),
                       "base", "add", "b", "--model", "timm:test_resnet")
    assert code == 0, err
    store.rename(tmp_path / "unmounted")  # the shared mount is not there
    for command in (("base", "list"), ("report", "accuracy", "--verify"), ("gc",)):
        code, out, err = run(capsys, "--home", str(home), *command)
        assert code == 1 and out == ""
        assert_one_line_error(err, rf"artifact store {store} is unreachable")
    assert not store.exists()  # a read never creates the store
    code, _, err = run(capsys, "--home", str(home), "--artifacts", "nosuchproto://x",
                       "base", "list")
    assert code == 1
    assert_one_line_error(err, "invalid artifact store URL nosuchproto://x")


def test_store_of_another_registry_is_refused(tmp_path):
    store = tmp_path / "store"
    with Registry(tmp_path / "one", artifacts=str(store)) as reg:
        add_base(reg)
    before = files_under(store)
    with pytest.raises(StoreMismatch, match="belongs to another registry"):
        Registry(tmp_path / "two", artifacts=str(store))
    assert files_under(store) == before
    # The refused first write leaves no empty registry behind.
    assert not (tmp_path / "two" / "registry.db").exists()
    with pytest.raises(NoRegistry):
        Registry(tmp_path / "two", create=False, artifacts=str(store))
    # A reader of a registry that recorded nothing yet writes nothing either.
    (tmp_path / "three").mkdir()
    engine = db.make_engine(db.sqlite_url(tmp_path / "three" / "registry.db"))
    db.ensure_schema(engine, create=True)  # a schema, no store recorded (no write open yet)
    engine.dispose()
    with Registry(tmp_path / "three", create=False, artifacts=str(store)) as reg:
        assert reg.store_record is None and reg.list_bases() == []
    assert files_under(store) == before


def test_memory_store_writes_reads_and_collects_garbage(tmp_path):
    url = f"memory://taps-test-{uuid.uuid4().hex}/store"
    fs, root = fsspec.core.url_to_fs(url)
    with Registry(tmp_path / "home", artifacts=url) as reg:
        base = add_base(reg)
        task = finish(reg, begin(reg, "t1"), b"task-blob")
        assert not reg.store.is_local
        assert reg.check_artifact(task.artifact) == b"task-blob"
        assert fs.cat_file(f"{root}/{base.weights.path}") == b"weights-1"
        assert not [p for p in fs.find(root) if TEMP_PREFIX in p]  # every temp object moved
        # A damaged object is found on read and never rewritten.
        fs.pipe_file(f"{root}/{task.artifact.path}", b"damaged")
        with pytest.raises(IntegrityFailure, match="is corrupt"):
            reg.read_artifact(task.artifact)
        with pytest.raises(IntegrityFailure, match="exists but is corrupt"):
            reg.store.write(b"task-blob")
        assert fs.cat_file(f"{root}/{task.artifact.path}") == b"damaged"
        fs.pipe_file(f"{root}/{task.artifact.path}", b"task-blob")
        # gc: an unreferenced object and an abandoned temp object; the marker is left alone.
        _, orphan = reg.store.write(b"orphan")
        fs.pipe_file(f"{root}/ab/{TEMP_PREFIX}abandoned.safetensors", b"half")
        assert sorted(g.reason for g in reg.find_garbage()) == ["unreferenced"]  # temp is young
        later = time.time() + 3600
        garbage = reg.find_garbage(now=later)
        assert sorted(g.reason for g in garbage) == ["temp", "unreferenced"]
        assert reg.remove_garbage(garbage, now=later) == len(b"orphan") + len(b"half")
        assert not reg.store.exists(orphan)
        assert reg.check_artifact(task.artifact) == b"task-blob"
        assert fs.exists(f"{root}/{MARKER}")


@pytest.mark.parametrize("named", [False, True])
def test_migration_0005_round_trip_keeps_the_registry_working(tmp_path, named):
    home, store = tmp_path / "home", tmp_path / "store"
    artifacts = str(store) if named else None
    reg = Registry(home, artifacts=artifacts)
    add_base(reg)
    finish(reg, begin(reg, "t1"))
    record = reg.store_record
    engine = reg.engine
    db.downgrade(engine, "0004")
    with engine.connect() as conn:
        tables = {r[0] for r in conn.execute(text("SELECT name FROM sqlite_master"))}
    assert "artifact_store" not in tables
    reg.close()
    with pytest.raises(SchemaOutOfDate, match="taps-cl db upgrade"):
        Registry(home, artifacts=artifacts)
    engine = db.make_engine(db.sqlite_url(home / "registry.db"))
    db.upgrade(engine, "0005")
    assert db.current_revision(engine) == "0005"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM artifact_store")).scalar() == 0
    db.upgrade(engine)
    engine.dispose()
    # A reader of the upgraded registry records nothing; the first writer adopts the store.
    with Registry(home, create=False, artifacts=artifacts) as again:
        assert again.store_record is None
        assert again.check_artifact(again.get_base("b").weights) == b"weights-1"
    with Registry(home, artifacts=artifacts) as again:
        assert again.store_record == record  # a named store keeps the id in its marker
        assert again.get_task("t1").position == 1
        finish(again, begin(again, "t2"), b"two")
        assert [t.name for t in again.list_tasks("b")] == ["t1", "t2"]


def add_and_restore(capsys, a: list[str], image_data, out) -> None:
    """From home A (global options `a`): a base, task t on it, and t restored to `out`."""
    code, _, err = run(capsys, *a, "base", "add", "b", "--model", "timm:test_resnet")
    assert code == 0, err
    code, _, err = run(capsys, *a, "task", "add", "t", "--base", "b", "--data",
                       f"imagefolder:{image_data}", "--epochs", "1", "--batch-size", "16",
                       "--img-size", "32", "--seed", "0")
    assert code == 0, err
    code, _, err = run(capsys, *a, "restore", "t", "--out", str(out))
    assert code == 0, err


def test_two_homes_share_database_and_store_and_restore_bit_identically(
        capsys, tmp_path, image_data):
    """A task added from one machine (home A) restores bit-identically from another (home B)
    sharing the database URL and artifact store."""
    shared = tmp_path / "shared"
    database = f"sqlite:///{shared / 'registry.db'}"
    store = str(shared / "store")
    a = ["--home", str(tmp_path / "a"), "--db", database, "--artifacts", store]
    add_and_restore(capsys, a, image_data, tmp_path / "a.safetensors")
    # Home B names only the database: the store comes from the registry's record.
    b = ["--home", str(tmp_path / "b"), "--db", database]
    code, _, err = run(capsys, *b, "restore", "t", "--out", str(tmp_path / "b.safetensors"))
    assert code == 0, err
    code, out, err = run(capsys, *b, "--json", "report", "accuracy", "--verify")
    assert code == 0 and json.loads(out)["verified"] is True, err
    ours, theirs = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert ours.keys() == theirs.keys() and ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not (tmp_path / "b" / "artifacts").exists()  # B wrote no store of its own


def test_registry_records_its_store_on_both_databases(tmp_path, db_url):
    """Home B opens home A's database by URL alone and gets the recorded (named) store."""
    url = db_url or db.sqlite_url(tmp_path / "a" / "registry.db")
    store = tmp_path / "store"
    with Registry(tmp_path / "a", url, artifacts=str(store)) as reg:
        base = add_base(reg)
        finish(reg, begin(reg, "t1"), b"task-blob")
        record = reg.store_record
    assert record.url == str(store) and record.store_id == marker_id(store)
    with Registry(tmp_path / "b", url) as reg:  # a writer: nothing to record again
        assert reg.store_record == record and Path(reg.store.root) == store
        assert reg.check_artifact(reg.get_task("t1").artifact) == b"task-blob"
        assert reg.get_base("b").weights == base.weights
    (tmp_path / "wrong").mkdir()
    with pytest.raises(StoreMismatch, match="is not this registry's store"):
        Registry(tmp_path / "b", url, artifacts=str(tmp_path / "wrong"))
    assert files_under(tmp_path / "wrong") == {}
