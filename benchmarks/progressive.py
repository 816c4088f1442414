"""The progressive rows: library method "progressive" through the Manager, one base per row.

Adapters on every block in three bands: shared by all tasks early, by a similarity group in the
middle, task-specific near the head (docs/architecture.md). progressive-group trains the tasks as
ONE `Manager.group_train` run; progressive adds them one at a time with `group="auto"`, and after
each add re-reads every earlier task's artifact and pinned shared bands (sha256 of the bytes) to
check that joining rewrote nothing, then runs `Manager.verify` on its base at the end.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Callable

from benchmarks.protocol import VAL_FRACTION, Bench, TaskDef
from benchmarks.rows import (
    PROGRESSIVE_GROUP,
    Row,
    RowSpec,
    Run,
    SharedBand,
    failing_task,
    record_task,
)
from registry import RegistryError
from taps_cl.manager import Manager
from taps_cl.tasks.grouping import GroupResult
from taps_cl.tasks.recording import TaskAddResult


def train_progressive(
    bench: Bench, manager: Manager, spec: RowSpec, base: str, lr: float, seed: int, *,
    max_train: int, max_test: int,
    after_add: Callable[[TaskDef, TaskAddResult], None] | None = None,
) -> tuple[list[TaskAddResult], GroupResult | None]:
    """Register `base` (bands are per base) and train a progressive row's tasks on it.

    progressive-group: one `group_train` run of all tasks (its GroupResult is returned too);
    progressive: one `add_task(..., method="progressive", group="auto")` per task, in order,
    calling `after_add` after each. Tasks are named `<base>-<task>`. A task that fails to train
    raises RunFailed (rows.failing_task).
    """
    a = bench.args
    manager.add_base(base, bench.spec, weights=str(bench.weights))
    common = dict(epochs=a.epochs, batch_size=a.batch_size, lr=lr, weight_decay=a.weight_decay,
                  img_size=a.img_size, seed=seed, max_train=max_train, max_test=max_test,
                  val_fraction=VAL_FRACTION, method_options=spec.method_options(lr))
    if spec.kind == PROGRESSIVE_GROUP:
        with failing_task("(group train)"):
            grouped = manager.group_train(
                base, [(f"{base}-{t.name}", t.data_spec) for t in bench.tasks],
                groups=a.progressive_groups, **common)
        return list(grouped.results), grouped
    results = []
    for task in bench.tasks:
        with failing_task(task.name):
            result = manager.add_task(f"{base}-{task.name}", base, task.data_spec,
                                      method="progressive", group="auto", **common)
        assert result is not None  # one process: this one records
        results.append(result)
        if after_add is not None:
            after_add(task, result)
    return results, None


def _stored_hashes(manager: Manager, name: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """sha256 of the bytes of a task's artifact and of each shared artifact it pins, re-read
    from the store now ("unreadable" where the store refuses them: a changed file)."""
    reg = manager.registry
    task = manager.get_task(name)

    def digest(artifact) -> str:  # type: ignore[no-untyped-def]
        try:
            return hashlib.sha256(reg.read_artifact(artifact)).hexdigest()
        except RegistryError:  # read_artifact checks the content hash: it changed
            return "unreadable"

    assert task.artifact is not None
    pins = tuple(sorted((pin.kind, digest(reg.get_artifact(pin.sha256)))
                        for pin in task.depends_on if pin.task is None))
    return digest(task.artifact), pins


def short_name(name: str, base: str) -> str:
    return name.removeprefix(f"{base}-")


def _progressive_sizes(manager: Manager, run: Run, base: str) -> None:
    """A progressive run's sizes from the budget of its own base: own artifacts, shared ones."""
    budget = manager.budget(base)
    for entry in budget.tasks:
        run.task_bytes[short_name(entry.name, base)] = entry.bytes
    run.total_params, run.total_bytes = budget.total_params, budget.total_bytes
    run.shared_params = sum(u.num_params for u in budget.shared)
    run.shared_bytes = sum(u.bytes for u in budget.shared)
    run.shared = [SharedBand(tuple(k.removeprefix("progressive_") for k in u.kinds),
                             u.num_params, tuple(short_name(t, base) for t in u.tasks), u.bytes)
                  for u in budget.shared]
    # After k tasks: the base, their own artifacts and every shared band one of them reads.
    order = [t for t in run.acc]  # the tasks in the order they were added
    run.cumulative_bytes = [
        budget.base_bytes + sum(run.task_bytes[t] for t in order[:k])
        + sum(b.bytes for b in run.shared if set(b.tasks) & set(order[:k]))
        for k in range(1, len(order) + 1)]


