"""Norm policies: what a task does with the base's norm layers (BatchNorm, LayerNorm, GroupNorm).

A method that trains norm layers declares `norms` (and `norm_split`) in its config; every norm
layer then has one of three roles:

* ``task``: the task's own statistics and affine parameters. The layer trains in train mode, so
  BatchNorm re-estimates its running statistics from the task's batches; the task stores the whole
  layer state (parameters, running statistics, num_batches_tracked) as `set/` tensors.
* ``affine``: the base's running statistics, the task's affine parameters. The layer runs in eval
  mode while the task trains, so its statistics never move and normalise with the base's; its
  weight and bias train and are stored, its buffers are not (they are the base's).
* ``base``: the base's layer untouched: frozen, in eval mode, nothing stored.

The policies give the roles: ``task``, ``affine`` and ``base`` give every norm layer that role;
``split`` gives the first `norm_split` of the norm layers ``affine`` and the rest ``task`` (the
rule progressive adaptation applies to its shared and task bands). The layers are counted in module
order, which for timm and torchvision backbones is their forward order (stem first, the norm after
the last block last); the first round(norm_split × N) of the N norm layers keep the base's
statistics. With ``affine`` or ``base`` a layer the task does not change computes exactly the
base's function. LayerNorm and GroupNorm have no running statistics: ``affine`` and ``task`` are
the same for them.

Restoring needs nothing of the policy: a norm tensor the task does not store is the base's in
`merge_state`, and the stored ones replace theirs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from taps_cl.errors import MethodError
from taps_cl.methods.base import SET_PREFIX
from taps_cl.methods.layers import (
    cpu_copy,
    head_parameters,
    module_state,
    norm_layers,
    trainable,
)
from taps_cl.methods.options import check_choice, check_number, option

NORM_POLICIES = ("task", "affine", "base", "split")
ROLES = ("task", "affine", "base")
DEFAULT_NORM_SPLIT = 0.5


def norms_option(default: str = "task") -> Any:
    """The `norms` field of a method config (one declaration, one flag for every method)."""
    return option(
        default, "taps/lora/adapter/fusion/finetune: norm layers: task (own statistics and affine; "
        "the default of taps, lora, finetune), affine (base statistics, own affine; the default "
        "of adapter, fusion), base (untouched, not stored) or split (base statistics in the "
        "first --norm-split of them, own in the rest).",
        choices=NORM_POLICIES)


def norm_split_option() -> Any:
    """The `norm_split` field of a method config."""
    return option(
        DEFAULT_NORM_SPLIT, "With --norms split: the fraction of the norm layers, from the input, "
        "that keep the base's statistics (default 0.5).", minimum=0, maximum=1)


def check_norm_options(method: str, config: Any) -> None:
    """Validate (and normalise) `config.norms` and `config.norm_split` in a config's
    `__post_init__`; a split other than the default means nothing without ``split``."""
    norms = check_choice(method, "norms", config.norms, NORM_POLICIES)
    split = check_number(method, "norm_split", config.norm_split, minimum=0, maximum=1)
    if norms != "split" and split != DEFAULT_NORM_SPLIT:
        raise MethodError(f"{method}: norm_split applies to norms 'split', not {norms!r}")
    object.__setattr__(config, "norms", norms)
    object.__setattr__(config, "norm_split", split)


@dataclass(frozen=True)
class NormPolicy:
    """A norm policy applied to a model (see the module docstring)."""

    norms: str = "task"
    split: float = DEFAULT_NORM_SPLIT

    @classmethod
    def of(cls, config: Any) -> NormPolicy:
        """The policy a method config declares (`norms`, `norm_split`)."""
        return cls(config.norms, config.norm_split)

    def roles(self, model: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """(name, module, role) of every norm layer of `model`, in module order."""
        layers = norm_layers(model)
        if self.norms != "split":
            return [(name, module, self.norms) for name, module in layers]
        early = round(self.split * len(layers))
        return [(name, module, "affine" if i < early else "task")
                for i, (name, module) in enumerate(layers)]

    def make_trainable(self, model: nn.Module) -> list[nn.Parameter]:
        """Make the norm parameters the task trains trainable (the others frozen); return them."""
        trained = []
        for _, module, role in self.roles(model):
            params = list(module.parameters())
            if role == "base":
                for p in params:
                    p.requires_grad_(False)
            else:
                trained += trainable(params)
        return trained

    def train_mode(self, model: nn.Module) -> None:
        """`model` in train mode, but the norm layers that keep the base's statistics in eval
        mode: their running statistics never move, and they normalise with the base's."""
        model.train()
        for _, module, role in self.roles(model):
            if role != "task":
                module.eval()

    def state(self, model: nn.Module) -> dict[str, Tensor]:
        """What the task stores of its norm layers, keyed as in the model (not copied)."""
        state: dict[str, Tensor] = {}
        for name, module, role in self.roles(model):
            if role == "task":
                state.update(module_state(name, module))
            elif role == "affine":
                params = {key for key, _ in module.named_parameters()}
                dotted = f"{name}." if name else ""
                state.update({f"{dotted}{key}": value
                              for key, value in module.state_dict().items() if key in params})
        return state


def norm_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of every norm layer of `model`, whatever the policy."""
    return {key for name, module in norm_layers(model) for key in module_state(name, module)}


def norm_head_state(model: nn.Module, head: frozenset[str], policy: NormPolicy
                    ) -> dict[str, Tensor]:
    """What a task stores whole (`set/`, not copied): norm tensors by `policy`, then the head."""
    state = policy.state(model)
    full = model.state_dict()
    missing = sorted(head - full.keys())
    if missing:
        raise MethodError(f"the model has no head key(s) {missing}")
    state.update({key: full[key] for key in sorted(head)})
    return state


def stored_norm_head(model: nn.Module, head: frozenset[str], policy: NormPolicy
                     ) -> dict[str, Tensor]:
    """`set/` copies of `norm_head_state`."""
    return {f"{SET_PREFIX}{key}": cpu_copy(value)
            for key, value in norm_head_state(model, head, policy).items()}


def train_norms_and_head(model: nn.Module, head: frozenset[str], policy: NormPolicy) -> None:
    """Make the norm parameters `policy` trains and the head trainable."""
    policy.make_trainable(model)
    trainable(head_parameters(model, head))
