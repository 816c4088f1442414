"""One readable training loop for every method: seeded, cosine schedule, selection on validation."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from taps_cl.training.distributed import SINGLE, Group
from taps_cl.errors import DataError, MethodError
from taps_cl.methods.base import Method
from taps_cl.methods.options import check_choice, check_number

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "sgd")
SGD_MOMENTUM = 0.9


@dataclass(frozen=True)
class TrainConfig:
    """How to train one task (the method's own options live in its Config)."""

    # Passes over the training set.
    epochs: int = 3
    # Samples per optimisation step.
    batch_size: int = 32
    # Peak learning rate of the cosine schedule (TAPS scores use their own score_lr).
    lr: float = 1e-3
    # "adamw" or "sgd" (SGD with momentum 0.9).
    optimizer: str = "adamw"
    # Weight decay of the trained parameters (decoupled for AdamW).
    weight_decay: float = 0.0
    # Seeds torch's RNG (head init done before fit is not affected) and the data order.
    seed: int = 0
    # "auto" (CUDA when available, else CPU), or a torch device such as "cpu", "cuda:0".
    device: str = "auto"
    # DataLoader worker processes for the training set (0 = load in the main process).
    num_workers: int = 0
    # Processes training together (torchrun's world size); each step every one takes its
    # batch_size / processes samples from its own shard of the training set.
    processes: int = 1

    def __post_init__(self) -> None:
        def fix(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        fix("epochs", check_number("train", "epochs", self.epochs, minimum=1, integer=True))
        fix("batch_size",
            check_number("train", "batch_size", self.batch_size, minimum=1, integer=True))
        fix("lr", check_number("train", "lr", self.lr, positive=True))
        fix("optimizer", check_choice("train", "optimizer", self.optimizer, OPTIMIZERS))
        fix("weight_decay", check_number("train", "weight_decay", self.weight_decay, minimum=0))
        fix("seed", check_number("train", "seed", self.seed, integer=True))
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


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device for a TrainConfig.device value; MethodError if it is not available.

    "auto" picks CUDA, then Apple's MPS, then the CPU. Only training uses it: every number the
    registry compares (restore check, probe logits) is computed on the CPU in float32.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise MethodError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MethodError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not _mps_available():
        raise MethodError(f"device {name!r} requested but Apple MPS is not available")
    return device


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


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Everything training can change: trainable parameters and all buffers (norm statistics)."""
    state = {name: p for name, p in model.named_parameters() if p.requires_grad}
    state.update(model.named_buffers())
    return state


def fit(
    model: nn.Module,
    method: Method,
    train_ds: Dataset,
    val_ds: Dataset | None,
    cfg: TrainConfig,
    progress: bool = False,
    group: Group = SINGLE,
) -> FitResult:
    """Train a model prepared by `method` and keep the weights of the best selectable epoch.

    Epochs are 0-based. Each history row holds `epoch`, `train_loss` (task loss, without the
    method's extra loss), `train_accuracy`, `val_accuracy`, `val_loss` (None without a validation
    set), `active_layers` (only for methods that report it) and `seconds`. The best epoch is the
    selectable one (`method.selectable`) with the highest validation accuracy, ties going to the
    lower validation loss and then to the earlier epoch; without a validation set it is the last
    selectable epoch. If the method allows no epoch, the last one is used.

    With a `group` of several processes (taps_cl.training.distributed) each trains on its shard through
    DistributedDataParallel; losses, accuracies and the validation score are reduced over the
    ranks, so every rank keeps the same epoch and ends with the same weights.
    """
    started = time.perf_counter()
    n_train = len(train_ds)  # type: ignore[arg-type]
    if n_train == 0:
        raise DataError("the training set is empty")
    has_val = val_ds is not None and len(val_ds) > 0  # type: ignore[arg-type]
    if cfg.processes != group.world_size:
        raise MethodError(f"train: configured for {cfg.processes} process(es), running in "
                          f"{group.world_size}")
    device = resolve_device(cfg.device)
    model.to(device)
    net = group.wrap(model)  # DistributedDataParallel across processes, else the model itself

    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = group.sampler(train_ds, cfg.seed)  # this rank's shard; None: the loader shuffles
    per_step = cfg.batch_size // group.world_size  # samples this process takes per step
    shard = n_train if sampler is None else len(sampler)
    # A final batch of one sample breaks BatchNorm in train mode; drop it only in that case.
    drop_last = shard > per_step and shard % per_step == 1
    loader = DataLoader(train_ds, batch_size=per_step, shuffle=sampler is None, sampler=sampler,
                        generator=generator, drop_last=drop_last, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")

    groups = method.param_groups(model, cfg.lr, cfg.weight_decay)
    if not any(p.requires_grad for g in groups for p in g["params"]):
        raise MethodError(f"{method.name}: nothing to train (no trainable parameters)")
    optimizer = make_optimizer(groups, cfg)
    total_steps = cfg.epochs * len(loader)
    scheduler = LambdaLR(optimizer, cosine_schedule(total_steps))

    selectable = [e for e in range(cfg.epochs) if method.selectable(e, cfg.epochs)]
    selectable = selectable or [cfg.epochs - 1]
    best_epoch, best_key, best_state = -1, None, None
    history: list[dict] = []
    bar = tqdm(total=total_steps, disable=not progress, unit="step", dynamic_ncols=True,
               desc=f"{method.name}")
    try:
        for epoch in range(cfg.epochs):
            epoch_start = time.perf_counter()
            if sampler is not None:
                sampler.set_epoch(epoch)  # a new order each epoch, the same on every rank
            method.set_train_mode(model)
            loss_sum, correct, seen = 0.0, 0, 0
            for inputs, labels in loader:
                inputs = inputs.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                outputs = net(inputs)
                loss = F.cross_entropy(outputs, labels)
                extra = method.extra_loss(model, epoch)
                objective = loss if extra is None else loss + extra
                optimizer.zero_grad(set_to_none=True)
                objective.backward()
                optimizer.step()
                method.after_step(model, epoch)
                scheduler.step()

                batch_loss = loss.item()
                if not math.isfinite(batch_loss):
                    raise MethodError(f"training loss became {batch_loss} in epoch {epoch}; "
                                      f"try a lower learning rate")
                loss_sum += batch_loss * labels.numel()
                correct += (outputs.detach().argmax(dim=1) == labels).sum().item()
                seen += labels.numel()
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{batch_loss:.3f}", refresh=False)

            loss_sum, correct, seen = group.all_sum(loss_sum, correct, seen)
            group.sync_buffers(model)  # rank 0's norm statistics everywhere: one model to judge
            row: dict = {
                "epoch": epoch,
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "val_accuracy": None,
                "val_loss": None,
            }
            if has_val:
                result = group.evaluate(model, val_ds, batch_size=2 * cfg.batch_size)
                row["val_accuracy"], row["val_loss"] = result.accuracy, result.loss
            active = method.active_layers(model)
            if active is not None:
                row["active_layers"] = active

            if epoch in selectable:
                key = (row["val_accuracy"], -row["val_loss"]) if has_val else (epoch,)
                if best_key is None or key > best_key:
                    best_epoch, best_key = epoch, key
                    best_state = {k: v.detach().clone()
                                  for k, v in trainable_state(model).items()}
            row["seconds"] = time.perf_counter() - epoch_start
            history.append(row)
            logger.info(
                "epoch %d/%d: train loss %.4f acc %.4f, val acc %s%s (%.1fs)",
                epoch + 1, cfg.epochs, row["train_loss"], row["train_accuracy"],
                "-" if row["val_accuracy"] is None else f"{row['val_accuracy']:.4f}",
                "" if active is None else f", {active} active layers", row["seconds"],
            )
    finally:
        bar.close()

    if best_state is not None and best_epoch != cfg.epochs - 1:
        with torch.no_grad():
            for key, tensor in trainable_state(model).items():
                tensor.copy_(best_state[key])
    logger.info("kept epoch %d of %d", best_epoch + 1, cfg.epochs)
    best_val = history[best_epoch]["val_accuracy"]
    return FitResult(best_epoch=best_epoch, best_val_accuracy=best_val, history=history,
                     seconds=time.perf_counter() - started)
