"""Linear-probe baseline: only the new head trains; the backbone and its statistics stay fixed."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from taps_cl.methods.base import LayerRecord, Method, TaskState
from taps_cl.methods.catalog import register
from taps_cl.methods.layers import (
    adaptable_layers,
    freeze,
    head_parameters,
    head_state,
    layer_kind,
    trainable,
)


@dataclass(frozen=True)
class LinearConfig:
    """The linear probe has no options of its own (learning rate etc. live in TrainConfig)."""


@register
class Linear(Method):
    """Train the classifier head on frozen features; the task stores the head only."""

    name = "linear"
    Config = LinearConfig

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze everything but the head."""
        freeze(model)
        trainable(head_parameters(model, head))
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """One group with the head's parameters."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "head"}]

    def set_train_mode(self, model: nn.Module) -> None:
        """Eval mode throughout: BatchNorm statistics must not move (they belong to the base).

        The head is a plain layer whose output does not depend on the mode; dropout before it
        is off, as usual for a linear probe.
        """
        model.eval()

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """The head as `set/` tensors; no adaptable layer changes."""
        layers = [
            LayerRecord(
                name=name,
                kind=layer_kind(module),
                score=None,
                active=False,
                base_params=module.weight.numel(),
                task_params=0,
            )
            for name, module in adaptable_layers(model, head)
        ]
        return TaskState(tensors=head_state(model, head), layers=layers)
