"""The benchmark's targets, each computed from the run: met, MISSED or not measured, with numbers.

Three groups, each printed under its own heading in the report and written to the JSON result:

* "compact": compact TAPS against fine-tuning (stored size per task, accuracy, the whole
  sequence's size), against each PEFT LoRA row at equal or fewer stored parameters, the TAPS
  rows' training step against fine-tuning's, and the budget row's per-task bound;
* "composed": an adapter task's mean stored size and a fusion task's own tensors;
* "progressive": the progressive rows' task-specific stored parameters against the adapter
  row's at its accuracy, the similarity ranking of related tasks, and that joining a group
  leaves every earlier task's stored bytes and probe logits unchanged.

A `Target` keeps the report's line and the figures it was decided on (`met` is None where the
rows chosen by --methods cannot measure it).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from benchmarks.protocol import fmt_acc, fmt_params, plural
from benchmarks.rows import (
    PROGRESSIVE,
    PROGRESSIVE_GROUP,
    PROGRESSIVE_KINDS,
    Row,
    Run,
    epoch_ratio,
)

EQUAL_SIZE = 0.02  # "equal stored parameters" within 2 %
# Compact TAPS: a task ≤ 0.15× base at ≥ fine-tune − 1.5 pt; the sequence ≤ 1.6× base; ≥ LoRA
# + 1 pt at equal size; a training step ≤ 1.15× fine-tuning's.
TARGET_TASK_SIZE, TARGET_ACC_GAP, TARGET_SEQUENCE = 0.15, -1.5, 1.6
TARGET_OVER_LORA, TARGET_STEP = 1.0, 1.15
# Composed methods' sizes: an adapter task (mean stored), a fusion task's own tensors.
TARGET_ADAPTER, TARGET_FUSION = 0.06, 0.05
# Progressive: task-specific total ≤ 0.7× the adapter row's, at ≥ its accuracy − 0.5 pt.
TARGET_PROGRESSIVE_SIZE, TARGET_PROGRESSIVE_GAP = 0.7, -0.5
# The report's heading of each group.
HEADINGS = {
    "compact": "Targets of compact TAPS, from this run; rows with several seeds enter with their means:",
    "composed": "Targets of adapters and fusion, stored sizes from this run:",
    "progressive": "Targets of progressive adaptation, from this run; rows with several seeds enter with their "
                   "means:",
}


@dataclass(frozen=True)
class Target:
    """One target as this run decided it."""

    group: str  # "compact", "composed" or "progressive" (a key of HEADINGS)
    key: str  # what it is about, e.g. "task-size", "over-lora", "join"
    text: str  # the report's line
    met: bool | None  # None: not measured with the rows chosen
    row: str | None = None  # the row it is about, where it is about one
    numbers: dict[str, Any] = field(default_factory=dict)  # the figures it was decided on


def lines(group: str, targets: list[Target]) -> list[str]:
    """The report's lines of one group: its heading, then one line per target."""
    return [HEADINGS[group], *(t.text for t in targets if t.group == group)]


def mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def row_acc(row: Row) -> str:
    return fmt_acc([r.mean_acc for r in row.runs])


