"""Registry API and artifact store: entities, errors, atomic content-addressed files."""

from __future__ import annotations

import os
import sqlite3

import pytest

from registry import AlreadyExists, IntegrityFailure, NotFound, Registry, RegistryError, runs
from registry.entities import EarlierCell, LayerEntry, Task
from registry.store import ArtifactStore, sha256_bytes


def add_base(reg: Registry, name: str = "b", weights: bytes = b"weights-1"):
    return reg.add_base(
        name,
        model_spec="timm:test_resnet",
        architecture="test_resnet",
        weights=weights,
        weights_num_params=10,
        num_params=8,
        total_params=10,
        data_config={"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3},
        head_keys=["fc.weight", "fc.bias"],
    )


def begin(reg: Registry, name: str, base: str = "b", *, host: str | None = None,
          pid: int | None = None) -> Task:
    """begin_task as a run on this host in this process (unless told otherwise)."""
    return reg.begin_task(
        name,
        base=base,
        method="taps",
        method_config={"lam": 1.0},
        train_config={"epochs": 1},
        dataset_spec={"kind": "digits"},
        class_names=["a", "b", "c"],
        run_host=runs.this_host() if host is None else host,
        run_pid=os.getpid() if pid is None else pid,
    )


def cells_for_ready(reg: Registry, base: str = "b") -> list[EarlierCell]:
    """A probe cell for every task of ``base`` that is ready now (what a run re-checks)."""
    ready = reg.list_tasks(base, ready_only=True)
    return [EarlierCell(t.name, "probe", 0.5, 0.0, True) for t in ready]


def finish(reg: Registry, task: Task | str, blob: bytes = b"task", acc: float = 0.5,
           earlier: list[EarlierCell] | None = None) -> Task:
    """finish_task for the run of ``task`` (a Task from begin, or a name); by default with a
    cell for every ready task of its base."""
    if isinstance(task, str):
        task = reg.get_task(task)
    layers = [LayerEntry("conv1", "conv2d", 0.2, True, 9, 9), LayerEntry("fc0", "linear", 0.0, False, 4, 0)]
    return reg.finish_task(
        task.run_token,
        task_blob=blob,
        task_num_params=9,
        probe_blob=b"probe-" + blob,
        probe_num_params=3,
        layers=layers,
        head_params=4,
        train_seconds=1.5,
        test_accuracy=acc,
        test_loss=1.0,
        test_samples=10,
        earlier=cells_for_ready(reg, task.base) if earlier is None else earlier,
    )


@pytest.fixture
def reg(tmp_path, db_url):
    """A new registry on SQLite and on PostgreSQL (tests.servers.db_url)."""
    with Registry(tmp_path / "home", db_url) as registry:
        yield registry


def test_sqlite_pragmas(tmp_path):
    with Registry(tmp_path / "home") as reg, reg.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert raw.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000


def test_registry_is_on_the_database_asked_for(reg, db_url):
    assert reg.engine.dialect.name == ("sqlite" if db_url is None else "postgresql")
    add_base(reg)
    assert (reg.home / "registry.db").exists() == (db_url is None)


def test_base_roundtrip_and_duplicate(reg):
    base = add_base(reg)
    assert base.sha256 == sha256_bytes(b"weights-1")
    assert reg.get_base("b") == base
    assert (reg.store.root / base.weights.path).read_bytes() == b"weights-1"
    with pytest.raises(AlreadyExists):
        add_base(reg, weights=b"other")
    assert [b.name for b in reg.list_bases()] == ["b"]
    assert len(reg.list_artifacts()) == 1  # the duplicate left no artifact row
    with pytest.raises(NotFound):
        reg.get_base("nope")


def test_identical_content_stored_once(reg):
    a = add_base(reg, "a", weights=b"same")
    b = add_base(reg, "b", weights=b"same")
    assert a.weights == b.weights
    assert len(reg.list_artifacts()) == 1


def test_task_lifecycle_positions_and_layers(reg):
    add_base(reg)
    t1 = begin(reg, "t1")
    assert (t1.status, t1.position) == ("training", None)  # a position comes with "ready"
    assert t1.run_token and len(t1.run_token) == 32 and t1.run_pid == os.getpid()
    assert t1.heartbeat_at is not None
    done = finish(reg, t1)
    assert done.status == "ready" and done.position == 1
    assert done.active_layers == 1 and done.total_layers == 2
    assert done.task_params == 9 and done.probe is not None
    t2 = begin(reg, "t2")
    reg.discard_task("t2", run_token=t2.run_token)  # a failed run leaves nothing behind
    t3 = begin(reg, "t3")
    t4 = begin(reg, "t4")
    assert t3.position is None and t3.run_token != t4.run_token
    # Tasks without a position are listed last, in the order they were begun.
    assert [t.name for t in reg.list_tasks()] == ["t1", "t3", "t4"]
    assert finish(reg, t4, b"four").position == 2  # finishing order decides positions
    assert finish(reg, t3, b"three").position == 3
    assert [t.name for t in reg.list_tasks()] == ["t1", "t4", "t3"]
    with pytest.raises(AlreadyExists, match="ready"):
        begin(reg, "t1")
    with pytest.raises(RegistryError):
        reg.discard_task("t1")  # finished tasks are never removed
    reg.discard_task("t1", run_token=t1.run_token)  # nor by the run that made them
    assert reg.get_task("t1").status == "ready"
    assert [t.name for t in reg.list_tasks(ready_only=True)] == ["t1", "t4", "t3"]
    with pytest.raises(NotFound):
        begin(reg, "t5", base="missing")
    assert reg.get_task_by_token(t3.run_token).name == "t3"
    with pytest.raises(NotFound):
        reg.get_task_by_token(t2.run_token)


def test_evaluations(reg):
    add_base(reg)
    begin(reg, "t1")
    finish(reg, "t1", b"one", acc=0.7)
    begin(reg, "t2")
    finish(reg, "t2", b"two", acc=0.8)
    reg.add_evaluation("t1", after_task="t2", kind="measured", accuracy=0.7)
    evals = reg.list_evaluations("b")
    assert [(e.task, e.after_task, e.kind) for e in evals] == [
        ("t1", "t1", "measured"),
        ("t2", "t2", "measured"),
        ("t1", "t2", "probe"),  # recorded with t2, in its transaction
        ("t1", "t2", "measured"),
    ]
    with pytest.raises(RegistryError):
        reg.add_evaluation("t1", after_task="t2", kind="guess")


def test_store_verifies_on_read(tmp_path):
    store = ArtifactStore(tmp_path)
    digest, rel = store.write(b"hello")
    assert rel == f"{digest[:2]}/{digest}.safetensors"
    assert store.read(rel, digest) == b"hello"
    path = store.path_of(rel)
    path.write_bytes(b"hellO")
    with pytest.raises(IntegrityFailure, match=digest):
        store.read(rel, digest)
    path.unlink()
    with pytest.raises(IntegrityFailure, match="cannot be read"):
        store.read(rel, digest)
    assert not list(tmp_path.rglob(".tmp-*"))


def test_store_never_rewrites_good_file(tmp_path):
    store = ArtifactStore(tmp_path)
    digest, rel = store.write(b"x" * 100)
    before = store.path_of(rel).stat().st_mtime_ns
    store.write(b"x" * 100)
    assert store.path_of(rel).stat().st_mtime_ns == before


def test_foreign_and_unreadable_database(tmp_path):
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE people (id INTEGER)")
    with pytest.raises(RegistryError, match="not a taps-cl registry"):
        Registry(tmp_path, db_url=f"sqlite:///{foreign}")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(RegistryError, match="not a taps-cl registry"):
        Registry(tmp_path, db_url=f"sqlite:///{junk}")
    assert junk.read_bytes() == b"this is not a database" * 100


def test_invalid_names(reg):
    with pytest.raises(RegistryError, match="invalid name"):
        add_base(reg, "a/b")


def test_store_refuses_to_rewrite_a_damaged_file(tmp_path):
    store = ArtifactStore(tmp_path)
    digest, rel = store.write(b"payload")
    store.path_of(rel).write_bytes(b"damaged")
    with pytest.raises(IntegrityFailure, match="corrupt"):
        store.write(b"payload")
    assert store.path_of(rel).read_bytes() == b"damaged"
