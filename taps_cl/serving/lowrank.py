"""Low-rank task deltas kept as factors: a layer run as base(x) + B·(A·x).

A task that stores `factor_b/<key>` and `factor_a/<key>` (B: out × r, A: r × in·k·k; see
docs/architecture.md, "What is stored") restores to a model whose weight `<key>` is W + B·A, a
full weight per task. The multi-task model puts the base layer back instead (its weight W is the
base's tensor, held once for every task) beside the two factors: a convolution with A viewed as
r filters of the layer's kernel (same stride, padding and dilation), then a 1×1 convolution with
B; for a Linear layer two matrix products. That is the same function up to float32 rounding
(checked against the task's probe logits when the task is loaded), at r·(out + in·k·k) numbers
instead of out·in·k·k.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from taps_cl.methods.base import FACTOR_A_PREFIX, FACTOR_B_PREFIX, SET_PREFIX


class LowRankDelta(nn.Module):
    """`base(x) + B·(A·x)` for a Conv2d (groups 1) or Linear `base` with the base's weight."""

    def __init__(self, base: nn.Module, factor_b: Tensor, factor_a: Tensor) -> None:
        super().__init__()
        self.base = base
        self.conv = isinstance(base, nn.Conv2d)
        weight = base.weight
        rank = factor_a.shape[0]
        shape_a = (rank, *weight.shape[1:]) if self.conv else (rank, weight.shape[1])
        shape_b = (weight.shape[0], rank, 1, 1) if self.conv else (weight.shape[0], rank)
        dtype = weight.dtype
        self.factor_a = nn.Parameter(factor_a.to(torch.float32).reshape(shape_a).to(dtype),
                                     requires_grad=False)
        self.factor_b = nn.Parameter(factor_b.to(torch.float32).reshape(shape_b).to(dtype),
                                     requires_grad=False)

    def delta(self, x: Tensor) -> Tensor:
        """B·(A·x): the task's change to the layer's output."""
        if not self.conv:
            return F.linear(F.linear(x, self.factor_a), self.factor_b)
        if type(self.base) is nn.Conv2d:
            z = self.base._conv_forward(x, self.factor_a, None)
        else:  # a subclass with its own padding rule (timm's Conv2dSame): its forward, A as weight
            z = functional_call(self.base, {"weight": self.factor_a, "bias": None}, (x,))
        return F.conv2d(z, self.factor_b)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.delta(x)

    def extra_macs(self, output: Tensor) -> int:
        """Multiply-accumulates of the factors (the base layer counts its own)."""
        out_features, rank = self.factor_b.shape[0], self.factor_b.shape[1]
        positions = output.numel() // out_features
        # A conv subclass runs A through its own forward, where its hooks count it already.
        rest = self.factor_a[0].numel() if type(self.base) in (nn.Conv2d, nn.Linear) else 0
        return positions * rank * (rest + out_features)


def keep_factors(model: nn.Module, tensors: dict[str, Tensor],
                 base_state: dict[str, Tensor]) -> list[str]:
    """Replace every layer of `model` whose weight folds a stored B·A by a `LowRankDelta` on the
    base weight, where the factors are smaller than the weight; returns the replaced layers.

    Layers with hooks, grouped convolutions and weights the task also replaces (`set/`) stay
    folded: their restored module is what the task runs.
    """
    replaced = []
    for name in sorted(tensors):
        if not name.startswith(FACTOR_B_PREFIX):
            continue
        key = name[len(FACTOR_B_PREFIX):]
        b, a = tensors[name], tensors.get(f"{FACTOR_A_PREFIX}{key}")
        path, _, attr = key.rpartition(".")
        if (a is None or attr != "weight" or f"{SET_PREFIX}{key}" in tensors
                or key not in base_state):
            continue
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            continue
        if not _factorable(layer) or b.numel() + a.numel() >= layer.weight.numel():
            continue
        if layer.weight.shape != base_state[key].shape or b.shape[0] * a.shape[1] != math.prod(
                layer.weight.shape):
            continue
        base = copy.deepcopy(layer)
        base.weight = nn.Parameter(base_state[key].to(layer.weight.dtype), requires_grad=False)
        model.set_submodule(path, LowRankDelta(base, b, a))
        replaced.append(path)
    return replaced


def _factorable(layer: nn.Module) -> bool:
    if layer._forward_hooks or layer._forward_pre_hooks:
        return False
    if isinstance(layer, nn.Conv2d):
        return layer.groups == 1
    return isinstance(layer, nn.Linear)
