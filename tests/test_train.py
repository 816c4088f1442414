"""fit(): seeding, validation-based selection, restoring the best epoch; evaluate() and logits()."""

from __future__ import annotations

import logging
import math

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import TensorDataset

from taps_cl.errors import DataError, MethodError
from taps_cl.methods.catalog import get_method
from taps_cl.methods.linear import Linear
from taps_cl.training.evaluate import EvalResult, evaluate, logits
from taps_cl.training.fit import FitResult, TrainConfig, fit

IMG = 32
CLASSES = 3


def make_dataset(n: int, seed: int) -> TensorDataset:
    """Images whose class is visible in their mean colour, so accuracy can move."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % CLASSES
    images = torch.randn(n, 3, IMG, IMG, generator=gen) * 0.5
    images[torch.arange(n), labels] += 1.0
    return TensorDataset(images, labels)


TRAIN = make_dataset(32, seed=0)
VAL = make_dataset(16, seed=1)


def prepared(method_name: str = "linear", method=None, **overrides):
    method = method or get_method(method_name, **overrides)
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=CLASSES)
    head = frozenset({"fc.weight", "fc.bias"})
    return method.prepare(model, head), method


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


class OnlyEpoch(Linear):
    """A linear probe whose selection is limited to one epoch (not registered)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def selectable(self, epoch: int, epochs: int) -> bool:
        return epoch == self.epoch


def test_fit_restores_the_selected_epoch():
    model, method = prepared(method=OnlyEpoch(0))
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, device="cpu")
    result = fit(model, method, TRAIN, VAL, cfg)

    assert isinstance(result, FitResult)
    assert result.best_epoch == 0
    assert [row["epoch"] for row in result.history] == [0, 1, 2]
    first, last = result.history[0], result.history[-1]
    assert first["val_loss"] != last["val_loss"]  # training moved on after epoch 0
    now = evaluate(model, VAL)
    assert now.accuracy == first["val_accuracy"] == result.best_val_accuracy
    assert now.loss == pytest.approx(first["val_loss"], abs=1e-6)


def test_fit_picks_best_selectable_epoch_by_validation():
    model, method = prepared("taps", warmup_epochs=1, lam=1.0)
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.01, device="cpu")
    result = fit(model, method, TRAIN, VAL, cfg)

    rows = result.history
    assert set(rows[0]) == {"epoch", "train_loss", "train_accuracy", "val_accuracy", "val_loss",
                            "active_layers", "seconds"}
    candidates = rows[1:]  # epoch 0 is the warm-up
    best = max(candidates, key=lambda r: (r["val_accuracy"], -r["val_loss"]))
    assert result.best_epoch == best["epoch"] >= 1
    assert result.best_val_accuracy == best["val_accuracy"]
    now = evaluate(model, VAL)
    assert now.loss == pytest.approx(best["val_loss"], abs=1e-6)
    assert method.active_layers(model) == best["active_layers"]
    assert all(0 <= r["train_accuracy"] <= 1 and r["seconds"] > 0 for r in rows)


def test_fit_is_reproducible_for_a_seed():
    results, states = [], []
    for _ in range(2):
        model, method = prepared("taps")
        cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, seed=7, device="cpu")
        results.append(fit(model, method, TRAIN, VAL, cfg))
        states.append(state_of(model))
    assert without_seconds(results[0].history) == without_seconds(results[1].history)
    assert results[0].best_epoch == results[1].best_epoch
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key

    model, method = prepared("taps")
    other = fit(model, method, TRAIN, VAL,
                TrainConfig(epochs=2, batch_size=16, lr=0.01, seed=8, device="cpu"))
    assert without_seconds(other.history) != without_seconds(results[0].history)


