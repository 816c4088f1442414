"""Concurrent adds on one registry (SQLite and PostgreSQL): 4 processes, 3 rounds, plain registry
calls (no torch).

Each worker begins its task, reads which tasks are ready, waits until every worker has done the
same (so all but the first finisher hold a stale list), then finishes with cells for what it saw.
All tasks must land at once, with distinct positions, cells only where something was checked
(never below the diagonal) and one unbroken hash chain over the sequence.
"""

from __future__ import annotations

import multiprocessing
import os
import traceback

from registry import Registry, runs
from registry.entities import EarlierCell, LayerEntry
from tests.test_registry import add_base

WORKERS = 4
ROUNDS = 3


def _worker(home: str, url, worker: int, barrier, results) -> None:  # type: ignore[no-untyped-def]
    try:
        with Registry(home, url) as reg:
            for round_ in range(ROUNDS):
                name = f"r{round_}w{worker}"
                barrier.wait(timeout=60)  # all begin at once
                task = reg.begin_task(
                    name, base="b", method="linear", method_config={}, train_config={},
                    dataset_spec={"kind": "digits"}, class_names=["x", "y"],
                    run_host=runs.this_host(), run_pid=os.getpid(),
                )
                seen = reg.list_task_names("b")
                barrier.wait(timeout=60)  # every worker has read the ready set before any finishes
                reg.finish_task(
                    task.run_token,
                    task_blob=f"task {name}".encode(), task_num_params=4,
                    probe_blob=f"probe {name}".encode(), probe_num_params=2,
                    layers=[LayerEntry("fc", "linear", None, True, 4, 4)],
                    head_params=4, train_seconds=0.1, test_accuracy=0.9,
                    test_loss=0.1, test_samples=8,
                    earlier=[EarlierCell(n, "probe", 0.9, 0.0, True) for n in seen],
                )
        results.put((worker, None))
    except BaseException:  # reported to the test: "database is locked" would land here
        results.put((worker, traceback.format_exc()))


def test_four_concurrent_adds_three_rounds(tmp_path, db_url):
    home = tmp_path / "home"
    with Registry(home, db_url) as reg:
        add_base(reg)
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(home), db_url, w, barrier, results))
             for w in range(WORKERS)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=240) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    errors = [error for _, error in outcomes if error]
    assert errors == []

    with Registry(home, db_url, create=False) as reg:
        tasks = reg.list_tasks("b")
        assert len(tasks) == WORKERS * ROUNDS and all(t.status == "ready" for t in tasks)
        assert [t.position for t in tasks] == list(range(1, WORKERS * ROUNDS + 1))
        for round_ in range(1, ROUNDS):  # rounds are sequential: a round follows the last
            chunk = tasks[WORKERS * round_:WORKERS * (round_ + 1)]
            assert {t.name[:2] for t in chunk} == {f"r{round_}"}
        position = {t.name: t.position for t in tasks}
        column: dict[str, set[str]] = {t.name: set() for t in tasks}
        for ev in reg.list_evaluations("b"):
            column[ev.after_task].add(ev.task)
        for task in tasks:  # its diagonal and what it saw; nothing below the diagonal
            assert task.name in column[task.name]
            assert all(position[t] <= task.position for t in column[task.name])
        # Round r's tasks saw (at least) every task of the rounds before.
        assert all(column[t.name] >= {u.name for u in tasks[:WORKERS * int(t.name[1])]}
                   for t in tasks)
        assert reg.chain_problems("b") == {}


def _opener(home: str, url, barrier, results) -> None:  # type: ignore[no-untyped-def]
    try:
        barrier.wait(timeout=60)
        with Registry(home, url) as reg:
            results.put(("ok", len(reg.list_bases())))
    except BaseException:
        results.put(("error", traceback.format_exc()))


def test_processes_creating_one_new_registry_at_once(tmp_path, db_url):
    # One creates the schema; the others wait for its write lock instead of taking its
    # half-made file (SQLite) or database (PostgreSQL) for someone else's.
    home = tmp_path / "fresh"
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_opener, args=(str(home), db_url, barrier, results))
             for _ in range(WORKERS)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
    assert outcomes == [("ok", 0)] * WORKERS
