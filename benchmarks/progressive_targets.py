"""The progressive rows' targets: size and accuracy against independent adapters, the similarity
ranking of related tasks, and that joining a group leaves every earlier task unchanged.

Each is a `benchmarks.targets.Target` of the group "progressive" (printed under its heading).
"""

from __future__ import annotations

import statistics
from typing import Any

from benchmarks.protocol import fmt_params, plural
from benchmarks.rows import (
    PROGRESSIVE,
    PROGRESSIVE_GROUP,
    PROGRESSIVE_KINDS,
    Row,
    Run,
    measured,
)
from benchmarks.targets import Target, mark, row_acc

# Progressive: task-specific total ≤ 0.7× the adapter row's, at ≥ its accuracy − 0.5 pt.
TARGET_PROGRESSIVE_SIZE, TARGET_PROGRESSIVE_GAP = 0.7, -0.5


def similarity_runs(rows: list[Row], every: bool = False) -> list[tuple[Row, Run]]:
    """Runs that measured the tasks' similarity: one per seed, the group row's first (`every`:
    all of them)."""
    prog = sorted((r for r in measured(rows) if r.kind in PROGRESSIVE_KINDS),
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

    rows = measured(rows)
    # The adapter row of the method's default norm policy ("task") where policies vary.
    adapters = [r for r in rows if r.kind == "adapter"]
    adapter = next((r for r in adapters if r.spec.norms in (None, "task")),
                   adapters[0] if adapters else None)
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
