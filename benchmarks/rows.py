"""The benchmark's rows: what each row is (method, options, seeds) and what its runs record.

`row_specs` lists every row the options define, `select_rows` keeps those --methods names,
`make_method` builds a row's method at a learning rate as the Manager configures it; `Run` holds
one seed's figures over every task and `Row` a row's chosen rate and runs, with the means the
report shows. How a row is trained is in benchmarks/training.py (and benchmarks/progressive.py
for the progressive rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from dataclasses import dataclass, field

from benchmarks.peft_lora import LoraOptions, PeftLora
from benchmarks.protocol import Bench, TaskDef, plural
from taps_cl.methods.base import Method
from taps_cl.methods.progressive.sharing import BANDS
from taps_cl.tasks.requests import configured_method


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: a method and its options; the learning rate is chosen per row."""

    key: str  # name for --methods, e.g. "compact-r4"
    label: str  # the table's row name
    # "linear", "finetune", "taps", "compact", "budget", "lora", "adapter", "fusion",
    # "progressive-group", "progressive"
    kind: str
    method: str  # library method name, or "lora" (the PeftLora class of benchmarks/peft_lora.py)
    options: dict = field(default_factory=dict)  # method options, the learning rate aside
    seeded: bool = False  # trained with every seed of --seeds (a row the targets depend on)
    max_seeds: int | None = None  # a seeded row uses at most this many of --seeds (None: all)
    factor_scale: float = 1.0  # compact TAPS: factor_lr = factor_scale × the grid rate
    # Stage-2 seeds given instead of --seeds (the progressive rows and, beside them, the adapter
    # and fusion rows: --progressive-seeds); max_seeds still cuts them.
    seed_list: tuple[int, ...] | None = None

    def seeds(self, seeds: list[int]) -> list[int]:
        """The seeds this row trains with in stage 2 (stage 1 uses the first of --seeds)."""
        if self.seed_list is not None:
            return list(self.seed_list[:self.max_seeds])
        return seeds[:self.max_seeds] if self.seeded else seeds[:1]

    def method_options(self, lr: float) -> dict:
        """Options at learning rate `lr`: compact TAPS factors at factor_scale × that rate."""
        if self.kind in ("compact", "budget"):
            return {**self.options, "factor_lr": self.factor_scale * lr}
        return dict(self.options)


MATCHED = "lora-matched"  # --methods name of the parameter-matched LoRA row
ADAPTER, FUSION = "adapter", "fusion"  # --methods names; fusion reads the adapter row's tasks
# --methods names (and kinds) of the progressive rows; they bring the adapter row to compare with.
PROGRESSIVE, PROGRESSIVE_GROUP = "progressive", "progressive-group"
PROGRESSIVE_KINDS = (PROGRESSIVE_GROUP, PROGRESSIVE)
ALL = "all"  # --methods name of every row (by default the progressive rows are left out)
GROUPS = {"compact": ("compact",), "lora": ("lora",)}  # --methods names of several rows


def row_specs(args: argparse.Namespace) -> list[RowSpec]:
    """Every row the options define, in table order (the matched LoRA row comes later)."""
    taps = {"lam": args.lam, "penalty": args.penalty}
    compact = dict(taps)
    if args.factor_min_params is not None:
        compact["factor_min_params"] = args.factor_min_params
    first = args.rank_values[0]
    factors = "" if args.factor_lr_scale == 1 else f" factor lr {args.factor_lr_scale:g}×"
    rows = [
        RowSpec("linear", "linear probe", "linear", "linear"),
        RowSpec("finetune", "fine-tune", "finetune", "finetune", seeded=True),
        RowSpec("taps", f"TAPS λ={args.lam:g} full deltas", "taps", "taps", taps),
        *[RowSpec(f"compact-r{r}", f"compact TAPS r={r} λ={args.lam:g}{factors}", "compact",
                  "taps", {**compact, "rank": r}, seeded=True, factor_scale=args.factor_lr_scale)
          for r in args.rank_values],
        RowSpec("budget", f"compact TAPS r={first} budget {args.budget:g}{factors}", "budget",
                "taps", {**compact, "rank": first, "budget": args.budget}, seeded=True,
                factor_scale=args.factor_lr_scale),
        *[lora_spec(f"lora-r{r}", r, args.lora_alpha) for r in args.lora_rank_values],
        # Fusion must come after the adapter row: its tasks fuse that row's adapter tasks.
        RowSpec(ADAPTER, "adapter", "adapter", "adapter", seeded=True,
                max_seeds=args.adapter_seeds),
        RowSpec(FUSION, "fusion (own adapter)", "fusion", "fusion", seeded=True,
                max_seeds=args.adapter_seeds),
        *[RowSpec(key, label, key, "progressive", seeded=True,
                  seed_list=tuple(args.progressive_seed_values))
          for key, label in ((PROGRESSIVE_GROUP, progressive_label(True, args)),
                             (PROGRESSIVE, progressive_label(False, args)))],
    ]
    if len(args.task_names) < 2:  # nothing earlier to fuse, nothing to train as a group
        rows = [r for r in rows if r.kind != "fusion" and r.key != PROGRESSIVE_GROUP]
    return rows


