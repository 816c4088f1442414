"""One readable training loop for every method: seeded, cosine schedule, selection on validation.

A run that diverges is stopped, never recorded: a training loss that is non-finite or above
DIVERGED_LOSS_FACTOR × the loss of guessing (ln C for C classes), or a non-finite trained parameter
after a step, raises `TrainingDiverged` (one line naming the epoch and step and the remedies: a
lower learning rate, or gradient clipping with `clip_grad`). So does a run that collapses with a
finite loss: one whose training loss fell well below the loss of guessing (its running mean under
COLLAPSE_LEARNT × ln C) and later spent a whole epoch at or above ln C — a model that has gone back
to predicting one class or noise.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from taps_cl.errors import DataError, MethodError
from taps_cl.methods.base import Method
from taps_cl.methods.options import check_choice, check_number, option
from taps_cl.training.device import resolve_device
from taps_cl.training.distributed import SINGLE, RankGroup

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9

# Upper bounds of the counts a run is given. A count beyond them cannot be what the user meant,
# and the run would die of memory (or overflow) only after its row was recorded: the command line
# refuses them as usage errors (the declarations' maximum) and TrainConfig in __post_init__.
# Epochs: the loop keeps a list and a history row per epoch and a cosine schedule over
# epochs × steps; 100,000 passes is far past any useful run (the benchmark uses 3) and still
# a few MB of bookkeeping.
MAX_EPOCHS = 100_000
# Samples per step, over all processes: the benchmark uses 32. With a 224-px base one step's
# input at the cap is 4096·3·224² floats (2.5 GB; evaluation takes batches twice as large);
# every batch must also fit `MAX_BATCH_FLOATS` at the run's input size (tasks/requests.py).
MAX_BATCH_SIZE = 4096
# Seeds: torch's generators take at most 2^64 - 1 and the loop seeds member i with seed + i;
# numpy's legacy seeds stop at 2^32 - 1, the bound every tool agrees on.
MAX_SEED = 2**32 - 1


# A batch's cross-entropy above this many times ln C (at least 1) means divergence: a model that
# guesses scores ln C, and a loss a thousand times that needs logit margins in the thousands.
# Seen on timm's test_efficientnet at --lr 1e6: losses of 4e13 for three epochs, all finite,
# ending at chance accuracy; a sound run's batch losses stay within a few times ln C.
DIVERGED_LOSS_FACTOR = 1000.0


# A run has learnt once the running mean of its batch losses (an exponential mean, weight LOSS_EMA
# per batch) is below COLLAPSE_LEARNT × ln C; an epoch whose mean loss is then back at ln C or more
# has collapsed. Seen: compact TAPS with the base's BatchNorm statistics at lr 3e-3 ended at 10 %
# on 10 classes with a finite loss, and was recorded, before this check.
COLLAPSE_LEARNT = 0.5
LOSS_EMA = 0.1


def collapsed(epoch_loss: float, lowest_running: float, classes: int) -> bool:
    """Whether an epoch's mean training loss is back at chance after the run had learnt."""
    if classes < 2:
        return False
    chance = math.log(classes)
    return epoch_loss >= chance and lowest_running < COLLAPSE_LEARNT * chance


def loss_ceiling(classes: int) -> float:
    """The largest training loss of a run that has not diverged, for `classes` classes."""
    return DIVERGED_LOSS_FACTOR * max(1.0, math.log(max(classes, 1)))


class TrainingDiverged(MethodError):
    """Training went non-finite (a learning rate too high for the method and data, usually).

    A MethodError: the options given cannot train this task; the caller records nothing.
    """


