"""How the rows are trained and measured: the learning rate chosen on validation, then the runs.

Stage 1 (`select_lr`) picks each row's rate from the one grid by mean validation accuracy, each
task's training set cut to --select-train images (class-stratified), with the first seed. Stage 2
trains the row at that rate with each of its seeds: linear, fine-tune, TAPS, adapter and fusion
rows through the product path (`Manager`: registry, artifacts, restore-then-evaluate, probe
checks, sizes from the budget report), PEFT LoRA rows with the library's `fit` and `evaluate`,
the progressive rows as benchmarks/progressive.py says. `step_timing` then times a training step
of every row round-robin.

A run whose training fails (the library raises a TapsError for a loss that turns non-finite) does
not stop the benchmark: in stage 1 that rate scores nothing ("diverged") and cannot be chosen; a
row that diverges at every rate gets no stage 2; in stage 2 the failing seed is recorded in the
row's `failures` and has no run. The options of every row are checked before anything trains
(`rows.check_rows`), so a TapsError here is the training's own.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.progressive import run_progressive, run_progressive_group, train_progressive
from benchmarks.protocol import (
    SELECT_TEST,
    VAL_FRACTION,
    Bench,
    fmt_lr,
    stratified_subset,
)
from benchmarks.rows import (
    PEFT,
    PROGRESSIVE,
    PROGRESSIVE_GROUP,
    PROGRESSIVE_KINDS,
    Row,
    RowSpec,
    Run,
    RunFailed,
    failing_task,
    fused_tasks,
    make_method,
    measured,
    record_task,
    say_task,
    timing_of,
)
from taps_cl import serialization
from taps_cl.errors import TapsError, first_line
from taps_cl.manager import Manager
from taps_cl.methods.base import Dependency, Method
from taps_cl.training.evaluate import evaluate
from taps_cl.training.fit import fit

# ------------------------------------------------------------------------------- stage 1


Selection = tuple[float | None, dict[float, float | None], dict[float, str]]


def select_lr(bench: Bench, row: RowSpec) -> Selection:
    """The grid rate with the best mean validation accuracy on the subsampled training sets,
    each rate's score, and why each rate that scored nothing failed.

    Ties go to the smaller rate; a rate whose training fails (a non-finite loss) scores nothing
    and the row's chosen rate is None when every rate failed. The adapter row keeps each task's
    adapter per rate; a fusion row (scored on the tasks from the second on) fuses the adapters its
    adapter row trained here at that row's chosen rate, so the adapter row is selected first.
    """
    a = bench.args
    if row.kind in PROGRESSIVE_KINDS:
        return select_lr_progressive(bench, row)
    if len(a.lr_values) == 1:
        return a.lr_values[0], {}, {}
    seed = a.seed_values[0]
    tasks = bench.data(seed)
    scored = fused_tasks(bench.tasks, row)
    if row.kind == "fusion":
        assert row.reads is not None, "a fusion row names the adapter row it reads"
        if row.reads not in bench.adapter_lr:  # that row diverged at every rate
            reason = "its adapter row diverged at every rate"
            bench.say(f"  stage 1  {row.label:<30} not run: {reason}")
            return None, {lr: None for lr in a.lr_values}, {lr: reason for lr in a.lr_values}
        adapters = bench.stage1_adapters[row.reads][bench.adapter_lr[row.reads]]
    scores: dict[float, float | None] = {}
    errors: dict[float, str] = {}
    for lr in a.lr_values:
        accs: dict[str, float] = {}
        for task in scored:
            td = tasks[task.name]
            deps: list[Dependency] = []
            if row.kind == "fusion":
                deps = [adapters[t.name] for t in bench.tasks[:bench.tasks.index(task)]]
            method = make_method(row, lr, a.epochs, fuse=[d.name for d in deps])
            model = bench.task_model(method, len(td.class_names), seed, deps)
            train = stratified_subset(td.train, a.select_train, seed)
            try:
                fit(model, method, train, td.val, bench.train_config(lr, seed, method))
            except TapsError as exc:  # a diverging rate: non-finite loss
                errors[lr] = f"{task.name}: {first_line(exc)}"
                bench.say(f"  stage 1  {row.label:<30} lr {fmt_lr(lr)}: diverged on "
                          f"{errors[lr]}")
                break
            method.finalize(model)  # what would be stored is what is scored
            accs[task.name] = evaluate(model, td.val).accuracy
            if row.kind == "adapter":
                bench.stage1_adapters.setdefault(row.key, {}).setdefault(lr, {})[task.name] = (
                    Dependency(task.name, "adapter", method.config_dict(),
                               method.extract(model, bench.head).tensors))
        scores[lr] = statistics.fmean(accs.values()) if len(accs) == len(scored) else None
        if scores[lr] is not None:
            bench.say(f"  stage 1  {row.label:<30} lr {fmt_lr(lr)}: val "
                      f"{100 * scores[lr]:5.1f}%  ("
                      + ", ".join(f"{t} {100 * v:.1f}" for t, v in accs.items()) + ")")
    chosen = _best_rate(bench, row, scores)
    if row.kind == "adapter" and chosen is not None:  # only these adapters are fused later
        bench.stage1_adapters[row.key] = {chosen: bench.stage1_adapters[row.key][chosen]}
    return chosen, scores, errors


def _best_rate(bench: Bench, row: RowSpec, scores: dict[float, float | None]) -> float | None:
    """The rate with the best score (ties to the smaller); None when every rate diverged."""
    valid = {lr: s for lr, s in scores.items() if s is not None}
    if not valid:
        bench.say(f"  stage 1  {row.label:<30} diverged at every rate of the grid: not run in "
                  "stage 2")
        return None
    chosen = max(valid, key=lambda lr: (valid[lr], -lr))
    bench.say(f"  stage 1  {row.label:<30} chosen lr {fmt_lr(chosen)}")
    return chosen


def select_lr_progressive(bench: Bench, row: RowSpec) -> Selection:
    """Stage 1 of a progressive row: the row itself through the Manager, on cut training sets.

    Sharing is the method, so no task can be trained alone: for each grid rate the whole row runs
    (`train_progressive`) on a base of its own in a throw-away registry, every task cut to
    --select-train training images by the Manager's max_train (validation is carved before that
    cut, so it stays disjoint from them) and SELECT_TEST test images (not read). Each task's
    restored model is then scored on the full validation split every other row is scored on.
    """
    a = bench.args
    if len(a.lr_values) == 1:
        return a.lr_values[0], {}, {}
    seed = a.seed_values[0]
    full = bench.data(seed)
    scores: dict[float, float | None] = {}
    errors: dict[float, str] = {}
    home = Path(tempfile.mkdtemp(prefix="taps-bench-select-"))
    try:
        with Manager(home) as manager:
            for i, lr in enumerate(a.lr_values):
                base = f"select-{row.key}-{i}"
                try:
                    train_progressive(bench, manager, row, base, lr, seed,
                                      max_train=a.select_train, max_test=SELECT_TEST)
                except RunFailed as exc:  # a diverging rate: non-finite loss
                    errors[lr] = str(exc)
                    bench.say(f"  stage 1  {row.label:<30} lr {fmt_lr(lr)}: diverged on "
                              f"{errors[lr]}")
                    scores[lr] = None
                    continue
                accs = {t.name: evaluate(manager.restore(f"{base}-{t.name}"),
                                         full[t.name].val).accuracy for t in bench.tasks}
                scores[lr] = statistics.fmean(accs.values())
                bench.say(f"  stage 1  {row.label:<30} lr {fmt_lr(lr)}: val "
                          f"{100 * scores[lr]:5.1f}%  ("
                          + ", ".join(f"{t} {100 * v:.1f}" for t, v in accs.items()) + ")")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return _best_rate(bench, row, scores), scores, errors


# ------------------------------------------------------------------------------- stage 2


def run_manager(bench: Bench, manager: Manager, row: Row, seed: int) -> Run:
    """One seed of a linear/fine-tune/TAPS/lora/adapter row (or the default) through the
    Manager: one base, tasks in order."""
    a = bench.args
    assert row.lr is not None
    base_name = f"{bench.prefix}-{row.spec.key}-s{seed}"
    manager.add_base(base_name, bench.spec, weights=str(bench.weights))
    run = Run(seed)
    sizes = bench.data(a.seed_values[0])  # the same counts for every seed
    for task in bench.tasks:
        with failing_task(task.name):
            result = manager.add_task(
                f"{base_name}-{task.name}", base_name, task.data_spec, method=row.method,
                method_options=row.spec.method_options(row.lr), epochs=a.epochs,
                batch_size=a.batch_size, lr=row.lr, weight_decay=a.weight_decay,
                img_size=a.img_size, seed=seed, max_train=a.max_train, max_test=a.max_test,
                val_fraction=VAL_FRACTION,
            )
        record_task(bench, row, run, task.name, result, len(sizes[task.name].train))
    budget = manager.budget(base_name)
    for entry in budget.tasks:
        run.task_bytes[entry.name.removeprefix(f"{base_name}-")] = entry.bytes
    ordered = [run.task_bytes[t.name] for t in bench.tasks]
    if row.method == "finetune":  # a fine-tuned task is a whole model: N models, no shared base
        run.total_params = budget.finetune_total_params
        run.total_bytes = sum(entry.bytes for entry in budget.tasks)
        run.cumulative_bytes = _cumulative(0, ordered)
    else:
        run.total_params, run.total_bytes = budget.total_params, budget.total_bytes
        run.cumulative_bytes = _cumulative(budget.base_bytes, ordered)
    return run


def _cumulative(start: int, sizes: list[int]) -> list[int]:
    """start + the running sum of `sizes`: bytes stored after each task."""
    out, total = [], start
    for size in sizes:
        total += size
        out.append(total)
    return out


def run_fusion(bench: Bench, manager: Manager, row: Row, seed: int, adapter: Row) -> Run:
    """One seed of the fusion row through the Manager, on the adapter row's base of that seed.

    Task 1 is the adapter row's task 1 (its result is copied, marked reused); task k ≥ 2 is a
    fusion task over the adapter row's tasks 1 … k−1. Sizes come from the budget report: a task's
    own artifact, and for the row's total the base + every artifact the row stores or reads (its
    fusion tasks, its first task and the adapters they fuse), each once.
    """
    a = bench.args
    assert row.lr is not None
    base_name = f"{bench.prefix}-{adapter.spec.key}-s{seed}"  # run_manager's base of that row
    source = next((r for r in adapter.runs if r.seed == seed), None)
    if source is None:
        raise RunFailed(bench.tasks[0].name, f"the adapter row has no run for seed {seed}")
    first = bench.tasks[0].name
    run = Run(seed, reused={first})
    for table in ("acc", "task_params", "task_bytes", "active", "active_names",
                  "epoch_seconds", "images_per_s"):
        getattr(run, table)[first] = getattr(source, table)[first]
    sizes = bench.data(a.seed_values[0])
    mine = {first: f"{base_name}-{first}"}
    for i, task in enumerate(bench.tasks[1:], start=1):
        fuse = [f"{base_name}-{t.name}" for t in bench.tasks[:i]]
        # prefixed: no clash with the adapters
        name = f"{bench.prefix}-{row.spec.key}-s{seed}-{task.name}"
        with failing_task(task.name):
            result = manager.add_task(
                name, base_name, task.data_spec, method=row.method,
                method_options={**row.spec.method_options(row.lr), "fuse": ",".join(fuse)},
                epochs=a.epochs, batch_size=a.batch_size, lr=row.lr,
                weight_decay=a.weight_decay, img_size=a.img_size, seed=seed,
                max_train=a.max_train, max_test=a.max_test, val_fraction=VAL_FRACTION,
            )
        mine[task.name] = name
        record_task(bench, row, run, task.name, result, len(sizes[task.name].train))
    budget = manager.budget(base_name)
    entries = {entry.name: entry for entry in budget.tasks}
    for task, name in mine.items():
        run.task_bytes[task] = entries[name].bytes
    # The row's artifacts: its own tasks and every adapter task they read (the registry's pins).
    def distinct(names: list[str]) -> dict:  # sha256 → budget entry, each artifact once
        stored = set(names) | {dep for name in names for dep in entries[name].depends_on}
        return {entries[n].sha256: entries[n] for n in stored}

    every = distinct(list(mine.values()))
    run.total_params = budget.base_params + sum(e.task_params for e in every.values())
    run.total_bytes = budget.base_bytes + sum(e.bytes for e in every.values())
    names = [mine[t.name] for t in bench.tasks]
    run.cumulative_bytes = [budget.base_bytes + sum(e.bytes for e in distinct(names[:k]).values())
                            for k in range(1, len(names) + 1)]
    return run


def run_lora(bench: Bench, row: Row, seed: int) -> Run:
    """One seed of a PEFT LoRA row with the library's fit/evaluate (same data, seed and head
    init)."""
    assert row.lr is not None
    run = Run(seed)
    for task in bench.tasks:
        td = bench.data(seed)[task.name]
        method = make_method(row.spec, row.lr, bench.args.epochs)
        model = bench.task_model(method, len(td.class_names), seed)
        with failing_task(task.name):
            result = fit(model, method, td.train, td.val, bench.train_config(row.lr, seed,
                                                                             method))
        method.finalize(model)
        state = method.extract(model, bench.head)
        run.acc[task.name] = evaluate(model, td.test).accuracy
        run.task_params[task.name] = state.num_params
        # The file a registry would store: same serialisation, a shorter metadata record.
        run.task_bytes[task.name] = len(serialization.to_bytes(
            state.tensors, {"method": PEFT, "config": method.config_dict(), "task": task.name}))
        run.active[task.name] = f"{state.active_layers}/{len(state.layers)}"
        run.epoch_seconds[task.name], run.images_per_s[task.name] = timing_of(
            result.history, len(td.train))
        run.config = method.config_dict()
        say_task(bench, row, run, task.name)
    run.total_params = bench.base_params + sum(run.task_params.values())
    run.total_bytes = bench.base_bytes + sum(run.task_bytes.values())
    run.cumulative_bytes = _cumulative(bench.base_bytes,
                                       [run.task_bytes[t.name] for t in bench.tasks])
    return run


def train_row(bench: Bench, manager: Manager, spec: RowSpec, done: list[Row]) -> Row:
    """Stage 1 (the row's learning rate), then stage 2 at that rate for the row's seeds.

    `done`: the rows trained before (a fusion row reads its adapter row's tasks).
    """
    lr, scores, errors = select_lr(bench, spec)
    row = Row(spec, lr, scores, stage1_errors=errors)
    if lr is None:
        return row
    if spec.kind == "adapter":
        bench.adapter_lr[spec.key] = lr
    train_runs(bench, manager, row, spec.seeds(bench.args.seed_values), done)
    return row


def train_runs(bench: Bench, manager: Manager, row: Row, seeds: list[int],
               done: list[Row]) -> None:
    """Stage 2 of `row` at its rate, one run per seed; a failing seed goes to row.failures."""
    for seed in seeds:
        try:
            row.runs.append(_run(bench, manager, row, seed, done))
        except RunFailed as exc:
            row.failures.append({"seed": seed, "task": exc.task, "lr": row.lr,
                                 "error": exc.error})
            bench.say(f"  stage 2  {row.label:<30} seed {seed} {exc.task}: failed at lr "
                      f"{fmt_lr(row.lr)} ({exc.error}); no run for this seed")


def _run(bench: Bench, manager: Manager, row: Row, seed: int, done: list[Row]) -> Run:
    spec = row.spec
    if spec.method == PEFT:
        return run_lora(bench, row, seed)
    if spec.kind == "fusion":
        adapter = next(r for r in done if r.key == spec.reads)
        return run_fusion(bench, manager, row, seed, adapter)
    if spec.kind == PROGRESSIVE_GROUP:
        return run_progressive_group(bench, manager, row, seed)
    if spec.kind == PROGRESSIVE:
        return run_progressive(bench, manager, row, seed)
    return run_manager(bench, manager, row, seed)


# ------------------------------------------------------------------------ step timing


def step_timing(rows: list[Row], bench: Bench, num_classes: int, rounds: int,
                steps: int) -> None:
    """Seconds per training step per row, timed round-robin so machine load hits all alike.

    Each row's model is prepared by its method at its chosen rate; a step is forward, task loss +
    the method's extra loss (TAPS: the penalty, after warm-up), backward and an AdamW step — what
    fit does per batch — on the first task's first batch. The fusion row is timed as its last
    task trains: fusing one adapter per earlier task (structure only: the adapters' values do
    not change the cost).
    """
    a = bench.args
    rows = measured(rows)
    first = bench.data(a.seed_values[0])[bench.tasks[0].name].train
    n = min(a.batch_size, len(first))
    inputs = torch.stack([first[i][0] for i in range(n)])
    labels = torch.tensor([int(first[i][1]) for i in range(n)])
    setups = []
    for row in rows:
        deps: list[Dependency] = []
        assert row.lr is not None
        if row.kind == "fusion":
            adapter = next(r for r in rows if r.key == row.spec.reads)
            assert adapter.lr is not None
            config = make_method(adapter.spec, adapter.lr, a.epochs).config_dict()
            deps = [Dependency(t.name, "adapter", config, None) for t in bench.tasks[:-1]]
        method = make_method(row.spec, row.lr, a.epochs, fuse=[d.name for d in deps])
        model = bench.task_model(method, num_classes, a.seed_values[0], deps)
        opt = torch.optim.AdamW(method.param_groups(model, row.lr, a.weight_decay),
                                lr=row.lr, weight_decay=a.weight_decay)
        setups.append((row, method, model, opt))

    def step(method: Method, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        method.set_train_mode(model)
        loss = F.cross_entropy(model(inputs), labels)
        extra = method.extra_loss(model, epoch=a.epochs)  # past any warm-up
        objective = loss if extra is None else loss + extra
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()

    times: dict[str, list[float]] = {row.label: [] for row in rows}
    for _, method, model, opt in setups:  # warm-up: allocator, first-call costs
        step(method, model, opt)
    for _ in range(rounds):
        for row, method, model, opt in setups:
            started = time.perf_counter()
            for _ in range(steps):
                step(method, model, opt)
            times[row.label].append((time.perf_counter() - started) / steps)
    for row in rows:
        row.step_seconds = statistics.median(times[row.label])
