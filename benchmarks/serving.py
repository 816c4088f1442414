"""Serving benchmark: the multi-task model against N restored models, on one base.

What it measures, for each row (a method and its options) and each number of tasks N (default
1, 8 and 32) on ImageNet EfficientNet-Lite0 at 64 px:

* memory — the multi-task model's parameters and buffers (each storage once,
  `MultiTaskModel.footprint`) against N restored models (`Manager.restore`, each a whole
  model), and against what the registry says the served tasks store: the base's parameters plus
  each task's own stored numbers plus every shared artifact they read, once (`Manager.budget`);
* every task on each image — images/s of one `forward` in which every image names all N tasks,
  against the N restored models run one after another on the same batch;
* mixed batches — images/s of a batch in which image i names task i mod N, against a batch of
  the same size for one task, and against the same images grouped by task (one call per task);
* PEFT's own mixed-adapter batch (`adapter_names`) for LoRA rows: N PEFT LoRA adapters of the
  row's rank on the same base, heads (and, for a row whose norms are per task, the norm layers)
  as PEFT `modules_to_save`, against the multi-task model's mixed batch;
* equivalence — the largest difference between a task's logits from the multi-task model and
  from its restored model on the benchmark's batch.

The tasks are real: each is added through `Manager.add_task` (1 epoch on a small generated
image folder, a seed of its own), so its active layers, norm statistics and shared bands are
exactly what the method gives a task; the adds skip re-checking earlier tasks (`recheck=0`),
which would only slow the building. `--demo-home` adds one row on an existing registry (the
demo's three tasks: `taps-cl demo` writes it). Run it with nothing else on the machine:

    python benchmarks/serving.py --plan          # what it would build; runs nothing
    python benchmarks/serving.py                 # Lite0, N = 1, 8, 32, every default row
    python benchmarks/serving.py --quick         # timm's tiny test model, N = 1, 3 (seconds)

Prints one markdown table per measurement (or, with --json, one JSON document); progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: the repository root, which holds benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scale_measure import make_imagefolder
from registry import RegistryError

LITE0 = "timm:tf_efficientnet_lite0"
QUICK_MODEL = "timm:test_efficientnet"
# Rows: label = method:option=value,… (options as Manager.add_task takes them).
ROWS = ("progressive=progressive:group=auto", "lora=lora:rank=8",
        "lora-affine=lora:rank=8,norms=affine", "adapter=adapter")
QUICK_ROWS = ("progressive=progressive:group=auto", "lora-affine=lora:rank=4,norms=affine")
SIZES = (1, 8, 32)
QUICK_SIZES = (1, 3)
PLAN_ADD_S = 4.0  # one real add on Lite0 at 64 px (1 epoch, 48 images, no re-check), 2 cores


@dataclass(frozen=True)
class Row:
    label: str
    method: str
    options: dict[str, Any]

    @staticmethod
    def parse(text: str) -> Row:
        label, _, rest = text.partition("=")
        method, _, opts = rest.partition(":")
        options: dict[str, Any] = {}
        for item in filter(None, opts.split(",")):
            key, _, value = item.partition("=")
            options[key] = _value(value)
        if not label or not method:
            raise SystemExit(f"serving.py: a row is label=method[:option=value,…], got {text!r}")
        return Row(label, method, options)


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# ------------------------------------------------------------------------------- measuring
def timed(call: Callable[[], Any], repeat: int) -> float:
    """Median seconds of `repeat` calls, after one warm-up call."""
    call()
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def budget_numbers(manager: Any, base: str, names: Sequence[str]) -> int:
    """What the registry says serving `names` needs: base + own numbers + shared bands once."""
    report = manager.budget(base)
    chosen = set(names)
    own = sum(r.task_params for r in report.tasks if r.name in chosen)
    shared = sum(u.num_params for u in report.shared if chosen & set(u.tasks))
    return report.base_params + own + shared


def peft_mixed(model_spec: str, rank: int, names: Sequence[str], num_classes: int,
               per_task_norms: bool, x: Any, repeat: int) -> dict[str, Any]:
    """Images/s of PEFT's mixed-adapter batch: N LoRA adapters, image i → adapter i mod N.

    The weights' values do not change the time, so the base is randomly initialised and the
    adapters are PEFT's non-zero test initialisation."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from taps_cl.models import backbones

    model = backbones.create_model(backbones.ModelSpec.parse(model_spec),
                                   num_classes=num_classes)
    head = "classifier" if hasattr(model, "classifier") else "fc"
    targets = [n for n, m in model.named_modules()
               if (isinstance(m, nn.Conv2d) and m.groups == 1) or
               (isinstance(m, nn.Linear) and n != head)]
    norms = [n for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm)] if per_task_norms else []
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=targets,
                        modules_to_save=[head, *norms], init_lora_weights=False)
    try:
        peft_model = get_peft_model(model, config, adapter_name=names[0])
        for name in names[1:]:
            peft_model.add_adapter(name, config)
        peft_model.eval()
        adapters = [names[i % len(names)] for i in range(x.shape[0])]
        with torch.no_grad():
            seconds = timed(lambda: peft_model(x, adapter_names=adapters), repeat)
    except Exception as exc:  # PEFT refuses some layer kinds in mixed batches: say which
        return {"peft_mixed_img_s": None, "peft_note": f"{type(exc).__name__}: {exc}"[:200]}
    return {"peft_mixed_img_s": x.shape[0] / seconds,
            "peft_note": "per-task norms as modules_to_save" if norms else "base norms"}