def test_fit_sgd_without_validation_keeps_last_epoch(caplog):
    model, method = prepared("finetune")
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.01, optimizer="sgd", device="cpu")
    with caplog.at_level(logging.INFO, logger="taps_cl.training.fit"):
        result = fit(model, method, TRAIN, None, cfg, progress=True)
    assert result.best_epoch == 1 and result.best_val_accuracy is None
    assert all(r["val_accuracy"] is None and "active_layers" not in r for r in result.history)
    assert "epoch 2/2" in caplog.text


def test_fit_when_no_epoch_is_selectable_uses_the_last():
    # Selection limited to an epoch that never runs: nothing is selectable, keep the last weights.
    model, method = prepared(method=OnlyEpoch(5))
    result = fit(model, method, TRAIN, VAL,
                 TrainConfig(epochs=3, batch_size=16, lr=0.05, device="cpu"))
    assert result.best_epoch == 2
    assert evaluate(model, VAL).loss == pytest.approx(result.history[-1]["val_loss"], abs=1e-6)


def training_batch_sizes(model: nn.Module) -> list[int]:
    """Sizes of the batches the model sees in train mode, recorded by a forward pre-hook."""
    sizes: list[int] = []
    model.register_forward_pre_hook(
        lambda module, args: sizes.append(args[0].shape[0]) if module.training else None
    )
    return sizes


def test_fit_drops_a_last_batch_of_one():
    # 17 samples at batch 16 would end with one sample, which BatchNorm cannot train on.
    model, method = prepared("taps")
    sizes = training_batch_sizes(model)
    result = fit(model, method, make_dataset(17, seed=2), VAL,
                 TrainConfig(epochs=2, batch_size=16, device="cpu"))
    assert sizes == [16, 16]  # one full batch per epoch; the single leftover sample is dropped
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    # Any other remainder is trained on: 18 samples give a last batch of 2.
    model, method = prepared("taps")
    sizes = training_batch_sizes(model)
    fit(model, method, make_dataset(18, seed=2), VAL,
        TrainConfig(epochs=1, batch_size=16, device="cpu"))
    assert sizes == [16, 2]


def test_fit_rejects_empty_training_set():
    model, method = prepared("linear")
    empty = TensorDataset(torch.zeros(0, 3, IMG, IMG), torch.zeros(0, dtype=torch.long))
    with pytest.raises(DataError, match="empty"):
        fit(model, method, empty, VAL, TrainConfig(epochs=1))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("epochs", 0, "epochs must be >= 1"),
        ("batch_size", 2.5, "batch_size must be an integer"),
        ("lr", 0.0, "lr must be > 0"),
        ("lr", float("inf"), "lr must be a finite number"),
        ("lr", float("nan"), "lr must be a finite number"),
        ("weight_decay", float("inf"), "weight_decay must be a finite number"),
        ("optimizer", "adam", "optimizer must be one of adamw, sgd"),
        ("weight_decay", -1, "weight_decay must be >= 0"),
        ("seed", "1", "seed must be an integer"),
        ("device", "toaster", "device must be 'auto' or a torch device"),
    ],
)
def test_train_config_validation(field, value, message):
    with pytest.raises(MethodError, match=message):
        TrainConfig(**{field: value})


def test_evaluate_and_logits_keep_mode_and_agree():
    model, method = prepared("linear")
    model.train()
    model.fc.eval()  # a mixed mode must come back unchanged
    result = evaluate(model, VAL, batch_size=10)
    assert isinstance(result, EvalResult) and result.num_samples == len(VAL)
    assert model.training and not model.fc.training

    images, labels = VAL.tensors
    out = logits(model, images, batch_size=7)
    assert out.shape == (len(VAL), CLASSES) and not out.requires_grad
    assert model.training
    expected = (out.argmax(1) == labels).float().mean().item()
    assert result.accuracy == pytest.approx(expected)
    loss = torch.nn.functional.cross_entropy(out, labels).item()
    assert result.loss == pytest.approx(loss, rel=1e-5)
    with pytest.raises(DataError):
        evaluate(model, TensorDataset(torch.zeros(0, 3, IMG, IMG), torch.zeros(0)))
