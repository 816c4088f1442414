"""How the rows are trained and measured: the learning rate chosen on validation, then the runs.

Stage 1 (`select_lr`) picks each row's rate from the one grid by mean validation accuracy, each
task's training set cut to --select-train images (class-stratified), with the first seed. Stage 2
trains the row at that rate with each of its seeds: linear, fine-tune, TAPS, adapter and fusion
rows through the product path (`Manager`: registry, artifacts, restore-then-evaluate, probe
checks, sizes from the budget report), LoRA rows with the library's `fit` and `evaluate`, the
progressive rows as benchmarks/progressive.py says. `step_timing` then times a training step of
every row round-robin.
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
    PROGRESSIVE,
    PROGRESSIVE_GROUP,
    PROGRESSIVE_KINDS,
    Row,
    RowSpec,
    Run,
    fused_tasks,
    make_method,
    record_task,
    say_task,
    timing_of,
)
from taps_cl import serialization
from taps_cl.errors import MethodError
from taps_cl.manager import Manager
from taps_cl.methods.base import Dependency, Method
from taps_cl.training.evaluate import evaluate
from taps_cl.training.fit import fit

# ------------------------------------------------------------------------------- stage 1


def select_lr(bench: Bench, row: RowSpec) -> tuple[float, dict[float, float | None]]:
    """The grid rate with the best mean validation accuracy on the subsampled training sets.

    Ties go to the smaller rate; a rate whose loss becomes non-finite scores nothing. The
    adapter row keeps each task's adapter per rate; the fusion row (scored on the tasks from the
    second on) fuses the adapters the adapter row trained here at its chosen rate, so the
    adapter row must be selected first.
    """
    a = bench.args
    if len(a.lr_values) == 1:
        return a.lr_values[0], {}
    if row.kind in PROGRESSIVE_KINDS:
        return select_lr_progressive(bench, row)
    seed = a.seed_values[0]
    tasks = bench.data(seed)
    scored = fused_tasks(bench.tasks, row)
    if row.kind == "fusion":
        assert bench.adapter_lr is not None, "the adapter row runs before the fusion row"
        adapters = bench.stage1_adapters[bench.adapter_lr]
    scores: dict[float, float | None] = {}
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
                fit(model, method, train, td.val, bench.train_config(lr, seed))
            except MethodError as exc:  # a diverging rate: non-finite loss
                bench.say(f"  stage 1  {row.label:<30} lr {fmt_lr(lr)}: {task.name} failed "
                          f"({exc})")
                break
            method.finalize(model)  # what would be stored is what is scored
            accs[task.name] = evaluate(model, td.val).accuracy
            if row.kind == "adapter":
                bench.stage1_adapters.setdefault(lr, {})[task.name] = Dependency(
                    task.name, "adapter", method.config_dict(),
                    method.extract(model, bench.head).tensors)
        scores[lr] = statistics.fmean(accs.values()) if len(accs) == len(scored) else None
        if scores[lr] is not None:
            bench.say(f"  stage 1  {row.label:<30} lr {fmt_lr(lr)}: val "
                      f"{100 * scores[lr]:5.1f}%  ("
                      + ", ".join(f"{t} {100 * v:.1f}" for t, v in accs.items()) + ")")
    chosen = _best_rate(bench, row, scores)
    if row.kind == "adapter":  # only the chosen rate's adapters are fused later
        bench.stage1_adapters = {chosen: bench.stage1_adapters[chosen]}
    return chosen, scores


def _best_rate(bench: Bench, row: RowSpec, scores: dict[float, float | None]) -> float:
    """The rate with the best score (ties to the smaller); refused when every rate diverged."""
    valid = {lr: s for lr, s in scores.items() if s is not None}
    if not valid:
        raise SystemExit(f"{row.label}: training diverged at every rate of the grid")
    chosen = max(valid, key=lambda lr: (valid[lr], -lr))
    bench.say(f"  stage 1  {row.label:<30} chosen lr {fmt_lr(chosen)}")
    return chosen


def select_lr_progressive(bench: Bench, row: RowSpec) -> tuple[float, dict[float, float | None]]:
    """Stage 1 of a progressive row: the row itself through the Manager, on cut training sets.

    Sharing is the method, so no task can be trained alone: for each grid rate the whole row runs
    (`train_progressive`) on a base of its own in a throw-away registry, every task cut to
    --select-train training images by the Manager's max_train (validation is carved before that
    cut, so it stays disjoint from them) and SELECT_TEST test images (not read). Each task's
    restored model is then scored on the full validation split every other row is scored on.
    """
    a = bench.args
    seed = a.seed_values[0]
    full = bench.data(seed)
    scores: dict[float, float | None] = {}
    home = Path(tempfile.mkdtemp(prefix="taps-bench-select-"))
    try:
        with Manager(home) as manager:
            for i, lr in enumerate(a.lr_values):
                base = f"select-{row.key}-{i}"
                try:
                    train_progressive(bench, manager, row, base, lr, seed,
                                      max_train=a.select_train, max_test=SELECT_TEST)
                except MethodError as exc:  # a diverging rate: non-finite loss
                    bench.say(f"  stage 1  {row.label:<30} lr {fmt_lr(lr)}: failed ({exc})")
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
    return _best_rate(bench, row, scores), scores


# ------------------------------------------------------------------------------- stage 2


def run_manager(bench: Bench, manager: Manager, row: Row, seed: int) -> Run:
    """One seed of a linear/fine-tune/TAPS row through the Manager: one base, tasks in order."""
    a = bench.args
    base_name = f"bench-{row.spec.key}-s{seed}"
    manager.add_base(base_name, bench.spec, weights=str(bench.weights))
    run = Run(seed)
    sizes = bench.data(a.seed_values[0])  # the same counts for every seed
    for task in bench.tasks:
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
    if row.method == "finetune":  # a fine-tuned task is a whole model: N models, no shared base
        run.total_params = budget.finetune_total_params
        run.total_bytes = sum(entry.bytes for entry in budget.tasks)
    else:
        run.total_params, run.total_bytes = budget.total_params, budget.total_bytes
    return run


def run_fusion(bench: Bench, manager: Manager, row: Row, seed: int, adapter: Row) -> Run:
    """One seed of the fusion row through the Manager, on the adapter row's base of that seed.

    Task 1 is the adapter row's task 1 (its result is copied, marked reused); task k ≥ 2 is a
    fusion task over the adapter row's tasks 1 … k−1. Sizes come from the budget report: a task's
    own artifact, and for the row's total the base + every artifact the row stores or reads (its
    fusion tasks, its first task and the adapters they fuse), each once.
    """
    a = bench.args
    base_name = f"bench-{adapter.spec.key}-s{seed}"  # run_manager's base of the adapter row
    source = next(r for r in adapter.runs if r.seed == seed)
    first = bench.tasks[0].name
    run = Run(seed, reused={first})
    for table in ("acc", "task_params", "task_bytes", "active", "active_names",
                  "epoch_seconds", "images_per_s"):
        getattr(run, table)[first] = getattr(source, table)[first]
    sizes = bench.data(a.seed_values[0])
    mine = {first: f"{base_name}-{first}"}
    for i, task in enumerate(bench.tasks[1:], start=1):
        fuse = [f"{base_name}-{t.name}" for t in bench.tasks[:i]]
        name = f"bench-{row.spec.key}-s{seed}-{task.name}"  # prefixed: no clash with the adapters
        result = manager.add_task(
            name, base_name, task.data_spec, method=row.method,
            method_options={**row.spec.method_options(row.lr), "fuse": ",".join(fuse)},
            epochs=a.epochs, batch_size=a.batch_size, lr=row.lr, weight_decay=a.weight_decay,
            img_size=a.img_size, seed=seed, max_train=a.max_train, max_test=a.max_test,
            val_fraction=VAL_FRACTION,
        )
        mine[task.name] = name
        record_task(bench, row, run, task.name, result, len(sizes[task.name].train))
    budget = manager.budget(base_name)
    entries = {entry.name: entry for entry in budget.tasks}
    for task, name in mine.items():
        run.task_bytes[task] = entries[name].bytes
    # The row's artifacts: its own tasks and every adapter task they read (the registry's pins).
    stored = set(mine.values()) | {dep for name in mine.values()
                                   for dep in entries[name].depends_on}
    distinct = {entries[n].sha256: entries[n] for n in stored}
    run.total_params = budget.base_params + sum(e.task_params for e in distinct.values())
    run.total_bytes = budget.base_bytes + sum(e.bytes for e in distinct.values())
    return run


def run_lora(bench: Bench, row: Row, seed: int) -> Run:
    """One seed of a LoRA row with the library's fit/evaluate (same data, seed and head init)."""
    run = Run(seed)
    for task in bench.tasks:
        td = bench.data(seed)[task.name]
        method = make_method(row.spec, row.lr, bench.args.epochs)
        model = bench.task_model(method, len(td.class_names), seed)
        result = fit(model, method, td.train, td.val, bench.train_config(row.lr, seed))
        method.finalize(model)
        state = method.extract(model, bench.head)
        run.acc[task.name] = evaluate(model, td.test).accuracy
        run.task_params[task.name] = state.num_params
        # The file a registry would store: same serialisation, a shorter metadata record.
        run.task_bytes[task.name] = len(serialization.to_bytes(
            state.tensors, {"method": "lora", "config": method.config_dict(), "task": task.name}))
        run.active[task.name] = f"{state.active_layers}/{len(state.layers)}"
        run.epoch_seconds[task.name], run.images_per_s[task.name] = timing_of(
            result.history, len(td.train))
        run.config = method.config_dict()
        say_task(bench, row, run, task.name)
    run.total_params = bench.base_params + sum(run.task_params.values())
    run.total_bytes = bench.base_bytes + sum(run.task_bytes.values())
    return run


