"""Progressive task-specific adaptation (Gangwar et al., 2025); docs/architecture.md has the rules.

Every block of the backbone (the blocks of `adapter.backbone_blocks`) gets a zero-initialised
bottleneck adapter on its output, h ↦ h + U·act(D·h), as in adapter.py. The blocks fall into three
bands by their order (`band_sizes`):

* the first `shared_fraction` of the blocks: the **shared** band — adapters and norm layers shared
  by every progressive task of the base;
* the last `task_fraction` (at least one block): the **task** band — adapters and norm layers of
  this task alone, with the head;
* the blocks between: the **group** band — shared by the tasks of one similarity group.

Norm layers belong to the band of the block that contains them; norms before the first block (the
stem) to the shared band, norms after the last block (e.g. Lite0's `bn2`) to the task band.

A task stores only its task band (`module/` adapters, `set/` norms and head) in its own artifact.
Shared and group bands are stored once each as shared artifacts (`band_tensors`, same tensor
names) that every member pins and reads frozen (`Dependency`; `dependency_state` places them, base
keys of norm layers included). `train_bands` says which bands this task trained itself: a task
that opens a group trains its group band, the first progressive task of a base (or a joint
`group train`) the shared band too; a task that joins a group trains the task band only, so
joining never rewrites what earlier members read.

Attached modules: `model.taps_progressive[<site key>]` (site key as in adapter.py: "blocks.3.1" →
"blocks-3-1"), a `Bottleneck` with `down` and `up`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from taps_cl.errors import MethodError
from taps_cl.methods.base import (
    MODULE_PREFIX,
    SET_PREFIX,
    Dependency,
    GroupPlan,
    GroupPlanning,
    LayerRecord,
    Method,
    Plan,
    Planning,
    SharedWrite,
    TaskState,
)
from taps_cl.methods.blocks import (
    MAX_REDUCTION,
    ACTIVATIONS,
    BlockSite,
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
    head_parameters,
    module_state,
    norm_layers,
    trainable,
)
from taps_cl.methods.options import check_choice, check_number, option
from taps_cl.methods.progressive.grouping import plan_group
from taps_cl.methods.progressive.joining import plan_join
from taps_cl.methods.progressive.sharing import (
    BAND_KEYS,
    BANDS,
    PROGRESSIVE_ATTR,
    band_dependency,
    trained_band,
)

logger = logging.getLogger(__name__)

# The `task_layers.kind` of an adapted block, by band.
LAYER_KINDS = {"shared": "shared_adapter", "group": "group_adapter", "task": "adapter"}


@dataclass(frozen=True)
class ProgressiveConfig:
    """Options of progressive adaptation; the bands are fixed per base by its first task."""

    # Reduction factor: an adapter on a C-channel output is max(1, C // reduction) wide.
    reduction: int = option(
        16, "adapter/fusion/progressive: bottleneck width = channels / reduction (default 16).",
        minimum=1, maximum=MAX_REDUCTION)
    # Non-linearity between down and up projection: "relu" or "gelu".
    activation: str = "relu"
    # Fraction of the blocks, from the input, whose adapters and norms all tasks share.
    shared_fraction: float = option(
        0.75, "progressive: fraction of the blocks (from the input) shared by all tasks "
        "(default 0.75; fixed by the base's first progressive task).",
        minimum=0, maximum=1)
    # Fraction of the blocks, from the output, that are task-specific (at least one block).
    task_fraction: float = option(
        0.125, "progressive: fraction of the blocks (from the output) that are task-specific "
        "(default 0.125; fixed by the base's first progressive task).",
        minimum=0, maximum=1)
    # The similarity group: "auto" (join the most similar group, or open one), "new", or a
    # group's name; once planned, the name of the group the task belongs to (stored configs
    # always hold that name, so the default is never stored).
    group: str = option(
        "auto", "progressive: auto (join the most similar group or open one; default), new, "
        "or the name of a group to join.", joint=False)
    # Mean signature similarity a task needs to join a group when its group is "auto".
    join_threshold: float = option(
        0.5, "progressive: mean signature similarity needed to join a group with --group "
        "auto (default 0.5).",
        minimum=-1, maximum=1, joint=False)
    # Bands the task trained itself; the others it read frozen from shared artifacts.
    train_bands: tuple[str, ...] = ("task",)

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        fix("reduction", check_number("progressive", "reduction", self.reduction, minimum=1,
                                      maximum=MAX_REDUCTION, integer=True))
        fix("activation", check_choice("progressive", "activation", self.activation,
                                       tuple(ACTIVATIONS)))
        for field in ("shared_fraction", "task_fraction"):
            value = check_number("progressive", field, getattr(self, field), minimum=0)
            if value > 1:
                raise MethodError(f"progressive: {field} must be <= 1, got {value!r}")
            fix(field, value)
        if self.shared_fraction + self.task_fraction > 1:
            raise MethodError("progressive: shared_fraction + task_fraction must be <= 1, got "
                              f"{self.shared_fraction} + {self.task_fraction}")
        if not isinstance(self.group, str):
            raise MethodError(f"progressive: group must be a name, got {self.group!r}")
        if not self.group.strip():  # given empty: not "auto" (the default), not a group's name
            raise MethodError(f"progressive: group must be auto, new or a group's name, got "
                              f"{self.group!r}")
        threshold = check_number("progressive", "join_threshold", self.join_threshold)
        if not -1 <= threshold <= 1:
            raise MethodError(f"progressive: join_threshold must be in [-1, 1], got {threshold!r}")
        fix("join_threshold", threshold)
        bands = tuple(self.train_bands) if isinstance(self.train_bands, (list, tuple)) else None
        if bands is None or not bands or any(b not in BANDS for b in bands) or "task" not in bands:
            raise MethodError("progressive: train_bands must list bands out of "
                              f"{', '.join(BANDS)} including 'task', got {self.train_bands!r}")
        fix("train_bands", tuple(b for b in BANDS if b in bands))

    def bands_key(self) -> dict[str, Any]:
        """The options every task reading the same shared artifacts must agree on."""
        return {key: getattr(self, key) for key in BAND_KEYS}


def band_sizes(blocks: int, shared_fraction: float, task_fraction: float) -> tuple[int, int, int]:
    """(shared, group, task) block counts: rounded fractions, the task band at least one block."""
    task = min(blocks, max(1, round(blocks * task_fraction)))
    shared = min(blocks - task, round(blocks * shared_fraction))
    return shared, blocks - task - shared, task


def block_bands(blocks: Sequence[str], config: ProgressiveConfig) -> dict[str, str]:
    """Band of every block name, in order."""
    shared, group, _ = band_sizes(len(blocks), config.shared_fraction, config.task_fraction)
    return {name: ("shared" if i < shared else "group" if i < shared + group else "task")
            for i, name in enumerate(blocks)}


def norm_bands(model: nn.Module, bands: dict[str, str]) -> dict[str, str]:
    """Band of every norm layer: its block's; before the first block shared, after the last task."""
    order = [name for name, _ in model.named_modules()]
    first = order.index(next(iter(bands)))
    result = {}
    for name, _ in norm_layers(model):
        block = next((b for b in bands if name.startswith(f"{b}.")), None)
        if block is not None:
            result[name] = bands[block]
        else:
            result[name] = "shared" if order.index(name) < first else "task"
    return result