def progressive_label(grouped: bool, args: argparse.Namespace) -> str:
    """The table's name of a progressive row."""
    if not grouped:
        return "progressive (incremental, group auto)"
    k = args.progressive_groups
    return f"progressive (group train, {'auto groups' if k is None else plural(k, 'group')})"


def lora_spec(key: str, rank: int, alpha: float | None, matched: bool = False) -> RowSpec:
    label = f"LoRA r={rank}{' matched' if matched else ''} (PEFT)"
    return RowSpec(key, label, "lora", "lora", {"rank": rank, "alpha": alpha}, seeded=True)


def select_rows(specs: list[RowSpec], methods: str | None) -> tuple[list[RowSpec], bool]:
    """The rows --methods names (all by default), and whether the matched LoRA row is wanted."""
    if methods is None:  # every row but the progressive ones: what fits the 90 minutes
        return [s for s in specs if s.kind not in PROGRESSIVE_KINDS], True
    names = [m.strip() for m in methods.split(",") if m.strip()]
    known = [s.key for s in specs] + [MATCHED, *GROUPS, ALL]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose from "
                         f"{', '.join(known)}")
    if ALL in names:
        names = [s.key for s in specs] + [MATCHED]
    kinds = {kind for n in names for kind in GROUPS.get(n, ())}
    if FUSION in names:  # the fusion row reads the adapter row's tasks: it needs that row
        names.append(ADAPTER)
    progressive = [s for s in specs if s.key in names and s.kind in PROGRESSIVE_KINDS]
    if progressive:  # compared with the adapter row, over the same seeds
        names.append(ADAPTER)
    chosen = [s for s in specs if s.key in names or s.kind in kinds]
    if progressive:
        seeds = progressive[0].seed_list
        chosen = [dataclasses.replace(s, seed_list=seeds, max_seeds=None) if s.kind == "adapter"
                  else dataclasses.replace(s, seed_list=seeds) if s.kind == "fusion" else s
                  for s in chosen]
    return chosen, MATCHED in names or "lora" in names


def make_method(row: RowSpec, lr: float, epochs: int, fuse: list[str] | None = None) -> Method:
    """A fresh method object for `row` at learning rate `lr` (as the Manager configures it).

    `fuse`: the adapter tasks a fusion row's task reads (required for fusion, else ignored).
    """
    if row.method == "lora":
        return PeftLora(LoraOptions(**row.options))
    options = row.method_options(lr)
    if row.kind == "fusion":
        options["fuse"] = ",".join(fuse or [])
    if row.method == "progressive":  # as a base's first progressive task: every band trains
        options["train_bands"] = BANDS
    return configured_method(row.method, options, epochs)


def fused_tasks(tasks: list[TaskDef], row: RowSpec) -> list[TaskDef]:
    """The tasks a row trains with its own method: a fusion row's first task is an adapter
    task (the adapter row's), so fusion trains from the second task on."""
    return tasks[1:] if row.kind == "fusion" else tasks


@dataclass(frozen=True)
class SharedBand:
    """A shared artifact a progressive row's tasks pin, from the budget of the row's base."""

    kinds: tuple[str, ...]  # the bands it holds, "progressive_" left off: "shared", "group"
    params: int  # numbers stored
    tasks: tuple[str, ...]  # the tasks that read it (short names)


