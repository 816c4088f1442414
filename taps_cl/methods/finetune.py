"""Full fine-tuning baseline: every parameter trains and the task stores the whole model.

Its norm layers follow the task's norm policy (`norms`, methods/norms.py): with the default `task`
they train and track statistics like everything else and the whole state dict is stored; with
`affine` they keep the base's statistics (not stored), with `base` they stay the base's
(frozen, not stored).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from taps_cl.methods.base import SET_PREFIX, LayerRecord, Method, TaskState
from taps_cl.methods.catalog import register
from taps_cl.methods.layers import adaptable_layers, cpu_copy, layer_kind, trainable
from taps_cl.methods.norms import (
    NormPolicy,
    check_norm_options,
    norm_keys,
    norm_split_option,
    norms_option,
)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning's only options are its norm policy (learning rate etc. live in TrainConfig)."""

    # Norm policy (methods/norms.py): task, affine, base or split (at norm_split).
    norms: str = norms_option()
    norm_split: float = norm_split_option()

    def __post_init__(self) -> None:
        check_norm_options("finetune", self)


@register
class Finetune(Method):
    """Train all weights; one whole model per task (the budget baseline)."""

    name = "finetune"
    Config = FinetuneConfig

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Make every parameter trainable, but norm layers the norm policy keeps as the base's."""
        trainable(list(model.parameters()))
        NormPolicy.of(self.config).make_trainable(model)
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """One group with every trainable parameter."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "model"}]

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode, norm layers as the norm policy says."""
        NormPolicy.of(self.config).train_mode(model)

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """The state dict as `set/` tensors (norm layers as the norm policy says); every adaptable
        layer counts as active."""
        norms = norm_keys(model)
        kept = NormPolicy.of(self.config).state(model)
        tensors: dict[str, Tensor] = {
            f"{SET_PREFIX}{key}": cpu_copy(value) for key, value in model.state_dict().items()
            if key not in norms or key in kept
        }
        layers = [
            LayerRecord(
                name=name,
                kind=layer_kind(module),
                score=None,
                active=True,
                base_params=module.weight.numel(),
                task_params=module.weight.numel(),
            )
            for name, module in adaptable_layers(model, head)
        ]
        return TaskState(tensors=tensors, layers=layers)
