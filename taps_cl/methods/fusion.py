"""AdapterFusion (Pfeiffer et al., EACL 2021) over earlier adapter tasks.

At every block (the blocks of `adapter.backbone_blocks`) with output h, the frozen adapters of the
fused tasks — and, with `own_adapter`, a new zero-initialised adapter of this task — give
z_n = U_n·act(D_n·h) (their outputs without the residual). A fusion layer weighs them per
position:

    α_n = softmax_n(⟨Wq·h, Wk·z_n⟩ / √d),    output = h + Σ_n α_n · (v ⊙ z_n),

with query and key projections Wq, Wk to d = max(1, C // key_reduction) channels (Linear on the
last dimension, or 1×1 convs on NCHW maps, as the adapters) and a per-channel value scale v, one at
start (the identity: the paper's Wv reduced to its diagonal) and pulled towards it by
value_reg·Σ‖1 − v‖². The fused adapters never change; the task trains the fusion layers, its own
adapter, the norm layers (as its norm policy says, `norms`: methods/norms.py; by default `affine`,
as adapters) and the head, and stores only those. Unless told otherwise it trains at FUSION_LR
with the adapters' gradient clipping (adapter.py: ADAPTER_CLIP).

Attached modules: `model.taps_fusion[<site key>]` per block (site key as in adapter.py:
"blocks.3.1" → "blocks-3-1") holding `adapters.dep<i>` for the i-th name of `fuse`,
`adapters.own`, `query`, `key` and `value`. A dependency's `module/taps_adapters.<site>.<rest>`
tensor is placed at `taps_fusion.<site>.adapters.dep<i>.<rest>`; its `set/` tensors (norms, head)
are not used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from taps_cl.errors import MethodError
from taps_cl.methods.adapter import (
    ADAPTER_CLIP,
    ADAPTER_LEGACY_DEFAULTS,
    ADAPTER_NORMS,
    ADAPTERS_ATTR,
    AdapterConfig,
)
from taps_cl.methods.base import MODULE_PREFIX, Dependency, LayerRecord, Method, TaskState
from taps_cl.methods.blocks import (
    ACTIVATIONS,
    MAX_REDUCTION,
    BlockSite,
    Bottleneck,
    attached,
    hook_blocks,
    projection,
    site_key,
    site_names,
    trace_blocks,
)
from taps_cl.methods.catalog import register
from taps_cl.methods.layers import (
    block_params,
    cpu_copy,
    freeze,
    module_state,
    trainable,
)
from taps_cl.methods.norms import (
    NormPolicy,
    check_norm_options,
    norm_split_option,
    norms_option,
    stored_norm_head,
    train_norms_and_head,
)
from taps_cl.methods.options import check_choice, check_number, option

logger = logging.getLogger(__name__)

# The ModuleDict attribute holding a fusion task's modules on the model.
FUSION_ATTR = "taps_fusion"
OWN = "own"
# Learning rate of a fusion task when none is given: the grid {1e-3, 3e-3, 1e-2}'s choice for
# fusion over clipped `affine` adapters, gradients clipped too (validation 60.4 · 72.5 · 77.1;
# docs/results.md). Unclipped, the same grid chose 3e-3 and 1e-2 collapsed.
FUSION_LR = 1e-2


def dep_key(index: int) -> str:
    """The key of the `index`-th fused task's adapter inside a fusion site."""
    return f"dep{index}"