@dataclass
class Run:
    """One row trained with one seed over every task."""

    seed: int
    acc: dict[str, float] = field(default_factory=dict)  # task → test accuracy
    task_params: dict[str, int] = field(default_factory=dict)  # task → numbers stored
    task_bytes: dict[str, int] = field(default_factory=dict)  # task → bytes of its artifact
    active: dict[str, str] = field(default_factory=dict)  # task → "k/L" active layers
    active_names: dict[str, list[str]] = field(default_factory=dict)
    epoch_seconds: dict[str, float] = field(default_factory=dict)  # task → mean s per epoch
    images_per_s: dict[str, float] = field(default_factory=dict)
    total_params: int = 0  # base + Σ task-specific (fine-tune: N whole models)
    total_bytes: int = 0  # the same in bytes of stored files
    probes: list[bool] = field(default_factory=list)  # earlier tasks' probe checks
    config: dict = field(default_factory=dict)  # method config as the registry recorded it
    # Tasks whose result is another row's task (fusion's first task is the adapter row's task):
    # in the accuracies and totals, not in the row's mean stored size per task.
    reused: set[str] = field(default_factory=set)
    # Progressive rows: the shared artifacts (bands) the row's tasks pin, each counted once.
    shared_params: int = 0
    shared_bytes: int = 0
    shared: list[SharedBand] = field(default_factory=list)  # one per shared artifact
    groups: dict[str, str] = field(default_factory=dict)  # task → the group it landed in
    opened: dict[str, bool] = field(default_factory=dict)  # task → opened its group (incremental)
    # Cosine similarity of the tasks' gradient signatures: (task names, matrix).
    similarity: tuple[list[str], list[list[float]]] | None = None
    # The incremental row's join checks: after each add, one (earlier task, unchanged?) per
    # earlier task — its artifact and pinned shared bands re-read and hashed.
    unchanged: list[tuple[str, bool]] = field(default_factory=list)
    probe_drift: float = 0.0  # largest probe drift of an earlier task the adds re-checked
    verified: list[tuple[str, bool, float | None]] = field(default_factory=list)  # Manager.verify

    @property
    def own_params(self) -> dict[str, int]:
        """Stored numbers of the tasks this row trained itself."""
        return {t: n for t, n in self.task_params.items() if t not in self.reused}

    @property
    def mean_acc(self) -> float:
        return statistics.fmean(self.acc.values())


@dataclass
class Row:
    """A row of the table: its spec, the chosen learning rate and one run per seed."""

    spec: RowSpec
    lr: float  # chosen in stage 1 (the only grid value when the grid has one)
    val_by_lr: dict[float, float | None]  # stage 1: mean validation accuracy (None: diverged)
    runs: list[Run] = field(default_factory=list)
    step_seconds: float | None = None  # interleaved step timing (median)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def method(self) -> str:
        return self.spec.method

    @property
    def mean_acc(self) -> float:
        return statistics.fmean(r.mean_acc for r in self.runs)

    def task_acc(self, task: str) -> list[float]:
        return [r.acc[task] for r in self.runs]

    @property
    def task_params(self) -> float:
        """Stored numbers per task the row trained itself, mean over tasks and seeds."""
        return statistics.fmean(n for r in self.runs for n in r.own_params.values())

    @property
    def task_bytes(self) -> float:
        return statistics.fmean(n for r in self.runs for t, n in r.task_bytes.items()
                                if t not in r.reused)

    @property
    def total_params(self) -> float:
        return statistics.fmean(r.total_params for r in self.runs)

    @property
    def total_bytes(self) -> float:
        return statistics.fmean(r.total_bytes for r in self.runs)


def epoch_ratio(row: Row, ft: Row) -> float:
    """Median over tasks of (seconds per epoch ÷ fine-tune's on the same task), first seeds.

    The median, because one epoch slowed by another process's burst would swing a mean. Only
    the tasks the row trained itself (not fusion's reused first task).
    """
    mine, theirs = row.runs[0], ft.runs[0]
    return statistics.median(mine.epoch_seconds[t] / theirs.epoch_seconds[t] for t in mine.acc
                             if t not in mine.reused)


def record_task(bench, row, run, name: str, result, n_train: int,  # type: ignore[no-untyped-def]
                timing: tuple[float, float] | None = None) -> None:
    """Note one added task's figures in its row's run and say them.

    `timing`: (seconds per epoch, images/s) when the history's own would mislead (a joint run).
    """
    t = result.task
    run.task_params[name] = t.task_params
    run.active[name] = f"{t.active_layers}/{t.total_layers}"
    run.active_names[name] = [layer.name for layer in t.layers if layer.active]
    run.epoch_seconds[name], run.images_per_s[name] = timing or timing_of(result.history, n_train)
    run.probes += [c.ok for c in result.probe_checks]
    drifts = [c.max_drift for c in result.probe_checks if c.max_drift is not None]
    run.probe_drift = max([run.probe_drift, *drifts])
    run.config = dict(t.method_config)
    run.acc[name] = result.test_accuracy
    say_task(bench, row, run, name)


def timing_of(history: list[dict], n_train: int) -> tuple[float, float]:
    """(mean seconds per epoch, images per second) from fit's history rows."""
    seconds = sum(r["seconds"] for r in history)
    return seconds / len(history), n_train * len(history) / seconds


def say_task(bench: Bench, row: Row, run: Run, task: str) -> None:
    bench.say(f"  stage 2  {row.label:<30} seed {run.seed} {task:<10} acc "
              f"{100 * run.acc[task]:6.2f}%  layers {run.active[task]:>5}  task params "
              f"{run.task_params[task]:>10,}  {run.epoch_seconds[task]:6.1f} s/epoch")