def compact_targets(rows: list[Row], base_params: int, n_tasks: int,
                    budget: float) -> list[Target]:
    """Compact TAPS against fine-tuning and LoRA, step time, and the budget row's bound."""
    ft = next((r for r in rows if r.kind == "finetune"), None)
    compact = [r for r in rows if r.kind in ("compact", "budget")]
    loras = [r for r in rows if r.kind == "lora"]
    out: list[Target] = []

    def size(r: Row) -> str:
        return f"{r.task_params / base_params:.3f}×"

    def add(key: str, text: str, met: bool | None, row: str | None = None,
            **numbers: Any) -> None:
        out.append(Target("compact", key, text, met, row, numbers))

    good: list[Row] = []
    if ft is None or not compact:
        add("task-size", f"- compact TAPS ≤ {TARGET_TASK_SIZE:g}× base per task at ≥ fine-tune − "
            f"{-TARGET_ACC_GAP:g} pt: not measured (needs fine-tune and a compact row)", None)
    else:
        details, figures = [], {}
        for r in compact:
            gap = 100 * (r.mean_acc - ft.mean_acc)
            if r.task_params / base_params <= TARGET_TASK_SIZE and gap >= TARGET_ACC_GAP:
                good.append(r)
            details.append(f"{r.label}: {size(r)} per task, {row_acc(r)} ({gap:+.1f} pt)")
            figures[r.label] = {"task_size": r.task_params / base_params, "gap_pt": gap}
        add("task-size", f"- a compact TAPS setting with mean stored task ≤ {TARGET_TASK_SIZE:g}× "
            f"base and mean accuracy ≥ fine-tune − {-TARGET_ACC_GAP:g} pt (fine-tune "
            f"{row_acc(ft)}): {mark(bool(good))} — " + "; ".join(details), bool(good),
            rows=figures, good=[r.label for r in good])
    if compact:
        pool = good or compact
        ok = any(r.total_params / base_params <= TARGET_SEQUENCE for r in good)
        ft_total = f"; fine-tune {ft.total_params / base_params:.2f}×" if ft else ""
        add("sequence", f"- the {n_tasks}-task sequence in that setting ≤ {TARGET_SEQUENCE:g}× "
            f"base{ft_total}: {mark(ok)} — "
            + "; ".join(f"{r.label}: {r.total_params / base_params:.2f}×" for r in pool)
            + ("" if good else " (no setting met the first target)"), ok,
            totals={r.label: r.total_params / base_params for r in pool},
            fine_tune_total=ft.total_params / base_params if ft else None)
    for lora in loras if compact else []:
        fits = [r for r in compact if r.task_params <= lora.task_params * (1 + EQUAL_SIZE)]
        if not fits:
            smallest = min(compact, key=lambda r: r.task_params)
            add("over-lora", f"- compact TAPS ≥ {lora.label} + {TARGET_OVER_LORA:g} pt at equal "
                f"(within {EQUAL_SIZE:.0%}) or fewer stored params: MISSED — no compact "
                f"row stores ≤ {size(lora)} per task (smallest: {smallest.label}, "
                f"{size(smallest)})", False, lora.label,
                lora_size=lora.task_params / base_params, best=None,
                smallest=smallest.label, smallest_size=smallest.task_params / base_params)
            continue
        best = max(fits, key=lambda r: r.mean_acc)
        gap = 100 * (best.mean_acc - lora.mean_acc)
        add("over-lora", f"- compact TAPS ≥ {lora.label} + {TARGET_OVER_LORA:g} pt at equal "
            f"(within {EQUAL_SIZE:.0%}) or fewer stored params: {mark(gap >= TARGET_OVER_LORA)} — "
            f"the most accurate such row, {best.label}, "
            f"{row_acc(best)} at {size(best)} vs {row_acc(lora)} at {size(lora)} "
            f"({gap:+.1f} pt)", gap >= TARGET_OVER_LORA, lora.label,
            lora_size=lora.task_params / base_params, best=best.label,
            best_size=best.task_params / base_params, gap_pt=gap)
    for r in (r for r in rows if r.method == "taps"):
        if ft is None or not r.step_seconds or not ft.step_seconds:
            continue
        step = r.step_seconds / ft.step_seconds
        epoch = epoch_ratio(r, ft)
        add("step", f"- {r.label}: train step ≤ {TARGET_STEP:g}× fine-tune: "
            f"{mark(step <= TARGET_STEP)} — interleaved step {step:.2f}×, epoch time in "
            f"the run {epoch:.2f}×", step <= TARGET_STEP, r.label, step=step, epoch=epoch)
    for r in (r for r in rows if r.kind == "budget"):
        worst = max(n / base_params for run in r.runs for n in run.task_params.values())
        count = sum(len(run.task_params) for run in r.runs)
        add("budget", f"- --budget {budget:g}: every task stores ≤ {budget:g}× base: "
            f"{mark(worst <= budget)} — largest of {count} tasks ({len(r.runs)} seeds) "
            f"{worst:.4f}×", worst <= budget, r.label, budget=budget, largest=worst,
            tasks=count, seeds=len(r.runs))
    if not out:
        add("none", "- none measurable with the rows chosen by --methods", None)
    return out