@dataclass(frozen=True)
class FusionConfig:
    """Options of AdapterFusion; `fuse` is required (the earlier adapter tasks to combine)."""

    # Names of the earlier adapter tasks whose adapters are fused, in order (a comma-separated
    # string is accepted and split); at least one, no repeats.
    fuse: tuple[str, ...] = option((), "fusion: the earlier adapter tasks to fuse, e.g. A,B.")
    # Whether the task adds an adapter of its own (zero at start) to those it fuses.
    own_adapter: bool = option(
        True, "fusion: fuse only the earlier adapters, train no adapter of its own.",
        flag="--no-own-adapter", flag_value=False)
    # Reduction factor of the own adapter (as `adapter --reduction`).
    reduction: int = option(
        16, "adapter/fusion/progressive: bottleneck width = channels / reduction (default 16).",
        minimum=1, maximum=MAX_REDUCTION)
    # Non-linearity of the own adapter: "relu" or "gelu".
    activation: str = "relu"
    # Query/key width d = max(1, C // key_reduction). 32 keeps a Lite0 fusion task's own tensors
    # (fusion layers, own adapter, norms, a 10-class head) at 0.047× base; 16 gives 0.053×.
    key_reduction: int = 32
    # Weight of the regulariser value_reg·Σ‖1 − v‖² pulling the value scales to the identity.
    value_reg: float = 0.01
    # Norm policy (methods/norms.py): task, affine, base or split (at norm_split).
    norms: str = norms_option(ADAPTER_NORMS)
    norm_split: float = norm_split_option()

    def __post_init__(self) -> None:
        def fix(field: str, value: object) -> None:
            object.__setattr__(self, field, value)

        fix("fuse", _fuse_names(self.fuse))
        if not isinstance(self.own_adapter, bool):
            raise MethodError(
                f"fusion: own_adapter must be true or false, got {self.own_adapter!r}")
        fix("reduction", check_number("fusion", "reduction", self.reduction, minimum=1,
                                      maximum=MAX_REDUCTION, integer=True))
        fix("activation", check_choice("fusion", "activation", self.activation,
                                       tuple(ACTIVATIONS)))
        fix("key_reduction", check_number("fusion", "key_reduction", self.key_reduction,
                                          minimum=1, integer=True))
        fix("value_reg", check_number("fusion", "value_reg", self.value_reg, minimum=0))
        check_norm_options("fusion", self)


