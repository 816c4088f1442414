"""The benchmark's rows: what each row is (method, options, seeds) and what its runs record.

`row_specs` lists every row the options define, `select_rows` keeps those --methods names (and
--long-methods brings), `with_policies` turns a row into one row per norm policy
(--norms-policies, for the rows --norms-rows names), `check_rows` builds each chosen row's method
once so that an unknown method or option stops the run before any training, and `make_method`
builds a row's method at a learning rate as the Manager configures it. `Run` holds one seed's
figures over every task and `Row` a row's chosen rate and runs, with the means the report shows.
How a row is trained is in benchmarks/training.py (and benchmarks/progressive.py for the
progressive rows).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from benchmarks.peft_lora import LoraOptions, PeftLora
from benchmarks.protocol import Bench, TaskDef, plural
from taps_cl.errors import TapsError, first_line
from taps_cl.methods.base import Method
from taps_cl.methods.catalog import load_builtin
from taps_cl.methods.norms import NORM_POLICIES
from taps_cl.methods.progressive.sharing import BANDS
from taps_cl.tasks.requests import TaskRequest, configured_method

# RowSpec.method of the PEFT LoRA rows (benchmarks/peft_lora.py, not the library's "lora").
PEFT = "peft-lora"


@dataclass(frozen=True)
class RowSpec:
    """One row of the table: a method and its options; the learning rate is chosen per row."""

    key: str  # --methods name, e.g. "compact-r4" (a norm-policy variant: "compact-r4-norms-base")
    label: str  # the table's row name
    # "linear", "finetune", "taps", "compact", "budget", "default", "lib-lora", "peft", "adapter",
    # "fusion", "progressive-group", "progressive"
    kind: str
    method: str  # library method name, or PEFT (the PeftLora class of benchmarks/peft_lora.py)
    options: dict = field(default_factory=dict)  # method options, the learning rate aside
    seeded: bool = False  # trained with every seed of --seeds (a row the targets depend on)
    max_seeds: int | None = None  # a seeded row uses at most this many of --seeds (None: all)
    factor_scale: float = 1.0  # compact TAPS: factor_lr = factor_scale × the grid rate
    # Stage-2 seeds given instead of --seeds (the progressive rows and, beside them, the adapter
    # and fusion rows: --progressive-seeds); max_seeds still cuts them.
    seed_list: tuple[int, ...] | None = None
    base_key: str = ""  # a norm-policy variant: the key of the row it varies ("": this is one)
    norms: str | None = None  # the norm policy a variant sets (None: the method's own default)
    reads: str | None = None  # a fusion row: the key of the adapter row whose tasks it fuses

    @property
    def family(self) -> str:
        """The key --methods, --norms-rows and --long-methods know this row by."""
        return self.base_key or self.key

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


MATCHED = "lora-matched"  # --methods name of the parameter-matched PEFT LoRA row
DEFAULT = "default"  # --methods name of `task add` with no method options
ADAPTER, FUSION = "adapter", "fusion"  # --methods names; fusion reads the adapter row's tasks
# --methods names (and kinds) of the progressive rows; they bring the adapter row to compare with.
PROGRESSIVE, PROGRESSIVE_GROUP = "progressive", "progressive-group"
PROGRESSIVE_KINDS = (PROGRESSIVE_GROUP, PROGRESSIVE)
ALL = "all"  # --methods name of every row (by default the progressive rows are left out)
# --methods names of several rows: "lora" = the PEFT LoRA rows, "lib-lora" = the library's.
GROUPS = {"compact": ("compact",), "lora": ("peft",), "lib-lora": ("lib-lora",)}


def default_method() -> str:
    """The method `task add` uses when none is named (the request's own default)."""
    return next(f.default for f in dataclasses.fields(TaskRequest) if f.name == "method")


def default_is_compact() -> bool:
    """Whether `task add`'s default is compact TAPS (taps with a rank): its row then counts as a
    compact TAPS row where the targets compare those."""
    return default_method() == "taps" and load_builtin()["taps"].Config().rank > 0


def declared(method: str) -> set[str]:
    """The options a library method declares (its Config's fields); empty if it is unknown."""
    cls = load_builtin().get(method)
    return set() if cls is None else {f.name for f in dataclasses.fields(cls.Config)}


def row_specs(args: argparse.Namespace) -> list[RowSpec]:
    """Every row the options define, in table order (the matched LoRA row comes later)."""
    taps = {"lam": args.lam, "penalty": args.penalty}
    compact = dict(taps)
    factor_min = ({} if args.factor_min_params is None
                  else {"factor_min_params": args.factor_min_params})
    compact.update(factor_min)
    # The library's lora factorises the layers compact TAPS does: the same threshold, if it
    # declares one.
    lib_lora = factor_min if "factor_min_params" in declared("lora") else {}
    first = args.rank_values[0]
    factors = "" if args.factor_lr_scale == 1 else f" factor lr {args.factor_lr_scale:g}×"
    rows = [
        RowSpec("linear", "linear probe", "linear", "linear"),
        RowSpec("finetune", "fine-tune", "finetune", "finetune", seeded=True),
        RowSpec("taps", f"TAPS λ={args.lam:g} full deltas", "taps", "taps", taps),
        RowSpec(DEFAULT, f"default ({default_method()}, no options)", DEFAULT,
                default_method(), seeded=True),
        *[RowSpec(f"compact-r{r}", f"compact TAPS r={r} λ={args.lam:g}{factors}", "compact",
                  "taps", {**compact, "rank": r}, seeded=True, factor_scale=args.factor_lr_scale)
          for r in args.rank_values],
        RowSpec("budget", f"compact TAPS r={first} budget {args.budget:g}{factors}", "budget",
                "taps", {**compact, "rank": first, "budget": args.budget}, seeded=True,
                factor_scale=args.factor_lr_scale),
        *[RowSpec(f"lib-lora-r{r}", f"lora r={r}", "lib-lora", "lora", {**lib_lora, "rank": r},
                  seeded=True) for r in args.lib_lora_rank_values],
        *[lora_spec(f"lora-r{r}", r, args.lora_alpha) for r in args.lora_rank_values],
        # Fusion must come after the adapter row: its tasks fuse that row's adapter tasks.
        RowSpec(ADAPTER, "adapter", "adapter", "adapter", seeded=True,
                max_seeds=args.adapter_seeds),
        RowSpec(FUSION, "fusion (own adapter)", "fusion", "fusion", seeded=True,
                max_seeds=args.adapter_seeds, reads=ADAPTER),
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
    return RowSpec(key, label, "peft", PEFT, {"rank": rank, "alpha": alpha}, seeded=True)


def named(spec: RowSpec, names: list[str] | set[str]) -> bool:
    """Whether a --methods-like list names this row (its key, the row it varies, or a group)."""
    return (spec.key in names or spec.family in names
            or any(spec.kind in GROUPS.get(n, ()) for n in names))


def select_rows(specs: list[RowSpec], methods: str | None,
                also: list[str] | None = None) -> tuple[list[RowSpec], bool]:
    """The rows --methods names (by default all but the progressive ones) and those `also` names
    (--long-methods: their 3-epoch figures are needed beside the long ones), and whether the
    matched LoRA row is wanted."""
    known = [s.key for s in specs] + [MATCHED, *GROUPS, ALL]
    extra = [family_of(n) for n in also or []]  # a norm-policy variant brings its row
    unknown = [n for n in extra if n not in known or n in (ALL, MATCHED)]
    if unknown:
        raise SystemExit(f"--long-methods: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(k for k in known if k not in (ALL, MATCHED))}")
    if methods is None:  # every row but the progressive ones (unless --long-methods wants one)
        names = [s.key for s in specs if s.kind not in PROGRESSIVE_KINDS] + [MATCHED]
    else:
        names = [m.strip() for m in methods.split(",") if m.strip()]
        unknown = [n for n in names if n not in known]
        if unknown or not names:
            raise SystemExit(f"--methods: unknown {', '.join(unknown) or '(empty)'}; choose "
                             f"from {', '.join(known)}")
        if ALL in names:
            names = [s.key for s in specs] + [MATCHED]
    names += extra
    if FUSION in names:  # the fusion row reads the adapter row's tasks: it needs that row
        names.append(ADAPTER)
    progressive = [s for s in specs if s.key in names and s.kind in PROGRESSIVE_KINDS]
    if progressive:  # compared with the adapter row, over the same seeds
        names.append(ADAPTER)
    chosen = [s for s in specs if named(s, names)]
    if progressive:
        seeds = progressive[0].seed_list
        chosen = [dataclasses.replace(s, seed_list=seeds, max_seeds=None) if s.kind == "adapter"
                  else dataclasses.replace(s, seed_list=seeds) if s.kind == "fusion" else s
                  for s in chosen]
    return chosen, MATCHED in names or "lora" in names


def family_of(name: str) -> str:
    """The row key a variant's key varies ("compact-r8-norms-base" → "compact-r8")."""
    row, _, policy = name.rpartition("-norms-")
    return row if row and policy in NORM_POLICIES else name


def supports_norms(spec: RowSpec) -> bool:
    """Whether a row's method takes a norm policy (the PEFT rows do: benchmarks/peft_lora.py)."""
    if spec.kind == DEFAULT:  # `task add` with no options: never varied
        return False
    return spec.method == PEFT or "norms" in declared(spec.method)


def with_policies(specs: list[RowSpec], policies: list[str], rows: list[str]) -> list[RowSpec]:
    """Each row `rows` names (keys or groups) that takes a norm policy, once per policy.

    A variant's key is `<key>-norms-<policy>`, its label ends in ` norms=<policy>`. The adapter and
    fusion rows vary together (a fusion row fuses the adapter row's tasks of the same policy).
    """
    if not policies:
        return specs
    chosen = {s.key for s in specs if named(s, rows) and supports_norms(s)}
    if chosen & {ADAPTER, FUSION}:
        chosen |= {s.key for s in specs if s.key in (ADAPTER, FUSION)}
    out: list[RowSpec] = []
    for spec in specs:
        if spec.key not in chosen:
            out.append(spec)
            continue
        for policy in policies:
            out.append(dataclasses.replace(
                spec, key=f"{spec.key}-norms-{policy}", label=f"{spec.label} norms={policy}",
                options={**spec.options, "norms": policy}, base_key=spec.key, norms=policy,
                reads=None if spec.reads is None else f"{spec.reads}-norms-{policy}"))
    return out


def check_rows(specs: list[RowSpec], lr: float, epochs: int) -> None:
    """Build each row's method once (nothing trains): an unknown method or option, or a norm policy
    a method refuses, stops the run here with one line instead of after hours of other rows."""
    for spec in specs:
        try:
            make_method(spec, lr, epochs, fuse=["(checked)"])
        except TapsError as exc:
            raise SystemExit(f"row {spec.label!r}: {exc}") from None


def make_method(row: RowSpec, lr: float, epochs: int, fuse: list[str] | None = None) -> Method:
    """A fresh method object for `row` at learning rate `lr` (as the Manager configures it).

    `fuse`: the adapter tasks a fusion row's task reads (required for fusion, else ignored).
    """
    if row.method == PEFT:
        return PeftLora(LoraOptions(**row.options))
    options = row.method_options(lr)
    if row.kind == "fusion":
        options["fuse"] = ",".join(fuse or [])
    if row.method == "progressive":  # as a base's first progressive task: every band trains
        options["train_bands"] = BANDS
    return configured_method(row.method, options, epochs)


class RunFailed(Exception):
    """One task of a run failed to train (a TapsError: most likely a loss that went non-finite)."""

    def __init__(self, task: str, error: str) -> None:
        super().__init__(f"{task}: {error}")
        self.task, self.error = task, error


@contextmanager
def failing_task(task: str) -> Iterator[None]:
    """Turn a TapsError raised while `task` trains into RunFailed naming the task."""
    try:
        yield
    except TapsError as exc:
        raise RunFailed(task, first_line(exc)) from exc


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
    bytes: int = 0  # its artifact's bytes


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
    # Bytes stored after each task, in task order: base + every distinct artifact the tasks so
    # far store or read (fine-tune: the whole models, no shared base). The last is total_bytes.
    cumulative_bytes: list[int] = field(default_factory=list)

    @property
    def own_params(self) -> dict[str, int]:
        """Stored numbers of the tasks this row trained itself."""
        return {t: n for t, n in self.task_params.items() if t not in self.reused}

    @property
    def own_bytes(self) -> dict[str, int]:
        return {t: n for t, n in self.task_bytes.items() if t not in self.reused}

    @property
    def params_per_task(self) -> float:
        """What a task of this run costs: its own tensors plus the shared bands divided among the
        tasks that read them (all of them are this run's tasks), mean over its own tasks."""
        return (sum(self.own_params.values()) + self.shared_params) / len(self.own_params)

    @property
    def bytes_per_task(self) -> float:
        """`params_per_task` in bytes of stored files."""
        return (sum(self.own_bytes.values()) + self.shared_bytes) / len(self.own_bytes)

    @property
    def mean_acc(self) -> float:
        return statistics.fmean(self.acc.values())


@dataclass
class Row:
    """A row of the table: its spec, the chosen learning rate and one run per seed."""

    spec: RowSpec
    # Chosen in stage 1 (the only grid value when the grid has one); None: every rate diverged.
    lr: float | None
    val_by_lr: dict[float, float | None]  # stage 1: mean validation accuracy (None: diverged)
    runs: list[Run] = field(default_factory=list)
    step_seconds: float | None = None  # interleaved step timing (median)
    # Runs that failed in stage 2 (a non-finite loss at the chosen rate, most likely), each
    # {"seed", "task", "lr", "error"}; such a seed has no run, and a row with no run is left out
    # of the table, the targets and the plots (the report lists it).
    failures: list[dict] = field(default_factory=list)
    # Stage 1: why each rate that scored nothing failed ({lr: the error's first line}).
    stage1_errors: dict[float, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def key(self) -> str:
        return self.spec.key

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
    def params_per_task(self) -> float:
        """Own tensors plus shared bands divided among their readers, mean over seeds."""
        return statistics.fmean(r.params_per_task for r in self.runs)

    @property
    def bytes_per_task(self) -> float:
        return statistics.fmean(r.bytes_per_task for r in self.runs)

    @property
    def total_params(self) -> float:
        return statistics.fmean(r.total_params for r in self.runs)

    @property
    def total_bytes(self) -> float:
        return statistics.fmean(r.total_bytes for r in self.runs)


def policy_of(row: Row) -> str:
    """The norm policy a row trained with: its variant's, else its method's default as recorded
    in the run's config ("task" for a method without one: what every method did before)."""
    recorded = row.runs[0].config.get("norms") if row.runs else None
    return row.spec.norms or recorded or "task"


def measured(rows: list[Row]) -> list[Row]:
    """The rows with at least one complete run (a row that diverged everywhere has none)."""
    return [r for r in rows if r.runs]


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