def train_row(bench: Bench, manager: Manager, spec: RowSpec, done: list[Row]) -> Row:
    """Stage 1 (the row's learning rate), then stage 2 at that rate for the row's seeds.

    `done`: the rows trained before (the fusion row reads the adapter row's tasks).
    """
    lr, scores = select_lr(bench, spec)
    row = Row(spec, lr, scores)
    if spec.kind == "adapter":
        bench.adapter_lr = lr
    for seed in spec.seeds(bench.args.seed_values):
        if spec.method == "lora":
            row.runs.append(run_lora(bench, row, seed))
        elif spec.kind == "fusion":
            adapter = next(r for r in done if r.kind == "adapter")
            row.runs.append(run_fusion(bench, manager, row, seed, adapter))
        elif spec.kind == PROGRESSIVE_GROUP:
            row.runs.append(run_progressive_group(bench, manager, row, seed))
        elif spec.kind == PROGRESSIVE:
            row.runs.append(run_progressive(bench, manager, row, seed))
        else:
            row.runs.append(run_manager(bench, manager, row, seed))
    return row


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
    first = bench.data(a.seed_values[0])[bench.tasks[0].name].train
    n = min(a.batch_size, len(first))
    inputs = torch.stack([first[i][0] for i in range(n)])
    labels = torch.tensor([int(first[i][1]) for i in range(n)])
    setups = []
    for row in rows:
        deps: list[Dependency] = []
        if row.kind == "fusion":
            adapter = next(r for r in rows if r.kind == "adapter")
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