def _fuse_names(value: Any) -> tuple[str, ...]:
    """`fuse` as a tuple of task names: from a comma-separated string or a list of strings."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(n, str) for n in value):
        raise MethodError(f"fusion: fuse must be task names, got {value!r}")
    names = tuple(n.strip() for n in value)
    if not names or any(not n for n in names):
        raise MethodError("fusion: fuse needs at least one earlier adapter task name "
                          f"(got {','.join(names)!r})")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise MethodError(f"fusion: fuse names {', '.join(repeated)} more than once")
    return names


class FusionSite(nn.Module):
    """One block's adapters (fused and own) and fusion layer; see the module docstring."""

    def __init__(self, site: BlockSite, adapters: dict[str, Bottleneck],
                 key_reduction: int) -> None:
        super().__init__()
        width = max(1, site.channels // key_reduction)
        self.channel_dim = -1 if site.channels_last else 1
        self.scale = 1.0 / math.sqrt(width)
        self.adapters = nn.ModuleDict(adapters)
        self.query = projection(site.channels, width, site.channels_last)
        self.key = projection(site.channels, width, site.channels_last)
        self.value = nn.Parameter(torch.ones(site.channels))

    def forward(self, h: Tensor) -> Tensor:
        dim = self.channel_dim
        zs = [adapter.delta(h) for adapter in self.adapters.values()]
        query = self.query(h)
        scores = torch.stack([(query * self.key(z)).sum(dim) for z in zs]) * self.scale
        weights = scores.softmax(dim=0).unsqueeze(dim if dim < 0 else dim + 1)
        shape = [1] * h.dim()
        shape[dim] = -1
        value = self.value.view(shape)
        return h + (weights * torch.stack([value * z for z in zs])).sum(0)

    def hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook on the block: its output fused (a bound method, see Bottleneck.hook)."""
        return self(output)

    def own_parameters(self) -> list[nn.Parameter]:
        """What the task trains here: query, key, value and the own adapter (if any)."""
        own = [*self.query.parameters(), *self.key.parameters(), self.value]
        if OWN in self.adapters:
            own += list(self.adapters[OWN].parameters())
        return own


@register
class Fusion(Method):
    """Fuse the frozen adapters of earlier adapter tasks (plus an own adapter) per block."""

    name = "fusion"
    Config = FusionConfig
    mergeable = False
    LEGACY_DEFAULTS = ADAPTER_LEGACY_DEFAULTS

    def train_defaults(self) -> dict[str, Any]:
        return {"lr": FUSION_LR, "clip_grad": ADAPTER_CLIP}

    def config_dict(self) -> dict[str, Any]:
        """The options as JSON-able values (`fuse` as a list)."""
        cfg = super().config_dict()
        cfg["fuse"] = list(self.config.fuse)
        return cfg

    def dependencies(self) -> tuple[str, ...]:
        return self.config.fuse

    def check_dependency(self, name: str, method: str) -> None:
        if method != "adapter":
            raise MethodError(f"fusion: task {name!r} was trained with {method!r}; "
                              "fusion reads adapter tasks only")

    def _index(self, dependencies: Sequence[Dependency]) -> dict[str, Dependency]:
        """The dependencies by name; MethodError unless they are exactly `fuse`'s tasks."""
        by_name = {dep.name: dep for dep in dependencies}
        if sorted(by_name) != sorted(self.config.fuse) or len(by_name) != len(dependencies):
            raise MethodError(f"fusion: expected the tasks {', '.join(self.config.fuse)}, got "
                              f"{', '.join(dep.name for dep in dependencies) or 'none'}")
        for dep in dependencies:
            self.check_dependency(dep.name, dep.method)
        return by_name

    def attach(self, model: nn.Module, head: frozenset[str], dependencies: Sequence[Dependency],
               example: Tensor) -> None:
        """Hook a fusion site (fused adapters, own adapter, fusion layer) onto every block."""
        cfg = self.config
        by_name = self._index(dependencies)
        dep_configs = []
        for name in cfg.fuse:
            try:
                dep_configs.append(AdapterConfig(**by_name[name].config))
            except TypeError as exc:
                raise MethodError(f"fusion: task {name!r} has adapter options this version "
                                  f"does not know: {exc}") from exc
        sites = trace_blocks(model, head, example)
        modules = {}
        for site in sites:
            adapters = {dep_key(i): Bottleneck(site, c.reduction, c.activation)
                        for i, c in enumerate(dep_configs)}
            if cfg.own_adapter:
                adapters[OWN] = Bottleneck(site, cfg.reduction, cfg.activation)
            modules[site.key] = FusionSite(site, adapters, cfg.key_reduction)
        hook_blocks(model, FUSION_ATTR, sites, modules, self.name)
        logger.debug("fusion: %d blocks fuse %d adapter task(s)%s", len(sites), len(cfg.fuse),
                     " and an own adapter" if cfg.own_adapter else "")

    def dependency_state(self, dependency: Dependency) -> dict[str, Tensor]:
        """The dependency's adapter tensors at `taps_fusion.<site>.adapters.dep<i>.…`."""
        if dependency.name not in self.config.fuse:
            raise MethodError(f"fusion: {dependency.name!r} is not one of the fused tasks")
        self.check_dependency(dependency.name, dependency.method)
        if dependency.tensors is None:
            return {}
        index = self.config.fuse.index(dependency.name)
        prefix = f"{MODULE_PREFIX}{ADAPTERS_ATTR}."
        placed = {}
        for name, value in dependency.tensors.items():
            if name.startswith(prefix):
                site, rest = name[len(prefix):].split(".", 1)
                placed[f"{FUSION_ATTR}.{site}.adapters.{dep_key(index)}.{rest}"] = value
        if not placed:
            raise MethodError(f"fusion: task {dependency.name!r} stores no adapter tensors")
        return placed

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze the base and the fused adapters; fusion layers, own adapter, norms (by the norm
        policy), head train."""
        sites = attached(model, FUSION_ATTR, self.name)
        freeze(model)
        for site in sites.values():
            trainable(site.own_parameters())
        train_norms_and_head(model, head, NormPolicy.of(self.config))
        return model

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode, norm layers as the norm policy says."""
        NormPolicy.of(self.config).train_mode(model)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """One group: fusion layers, own adapter, norms and head."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "task"}]

    def extra_loss(self, model: nn.Module, epoch: int) -> Tensor | None:
        """value_reg·Σ‖1 − v‖² over every fusion layer (None when value_reg is 0)."""
        if self.config.value_reg == 0:
            return None
        sites = attached(model, FUSION_ATTR, self.name)
        total = sum(((1 - site.value) ** 2).sum() for site in sites.values())
        return self.config.value_reg * total

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """The fusion layers and own adapter (`module/`), norms and head (`set/`).

        The fused tasks' adapters are not stored: they are their tasks' tensors.
        """
        sites = attached(model, FUSION_ATTR, self.name)
        fused = tuple(f".adapters.{dep_key(i)}." for i in range(len(self.config.fuse)))
        tensors = {f"{MODULE_PREFIX}{key}": cpu_copy(value)
                   for key, value in module_state(FUSION_ATTR, sites).items()
                   if not any(part in key for part in fused)}
        tensors.update(stored_norm_head(model, head, NormPolicy.of(self.config)))
        sizes = block_params(model)
        layers = [
            LayerRecord(name=name, kind="fusion", score=None, active=True,
                        base_params=sizes[name],
                        task_params=sum(p.numel() for p in sites[site_key(name)].own_parameters()))
            for name in site_names(model, sites)
        ]
        return TaskState(tensors=tensors, layers=layers)
