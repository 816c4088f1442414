"""The benchmark's targets, each computed from the run: met, MISSED or not measured, with numbers.

Groups, each printed under its own heading in the report and written to the JSON result:

* "frontier": accuracy per stored number — the default `task add` against PEFT LoRA at the rank
  matched to its size, the best library setting at ≤ 0.05× per task against fine-tuning, compact
  TAPS against the library's lora at equal size (do the gates earn their keep?), adapters against
  PEFT LoRA at equal size, fusion against its adapters on the low-data lowercase task;
* "compact": the TAPS rows' training step against fine-tuning's, the budget row's per-task bound;
* "composed": an adapter task's mean stored size and a fusion task's own tensors;
* "progressive" (benchmarks/progressive_targets.py) and "length" (benchmarks/length.py).

Sizes per task are own tensors plus any shared bands divided among the tasks that read them
(`Row.params_per_task`), as a fraction of the base's parameters; accuracies are the mean over the
tasks, mean ± sample standard deviation over the seeds. Rows are compared with rows of the same
norm policy. A `Target` keeps the report's line and the figures it was decided on (`met` is None
where the rows chosen by --methods cannot measure it).
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from benchmarks.protocol import fmt_acc, plural
from benchmarks.rows import (
    DEFAULT, MATCHED, PEFT, Row, default_is_compact, epoch_ratio, measured, policy_of)

EQUAL_SIZE = 0.02  # "equal stored size" within 2 %
# The default `task add`: ≤ 0.15× base per task at ≥ PEFT LoRA (matched rank) + 1 pt.
TARGET_DEFAULT_SIZE, TARGET_DEFAULT_OVER_LORA = 0.15, 1.0
# The best library setting at ≤ 0.05× per task: within 2 pt of fine-tuning.
TARGET_SMALL_SIZE, TARGET_SMALL_GAP = 0.05, -2.0
TARGET_GATES = 1.0  # compact TAPS ≥ the library's lora + 1 pt at equal size
TARGET_ADAPTER_GAP = -1.0  # adapter ≥ PEFT LoRA at equal size − 1 pt
TARGET_FUSION_GAIN, FUSION_TASK = 1.0, "lowercase"  # fusion ≥ adapter + 1 pt on lowercase
TARGET_STEP = 1.15  # a TAPS training step ≤ 1.15× fine-tuning's
# Composed methods' sizes: an adapter task (mean stored), a fusion task's own tensors.
TARGET_ADAPTER, TARGET_FUSION = 0.06, 0.05
# The report's heading of each group.
HEADINGS = {
    "frontier": "Targets of accuracy per stored number, from this run (mean ± sd over seeds; size "
                "= stored per task, shared bands divided among their readers, × base):",
    "compact": "Targets of TAPS's step time and budget, from this run:",
    "composed": "Targets of adapters and fusion, stored sizes from this run:",
    "progressive": "Targets of progressive adaptation, from this run; rows with several seeds "
                   "enter with their means:",
    "length": "Targets of training length, from this run:",
}


@dataclass(frozen=True)
class Target:
    """One target as this run decided it."""

    group: str  # a key of HEADINGS
    key: str  # what it is about, e.g. "default", "gates", "join"
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
    """The row's mean accuracy over tasks, mean ± sd over its seeds, in %."""
    return fmt_acc([r.mean_acc for r in row.runs])


def size(row: Row, base_params: int) -> float:
    """Stored per task (own + shared bands per reader) as a fraction of the base."""
    return row.params_per_task / base_params


def described(row: Row, base_params: int) -> str:
    return f"{row.label} {row_acc(row)} at {size(row, base_params):.3f}×"


def _stats(row: Row) -> dict[str, Any]:
    accs = [100 * r.mean_acc for r in row.runs]
    return {"mean": statistics.fmean(accs),
            "sd": statistics.stdev(accs) if len(accs) > 1 else None, "seeds": len(accs)}


def same_policy(rows: list[Row], row: Row) -> list[Row]:
    """`rows` that trained with `row`'s norm policy."""
    return [r for r in rows if policy_of(r) == policy_of(row)]


# ------------------------------------------------------------------------------ frontier


