"""--plan: the training runs each stage of the benchmark has, and how long they should take.

The estimate uses the speeds measured for Lite0 on 2 cores at 64 px (benchmarks/protocol.py's
TRAIN_IMG_S, LINEAR_IMG_S, EVAL_IMG_S) and fixed per-run overheads; the defaults are sized so that
the whole run fits PLAN_LIMIT_MIN minutes by it; --time-limit checks a run against another limit.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

from benchmarks.protocol import (
    BASE_ADD_S,
    EVAL_IMG_S,
    FIT_OVERHEAD_S,
    LINEAR_IMG_S,
    PLAN_LIMIT_MIN,
    QUICK_TIMED_STEPS,
    SELECT_TEST,
    SIGNATURE_S,
    TASK_OVERHEAD_S,
    TIMED_STEPS,
    TRAIN_IMG_S,
    VAL_FRACTION,
    expected_sizes,
    plural,
)
from benchmarks.rows import MATCHED, PROGRESSIVE_GROUP, PROGRESSIVE_KINDS, RowSpec, lora_spec, named


@dataclass
class Plan:
    """The runs of a benchmark and their estimated seconds, as numbers and as printed lines."""

    rows: list[str]  # the rows' --methods keys, in table order (the matched LoRA row counted)
    tasks: dict[str, dict[str, int]]  # task → expected train/val/test images
    rates: int  # learning rates tried per row in stage 1 (0: one rate given, no selection)
    stage1_runs: int  # training runs of stage 1
    seeds: dict[int, int]  # seeds per row → how many rows train with that many in stage 2
    row_runs: int  # stage 2: Σ over rows of their seeds
    stage2_runs: int  # stage 2: training runs (row runs × the tasks each trains)
    stage1_s: float
    stage2_s: float
    timing_s: float  # the interleaved step timing
    total_s: float
    long_s: float  # the training-length runs (--long-epochs), in total_s
    long_rows: list[str]  # their rows' keys
    long_runs: int  # their training runs (rows × long tasks, one seed)
    images: dict[str, int]  # training images per task: "select_train" (stage 1), "max_train"
    # Per row, in `rows` order: {"key", "seeds" (its stage-2 seeds), "stage1_s", "stage2_s"}.
    per_row: list[dict] = field(default_factory=list)
    limit_min: float = PLAN_LIMIT_MIN
    lines: list[str] = field(default_factory=list)

    @property
    def over(self) -> bool:
        """The estimate is over the limit."""
        return self.total_s > self.limit_min * 60

    def to_json(self) -> dict:
        return {"rows": self.rows, "tasks": self.tasks, "rates": self.rates,
                "stage1_runs": self.stage1_runs,
                "seeds": [{"seeds": k, "rows": n} for k, n in sorted(self.seeds.items())],
                "row_runs": self.row_runs, "stage2_runs": self.stage2_runs,
                "stage1_s": self.stage1_s, "stage2_s": self.stage2_s,
                "timing_s": self.timing_s, "total_s": self.total_s, "images": self.images,
                "long_s": self.long_s, "long_rows": self.long_rows, "long_runs": self.long_runs,
                "per_row": self.per_row, "limit_min": self.limit_min, "over": self.over}


def plan(args: argparse.Namespace, specs: list[RowSpec], matched: bool) -> Plan:
    """How many training runs each stage has and the estimated seconds at the measured speeds."""
    sizes = expected_sizes(args.task_names, args.max_train, args.max_test)
    rows = specs + ([lora_spec(MATCHED, 0, None, matched=True)] if matched else [])
    epochs, n_tasks = args.epochs, len(sizes)
    rates = len(args.lr_values) if len(args.lr_values) > 1 else 0
    stage1 = stage2 = 0.0
    runs1 = runs2 = fits2 = 0
    by_seeds: dict[int, int] = {}  # seeds per row → rows
    per_row = []
    for row in rows:
        before = stage1, stage2
        speed = _speed(row)
        seeds = len(row.seeds(args.seed_values))
        by_seeds[seeds] = by_seeds.get(seeds, 0) + 1
        trained = list(sizes.values())[1:] if row.kind == "fusion" else list(sizes.values())
        runs1 += rates * len(trained)
        runs2 += seeds
        fits2 += seeds * len(trained)
        progressive = row.kind in PROGRESSIVE_KINDS
        for s in trained:
            chosen = min(args.select_train, s["train"])
            if progressive:  # through the Manager: its own cut validation, test, signature,
                # then a restore scored on the full validation split
                own_val = min(math.ceil(chosen * VAL_FRACTION), s["val"])
                stage1 += rates * (chosen * epochs / speed + (own_val * epochs + s["val"]
                                   + min(SELECT_TEST, s["test"])) / EVAL_IMG_S
                                   + TASK_OVERHEAD_S + SIGNATURE_S)
            else:
                stage1 += rates * (chosen * epochs / speed + s["val"] * (epochs + 1) / EVAL_IMG_S
                                   + FIT_OVERHEAD_S)
            stage2 += seeds * (s["train"] * epochs / speed
                               + (s["val"] * epochs + s["test"]) / EVAL_IMG_S + TASK_OVERHEAD_S
                               + (SIGNATURE_S if progressive else 0.0))
        if progressive:  # a base of its own per rate and per seed
            stage1 += rates * BASE_ADD_S
            stage2 += seeds * BASE_ADD_S
        per_row.append({"key": row.key, "seeds": row.seeds(args.seed_values),
                        "stage1_s": stage1 - before[0], "stage2_s": stage2 - before[1]})
    long_keys, long_runs, long_s = _long(args, rows)
    steps = QUICK_TIMED_STEPS if args.quick else TIMED_STEPS
    timing = (len(rows) * (args.step_rounds * steps + 1) * args.batch_size / TRAIN_IMG_S
              + len(rows) * FIT_OVERHEAD_S) if args.step_rounds else 0.0
    total = stage1 + stage2 + timing + long_s
    fusion = any(r.kind == "fusion" for r in rows)
    fewer = (f" (the fusion row trains {n_tasks - 1}: its first task is the adapter row's)"
             if fusion else "")
    images = ", ".join(f"{t} {s['train']}/{s['val']}/{s['test']}" for t, s in sizes.items())
    limit = args.time_limit
    over = "" if total <= limit * 60 else (
        ": OVER — lower --max-train, --seeds or --select-train")
    lines = [
        f"plan: {len(rows)} rows ({', '.join(r.key for r in rows)}), {n_tasks} tasks "
        f"({images} train/val/test images)",
        f"- stage 1 (learning rate): {len(rows)} rows × {rates} rates × {n_tasks} tasks{fewer} = "
        f"{runs1} training runs on ≤ {args.select_train} images each, "
        f"{plural(epochs, 'epoch')}" + ("" if rates else " (one rate given: no selection)"),
        "- stage 2 (full data): " + " + ".join(
            f"{n} rows × {plural(k, 'seed')}" for k, n in sorted(by_seeds.items()))
        + f" = {runs2} row runs × {n_tasks} tasks{fewer} = {fits2} training runs on ≤ "
        f"{args.max_train} images each, {plural(epochs, 'epoch')}",
        f"- step timing: {len(rows)} rows × {plural(args.step_rounds, 'round')} × "
        f"{plural(steps, 'step')}",
        f"- estimate at {TRAIN_IMG_S:g} train img/s ({LINEAR_IMG_S:g} for the linear probe) and "
        f"{EVAL_IMG_S:g} eval img/s on 2 cores (Lite0 at 64 px, docs/results.md), plus "
        f"{FIT_OVERHEAD_S:g} s per stage-1 run and {TASK_OVERHEAD_S:g} s per stage-2 task: "
        f"stage 1 {stage1 / 60:.0f} min, stage 2 {stage2 / 60:.0f} min, step timing "
        f"{timing / 60:.0f} min"
        + (f", training length {long_s / 60:.0f} min" if long_keys else "")
        + f"; total ≈ {total / 60:.0f} min (limit {limit:g} min{over})",
    ]
    if long_keys:
        lines.insert(3, f"- training length: {len(long_keys)} rows ({', '.join(long_keys)}) × "
                     f"{len(args.long_task_names)} tasks ({', '.join(args.long_task_names)}) × "
                     f"1 seed = {long_runs} training runs of {plural(args.long_epochs, 'epoch')} "
                     f"on ≤ {args.max_train} images each, at the rates stage 1 chose")
    if matched:
        lines.append("- the parameter-matched LoRA row is counted; it is skipped when its rank is "
                     "one of --lora-ranks")
    if any(r.kind in PROGRESSIVE_KINDS for r in rows):
        lines.append(f"- progressive rows: stage 1 runs the row whole through the Manager per "
                     f"rate (a base each, {BASE_ADD_S:g} s), each task with its gradient "
                     f"signature ({SIGNATURE_S:g} s) and a restore scored on validation; stage 2 "
                     "adds a signature per task and a base per seed")
    return Plan([r.key for r in rows], sizes, rates, runs1, by_seeds, runs2, fits2, stage1,
                stage2, timing, total, long_s, long_keys, long_runs,
                {"select_train": args.select_train, "max_train": args.max_train},
                per_row, limit_min=limit, lines=lines)


def _speed(row: RowSpec) -> float:
    return LINEAR_IMG_S if row.method == "linear" else TRAIN_IMG_S


def _long(args: argparse.Namespace, specs: list[RowSpec]) -> tuple[list[str], int, float]:
    """The training-length runs: (their rows' keys, training runs, estimated seconds)."""
    if args.long_epochs is None:
        return [], 0, 0.0
    sizes = expected_sizes(args.long_task_names, args.max_train, args.max_test)
    rows = [s for s in specs if named(s, args.long_method_names) and s.kind != "fusion"
            and not (s.kind == PROGRESSIVE_GROUP and len(sizes) < 2)]
    seconds = 0.0
    for row in rows:
        progressive = row.kind in PROGRESSIVE_KINDS
        for s in sizes.values():
            seconds += (s["train"] * args.long_epochs / _speed(row)
                        + (s["val"] * args.long_epochs + s["test"]) / EVAL_IMG_S
                        + TASK_OVERHEAD_S + (SIGNATURE_S if progressive else 0.0))
        seconds += BASE_ADD_S if progressive else 0.0
    return [r.key for r in rows], len(rows) * len(sizes), seconds
