"""Accuracy and loss of a model on a dataset, and raw outputs on a batch (probe logits)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from taps_cl.errors import DataError


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and mean cross-entropy of a model over a dataset."""

    accuracy: float  # fraction of samples whose arg-max logit is the label, in [0, 1]
    loss: float  # mean cross-entropy per sample
    num_samples: int  # how many samples were evaluated


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model without any)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode and give every submodule back its own mode afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        # Per module, because a method may train with a mix (e.g. linear probe: all eval).
        for module, training in modes:
            module.training = training


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> EvalResult:
    """Accuracy and loss of `model` on `dataset` of (image tensor, int label), in eval mode."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise DataError("cannot evaluate on an empty dataset")
    device = model_device(model)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    correct = 0
    total_loss = 0.0
    count = 0
    with eval_mode(model), torch.no_grad():
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            out = model(inputs)
            total_loss += F.cross_entropy(out, labels, reduction="sum").item()
            correct += (out.argmax(dim=1) == labels).sum().item()
            count += labels.numel()
    return EvalResult(accuracy=correct / count, loss=total_loss / count, num_samples=count)


def logits(model: nn.Module, inputs: Tensor, batch_size: int = 256) -> Tensor:
    """Outputs of `model` on `inputs` [N, 3, H, W] in eval mode without gradients, on the CPU."""
    device = model_device(model)
    outs = []
    with eval_mode(model), torch.no_grad():
        for chunk in torch.split(inputs, batch_size):
            outs.append(model(chunk.to(device)).float().cpu())
    if not outs:
        raise DataError("no inputs to compute logits for")
    return torch.cat(outs)