def frontier_targets(rows: list[Row], base_params: int,
                     matched: dict[str, Any] | None) -> list[Target]:
    """The targets of accuracy per stored number, each met or missed with its numbers."""
    rows = measured(rows)
    out = [_default_target(rows, base_params, matched), _small_target(rows, base_params)]
    out += _gates_targets(rows, base_params)
    out += _adapter_targets(rows, base_params)
    out += _fusion_targets(rows)
    return out


def _default_target(rows: list[Row], base_params: int,
                    matched: dict[str, Any] | None) -> Target:
    head = (f"- the default `task add` ≤ {TARGET_DEFAULT_SIZE:g}× base per task and ≥ PEFT LoRA "
            f"at the rank matched to its size + {TARGET_DEFAULT_OVER_LORA:g} pt")
    default = next((r for r in rows if r.kind == DEFAULT), None)
    lora = None
    if matched is not None and default is not None and matched["target_row"] == default.label:
        lora = next((r for r in rows if r.kind == "peft" and (
            r.key == MATCHED or r.label == matched["twin"])), None)
    if default is None or lora is None:
        return Target("frontier", "default", f"{head}: not measured (needs the default row and "
                      "its matched PEFT LoRA row)", None)
    mine, theirs = size(default, base_params), size(lora, base_params)
    gap = 100 * (default.mean_acc - lora.mean_acc)
    small = mine <= TARGET_DEFAULT_SIZE
    # "at equal or smaller stored size": the matched rank may land a little above the default.
    fits = mine <= theirs * (1 + EQUAL_SIZE)
    ahead = gap >= TARGET_DEFAULT_OVER_LORA
    ok = small and fits and ahead
    return Target(
        "frontier", "default",
        f"{head}: {mark(ok)} — {default.label}: {mine:.3f}× ({mark(small)}), {row_acc(default)} "
        f"vs {lora.label} {row_acc(lora)} at {theirs:.3f}× ({gap:+.1f} pt, {mark(ahead)})"
        + ("" if fits else f"; the default stores more than that LoRA ({mine:.3f}× > "
           f"{theirs:.3f}×)"),
        ok, default.label,
        {"size": mine, "size_met": small, "lora": lora.label, "lora_rank": matched["rank"],
         "lora_size": theirs, "gap_pt": gap, "accuracy_met": ahead, "no_larger": fits,
         "default": _stats(default), "lora_stats": _stats(lora)})


def _small_target(rows: list[Row], base_params: int) -> Target:
    head = (f"- the best library setting at ≤ {TARGET_SMALL_SIZE:g}× base per task within "
            f"{-TARGET_SMALL_GAP:g} pt of fine-tuning")
    ft = next((r for r in rows if r.kind == "finetune" and r.spec.norms is None),
              next((r for r in rows if r.kind == "finetune"), None))
    library = [r for r in rows if r.method not in (PEFT, "finetune")]
    small = [r for r in library if size(r, base_params) <= TARGET_SMALL_SIZE]
    if ft is None or not library:
        return Target("frontier", "small", f"{head}: not measured (needs fine-tune and a library "
                      "row)", None)
    if not small:
        smallest = min(library, key=lambda r: r.params_per_task)
        return Target("frontier", "small", f"{head}: MISSED — no library row stores ≤ "
                      f"{TARGET_SMALL_SIZE:g}× (smallest: {described(smallest, base_params)})",
                      False, None, {"candidates": [], "fine_tune": _stats(ft)})
    best = max(small, key=lambda r: r.mean_acc)
    gap = 100 * (best.mean_acc - ft.mean_acc)
    ok = gap >= TARGET_SMALL_GAP
    others = [r for r in small if r is not best]
    return Target(
        "frontier", "small",
        f"{head}: {mark(ok)} — {described(best, base_params)} vs fine-tune {row_acc(ft)} "
        f"({gap:+.1f} pt)" + ("; the others at that size: " + "; ".join(
            described(r, base_params) for r in sorted(others, key=lambda r: -r.mean_acc))
            if others else ""),
        ok, best.label,
        {"best": best.label, "size": size(best, base_params), "gap_pt": gap,
         "best_stats": _stats(best), "fine_tune": _stats(ft),
         "candidates": [r.label for r in small]})