@register
class Progressive(Method):
    """Adapters and norms shared by all tasks early, by a similarity group in the middle, own
    late."""

    name = "progressive"
    Config = ProgressiveConfig
    mergeable = False
    uses_signature = True  # a new task joins the group whose signatures it matches best

    # ------------------------------------------------------------------------------ planning
    def plan(self, planning: Planning) -> Plan:
        """Which shared bands the new task reads frozen and which it trains (see joining)."""
        return plan_join(self, planning)

    def plan_group(self, planning: GroupPlanning) -> GroupPlan:
        """Groups by similarity, one model per task with shared and group bands tied."""
        return plan_group(self, planning)

    def shared_outputs(self, model: nn.Module, base_sha256: str) -> list[SharedWrite]:
        """The shared and group bands this task trained, one shared artifact each."""
        return [trained_band(self, model, band, base_sha256)
                for band in self.config.train_bands if band != "task"]

    def describe(self) -> dict[str, Any]:
        return {"group": self.config.group}

    def read_shared(self, blob: bytes) -> Dependency:
        return band_dependency(blob)

    # ----------------------------------------------------------------------------- structure
    def attach(self, model: nn.Module, head: frozenset[str], dependencies: Sequence[Dependency],
               example: Tensor, modules: dict[str, Bottleneck] | None = None) -> None:
        """Hook an adapter onto every block; `modules` (by site key) are used instead of fresh
        ones where given — `group train` ties the shared and group bands of its tasks that way."""
        for dep in dependencies:
            self.check_dependency(dep.name, dep.method)
            self._check_bands(dep)
        cfg = self.config
        sites = trace_blocks(model, head, example)
        given = modules or {}
        adapters = {s.key: given.get(s.key) or Bottleneck(s, cfg.reduction, cfg.activation)
                    for s in sites}
        hook_blocks(model, PROGRESSIVE_ATTR, sites, adapters, self.name)
        shared, group, task = band_sizes(len(sites), cfg.shared_fraction, cfg.task_fraction)
        logger.debug("progressive: %d shared, %d group, %d task-specific blocks",
                     shared, group, task)

    def bands(self, model: nn.Module) -> tuple[dict[str, str], dict[str, str]]:
        """(block name → band, norm layer name → band) of an attached model."""
        holder = attached(model, PROGRESSIVE_ATTR, self.name)
        blocks = site_names(model, holder)
        by_block = block_bands(blocks, self.config)
        return by_block, norm_bands(model, by_block)

    # ------------------------------------------------------------------------------ training
    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze the base; the adapters and norms of `train_bands` and the head train."""
        holder = attached(model, PROGRESSIVE_ATTR, self.name)
        by_block, by_norm = self.bands(model)
        freeze(model)
        wanted = set(self.config.train_bands)
        modules = dict(model.named_modules())
        for block, band in by_block.items():
            if band in wanted:
                trainable(list(holder[site_key(block)].parameters()))
        for norm, band in by_norm.items():
            if band in wanted:
                trainable(list(modules[norm].parameters()))
        trainable(head_parameters(model, head))
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """One group: whatever `prepare` made trainable."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "task"}]

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode, except the norm layers of the shared and group bands: they keep their
        running statistics (the base's), whoever trains them.

        Those bands serve several tasks. Statistics collected on the task that happens to train
        them first would be wrong for the others (and a joint `group train` step normalises each
        task's batch with that batch's statistics while the running averages would mix every
        task's). Their affine parameters train; only the task band's norms track statistics.
        """
        model.train()
        _, by_norm = self.bands(model)
        modules = dict(model.named_modules())
        for norm, band in by_norm.items():
            if band != "task":
                modules[norm].eval()

    # ----------------------------------------------------------------------------- storing
    def band_tensors(self, model: nn.Module, band: str) -> dict[str, Tensor]:
        """The `module/` adapter and `set/` norm tensors of one band (CPU copies)."""
        if band not in BANDS:
            raise MethodError(f"progressive: no band {band!r} (bands: {', '.join(BANDS)})")
        holder = attached(model, PROGRESSIVE_ATTR, self.name)
        by_block, by_norm = self.bands(model)
        modules = dict(model.named_modules())
        tensors: dict[str, Tensor] = {}
        for block, b in by_block.items():
            if b == band:
                key = f"{PROGRESSIVE_ATTR}.{site_key(block)}"
                tensors.update({f"{MODULE_PREFIX}{k}": cpu_copy(v)
                                for k, v in module_state(key, holder[site_key(block)]).items()})
        for norm, b in by_norm.items():
            if b == band:
                tensors.update({f"{SET_PREFIX}{k}": cpu_copy(v)
                                for k, v in module_state(norm, modules[norm]).items()})
        return tensors

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """The task band and the head; a record per block (own numbers only in the task band)."""
        holder = attached(model, PROGRESSIVE_ATTR, self.name)
        tensors = self.band_tensors(model, "task")
        state = model.state_dict()
        missing = sorted(head - state.keys())
        if missing:
            raise MethodError(f"the model has no head key(s) {missing}")
        tensors.update({f"{SET_PREFIX}{k}": cpu_copy(state[k]) for k in sorted(head)})
        sizes = block_params(model)
        by_block, _ = self.bands(model)
        layers = [
            LayerRecord(name=block, kind=LAYER_KINDS[band], score=None, active=True,
                        base_params=sizes[block],
                        task_params=(sum(p.numel() for p in holder[site_key(block)].parameters())
                                     if band == "task" else 0))
            for block, band in by_block.items()
        ]
        return TaskState(tensors=tensors, layers=layers)

    # -------------------------------------------------------------------------- dependencies
    def check_dependency(self, name: str, method: str) -> None:
        if method != self.name:
            raise MethodError(f"progressive reads only shared progressive adapters, not "
                              f"{name!r} ({method})")

    def dependency_state(self, dependency: Dependency) -> dict[str, Tensor]:
        """A shared band's tensors under their model keys (adapters and norm layers)."""
        if dependency.tensors is None:
            return {}
        state = {}
        for name, value in dependency.tensors.items():
            for prefix in (MODULE_PREFIX, SET_PREFIX):
                if name.startswith(prefix):
                    state[name[len(prefix):]] = value
                    break
            else:
                raise MethodError(f"progressive: shared tensor {name!r} is neither "
                                  "'module/…' nor 'set/…'")
        return state

    def _check_bands(self, dependency: Dependency) -> None:
        """A shared artifact made with other band options cannot be read by this task."""
        theirs = {k: dependency.config.get(k) for k in self.config.bands_key()}
        if theirs != self.config.bands_key():
            raise MethodError(f"progressive: shared adapters {dependency.name!r} were made with "
                              f"{theirs}, this task uses {self.config.bands_key()}")


__all__ = ["BANDS", "PROGRESSIVE_ATTR", "BlockSite", "Progressive", "ProgressiveConfig",
           "band_sizes", "block_bands", "norm_bands"]
