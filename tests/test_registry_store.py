"""Artifact store hardening: paths from rows stay in the store, OS errors name the user's path,
failed writes leave no orphans, garbage is found and removed safely, recorded facts are checked."""

from __future__ import annotations

import os
import time
from dataclasses import replace

import pytest
from sqlalchemy import text

from registry import TEMP_GRACE_SECONDS, IntegrityFailure, Registry, RegistryError, StoreError
from registry.entities import GarbageFile
from registry.store import ArtifactStore, sha256_bytes
from tests.test_registry import add_base, begin, finish


@pytest.fixture
def reg(tmp_path, db_url):
    """A new registry on SQLite and on PostgreSQL (tests.servers.db_url)."""
    with Registry(tmp_path / "home", db_url) as registry:
        yield registry


def _refuse_inserts(reg: Registry, table: str, message: str) -> None:
    """A trigger that makes the database refuse every insert into ``table`` with ``message``."""
    with reg.engine.begin() as conn:
        if reg.engine.name == "sqlite":
            conn.execute(text(f"CREATE TRIGGER ro BEFORE INSERT ON {table} "
                              f"BEGIN SELECT RAISE(ABORT, '{message}'); END"))
        else:  # PostgreSQL
            conn.execute(text("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                              f"$$ BEGIN RAISE EXCEPTION '{message}'; END $$"))
            conn.execute(text(f"CREATE TRIGGER ro BEFORE INSERT ON {table} "
                              "FOR EACH ROW EXECUTE FUNCTION refuse()"))


def _files(reg: Registry) -> set[str]:
    root = reg.store.root
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("relative", [
    "../outside.safetensors", "/etc/passwd", "ab/../../x", "", "ab\\..\\x",
])
def test_paths_outside_the_store_are_refused(tmp_path, relative):
    store = ArtifactStore(tmp_path / "artifacts")
    with pytest.raises(IntegrityFailure, match="escapes the store"):
        store.path_of(relative)


def test_symlinked_path_escaping_the_store_is_refused(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    digest, rel = store.write(b"data")
    (tmp_path / "elsewhere").mkdir()
    (store.root / "zz").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(IntegrityFailure, match="escapes the store"):
        store.path_of("zz/file.safetensors")
    assert store.read(rel, digest) == b"data"


def test_edited_artifact_rows_are_integrity_failures(reg):
    base = add_base(reg)
    data = reg.check_artifact(base.weights)
    assert data == b"weights-1"
    other_sha = sha256_bytes(b"other")
    with pytest.raises(IntegrityFailure, match="not where content"):
        reg.read_artifact(replace(base.weights, path=f"{other_sha[:2]}/{other_sha}.safetensors"))
    with pytest.raises(IntegrityFailure, match="escapes the store|not where content"):
        reg.read_artifact(replace(base.weights, path="../../registry.db"))
    with pytest.raises(IntegrityFailure, match="not a sha256"):
        reg.read_artifact(replace(base.weights, sha256="../x"))
    with pytest.raises(IntegrityFailure, match="bytes=999"):
        reg.check_artifact(replace(base.weights, bytes=999))
    with pytest.raises(IntegrityFailure, match="kind"):
        reg.check_artifact(replace(base.weights, kind="weird"))
    # The same through the database: an edited row is caught on the next read.
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE artifacts SET bytes = bytes + 1"))
    with pytest.raises(IntegrityFailure, match="bytes="):
        reg.check_artifact(reg.get_base("b").weights)


def test_os_errors_name_the_path_and_operation(tmp_path):
    root = tmp_path / "artifacts"
    root.write_bytes(b"a file where the store's directory should be")
    store = ArtifactStore(root)
    message = r"cannot write artifact into .*artifacts/[0-9a-f]{2}: "
    with pytest.raises(StoreError, match=message) as info:
        store.write(b"data")
    assert ".tmp" not in str(info.value)
    assert isinstance(info.value, RegistryError)


def test_unreadable_artifact_is_a_store_error(tmp_path):
    store = ArtifactStore(tmp_path / "artifacts")
    digest, rel = store.write(b"data")
    path = store.path_of(rel)
    path.unlink()
    path.mkdir()  # a directory where the file was
    with pytest.raises(IntegrityFailure, match="cannot be read"):
        store.read(rel, digest)


def test_failed_base_add_leaves_no_orphan(reg):
    _refuse_inserts(reg, "base_models", "read-only")  # as a read-only database would
    with pytest.raises(RegistryError, match="read-only"):
        add_base(reg, weights=b"big weights" * 1000)
    assert reg.list_bases() == [] and reg.list_artifacts() == []
    assert _files(reg) == set()


def test_failed_base_add_keeps_files_it_did_not_create(reg):
    kept = add_base(reg, "kept", weights=b"shared")
    _refuse_inserts(reg, "base_models", "read-only")
    with pytest.raises(RegistryError):
        add_base(reg, "again", weights=b"shared")
    assert reg.check_artifact(kept.weights) == b"shared"
    assert _files(reg) == {kept.weights.path}


def test_base_add_into_read_only_database_leaves_no_orphan(tmp_path):
    home = tmp_path / "home"
    Registry(home).close()
    url = f"sqlite:///file:{home / 'registry.db'}?mode=ro&uri=true"
    with Registry(home, url) as reg:
        with pytest.raises(RegistryError, match="readonly|read-only"):
            add_base(reg, weights=b"w" * 10000)
        assert _files(reg) == set()


def test_failed_finish_removes_its_new_files(reg):
    add_base(reg)
    task = begin(reg, "t")
    _refuse_inserts(reg, "evaluations", "disk says no")
    with pytest.raises(RegistryError, match="disk says no"):
        finish(reg, task, b"task-blob")
    assert reg.get_task("t").status == "training"
    assert _files(reg) == {reg.get_base("b").weights.path}


def test_record_rewrites_a_file_removed_after_staging(reg):
    # A concurrent failed call (or gc) may remove a staged file before this call records it:
    # under the write lock the file is written again, so the row never points at nothing.
    add_base(reg)
    task = begin(reg, "t")
    real_put = reg.store.put
    removed = []

    def put_then_lose(data):
        sha, rel, created = real_put(data)
        if not removed:
            reg.store.remove(rel)
            removed.append(rel)
        return sha, rel, created

    reg.store.put = put_then_lose
    try:
        done = finish(reg, task, b"task-blob")
    finally:
        reg.store.put = real_put
    assert reg.check_artifact(done.artifact) == b"task-blob"
    assert removed == [done.artifact.path]


def test_garbage_is_found_and_removed(reg):
    base = add_base(reg)
    finish(reg, begin(reg, "t"), b"task-blob")
    orphan_sha, orphan = reg.write_artifact_file(b"orphan from a killed run")
    old_tmp = reg.store.root / orphan[:2] / ".tmp-abandoned.safetensors"
    old_tmp.write_bytes(b"partial")
    past = time.time() - TEMP_GRACE_SECONDS - 5
    os.utime(old_tmp, (past, past))
    live_tmp = reg.store.root / orphan[:2] / ".tmp-live.safetensors"
    live_tmp.write_bytes(b"being written")
    stray = reg.store.root / "README.txt"
    stray.write_text("not ours")
    garbage = reg.find_garbage()
    assert sorted((g.path, g.reason) for g in garbage) == sorted([
        (orphan, "unreferenced"),
        (f"{orphan[:2]}/.tmp-abandoned.safetensors", "temp"),
    ])
    assert {g.path: g.bytes for g in garbage}[orphan] == len(b"orphan from a killed run")
    freed = reg.remove_garbage(garbage)
    assert freed == len(b"orphan from a killed run") + len(b"partial")
    assert not reg.store.path_of(orphan).exists() and not old_tmp.exists()
    assert live_tmp.exists() and stray.exists()
    assert reg.find_garbage() == []
    for artifact in reg.list_artifacts():  # every referenced file is intact
        reg.check_artifact(artifact)
    assert reg.check_artifact(base.weights) == b"weights-1"


def test_remove_garbage_rechecks_references(reg):
    sha, rel = reg.write_artifact_file(b"weights-1")
    stale = reg.find_garbage()
    assert [g.path for g in stale] == [rel]
    base = add_base(reg)  # recorded after the listing: now referenced
    assert reg.remove_garbage(stale) == 0
    assert reg.check_artifact(base.weights) == b"weights-1"
    # Forged entries: a referenced file, a young temp file, a path outside the store.
    young = reg.store.root / rel[:2] / ".tmp-young.safetensors"
    young.write_bytes(b"x")
    young_rel = young.relative_to(reg.store.root).as_posix()
    forged = [GarbageFile(rel, 9, "unreferenced"), GarbageFile(young_rel, 1, "temp")]
    assert reg.remove_garbage(forged) == 0
    assert young.exists() and reg.check_artifact(base.weights) == b"weights-1"
    outside = reg.home / "outside.txt"  # beside the store, as the SQLite file is
    outside.write_text("not the store's")
    with pytest.raises(IntegrityFailure, match="escapes the store"):
        reg.remove_garbage([GarbageFile("../outside.txt", 1, "unreferenced")])
    assert outside.exists()


def test_garbage_of_an_empty_home_is_nothing(tmp_path):
    with Registry(tmp_path / "home") as reg:
        assert reg.find_garbage() == []