def _gates_targets(rows: list[Row], base_params: int) -> list[Target]:
    """Compact TAPS ≥ the library's lora + 1 pt at equal (or smaller) stored size."""
    loras = [r for r in rows if r.kind == "lib-lora"]
    compact = [r for r in rows if r.kind in ("compact", "budget")
               or (r.kind == DEFAULT and default_is_compact())]
    head = f"- compact TAPS ≥ the library's lora + {TARGET_GATES:g} pt at equal stored size"
    if not loras or not compact:
        return [Target("frontier", "gates", f"{head}: not measured (needs a library lora row "
                       "and a compact TAPS row)", None)]
    out = []
    for lora in loras:
        pool = same_policy(compact, lora)
        fits = [r for r in pool if r.params_per_task <= lora.params_per_task * (1 + EQUAL_SIZE)]
        if not fits:
            out.append(Target(
                "frontier", "gates", f"{head}: MISSED against {described(lora, base_params)} — "
                "no compact row of its norm policy stores as little (" + "; ".join(
                    described(r, base_params) for r in pool) + ")" if pool else
                f"{head}: not measured against {lora.label} (no compact row of its norm "
                "policy)", False if pool else None, lora.label,
                {"lora_size": size(lora, base_params), "best": None}))
            continue
        best = max(fits, key=lambda r: r.mean_acc)
        gap = 100 * (best.mean_acc - lora.mean_acc)
        ok = gap >= TARGET_GATES
        out.append(Target(
            "frontier", "gates",
            f"{head}: {mark(ok)} — {described(best, base_params)} vs "
            f"{described(lora, base_params)} ({gap:+.1f} pt)", ok, lora.label,
            {"best": best.label, "best_size": size(best, base_params),
             "lora_size": size(lora, base_params), "gap_pt": gap,
             "best_stats": _stats(best), "lora_stats": _stats(lora)}))
    return out


def lora_at(pefts: list[Row], params: float) -> tuple[float, str, str]:
    """PEFT LoRA's mean accuracy at `params` stored per task: a rank within 2 % of that size, or
    interpolated linearly in log(size) between the two ranks around it, or else the nearest rank.

    Returns (accuracy, how it was found, "equal", or "larger"/"smaller" for a nearest rank that
    stores more/less than `params`).
    """
    ordered = sorted(pefts, key=lambda r: r.params_per_task)
    for r in ordered:
        if abs(r.params_per_task / params - 1) <= EQUAL_SIZE:
            return r.mean_acc, r.label, "equal"
    for low, high in itertools.pairwise(ordered):
        if low.params_per_task <= params <= high.params_per_task:
            span = math.log(high.params_per_task) - math.log(low.params_per_task)
            w = (math.log(params) - math.log(low.params_per_task)) / span
            acc = (1 - w) * low.mean_acc + w * high.mean_acc
            return acc, f"interpolated in log size between {low.label} and {high.label}", "equal"
    if params < ordered[0].params_per_task:
        return ordered[0].mean_acc, f"{ordered[0].label}, which stores more", "larger"
    return ordered[-1].mean_acc, f"{ordered[-1].label}, which stores less", "smaller"


def _adapter_targets(rows: list[Row], base_params: int) -> list[Target]:
    """Adapters ≥ PEFT LoRA at equal stored size − 1 pt."""
    head = f"- adapter ≥ PEFT LoRA at equal stored size − {-TARGET_ADAPTER_GAP:g} pt"
    adapters = [r for r in rows if r.kind == "adapter"]
    pefts = [r for r in rows if r.kind == "peft"]
    if not adapters or not pefts:
        return [Target("frontier", "adapter", f"{head}: not measured (needs an adapter row and "
                       "PEFT LoRA rows)", None)]
    out = []
    for adapter in adapters:
        # PEFT rows of the adapter's norm policy; without any, PEFT as it is (norms task).
        pool = same_policy(pefts, adapter)
        other = "" if pool else "; PEFT at norms=task: none ran with the adapter's policy"
        pool = pool or [r for r in pefts if policy_of(r) == "task"]
        if not pool:
            out.append(Target("frontier", "adapter", f"{head}: not measured for {adapter.label} "
                              "(no PEFT LoRA row of its norm policy or of task)", None,
                              adapter.label))
            continue
        acc, how, side = lora_at(pool, adapter.params_per_task)
        gap = 100 * (adapter.mean_acc - acc)
        ok = gap >= TARGET_ADAPTER_GAP
        caveat = {"equal": "",
                  "larger": " (no LoRA rank as small as the adapter: a miss against a larger "
                            "LoRA is not conclusive; add a smaller rank to --lora-ranks)",
                  "smaller": " (no LoRA rank as large as the adapter: a pass against a smaller "
                             "LoRA is not conclusive)"}[side]
        out.append(Target(
            "frontier", "adapter",
            f"{head}: {mark(ok)} — {described(adapter, base_params)} vs PEFT LoRA "
            f"{100 * acc:.1f} ({how}{other}; {gap:+.1f} pt){caveat}", ok, adapter.label,
            {"adapter_size": size(adapter, base_params), "lora_accuracy": 100 * acc,
             "lora_from": how, "lora_side": side, "gap_pt": gap,
             "adapter_stats": _stats(adapter)}))
    return out


