"""Folding a task's stored tensors into the base: plain models and composed ones.

Stored tensor names say how they combine with the base: `delta/<key>` is added; `factor_b/<key>`
(out × r) and `factor_a/<key>` (r × rest) always come as a pair and add B·A reshaped to the weight
(a conv weight seen as out × in·k·k); `set/<key>` replaces the value; `module/<key>` is a tensor of
a module a composed method attaches. Narrower stored types (bfloat16) are cast to the base's."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from taps_cl.errors import MethodError
from taps_cl.methods.base import (
    DELTA_PREFIX,
    FACTOR_A_PREFIX,
    FACTOR_B_PREFIX,
    MODULE_PREFIX,
    SET_PREFIX,
    Dependency,
    Method,
)


def factor_product(b: Tensor, a: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The low-rank delta B·A reshaped to a weight's `shape`.

    TAPS's training forward and `merge_state` both use this one expression, so a restored weight
    is the trained one (not merely close to it).
    """
    return (b @ a).reshape(shape)


def merge_state(
    base_state: dict[str, Tensor], tensors: dict[str, Tensor], head: frozenset[str]
) -> dict[str, Tensor]:
    """A plain state dict for the task: base without its head, deltas added, `set/` replacing.

    The result loads with `strict=True` into the base architecture built with the task's number of
    classes. Base entries that the task does not change are shared with `base_state`, not copied.
    Stored tensors are cast to the base entry's type; B·A is computed in float32.
    """
    merged = {key: value for key, value in base_state.items() if key not in head}
    sets: dict[str, Tensor] = {}
    factors: dict[str, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(DELTA_PREFIX):
            key = name[len(DELTA_PREFIX):]
            base = merged.get(key)
            if base is None:
                raise MethodError(f"task delta {name!r} has no matching base weight")
            if base.shape != value.shape:
                raise MethodError(
                    f"task delta {name!r} has shape {tuple(value.shape)}, "
                    f"base weight has {tuple(base.shape)}"
                )
            merged[key] = base + value.to(device=base.device, dtype=base.dtype)
        elif name.startswith((FACTOR_B_PREFIX, FACTOR_A_PREFIX)):
            prefix = FACTOR_B_PREFIX if name.startswith(FACTOR_B_PREFIX) else FACTOR_A_PREFIX
            factors.setdefault(name[len(prefix):], {})[prefix] = value
        elif name.startswith(SET_PREFIX):
            sets[name[len(SET_PREFIX):]] = value
        else:
            raise MethodError(
                f"task tensor {name!r} is neither 'delta/…', 'factor_b/…', 'factor_a/…' "
                "nor 'set/…'"
            )
    for key, pair in factors.items():
        merged[key] = _fold_factors(merged, key, pair, has_delta=f"{DELTA_PREFIX}{key}" in tensors)
    # Replacements win over deltas: they hold the trained value itself.
    for key, value in sets.items():
        if key not in merged and key not in head:
            raise MethodError(f"task tensor 'set/{key}' has no matching base entry")
        reference = base_state.get(key)
        merged[key] = value if reference is None else value.to(dtype=reference.dtype)
    missing = sorted(head - merged.keys())
    if missing:
        raise MethodError(f"task state lacks head tensor(s) {missing}")
    return merged


def _fold_factors(
    merged: dict[str, Tensor], key: str, pair: dict[str, Tensor], has_delta: bool
) -> Tensor:
    """The weight `key` of `merged` plus B·A; MethodError for a lone or inconsistent factor."""
    b, a = pair.get(FACTOR_B_PREFIX), pair.get(FACTOR_A_PREFIX)
    if b is None or a is None:
        given, lacking = (FACTOR_B_PREFIX, FACTOR_A_PREFIX) if a is None else (
            FACTOR_A_PREFIX, FACTOR_B_PREFIX)
        raise MethodError(f"task tensor '{given}{key}' has no matching '{lacking}{key}'")
    base = merged.get(key)
    if base is None:
        raise MethodError(f"task factors of {key!r} have no matching base weight")
    if has_delta:
        raise MethodError(f"task stores both a delta and factors for {key!r}")
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise MethodError(
            f"task factors of {key!r} disagree on the rank: B {tuple(b.shape)}, A {tuple(a.shape)}"
        )
    if base.dim() == 0 or b.shape[0] != base.shape[0] or b.shape[0] * a.shape[1] != base.numel():
        raise MethodError(
            f"task factors of {key!r} give shape ({b.shape[0]}, {a.shape[1]}), "
            f"base weight has {tuple(base.shape)}"
        )
    # float32 like the training forward (bfloat16 factors are widened exactly), then the base type.
    f32 = {"device": base.device, "dtype": torch.float32}
    delta = factor_product(b.to(**f32), a.to(**f32), base.shape)
    return (base.to(torch.float32) + delta).to(base.dtype)


def build_composed(
    method: Method, model: nn.Module, head: frozenset[str], base_state: dict[str, Tensor],
    tensors: dict[str, Tensor], dependencies: Sequence[Dependency], example: Tensor,
) -> nn.Module:
    """A composed task's inference model, built in place on `model` (the base architecture with
    the task's number of classes): base merged with the task's `set/`/`delta/` tensors, the
    method's modules attached, the dependencies' and the task's own `module/` tensors loaded.

    Every attached tensor must be given exactly once: a missing or unknown one is a MethodError.
    """
    plain = {k: v for k, v in tensors.items() if not k.startswith(MODULE_PREFIX)}
    merged = merge_state(base_state, plain, head)
    model.load_state_dict(merged, strict=True)
    method.attach(model, head, dependencies, example)
    placed: dict[str, Tensor] = {}
    for dependency in dependencies:
        placed.update(method.dependency_state(dependency))
    # A dependency may also replace base entries (progressive: shared norm layers), never one
    # the task sets itself.
    clash = sorted(k for k in placed if f"{SET_PREFIX}{k}" in tensors)
    if clash:
        raise MethodError(f"{method.name}: the task and a dependency both set {clash[:3]}")
    placed.update({k[len(MODULE_PREFIX):]: v for k, v in tensors.items()
                   if k.startswith(MODULE_PREFIX)})
    state = model.state_dict()
    attached = set(state) - set(merged)
    missing, unknown = sorted(attached - set(placed)), sorted(set(placed) - set(state))
    if missing or unknown:
        raise MethodError(f"{method.name}: stored module tensors do not fit the attached modules "
                          f"(missing {missing[:3]}, unknown {unknown[:3]})")
    for key, value in placed.items():
        if state[key].shape != value.shape:
            raise MethodError(f"{method.name}: module tensor {key!r} has shape "
                              f"{tuple(value.shape)}, the model {tuple(state[key].shape)}")
    model.load_state_dict({**merged, **{k: v.to(state[k].dtype) for k, v in placed.items()}},
                          strict=True)
    return model.eval()
