"""Runs own their rows: run tokens, heartbeats, liveness, late positions, sampled columns, RunLost."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import text

from registry import (
    AlreadyExists,
    NotFound,
    Registry,
    RegistryError,
    RunLost,
    run_is_alive,
    runs,
)
from registry.entities import EarlierCell
from tests.test_registry import add_base, begin, cells_for_ready, finish


@pytest.fixture
def reg(tmp_path, db_url):
    with Registry(tmp_path / "home", db_url) as registry:
        add_base(registry)
        yield registry


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout)


def _age_heartbeat(reg: Registry, name: str, seconds: float) -> None:
    past = datetime.now(timezone.utc) - timedelta(seconds=seconds)
    # SQLite stores UTC as naive text; PostgreSQL takes the aware datetime (timestamptz).
    value = past.strftime("%Y-%m-%d %H:%M:%S.%f") if reg.engine.name == "sqlite" else past
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE tasks SET heartbeat_at = :t WHERE name = :n"),
                     {"t": value, "n": name})


def test_run_is_alive_rules(reg):
    task = begin(reg, "t")
    now = datetime.now(timezone.utc)
    assert run_is_alive(task, now)  # our own pid, fresh heartbeat
    stale = now + timedelta(seconds=runs.HEARTBEAT_STALE_SECONDS + 1)
    assert not run_is_alive(task, stale)
    assert not run_is_alive(replace(task, run_pid=_dead_pid()), now)  # kill -9 on this host
    foreign = replace(task, run_host=runs.this_host() + "-elsewhere", run_pid=_dead_pid())
    assert run_is_alive(foreign, now)  # another host: the heartbeat alone decides
    assert not run_is_alive(foreign, stale)
    assert not run_is_alive(replace(task, heartbeat_at=None), now)
    assert not run_is_alive(replace(task, status="ready"), now)
    naive = replace(task, heartbeat_at=now.replace(tzinfo=None))  # SQLite returns naive UTC
    assert run_is_alive(naive, now)
    assert runs.HEARTBEAT_INTERVAL_SECONDS < runs.HEARTBEAT_STALE_SECONDS


def test_live_run_is_not_removable_without_force(reg):
    begin(reg, "t")
    with pytest.raises(RegistryError, match=r"still alive.*pid %d.*--force" % os.getpid()):
        reg.discard_task("t")
    assert reg.get_task("t").status == "training"
    with pytest.raises(AlreadyExists, match="run in progress"):
        begin(reg, "t")
    reg.discard_task("t", force=True)
    with pytest.raises(NotFound):
        reg.get_task("t")


def test_dead_runs_are_removable(reg):
    begin(reg, "killed", pid=_dead_pid())  # this host, pid gone: removable at once
    with pytest.raises(AlreadyExists, match=r"left over.*taps-cl task remove killed"):
        begin(reg, "killed")
    reg.discard_task("killed")
    begin(reg, "far", host="some-other-host", pid=1)
    with pytest.raises(RegistryError, match="still alive"):  # fresh heartbeat, pid unknowable
        reg.discard_task("far")
    _age_heartbeat(reg, "far", runs.HEARTBEAT_STALE_SECONDS + 5)
    reg.discard_task("far")
    assert reg.list_tasks() == []


def test_heartbeat_refreshes_liveness(reg):
    task = begin(reg, "far", host="some-other-host", pid=1)
    _age_heartbeat(reg, "far", 3600)
    assert not run_is_alive(reg.get_task("far"))
    reg.heartbeat_task(task.run_token)
    assert run_is_alive(reg.get_task("far"))
    reg.heartbeat_task("no-such-token")  # a row that is gone: nothing happens


def test_a_run_cleans_up_only_its_own_row(reg):
    first = begin(reg, "t")
    reg.discard_task("t", force=True)  # the user removed the live run ...
    second = begin(reg, "t")  # ... and started another under the same name
    reg.discard_task("t", run_token=first.run_token)  # the first run's clean-up: not its row
    assert reg.get_task("t").run_token == second.run_token
    with pytest.raises(RunLost, match="removed while the run was training"):
        finish(reg, first)  # the first run cannot record into the second run's row
    assert reg.get_task("t").status == "training" and reg.get_task("t").artifact is None
    assert reg.list_artifacts() == [reg.get_base("b").weights]  # no file or row left behind
    assert len(list(reg.store.root.rglob("*.safetensors"))) == 1
    reg.discard_task("t", run_token=second.run_token)
    reg.discard_task("t", run_token=second.run_token)  # already gone: still nothing to do
    with pytest.raises(NotFound):
        reg.get_task("t")


def test_finish_after_removal_is_run_lost(reg):
    task = begin(reg, "t")
    reg.discard_task("t", force=True)
    with pytest.raises(RunLost):
        finish(reg, task)
    assert reg.list_tasks() == []


def test_altered_rows_are_not_removed(reg):
    finish(reg, begin(reg, "t"))
    with reg.engine.begin() as conn:  # a ready task set back to training by hand
        conn.execute(text("UPDATE tasks SET status = 'training' WHERE name = 't'"))
    with pytest.raises(RegistryError, match=r"stored results.*--verify"):
        reg.discard_task("t", force=True)
    assert reg.get_task("t").artifact is not None


def test_finish_records_only_the_cells_given(reg):
    """An add records the earlier tasks it re-checked (a sample), never needs all of them, and
    drops cells of tasks that are not ready; concurrent runs land without retrying."""
    a = begin(reg, "a")
    b = begin(reg, "b2")
    c = begin(reg, "c")
    stale = cells_for_ready(reg)  # nothing is ready yet: what all three runs saw
    finish(reg, a, b"A", earlier=stale)
    ghost = EarlierCell("gone", "probe", 0.1, 0.0, True)
    assert finish(reg, b, b"B", earlier=stale + [ghost]).position == 2
    assert finish(reg, c, b"C", earlier=[EarlierCell("b2", "probe", 0.5, 0.0, True)]).position == 3
    columns = {(e.task, e.after_task, e.kind) for e in reg.list_evaluations("b")}
    assert columns == {("a", "a", "measured"), ("b2", "b2", "measured"), ("c", "c", "measured"),
                       ("b2", "c", "probe")}


def test_chain_links_each_task_to_the_one_before(reg):
    from registry import chain

    tasks = [finish(reg, begin(reg, name), name.encode()) for name in ("a", "b2", "c")]
    base = reg.get_base("b")
    assert tasks[0].chain_prev_sha256 == chain.genesis(base.sha256)
    for before, task in zip(tasks, tasks[1:]):
        assert task.chain_prev_sha256 == before.chain_sha256
    for task in tasks:
        assert task.chain_sha256 == chain.link(task.chain_prev_sha256, task.position, task.name,
                                               task.artifact.sha256, task.probe.sha256)
    assert reg.chain_problems("b") == {}
    # Pointing an earlier task at another artifact breaks its link; rewriting its chain value
    # as well breaks the next task's.
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE tasks SET artifact_id = (SELECT probe_artifact_id FROM tasks "
                          "WHERE name = 'a') WHERE name = 'a'"))
    assert set(reg.chain_problems("b")) == {"a"}
    fake = reg.get_task("a")
    forged = chain.link(fake.chain_prev_sha256, 1, "a", fake.artifact.sha256, fake.probe.sha256)
    with reg.engine.begin() as conn:
        conn.execute(text("UPDATE tasks SET chain_sha256 = :c WHERE name = 'a'"), {"c": forged})
    problems = reg.chain_problems("b")
    assert set(problems) == {"b2"} and "does not follow" in problems["b2"]


def test_chain_survives_a_deleted_task(reg):
    for name in ("a", "b2", "c"):
        finish(reg, begin(reg, name), name.encode())
    reg.delete_task("b2")
    assert reg.chain_problems("b") == {}
    assert finish(reg, begin(reg, "d"), b"D").chain_prev_sha256 == reg.get_task("c").chain_sha256
    assert reg.chain_problems("b") == {}


def test_begin_never_collides_on_positions(reg):
    runs_ = [begin(reg, f"t{i}") for i in range(4)]  # four adds in flight at once
    assert all(t.position is None for t in runs_)
    for i, task in enumerate(reversed(runs_)):
        assert finish(reg, task, f"blob{i}".encode()).position == i + 1


@pytest.mark.parametrize("intrusion", ["edit", "cell"])
def test_finish_refuses_to_write_beyond_its_own_rows(reg, monkeypatch, intrusion):
    """The finishing transaction checks that it changes only the new task's rows."""
    from sqlalchemy import select

    from registry import lifecycle
    from registry.models import EvaluationRow, TaskRow

    finish(reg, begin(reg, "a"), b"A")
    run = begin(reg, "b2")
    original = lifecycle._chain_head

    def meddling(s, base_id):  # a bug that touches an earlier task inside the finish
        earlier = s.scalar(select(TaskRow).where(TaskRow.name == "a"))
        if intrusion == "edit":
            earlier.class_names = ["z"]
        else:
            s.add(EvaluationRow(task_id=earlier.id, after_task_id=earlier.id, split="test",
                                kind="measured", accuracy=0.1))
        return original(s, base_id)

    monkeypatch.setattr(lifecycle, "_chain_head", meddling)
    with pytest.raises(RegistryError, match="beyond its own rows"):
        finish(reg, run, b"B")
    monkeypatch.undo()
    assert reg.get_task("a").class_names == ("a", "b", "c")
    assert reg.get_task("b2").status == "training"
    assert len(reg.list_evaluations("b")) == 1
