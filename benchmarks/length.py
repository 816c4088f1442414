"""Training length: chosen rows trained again for --long-epochs on --long-tasks, beside the standard
run's figures of the same rows, tasks and seed.

Three epochs of 800 images under-train the parameter-efficient methods more than fine-tuning, and
a method's ranking may change with the length of training (a TAPS penalty that is not normalised
by the run's length switches off more layers the longer a task trains). With --long-epochs N each
row --long-methods names (keys or groups, as --methods; a name brings its row into the standard
run if --methods left it out) is trained once more after the standard run: the same base, rate
(the one stage 1 chose for the standard length: no new selection), options and first seed, only
the tasks of --long-tasks in the run's order, for N epochs. Its bases are named
`long-<row key>-s<seed>`. The report shows each row's accuracy per task and mean, stored size per
task and rank among these rows, at both lengths; the target: the default keeps its place.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from benchmarks.protocol import Bench, fmt_lr, fmt_params
from benchmarks.rows import DEFAULT, PROGRESSIVE_GROUP, Row, Run, named
from benchmarks.targets import Target, mark
from benchmarks.training import train_runs
from taps_cl.manager import Manager

LONG_PREFIX = "long"  # registry names of the long runs' bases: long-<row key>-s<seed>


@dataclass
class Length:
    """The long runs of a benchmark: per row, the standard run's first seed and the long run."""

    epochs: int  # the long runs' epochs
    standard_epochs: int
    tasks: list[str]
    pairs: list[tuple[Row, Row]]  # (the standard row, its long row: one run or a failure)
    skipped: list[str]  # rows named but not run long, with why


def long_rows(rows: list[Row], names: list[str], tasks: list[str]) -> tuple[list[Row], list[str]]:
    """The trained rows `names` picks for the long runs, and the named ones that cannot run."""
    picked, skipped = [], []
    for row in rows:
        if not named(row.spec, names):
            continue
        if not row.runs:
            skipped.append(f"{row.label}: no standard run (diverged)")
        elif row.kind == "fusion":
            skipped.append(f"{row.label}: fusion is not run long (it reads the adapter row's "
                           "standard-length tasks)")
        elif row.kind == PROGRESSIVE_GROUP and len(tasks) < 2:
            skipped.append(f"{row.label}: group train needs at least 2 tasks")
        else:
            picked.append(row)
    return picked, skipped


def train_long(bench: Bench, manager: Manager, rows: list[Row]) -> Length | None:
    """Train the rows --long-methods names for --long-epochs on --long-tasks (None: not asked)."""
    a = bench.args
    if a.long_epochs is None:
        return None
    long_bench = bench.variant(a.long_task_names, a.long_epochs, LONG_PREFIX)
    tasks = [t.name for t in long_bench.tasks]
    picked, skipped = long_rows(rows, a.long_method_names, tasks)
    pairs = []
    bench.say(f"training length: {len(picked)} rows × {len(tasks)} tasks at {a.long_epochs} "
              "epochs")
    for row in picked:
        long = Row(row.spec, row.lr, {})
        train_runs(long_bench, manager, long, [row.runs[0].seed], done=[])
        pairs.append((row, long))
    return Length(a.long_epochs, a.epochs, tasks, pairs, skipped)


def _figures(run: Run, tasks: list[str]) -> dict[str, Any]:
    """One run's accuracy on `tasks`, their mean, and stored numbers per task on them."""
    acc = {t: run.acc[t] for t in tasks}
    own = [run.task_params[t] for t in tasks]
    per_task = statistics.fmean(own) + run.shared_params / len(run.own_params)
    return {"seed": run.seed, "acc": acc, "mean": statistics.fmean(acc.values()),
            "params_per_task": per_task}


def _ranks(values: dict[str, float]) -> dict[str, int]:
    """1 + how many values are higher: 1 for the highest, ties share a rank."""
    return {k: 1 + sum(other > v for other in values.values()) for k, v in values.items()}