@dataclass(frozen=True)
class TrainConfig:
    """How to train one task (the method's own options live in its Config)."""

    # Passes over the training set.
    epochs: int = option(3, "Passes over the training set.", minimum=1, maximum=MAX_EPOCHS)
    # Samples per optimisation step.
    batch_size: int = option(32, "Samples per optimisation step.", minimum=1,
                             maximum=MAX_BATCH_SIZE)
    # Peak learning rate of the cosine schedule (TAPS scores use their own score_lr).
    # (`task add` and `group train`: the method's own default where it has one,
    # Method.train_defaults)
    lr: float = option(
        1e-3, "Peak learning rate of the cosine schedule.", minimum=0, open_minimum=True,
        method_default="the method's: 3e-3 for adapter (the default method) and lora; 1e-2 "
        "for compact TAPS and fusion; else 1e-3")
    # "adamw" or "sgd" (SGD with momentum 0.9).
    optimizer: str = option("adamw", "adamw, or sgd (with momentum 0.9).", choices=OPTIMIZERS)
    # Weight decay of the trained parameters (decoupled for AdamW).
    weight_decay: float = option(0.0, "Weight decay of the trained parameters.", minimum=0)
    # Most the gradients' total (L2) norm may be before a step: larger ones are scaled down to it
    # (torch.nn.utils.clip_grad_norm_ over every trained parameter). None or 0: no clipping.
    # (`task add` and `group train`: the method's own default where it has one, as for lr)
    clip_grad: float | None = option(
        None, "Clip the gradients' total norm to this before each step; 0 turns clipping off.",
        minimum=0, method_default="the method's: 1.0 for adapter and fusion; else off")
    # Seeds torch's RNG (head init done before fit is not affected) and the data order.
    seed: int = option(0, "Seeds the data split, the data order and the initialisation.",
                       minimum=0, maximum=MAX_SEED)
    # "auto" (CUDA when available, else CPU), or a torch device such as "cpu", "cuda:0".
    device: str = option(
        "auto", "Where training runs: auto, cpu, cuda, cuda:N or mps (checks run on the CPU).")
    # DataLoader worker processes for the training set (0 = load in the main process).
    num_workers: int = 0
    # Processes training together (torchrun's world size); each step every one takes its
    # batch_size / processes samples from its own shard of the training set.
    processes: int = 1

    def __post_init__(self) -> None:
        def fix(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        fix("epochs", check_number("train", "epochs", self.epochs, minimum=1,
                                   maximum=MAX_EPOCHS, integer=True))
        fix("batch_size", check_number("train", "batch_size", self.batch_size, minimum=1,
                                       maximum=MAX_BATCH_SIZE, integer=True))
        fix("lr", check_number("train", "lr", self.lr, positive=True))
        fix("optimizer", check_choice("train", "optimizer", self.optimizer, OPTIMIZERS))
        fix("weight_decay", check_number("train", "weight_decay", self.weight_decay, minimum=0))
        if self.clip_grad is not None:
            fix("clip_grad", check_number("train", "clip_grad", self.clip_grad, minimum=0))
        fix("seed", check_number("train", "seed", self.seed, minimum=0, maximum=MAX_SEED,
                                 integer=True))
        fix("num_workers",
            check_number("train", "num_workers", self.num_workers, minimum=0, integer=True))
        fix("processes",
            check_number("train", "processes", self.processes, minimum=1, integer=True))
        if self.batch_size % self.processes:
            raise MethodError(f"train: batch_size {self.batch_size} does not split evenly over "
                              f"{self.processes} processes")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise MethodError(f"train: device must be 'auto' or a torch device, got "
                                  f"{self.device!r}") from exc


@dataclass
class FitResult:
    """Outcome of `fit`; the model holds the weights of `best_epoch` afterwards."""

    best_epoch: int  # 0-based epoch whose weights were kept
    best_val_accuracy: float | None  # its validation accuracy (None without a validation set)
    history: list[dict] = field(default_factory=list)  # one row per epoch, see `fit`
    seconds: float = 0.0  # wall-clock time of the whole fit


def make_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg` names over parameter `groups` (AdamW, or SGD with momentum)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=SGD_MOMENTUM,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def cosine_schedule(total_steps: int):
    """LambdaLR factor: cosine decay from 1 to 0 over `total_steps`."""
    def factor(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return factor


def finite(params: Sequence[Tensor]) -> bool:
    """Whether every number of `params` is finite (the largest magnitude: no overflow, one
    device synchronisation)."""
    largest = torch.nn.utils.get_total_norm(params, norm_type=math.inf)
    return bool(torch.isfinite(largest))


def diverged(epoch: int, step: int, what: str, cfg: TrainConfig) -> TrainingDiverged:
    """The one-line error of a run that went non-finite at `step` (0-based) of `epoch`."""
    clip = "a lower --clip-grad" if cfg.clip_grad else "set --clip-grad"
    return TrainingDiverged(f"training diverged at epoch {epoch + 1}, step {step + 1} ({what}): "
                            f"lower --lr or {clip}")


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Everything training can change: trainable parameters and all buffers (norm statistics)."""
    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state.update(model.named_buffers())
    return state


@dataclass(frozen=True)
class Member:
    """One task model of a training run and what it trains on.

    Several members may share modules (the same Python objects): `fit_tied` optimises every
    shared parameter once and descends the mean of the members' losses.
    """

    model: nn.Module
    method: Method
    train: Dataset
    val: Dataset | None


def fit(
    model: nn.Module,
    method: Method,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig,
    progress: bool = False,
    group: RankGroup = SINGLE,
) -> FitResult:
    """Train one model prepared by `method` and keep the weights of its best selectable epoch.

    `fit_tied` with one member; see there. With a `group` of several processes
    (taps_cl.training.distributed) each trains on its shard through DistributedDataParallel;
    losses, accuracies and the validation score are reduced over the ranks, so every rank keeps
    the same epoch and ends with the same weights.
    """
    return fit_tied([Member(model, method, train_ds, val_ds)], cfg, progress, group)[0]


def fit_tied(
    members: Sequence[Member],
    cfg: TrainConfig,
    progress: bool = False,
    group: RankGroup = SINGLE,
) -> list[FitResult]:
    """The training loop of every task: one model, or several that share modules.

    Each step takes one batch of every member (a member whose training set is used up starts it
    again; an epoch is as many steps as the largest set has batches) and descends the mean over
    members of task loss + the method's `extra_loss` (gradients clipped to `clip_grad` if set);
    then every method's `after_step` runs. A diverging run (see the module docstring) raises
    `TrainingDiverged` at once. A
    member's history holds one row per epoch (0-based): `epoch`, `train_loss` (task loss only),
    `train_accuracy`, `val_accuracy`, `val_loss` (None without a validation set), `active_layers`
    (for methods that report it) and `seconds`. The epoch kept is one every method calls
    `selectable` with the highest mean validation accuracy, ties going to the lower mean loss,
    then to the earlier epoch; without validation sets, the last selectable one (if no epoch is
    selectable, the last).
    """
    started = time.perf_counter()
    if not members:
        raise MethodError("train: no model to train")
    if len(members) > 1 and group.distributed:
        raise MethodError("train: tied models train in one process")
    for member in members:
        if len(member.train) == 0:  # type: ignore[arg-type]
            raise DataError("the training set is empty")
    has_val = all(m.val is not None and len(m.val) > 0 for m in members)  # type: ignore[arg-type]
    if cfg.processes != group.world_size:
        raise MethodError(f"train: configured for {cfg.processes} process(es), running in "
                          f"{group.world_size}")
    device = resolve_device(cfg.device)
    for member in members:
        member.model.to(device)
    # DistributedDataParallel across processes, else the model itself.
    nets = [group.wrap(m.model) for m in members]

    torch.manual_seed(cfg.seed)
    samplers, loaders = [], []
    per_step = cfg.batch_size // group.world_size  # samples this process takes per step
    for i, member in enumerate(members):
        sampler = group.sampler(member.train, cfg.seed)  # this rank's shard; None: shuffle
        shard = len(member.train) if sampler is None else len(sampler)  # type: ignore[arg-type]
        # A final batch of one sample breaks BatchNorm in train mode; drop it only in that case.
        drop_last = shard > per_step and shard % per_step == 1
        samplers.append(sampler)
        loaders.append(DataLoader(
            member.train, batch_size=per_step, shuffle=sampler is None, sampler=sampler,
            generator=torch.Generator().manual_seed(cfg.seed + i), drop_last=drop_last,
            num_workers=cfg.num_workers, pin_memory=device.type == "cuda"))

    seen_params: set[int] = set()
    groups = []
    for member in members:  # a parameter shared by several members is optimised once
        for g in member.method.param_groups(member.model, cfg.lr, cfg.weight_decay):
            params = [p for p in g["params"] if id(p) not in seen_params]
            seen_params.update(id(p) for p in params)
            if params:
                groups.append({**g, "params": params})
    if not any(p.requires_grad for g in groups for p in g["params"]):
        names = ", ".join(sorted({m.method.name for m in members}))
        raise MethodError(f"{names}: nothing to train (no trainable parameters)")
    trained = [p for g in groups for p in g["params"] if p.requires_grad]
    optimizer = make_optimizer(groups, cfg)
    steps = max(len(loader) for loader in loaders)
    total_steps = cfg.epochs * steps
    scheduler = LambdaLR(optimizer, cosine_schedule(total_steps))

    selectable = [e for e in range(cfg.epochs)
                  if all(m.method.selectable(e, cfg.epochs) for m in members)]
    selectable = selectable or [cfg.epochs - 1]
    best_epoch, best_key, best_state = -1, None, None
    histories: list[list[dict]] = [[] for _ in members]
    # Per member: the running mean of its batch losses, its lowest value, the classes (collapse).
    running: list[float | None] = [None for _ in members]
    lowest = [math.inf for _ in members]
    classes = [0 for _ in members]
    desc = members[0].method.name if len(members) == 1 else f"{len(members)} tasks"
    bar = tqdm(total=total_steps, disable=not progress, unit="step", dynamic_ncols=True,
               desc=desc)
    try:
        for epoch in range(cfg.epochs):
            epoch_start = time.perf_counter()
            for sampler in samplers:
                if sampler is not None:
                    sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank
            for member in members:
                member.method.set_train_mode(member.model)
            iters = [iter(loader) for loader in loaders]
            sums = [[0.0, 0, 0] for _ in members]  # loss sum, correct, seen
            for step in range(steps):
                objectives, losses, sizes, ceilings = [], [], [], []
                for i, (member, net) in enumerate(zip(members, nets)):
                    try:
                        inputs, labels = next(iters[i])
                    except StopIteration:
                        iters[i] = iter(loaders[i])
                        inputs, labels = next(iters[i])
                    inputs = inputs.to(device, non_blocking=True)
                    labels = labels.to(device, non_blocking=True)
                    outputs = net(inputs)
                    loss = F.cross_entropy(outputs, labels)
                    extra = member.method.extra_loss(member.model, epoch)
                    objectives.append(loss if extra is None else loss + extra)
                    losses.append(loss)
                    sizes.append(labels.numel())
                    ceilings.append(loss_ceiling(outputs.shape[1]))
                    classes[i] = outputs.shape[1]
                    sums[i][1] += (outputs.detach().argmax(dim=1) == labels).sum().item()
                    sums[i][2] += labels.numel()
                batch_losses = [loss.item() for loss in losses]
                bad = next((v for v, top in zip(batch_losses, ceilings)
                            if not (math.isfinite(v) and v <= top)), None)
                if bad is not None:
                    raise diverged(epoch, step, f"loss {bad:.3g}", cfg)
                objective = objectives[0] if len(objectives) == 1 else \
                    torch.stack(objectives).mean()
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(trained, cfg.clip_grad)
                optimizer.step()
                if not finite(trained):
                    raise diverged(epoch, step, "parameters non-finite", cfg)
                for member in members:
                    member.method.after_step(member.model, epoch)
                scheduler.step()
                for i, (value, size) in enumerate(zip(batch_losses, sizes)):
                    sums[i][0] += value * size
                    before = running[i]
                    running[i] = value if before is None else before + LOSS_EMA * (value - before)
                    lowest[i] = min(lowest[i], running[i])
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{sum(batch_losses) / len(batch_losses):.3f}",
                                refresh=False)

            keys = []
            for i, member in enumerate(members):
                loss_sum, correct, seen, low = group.all_sum(*sums[i][:3], lowest[i])
                low /= group.world_size  # the ranks' mean: every rank decides alike
                if collapsed(loss_sum / seen, low, classes[i]):
                    raise diverged(epoch, steps - 1, f"loss {loss_sum / seen:.3g} back at chance, "
                                   f"ln {classes[i]} = {math.log(classes[i]):.3g}, after "
                                   f"{low:.3g}", cfg)
                # rank 0's norm statistics everywhere: one model to judge
                group.sync_buffers(member.model)
                row: dict = {"epoch": epoch, "train_loss": loss_sum / seen,
                             "train_accuracy": correct / seen, "val_accuracy": None,
                             "val_loss": None}
                if has_val:
                    result = group.evaluate(member.model, member.val,
                                            batch_size=2 * cfg.batch_size)
                    row["val_accuracy"], row["val_loss"] = result.accuracy, result.loss
                    keys.append((result.accuracy, result.loss))
                active = member.method.active_layers(member.model)
                if active is not None:
                    row["active_layers"] = active
                row["seconds"] = time.perf_counter() - epoch_start
                histories[i].append(row)
                logger.info(
                    "epoch %d/%d%s: train loss %.4f acc %.4f, val acc %s%s (%.1fs)",
                    epoch + 1, cfg.epochs, "" if len(members) == 1 else f", model {i + 1}",
                    row["train_loss"], row["train_accuracy"],
                    "-" if row["val_accuracy"] is None else f"{row['val_accuracy']:.4f}",
                    "" if active is None else f", {active} active layers", row["seconds"],
                )
            if epoch in selectable:
                key = ((sum(a for a, _ in keys) / len(keys), -sum(v for _, v in keys) / len(keys))
                       if has_val else (epoch,))
                if best_key is None or key > best_key:
                    best_epoch, best_key = epoch, key
                    best_state = [{k: v.detach().clone()
                                   for k, v in trainable_state(m.model).items()}
                                  for m in members]
    finally:
        bar.close()

    if best_state is not None and best_epoch != cfg.epochs - 1:
        with torch.no_grad():
            for member, state in zip(members, best_state):
                for key, tensor in trainable_state(member.model).items():
                    tensor.copy_(state[key])
    logger.info("kept epoch %d of %d", best_epoch + 1, cfg.epochs)
    seconds = time.perf_counter() - started
    return [FitResult(best_epoch=best_epoch, best_val_accuracy=h[best_epoch]["val_accuracy"],
                      history=h, seconds=seconds) for h in histories]
