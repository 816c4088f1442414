"""Bottleneck adapters (Pfeiffer et al., EACL 2021) on every block of the backbone.

Every block of the backbone gets an adapter on its output h: h ↦ h + U·act(D·h), with D a down
projection to max(1, C // reduction) channels and U the up projection back to C. U is zero at
start, so training starts at the base; D has PyTorch's default initialisation (torch's global RNG).
The base weights stay frozen; adapters, norm layers and the head are the task's own, the norm
layers as the task's norm policy says (`norms`, methods/norms.py; by default `affine`: the base's
running statistics, the task's own affine parameters). Unless told otherwise a task trains at
ADAPTER_LR with its gradients' norm clipped to ADAPTER_CLIP (`train_defaults`).

Which modules are blocks and how their outputs are laid out is `taps_cl.methods.blocks`. The
adapters live in the ModuleDict `model.taps_adapters` and act through forward hooks on the blocks;
the task stores `module/taps_adapters.<key>.{down,up}.{weight,bias}` besides `set/` norms and head.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from taps_cl.errors import MethodError
from taps_cl.methods.base import MODULE_PREFIX, Dependency, LayerRecord, Method, TaskState
from taps_cl.methods.blocks import (
    ACTIVATIONS,
    MAX_REDUCTION,
    Bottleneck,
    attached,
    hook_blocks,
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


# The ModuleDict attribute holding a task's adapters on the model.
ADAPTERS_ATTR = "taps_adapters"

# Defaults of adapter (and fusion) tasks, measured on the benchmark (Lite0, 64 px, four tasks,
# three seeds; docs/results.md "Adapters: the base's statistics and clipped gradients"). Norm
# policy `affine`: 83.3 against 77.8 with the task's own statistics (`task`, the default before),
# at 0.028× base against 0.041×. Clipping the gradients' norm to 1: at lr 3e-3 one seed of letters
# stalled at 63 % unclipped (first-epoch loss 2.7, above ln 10) and reached 97.8 % clipped; the
# adapter row went from 83.3 ± 5.2 to 90.0 ± 0.2. Learning rate: the grid {1e-3, 3e-3, 1e-2}'s
# choice for clipped adapters (fusion's is its own: fusion.py FUSION_LR).
ADAPTER_NORMS = "affine"
ADAPTER_LR = 3e-3
ADAPTER_CLIP = 1.0
# What adapter and fusion tasks stored before `affine` became their default (`stored_method`).
ADAPTER_LEGACY_DEFAULTS = {"norms": "task"}


@dataclass(frozen=True)
class AdapterConfig:
    """Options of the bottleneck adapter; defaults follow the paper (Pfeiffer: d/16, ReLU)."""

    # Reduction factor: an adapter on a C-channel output is max(1, C // reduction) wide.
    reduction: int = option(
        16, "adapter/fusion/progressive: bottleneck width = channels / reduction (default 16).",
        minimum=1, maximum=MAX_REDUCTION)
    # Non-linearity between down and up projection: "relu" (the paper's) or "gelu".
    activation: str = "relu"
    # Norm policy (methods/norms.py): task, affine, base or split (at norm_split).
    norms: str = norms_option(ADAPTER_NORMS)
    norm_split: float = norm_split_option()

    def __post_init__(self) -> None:
        object.__setattr__(self, "reduction", check_number(
            "adapter", "reduction", self.reduction, minimum=1, maximum=MAX_REDUCTION,
            integer=True))
        object.__setattr__(self, "activation", check_choice(
            "adapter", "activation", self.activation, tuple(ACTIVATIONS)))
        check_norm_options("adapter", self)


@register
class Adapter(Method):
    """A zero-initialised bottleneck adapter on every block's output; norms and head own."""

    name = "adapter"
    Config = AdapterConfig
    mergeable = False
    LEGACY_DEFAULTS = ADAPTER_LEGACY_DEFAULTS

    def train_defaults(self) -> dict[str, Any]:
        return {"lr": ADAPTER_LR, "clip_grad": ADAPTER_CLIP}

    def attach(self, model: nn.Module, head: frozenset[str], dependencies: Sequence[Dependency],
               example: Tensor) -> None:
        """Hook an adapter onto the output of every block (see the module docstring)."""
        if dependencies:
            raise MethodError("adapter reads no earlier task "
                              f"(got {', '.join(d.name for d in dependencies)})")
        cfg = self.config
        sites = trace_blocks(model, head, example)
        adapters = {s.key: Bottleneck(s, cfg.reduction, cfg.activation) for s in sites}
        hook_blocks(model, ADAPTERS_ATTR, sites, adapters, self.name)
        logger.debug("adapter: %d blocks adapted at reduction %d", len(sites), cfg.reduction)

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze the base; adapters, norms (by the norm policy) and head train. Needs `attach`
        first."""
        adapters = attached(model, ADAPTERS_ATTR, self.name)
        freeze(model)
        trainable(list(adapters.parameters()))
        train_norms_and_head(model, head, NormPolicy.of(self.config))
        return model

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode, norm layers as the norm policy says."""
        NormPolicy.of(self.config).train_mode(model)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """One group: adapters, norms and head."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "task"}]

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """`module/` adapter tensors, `set/` norms (by the norm policy) and head; a record per
        adapted block."""
        adapters = attached(model, ADAPTERS_ATTR, self.name)
        sizes = block_params(model)
        tensors = {f"{MODULE_PREFIX}{key}": cpu_copy(value)
                   for key, value in module_state(ADAPTERS_ATTR, adapters).items()}
        tensors.update(stored_norm_head(model, head, NormPolicy.of(self.config)))
        layers = [
            LayerRecord(name=name, kind="adapter", score=None, active=True,
                        base_params=sizes[name],
                        task_params=sum(p.numel() for p in adapters[site_key(name)].parameters()))
            for name in site_names(model, adapters)
        ]
        return TaskState(tensors=tensors, layers=layers)
