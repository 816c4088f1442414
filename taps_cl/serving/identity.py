"""When two tasks hold the same tensor, and when two of their modules compute the same function.

`TensorPool` keeps one tensor per content (dtype, shape and bytes, by sha256): every task model
the multi-task model loads has its parameters and buffers replaced by the pool's tensor of the
same content, so the base's weights, a shared progressive band or a fused task's adapters are held
once however many tasks read them — whatever method stored them and however they were rebuilt.

`module_key` says what a module computes in eval mode, as a digest of its class, its plain
attributes (stride, eps, …), the digests of its tensors, its children's keys and the modules its
forward hooks call (a composed method's adapters act through hooks on the blocks). Two modules
with equal keys compute the same function; a hook that is not a bound method of a module cannot
be compared and makes its module's key unique, so nothing is shared through it by mistake.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

# What every nn.Module keeps in its __dict__ (tensors, children and hooks are compared on their
# own); every other attribute, private ones included, is part of what a module computes.
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"training"}
HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
              "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def digest(tensor: Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(memoryview(data))
    return h.hexdigest()


class TensorPool:
    """One tensor per content, on one device; see the module docstring."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._tensors: dict[str, Tensor] = {}  # digest → the canonical tensor (on `device`)
        self._params: dict[str, nn.Parameter] = {}  # digest → its Parameter wrapper
        self._digests: dict[int, str] = {}  # id of a canonical tensor or wrapper → digest
        self._seeds: dict[str, Tensor] = {}  # digest → a CPU tensor to adopt when first needed

    def seed(self, tensors: Mapping[str, Tensor]) -> None:
        """Offer tensors by digest (e.g. the base's cached state) as the canonical copies of
        their content, so the pool holds them instead of equal copies made later."""
        for d, t in tensors.items():
            if d not in self._tensors:
                self._seeds.setdefault(d, t)

    def digest_of(self, tensor: Tensor) -> str:
        """The digest of a tensor (looked up for canonical ones, computed for others)."""
        known = self._digests.get(id(tensor))
        return known if known is not None else digest(tensor)

    def canonical(self, tensor: Tensor, parameter: bool) -> Tensor:
        """The pool's tensor with `tensor`'s content (a frozen Parameter for parameters)."""
        d = self._digests.get(id(tensor)) or digest(tensor)
        value = self._tensors.get(d)
        if value is None:
            source = self._seeds.pop(d, tensor).detach()
            value = source if source.device == self.device else source.to(self.device)
            self._tensors[d] = value
            self._digests[id(value)] = d
        if not parameter:
            return value
        param = self._params.get(d)
        if param is None:
            param = nn.Parameter(value, requires_grad=False)
            self._params[d] = param
            self._digests[id(param)] = d
        return param

    def adopt(self, model: nn.Module) -> None:
        """Replace every parameter and buffer of `model` by the pool's tensor of equal content."""
        for module in model.modules():
            for name, value in list(module._parameters.items()):
                if value is not None:
                    module._parameters[name] = self.canonical(value, parameter=True)
            for name, value in list(module._buffers.items()):
                if value is not None:
                    module._buffers[name] = self.canonical(value, parameter=False)

    def prune(self, models: Iterable[nn.Module]) -> None:
        """Forget seeds and every canonical tensor none of `models` holds any more."""
        used = {self._digests[id(t)] for m in models for t in _tensors(m)
                if id(t) in self._digests}
        self._seeds.clear()
        for d in [d for d in self._tensors if d not in used]:
            value = self._tensors.pop(d)
            self._digests.pop(id(value), None)
            param = self._params.pop(d, None)
            if param is not None:
                self._digests.pop(id(param), None)


def _tensors(model: nn.Module) -> Iterable[Tensor]:
    for module in model.modules():
        yield from (t for t in module._parameters.values() if t is not None)
        yield from (t for t in module._buffers.values() if t is not None)


def _attr(value: Any, pool: TensorPool) -> str:
    """A plain attribute as text; tensors (also inside containers) by digest, since a large
    tensor's repr is abridged."""
    if isinstance(value, Tensor):
        return f"tensor:{pool.digest_of(value)}"
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return f"{type(value).__name__}[{','.join(_attr(v, pool) for v in items)}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k!r}:{_attr(v, pool)}" for k, v in value.items()) + "}"
    return repr(value)


def hook_owners(module: nn.Module) -> list[tuple[str, str, nn.Module | None]]:
    """(hook kind, function name, the module it is a bound method of, or None) of every forward
    hook and pre-hook on `module`, in registration order."""
    out = []
    for kind in HOOK_DICTS:
        for hook in getattr(module, kind, {}).values():
            if isinstance(hook, bool):  # the *_with_kwargs / always_called dicts hold flags
                continue
            owner = getattr(hook, "__self__", None)
            func = getattr(hook, "__func__", hook)
            out.append((kind, getattr(func, "__qualname__", repr(func)),
                        owner if isinstance(owner, nn.Module) else None))
    return out


class KeyCache:
    """Module keys (see the module docstring), memoised by module id for one pass."""

    def __init__(self, pool: TensorPool) -> None:
        self.pool = pool
        self._keys: dict[int, str] = {}
        self._own: dict[int, str] = {}

    def own(self, module: nn.Module, with_hooks: bool = True) -> str:
        """A digest of the module's class, attributes, own tensors (and hooks), not children."""
        cached = self._own.get(id(module)) if with_hooks else None
        if cached is not None:
            return cached
        parts = [f"{type(module).__module__}.{type(module).__qualname__}"]
        parts += [f"{k}={_attr(v, self.pool)}" for k, v in sorted(vars(module).items())
                  if k not in _MODULE_INTERNALS]
        parts += [f"p:{k}={'-' if v is None else self.pool.digest_of(v)}"
                  for k, v in module._parameters.items()]
        parts += [f"b:{k}={'-' if v is None else self.pool.digest_of(v)}"
                  for k, v in module._buffers.items()]
        if with_hooks:
            for kind, func, owner in hook_owners(module):
                # An opaque hook (a closure, a function) is unique to this module: not shared.
                target = self.key(owner) if owner is not None else f"opaque:{id(module)}"
                parts.append(f"h:{kind}:{func}:{target}")
        key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        if with_hooks:
            self._own[id(module)] = key
        return key

    def key(self, module: nn.Module) -> str:
        """What `module` computes: its own key and its children's, recursively."""
        cached = self._keys.get(id(module))
        if cached is not None:
            return cached
        self._keys[id(module)] = f"cycle:{id(module)}"  # a hook owner reaching back: unique
        parts = [self.own(module)]
        parts += [f"{name}:{self.key(child)}" for name, child in module.named_children()]
        key = hashlib.sha256("\n".join(parts).encode()).hexdigest()
        self._keys[id(module)] = key
        return key


def differing(modules: Mapping[str, nn.Module], base_digests: Mapping[str, str],
              pool: TensorPool, ignore: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """How each module (by path) differs from the base, where it does: "changed" (a tensor
    differs from the base's of the same state-dict key; keys in `ignore` aside), "new" (a
    tensor the base has no key for), "hooked" (it carries hooks: attached modules act so)."""
    out = {}
    for path, module in modules.items():
        prefix = f"{path}." if path else ""
        how = set()
        for name, value in [*module._parameters.items(), *module._buffers.items()]:
            key = f"{prefix}{name}"
            if value is None or key in ignore:
                continue
            known = base_digests.get(key)
            if known is None:
                how.add("new")
            elif known != pool.digest_of(value):
                how.add("changed")
        if hook_owners(module):
            how.add("hooked")
        if how:
            out[path] = how
    return out