def measure(manager: Any, base: str, row: Row, names: Sequence[str], batch: int, repeat: int,
            peer: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """One row at one N: memory, throughput and equivalence."""
    import torch

    from taps_cl.serving.multitask import build_multitask, footprint_of

    n = len(names)
    say(f"{row.label} N={n}: building the multi-task model")
    mt = build_multitask(manager, tasks=list(names))
    restored = [manager.restore(name) for name in names]
    generator = torch.Generator().manual_seed(0)
    size = next(iter(mt.tasks.values())).input_size
    x = torch.randn((batch, *size), generator=generator)
    out: dict[str, Any] = {"row": row.label, "method": row.method, "n": n, "batch": batch}
    footprint = mt.footprint()
    out["mt_bytes"] = footprint["bytes"]
    out["mt_numbers"] = footprint["numbers"]
    out["restored_bytes"] = footprint_of(restored)["bytes"]
    out["budget_numbers"] = budget_numbers(manager, base, names)
    out["mt_vs_budget"] = footprint["numbers"] / out["budget_numbers"]
    one = footprint_of(restored[:1])["bytes"]
    out["mt_vs_one_model"] = footprint["bytes"] / one
    plan = mt.plan()
    out["segments"] = len(plan.segments)
    out["plan_saving"] = plan.saving  # MACs of N separate passes / MACs of the shared tree
    with torch.no_grad():
        everything = [list(names)] * batch
        got = mt.forward(x, everything)
        worst = 0.0
        for i, model in enumerate(restored):
            want = model(x)
            mine = torch.stack([g[names[i]] for g in got])
            worst = max(worst, float((want - mine).abs().max()))
        out["max_abs_diff"] = worst
        say(f"{row.label} N={n}: timing")
        out["all_tasks_mt_img_s"] = batch / timed(lambda: mt.forward(x, everything), repeat)
        out["all_tasks_restored_img_s"] = batch / timed(
            lambda: [model(x) for model in restored], repeat)
        mixed = [[names[i % n]] for i in range(batch)]
        out["mixed_img_s"] = batch / timed(lambda: mt.forward(x, mixed), repeat)
        out["single_img_s"] = batch / timed(lambda: mt.forward(x, [[names[0]]] * batch), repeat)
        groups = {name: [i for i in range(batch) if i % n == k] for k, name in enumerate(names)}
        out["grouped_img_s"] = batch / timed(lambda: [
            mt.forward(x[rows], [[name]] * len(rows)) for name, rows in groups.items() if rows],
            repeat)
    if peer and row.method == "lora":
        out.update(peft_mixed(manager.get_base(base).model_spec, int(row.options.get("rank", 8)),
                              names, len(mt.tasks[names[0]].classes),
                              row.options.get("norms", "task") == "task", x, repeat))
    return out


# -------------------------------------------------------------------------------- building
def build_row(manager: Any, model: str, weights: str | None, row: Row, count: int,
              folders: Sequence[Path], img_size: int, say: Callable[[str], None]) -> tuple[
                  str, list[str]]:
    """A base of the row's own (progressive bands are per base) and `count` real tasks."""
    base = f"serve-{row.label}"
    try:
        manager.get_base(base)
    except RegistryError:  # not registered yet (or no registry yet): add_base creates both
        manager.add_base(base, model, weights=weights)
    names = [f"{row.label}-{k:02d}" for k in range(count)]
    have = {t.name for t in manager.list_tasks(base) if t.status == "ready"}
    for k, name in enumerate(names):
        if name in have:
            continue
        start = time.perf_counter()
        manager.add_task(name, base, f"imagefolder:{folders[k % len(folders)]}",
                         method=row.method, method_options=dict(row.options), epochs=1,
                         batch_size=16, img_size=img_size, seed=k, device="cpu", recheck=0)
        say(f"{row.label}: added {name} in {time.perf_counter() - start:.1f} s")
    return base, names


# ---------------------------------------------------------------------------------- report
COLUMNS = (
    ("row", "row", "{}"), ("N", "n", "{}"),
    ("multi-task MB", "mt_bytes", "mb"), ("N restored MB", "restored_bytes", "mb"),
    ("numbers vs budget", "mt_vs_budget", "{:.3f}×"), ("vs one model", "mt_vs_one_model",
                                                         "{:.2f}×"),
    ("all tasks img/s (multi)", "all_tasks_mt_img_s", "{:.1f}"),
    ("all tasks img/s (restored)", "all_tasks_restored_img_s", "{:.1f}"),
    ("speed-up", "all_speedup", "{:.2f}×"),
    ("mixed img/s", "mixed_img_s", "{:.1f}"), ("single-task img/s", "single_img_s", "{:.1f}"),
    ("mixed / single", "mixed_vs_single", "{:.2f}×"), ("grouped img/s", "grouped_img_s", "{:.1f}"),
    ("PEFT mixed img/s", "peft_mixed_img_s", "{:.1f}"),
    ("max |Δlogit|", "max_abs_diff", "{:.1e}"), ("segments", "segments", "{}"),
    ("MACs saved (plan)", "plan_saving", "{:.2f}×"),
)


def derive(rows: list[dict[str, Any]]) -> None:
    for r in rows:
        r["all_speedup"] = r["all_tasks_mt_img_s"] / r["all_tasks_restored_img_s"]
        r["mixed_vs_single"] = r["mixed_img_s"] / r["single_img_s"]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for _, key, fmt in COLUMNS:
            value = r.get(key)
            cells.append("—" if value is None else f"{value / 1e6:.1f}" if fmt == "mb"
                         else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {r['row']} N={r['n']}: PEFT {r['peft_note']}" for r in rows if r.get("peft_note")]
    return "\n".join(lines + ([""] + notes if notes else []))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=None, help="label=method:opt=val,… separated by ';' "
                   f"(default: {'; '.join(ROWS)})")
    p.add_argument("--sizes", default=None, help="numbers of tasks (default 1,8,32)")
    p.add_argument("--img-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="images in every timed batch")
    p.add_argument("--repeat", type=int, default=5, help="timed runs per figure (median)")
    p.add_argument("--home", help="keep the registry here (default: a temporary directory); a "
                   "kept home is reused by the next run")
    p.add_argument("--demo-home", help="also measure the registry of `taps-cl demo` (its home)")
    p.add_argument("--no-peft", action="store_true", help="skip PEFT's mixed-adapter batches")
    p.add_argument("--quick", action="store_true",
                   help="timm's tiny test model, N = 1, 3, two rows: a smoke run")
    p.add_argument("--plan", action="store_true", help="say what would be built, run nothing")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [Row.parse(t.strip()) for t in (args.rows.split(";") if args.rows else
                                           QUICK_ROWS if args.quick else ROWS)]
    sizes = sorted({int(s) for s in args.sizes.split(",")} if args.sizes else
                   set(QUICK_SIZES if args.quick else SIZES))
    count = max(sizes)
    if args.plan:
        minutes = len(rows) * count * PLAN_ADD_S / 60
        print(f"{len(rows)} rows × {count} real adds (≈ {minutes:.0f} min on Lite0), then "
              f"{len(rows) * len(sizes)} measurements at N = {sizes}")
        return 0

    def say(message: str) -> None:
        print(f"[serving] {message}", file=sys.stderr, flush=True)

    from taps_cl import Manager
    from taps_cl.demo import lite0_weights

    model = QUICK_MODEL if args.quick else LITE0
    weights = None if args.quick else str(lite0_weights())
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="taps-serving-") as tmp:
        home = Path(args.home) if args.home else Path(tmp) / "home"
        folders = [make_imagefolder(Path(tmp) / f"data{k}", seed=k) for k in range(4)]
        with Manager(home) as manager:
            for row in rows:
                base, names = build_row(manager, model, weights, row, count, folders,
                                        args.img_size, say)
                for n in sizes:
                    results.append(measure(manager, base, row, names[:n], args.batch,
                                           args.repeat, not args.no_peft, say))
        if args.demo_home:
            with Manager(args.demo_home) as demo:
                base = demo.only_base()
                names = [t.name for t in demo.list_tasks(base.name)]
                results.append(measure(demo, base.name, Row("demo", "demo", {}), names,
                                       args.batch, args.repeat, False, say))
    derive(results)
    print(json.dumps(results, indent=2) if args.json else table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