def _fusion_targets(rows: list[Row]) -> list[Target]:
    """Fusion ≥ its adapter row + 1 pt on the low-data lowercase task."""
    head = (f"- fusion ≥ the single adapter + {TARGET_FUSION_GAIN:g} pt on {FUSION_TASK}")
    fusions = [r for r in rows if r.kind == "fusion"]
    if not fusions:
        return [Target("frontier", "fusion", f"{head}: not measured (no fusion row)", None)]
    out = []
    for fusion in fusions:
        adapter = next((r for r in rows if r.key == fusion.spec.reads), None)
        task_names = list(fusion.runs[0].acc)
        if adapter is None or FUSION_TASK not in task_names:
            out.append(Target("frontier", "fusion", f"{head}: not measured for {fusion.label} "
                              f"(needs the task {FUSION_TASK})", None, fusion.label))
            continue
        if FUSION_TASK in fusion.runs[0].reused:
            out.append(Target("frontier", "fusion", f"{head}: not measured for {fusion.label} "
                              f"({FUSION_TASK} is the first task: an adapter task, nothing to "
                              "fuse)", None, fusion.label))
            continue
        mine, theirs = fusion.task_acc(FUSION_TASK), adapter.task_acc(FUSION_TASK)
        gap = 100 * (statistics.fmean(mine) - statistics.fmean(theirs))
        ok = gap >= TARGET_FUSION_GAIN
        out.append(Target(
            "frontier", "fusion",
            f"{head}: {mark(ok)} — {fusion.label} {fmt_acc(mine)} vs {adapter.label} "
            f"{fmt_acc(theirs)} on {FUSION_TASK} ({gap:+.1f} pt, "
            f"{plural(len(mine), 'seed')})", ok, fusion.label,
            {"fusion": [100 * a for a in mine], "adapter": [100 * a for a in theirs],
             "gap_pt": gap}))
    return out


# ------------------------------------------------------------------------------ compact


def compact_targets(rows: list[Row], base_params: int, budget: float) -> list[Target]:
    """The TAPS rows' training step against fine-tuning's, and the budget row's bound."""
    rows = measured(rows)
    ft = next((r for r in rows if r.kind == "finetune"), None)
    out: list[Target] = []
    for r in (r for r in rows if r.method == "taps"):
        if ft is None or not r.step_seconds or not ft.step_seconds:
            continue
        step = r.step_seconds / ft.step_seconds
        epoch = epoch_ratio(r, ft)
        out.append(Target(
            "compact", "step", f"- {r.label}: train step ≤ {TARGET_STEP:g}× fine-tune: "
            f"{mark(step <= TARGET_STEP)} — interleaved step {step:.2f}×, epoch time in "
            f"the run {epoch:.2f}×", step <= TARGET_STEP, r.label, {"step": step, "epoch": epoch}))
    for r in (r for r in rows if r.kind == "budget"):
        worst = max(n / base_params for run in r.runs for n in run.task_params.values())
        count = sum(len(run.task_params) for run in r.runs)
        out.append(Target(
            "compact", "budget", f"- --budget {budget:g}: every task stores ≤ {budget:g}× base: "
            f"{mark(worst <= budget)} — largest of {count} tasks ({len(r.runs)} seeds) "
            f"{worst:.4f}×", worst <= budget, r.label,
            {"budget": budget, "largest": worst, "tasks": count, "seeds": len(r.runs)}))
    if not out:
        out.append(Target("compact", "none", "- none measurable with the rows chosen by "
                          "--methods", None))
    return out


def composed_targets(rows: list[Row], base_params: int) -> list[Target]:
    """Size targets of the composed methods: adapter task (mean stored), fusion task (own)."""
    rows = measured(rows)
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