def figures(length: Length) -> list[dict[str, Any]]:
    """Per row: its standard and long figures on the long tasks, with ranks among the rows."""
    out = []
    for short, long in length.pairs:
        run = short.runs[0]
        entry: dict[str, Any] = {"key": short.key, "label": short.label, "lr": short.lr,
                                 "standard": _figures(run, length.tasks),
                                 "long": _figures(long.runs[0], length.tasks) if long.runs
                                 else None, "failures": long.failures}
        out.append(entry)
    done = [e for e in out if e["long"] is not None]
    for stage in ("standard", "long"):
        ranks = _ranks({e["key"]: e[stage]["mean"] for e in done})
        for e in done:
            e[stage]["rank"] = ranks[e["key"]]
    return out


def length_table(length: Length, base_params: int) -> list[str]:
    """The markdown table of the long runs beside the standard ones, and its notes."""
    s, n = length.standard_epochs, length.epochs
    cols = [f"{t} {e} ep" for t in length.tasks for e in (s, n)]
    cols += [f"mean {s} ep", f"mean {n} ep", "Δ", f"per task {s} ep", f"per task {n} ep",
             f"rank {s} → {n} ep", "lr"]
    out = [(f"Training length: {n} epochs against {s}, on {', '.join(length.tasks)} (one seed, "
            "each row at the rate stage 1 chose for the standard length; the standard figures "
            "are that row's run of the same seed, on these tasks):"), "",
           "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for e in figures(length):
        std, lng = e["standard"], e["long"]
        cells = []
        for t in length.tasks:
            cells += [f"{100 * std['acc'][t]:.1f}",
                      "diverged" if lng is None else f"{100 * lng['acc'][t]:.1f}"]
        if lng is None:
            cells += [f"**{100 * std['mean']:.1f}**", "diverged", "–",
                      _size(std, base_params), "–", "–"]
        else:
            cells += [f"**{100 * std['mean']:.1f}**", f"**{100 * lng['mean']:.1f}**",
                      f"{100 * (lng['mean'] - std['mean']):+.1f}", _size(std, base_params),
                      _size(lng, base_params), f"{std['rank']} → {lng['rank']}"]
        cells.append(fmt_lr(e["lr"]))
        out.append(f"| {e['label']} | " + " | ".join(cells) + " |")
    out += [f"- not run long: {why}" for why in length.skipped]
    return out


def _size(figures: dict[str, Any], base_params: int) -> str:
    n = figures["params_per_task"]
    return f"{fmt_params(n)} ({n / base_params:.3f}×)"


def length_targets(length: Length | None) -> list[Target]:
    """The default holds its place among the long rows at both lengths."""
    head = "- the default `task add` holds its place at both training lengths"
    if length is None:
        return [Target("length", "default-place", f"{head}: not measured (no --long-epochs)",
                       None)]
    rows = {e["key"]: e for e in figures(length) if e["long"] is not None}
    default = rows.get(DEFAULT)
    if default is None or len(rows) < 2:
        return [Target("length", "default-place", f"{head}: not measured (needs the default "
                       "and another row in --long-methods, both trained)", None)]
    before, after = default["standard"]["rank"], default["long"]["rank"]
    ok = after <= before
    order = {stage: ", ".join(e["label"] for e in sorted(rows.values(),
                                                        key=lambda e: e[stage]["rank"]))
             for stage in ("standard", "long")}
    return [Target(
        "length", "default-place",
        f"{head}: {mark(ok)} — rank {before} of {len(rows)} at {length.standard_epochs} epochs "
        f"({100 * default['standard']['mean']:.1f}), {after} at {length.epochs} "
        f"({100 * default['long']['mean']:.1f}); order at {length.standard_epochs}: "
        f"{order['standard']}; at {length.epochs}: {order['long']}", ok, default["label"],
        {"rank_standard": before, "rank_long": after, "rows": len(rows)})]


def length_json(length: Length | None) -> dict[str, Any] | None:
    if length is None:
        return None
    return {"epochs": length.epochs, "standard_epochs": length.standard_epochs,
            "tasks": length.tasks, "rows": figures(length), "skipped": length.skipped}

