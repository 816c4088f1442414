"""Finding a model's layers and copying their state: what every method needs from a backbone.

`adaptable_layers` (every Conv2d/Linear but the head) and `norm_layers` (BatchNorm-like, LayerNorm,
GroupNorm) define what a task may change; the rest freezes, unfreezes and copies tensors. What a
task does with its norm layers is its norm policy (`taps_cl.methods.norms`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from taps_cl.errors import MethodError
from taps_cl.methods.base import SET_PREFIX

# Norm layers: what a task does with them is its norm policy (methods/norms.py).
NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm)


def _is_head(name: str, module: nn.Module, head: frozenset[str]) -> bool:
    prefix = f"{name}." if name else ""
    return any(f"{prefix}{key}" in head for key, _ in module.named_parameters(recurse=False))


def adaptable_layers(model: nn.Module, head: frozenset[str]) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear (subclasses included) in module order, except the classifier head."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not _is_head(name, module, head)
    ]


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-like (_NormBase), LayerNorm and GroupNorm module, subclasses included."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def layer_kind(module: nn.Module) -> str:
    """The `LayerRecord.kind` of an adaptable layer."""
    return "conv2d" if isinstance(module, nn.Conv2d) else "linear"


def head_parameters(model: nn.Module, head: frozenset[str]) -> list[nn.Parameter]:
    """The parameters of the classifier head; MethodError if `head` names none of them."""
    params = [p for name, p in model.named_parameters() if name in head]
    if not params:
        raise MethodError(f"the model has none of the head parameters {sorted(head)}")
    return params


def cpu_copy(tensor: Tensor) -> Tensor:
    """A detached, contiguous CPU copy: safe to serialise, shares nothing with the model."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def stored_copy(value: Tensor, dtype: torch.dtype) -> Tensor:
    """A CPU copy of `value` as stored: floating point in `dtype`, integers unchanged."""
    copy = cpu_copy(value)
    return copy.to(dtype) if copy.is_floating_point() else copy


def module_state(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    """State-dict entries (parameters, persistent buffers) of one module, keyed as in the model."""
    dotted = f"{prefix}." if prefix else ""
    return {f"{dotted}{key}": value for key, value in module.state_dict().items()}


def head_state(model: nn.Module, head: frozenset[str]) -> dict[str, Tensor]:
    """`set/` tensors for every head key of `model`."""
    state = model.state_dict()
    missing = sorted(head - state.keys())
    if missing:
        raise MethodError(f"the model has no head key(s) {missing}")
    return {f"{SET_PREFIX}{key}": cpu_copy(state[key]) for key in sorted(head)}


def trainable(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Mark `params` trainable and return them."""
    for p in params:
        p.requires_grad_(True)
    return params


def freeze(model: nn.Module) -> None:
    """Make every parameter of `model` frozen."""
    for p in model.parameters():
        p.requires_grad_(False)


def block_params(model: nn.Module) -> dict[str, int]:
    """Parameter count of every module of `model` by name (for LayerRecord.base_params)."""
    return {name: sum(p.numel() for p in m.parameters()) for name, m in model.named_modules()}