def run_progressive_group(bench: Bench, manager: Manager, row: Row, seed: int) -> Run:
    """One seed of the progressive-group row: every task in one `group train` run, own base.

    A joint epoch trains one batch of every task per step, so each task is given an equal share
    of it (joint epoch seconds ÷ tasks) in the time columns.
    """
    a = bench.args
    assert row.lr is not None
    base = f"{bench.prefix}-{row.spec.key}-s{seed}"
    results, grouped = train_progressive(bench, manager, row.spec, base, row.lr, seed,
                                         max_train=a.max_train, max_test=a.max_test)
    assert grouped is not None
    run = Run(seed)
    sizes = bench.data(a.seed_values[0])
    n = len(results)
    epochs = [max(r.history[e]["seconds"] for r in results)
              for e in range(len(results[0].history))]
    share = statistics.fmean(epochs) / n
    for task, result in zip(bench.tasks, results, strict=True):
        n_train = len(sizes[task.name].train)
        record_task(bench, row, run, task.name, result, n_train, (share, n_train / share))
    run.groups = {short_name(m, base): short_name(g, base)
                  for g, members in grouped.groups.items() for m in members}
    run.similarity = ([short_name(t, base) for t in grouped.tasks],
                      [list(map(float, r)) for r in grouped.matrix])
    _progressive_sizes(manager, run, base)
    bench.say(f"  stage 2  {row.label:<30} seed {seed} groups: {groups_text(run)}")
    return run


def run_progressive(bench: Bench, manager: Manager, row: Row, seed: int) -> Run:
    """One seed of the incremental progressive row, with the join checks.

    After each add, every earlier task's artifact and the shared bands it pins are re-read and
    hashed and must equal what they were right after that task's own add; the adds' probe
    re-checks are kept, and `Manager.verify` checks the whole base at the end.
    """
    a = bench.args
    assert row.lr is not None
    base = f"{bench.prefix}-{row.spec.key}-s{seed}"
    run = Run(seed)
    sizes = bench.data(a.seed_values[0])
    seen: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {}

    def after_add(task: TaskDef, result: TaskAddResult) -> None:
        record_task(bench, row, run, task.name, result, len(sizes[task.name].train))
        for earlier, hashes in seen.items():
            run.unchanged.append((earlier, _stored_hashes(manager, earlier) == hashes))
        name = f"{base}-{task.name}"
        seen[name] = _stored_hashes(manager, name)
        group = result.task.method_config.get("group", "")
        run.groups[task.name] = short_name(group, base)
        run.opened[task.name] = group == name  # a task that opens a group names it after itself

    train_progressive(bench, manager, row.spec, base, row.lr, seed, max_train=a.max_train,
                      max_test=a.max_test, after_add=after_add)
    run.verified = [(c.task, c.ok, c.max_drift) for c in manager.verify(base, workers=1)]
    report = manager.similarity(base)
    run.similarity = ([short_name(t, base) for t in report.tasks],
                      [list(map(float, r)) for r in report.matrix])
    _progressive_sizes(manager, run, base)
    bench.say(f"  stage 2  {row.label:<30} seed {seed} groups: {groups_text(run)}; "
              f"{sum(ok for _, ok in run.unchanged)}/{len(run.unchanged)} earlier artifacts "
              f"unchanged; verify {sum(ok for _, ok, _ in run.verified)}/{len(run.verified)} ok")
    return run


def groups_text(run: Run) -> str:
    """Which group each task landed in: "{fashion} {digits} {letters, lowercase}"."""
    members: dict[str, list[str]] = {}
    for task, group in run.groups.items():
        members.setdefault(group, []).append(task)
    return " ".join("{" + ", ".join(m) + "}" for m in members.values())