def composed_targets(rows: list[Row], base_params: int) -> list[Target]:
    """Size targets of the composed methods: adapter task (mean stored), fusion task (own)."""
    out: list[Target] = []
    for r in (r for r in rows if r.kind == "adapter"):
        sizes = [n / base_params for run in r.runs for n in run.own_params.values()]
        mean = statistics.fmean(sizes)
        out.append(Target(
            "composed", "adapter-size",
            f"- an adapter task stores ≤ {TARGET_ADAPTER:g}× base (mean stored): "
            f"{mark(mean <= TARGET_ADAPTER)} — {r.label}: mean {mean:.4f}×, largest "
            f"{max(sizes):.4f}× of {plural(len(sizes), 'task')}", mean <= TARGET_ADAPTER,
            r.label, {"mean": mean, "largest": max(sizes), "tasks": len(sizes)}))
    for r in (r for r in rows if r.kind == "fusion"):
        sizes = [n / base_params for run in r.runs for n in run.own_params.values()]
        mean = statistics.fmean(sizes)
        out.append(Target(
            "composed", "fusion-size",
            f"- a fusion task's own tensors ≤ {TARGET_FUSION:g}× base: "
            f"{mark(mean <= TARGET_FUSION)} — {r.label}: mean {mean:.4f}×, largest "
            f"{max(sizes):.4f}× of {plural(len(sizes), 'fusion task')} (the fused "
            f"adapters excluded: they are their tasks' artifacts); the row's total with "
            f"the adapters it reads: {r.total_params / base_params:.2f}× base",
            mean <= TARGET_FUSION, r.label,
            {"mean": mean, "largest": max(sizes), "tasks": len(sizes),
             "total": r.total_params / base_params}))
    if not out:
        out.append(Target("composed", "none", "- not measured (no adapter or fusion row chosen "
                          "by --methods)", None))
    return out


def similarity_runs(rows: list[Row], every: bool = False) -> list[tuple[Row, Run]]:
    """Runs that measured the tasks' similarity: one per seed, the group row's first (`every`:
    all of them)."""
    prog = sorted((r for r in rows if r.kind in PROGRESSIVE_KINDS),
                  key=lambda r: r.kind != PROGRESSIVE_GROUP)
    found = [(r, run) for r in prog for run in r.runs if run.similarity is not None]
    if every:
        return found
    first: dict[int, tuple[Row, Run]] = {}
    for r, run in found:
        first.setdefault(run.seed, (r, run))
    return [first[seed] for seed in sorted(first)]


def progressive_targets(rows: list[Row], base_params: int) -> list[Target]:
    """The progressive rows against the adapter row, the similarity ranking, the join checks."""
    out: list[Target] = []

    def specific(run: Run) -> int:  # what the tasks store beyond the base, shared ones once
        return run.total_params - base_params

    adapter = next((r for r in rows if r.kind == "adapter"), None)
    prog = [r for r in rows if r.kind in PROGRESSIVE_KINDS]
    if not prog:
        return [Target("progressive", "none", "- not measured (no progressive row chosen by "
                       "--methods)", None)]
    for r in prog:
        mine = statistics.fmean(specific(run) for run in r.runs)
        own = statistics.fmean(sum(run.task_params.values()) for run in r.runs)
        shared = statistics.fmean(run.shared_params for run in r.runs)
        text = (f"task-specific total {fmt_params(mine)} (Σ own {fmt_params(own)} + shared "
                f"{fmt_params(shared)}), accuracy {row_acc(r)}")
        numbers: dict[str, Any] = {"specific": mine, "own": own, "shared": shared,
                                   "accuracy": 100 * r.mean_acc}
        if adapter is None:
            out.append(Target(
                "progressive", "progressive-size",
                f"- {r.label}: total ≤ {TARGET_PROGRESSIVE_SIZE:g}× independent adapters' "
                f"at ≥ their accuracy − {-TARGET_PROGRESSIVE_GAP:g} pt: not measured (no "
                f"adapter row) — {text}", None, r.label, numbers))
            continue
        theirs = statistics.fmean(specific(run) for run in adapter.runs)
        ratio = mine / theirs
        gap = 100 * (r.mean_acc - adapter.mean_acc)
        size_ok, acc_ok = ratio <= TARGET_PROGRESSIVE_SIZE, gap >= TARGET_PROGRESSIVE_GAP
        accs = [100 * run.mean_acc for run in adapter.runs]
        numbers.update(adapter_specific=theirs, size_ratio=ratio, size_met=size_ok, gap_pt=gap,
                       accuracy_met=acc_ok, adapter_accuracy=statistics.fmean(accs),
                       adapter_std=statistics.stdev(accs) if len(accs) > 1 else None)
        out.append(Target(
            "progressive", "progressive-size",
            f"- {r.label}: task-specific stored parameters ≤ {TARGET_PROGRESSIVE_SIZE:g}× "
            f"independent adapters' at mean accuracy ≥ theirs − "
            f"{-TARGET_PROGRESSIVE_GAP:g} pt: {mark(size_ok and acc_ok)} — {text}; adapter row "
            f"{fmt_params(theirs)} (Σ of its {len(adapter.runs[0].task_params)} task "
            f"artifacts), accuracy {row_acc(adapter)}: size {ratio:.2f}× "
            f"({mark(size_ok)}), accuracy {gap:+.1f} pt "
            f"({mark(acc_ok)}). Sizes exclude the base (both "
            f"store it once); with it: {r.total_params / base_params:.2f}× vs "
            f"{adapter.total_params / base_params:.2f}× base.", size_ok and acc_ok, r.label,
            numbers))
    out.append(_similarity_target(rows))
    out += _join_targets(prog)
    return out


def _similarity_target(rows: list[Row]) -> Target:
    """Uppercase ↔ lowercase letters above letters ↔ Fashion-MNIST (both letter sets)."""
    text = ("- similarity ranks related tasks first: cos(letters, lowercase) above cos(letters, "
            "fashion) and cos(lowercase, fashion)")
    runs = similarity_runs(rows)
    needed = {"letters", "lowercase", "fashion"}
    if not runs or not needed <= set(runs[0][1].similarity[0]):  # type: ignore[index]
        return Target("progressive", "similarity", f"{text}: not measured (needs a progressive "
                      "row and the tasks letters, lowercase, fashion)", None)
    held, details, seeds = 0, [], []
    for _, run in runs:
        assert run.similarity is not None
        names, matrix = run.similarity
        at = {n: i for i, n in enumerate(names)}

        def cos(a: str, b: str) -> float:
            return matrix[at[a]][at[b]]  # noqa: B023 — used at once, in this iteration

        related = cos("letters", "lowercase")
        far = max(cos("letters", "fashion"), cos("lowercase", "fashion"))
        held += related > far
        details.append(f"seed {run.seed}: {related:.2f} vs {cos('letters', 'fashion'):.2f} / "
                       f"{cos('lowercase', 'fashion'):.2f}")
        seeds.append({"seed": run.seed, "related": related,
                      "letters_fashion": cos("letters", "fashion"),
                      "lowercase_fashion": cos("lowercase", "fashion")})
    ok = held == len(runs)
    return Target("progressive", "similarity",
                  f"{text}: {mark(ok)} — {held}/{len(runs)} seeds; " + "; ".join(details), ok,
                  numbers={"held": held, "seeds": len(runs), "per_seed": seeds})


def _join_targets(prog: list[Row]) -> list[Target]:
    """Joining leaves every earlier task's artifact byte-identical, its probe logits unchanged."""
    text = ("- joining leaves every earlier task's artifact byte-identical and its probe logits "
            "unchanged")
    incremental = [r for r in prog if r.kind == PROGRESSIVE]
    if not incremental:
        return [Target("progressive", "join", f"{text}: not measured (needs the progressive "
                       "row, the incremental one)", None)]
    out = []
    for r in incremental:
        same = [ok for run in r.runs for _, ok in run.unchanged]
        probes = [ok for run in r.runs for ok in run.probes]
        checks = [(task, ok, drift) for run in r.runs for task, ok, drift in run.verified]
        drifts = [d for _, _, d in checks if d is not None]
        joins = sum(not opened for run in r.runs for t, opened in list(run.opened.items())[1:])
        later = sum(len(run.opened) - 1 for run in r.runs)
        ok = all(same) and all(probes) and all(ok for _, ok, _ in checks) and bool(same)
        probe_drift = max((run.probe_drift for run in r.runs), default=0)
        out.append(Target(
            "progressive", "join",
            f"{text}: {mark(ok)} — {r.label}, {plural(len(r.runs), 'seed')}: after every add, "
            f"{sum(same)}/{len(same)} earlier tasks' artifacts and pinned shared bands re-read "
            f"byte-identical (sha256 of the bytes); {sum(probes)}/{len(probes)} probe re-checks "
            f"of earlier tasks during the adds unchanged (max drift "
            f"{probe_drift:.3g}); `Manager.verify` at the "
            f"end: {sum(ok for _, ok, _ in checks)}/{len(checks)} checks ok (max drift "
            f"{max(drifts, default=0):.3g}); {joins} of {later} later adds joined an existing "
            "group, the others opened one (every later add reads the shared band frozen)", ok,
            r.label,
            {"seeds": len(r.runs), "unchanged": sum(same), "rechecked": len(same),
             "probes_ok": sum(probes), "probes": len(probes),
             "verify_ok": sum(ok for _, ok, _ in checks), "verify": len(checks),
             "max_probe_drift": probe_drift, "max_verify_drift": max(drifts, default=0),
             "joins": joins, "later_adds": later}))
    return out
