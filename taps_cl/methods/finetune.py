"""Full fine-tuning baseline: every parameter trains and the task stores the whole model."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from taps_cl.methods.base import SET_PREFIX, LayerRecord, Method, TaskState
from taps_cl.methods.catalog import register
from taps_cl.methods.layers import adaptable_layers, cpu_copy, layer_kind, trainable


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning has no options of its own (learning rate etc. live in TrainConfig)."""


@register
class Finetune(Method):
    """Train all weights; one whole model per task (the budget baseline)."""

    name = "finetune"
    Config = FinetuneConfig

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Make every parameter trainable."""
        trainable(list(model.parameters()))
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """One group with every trainable parameter."""
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay, "name": "model"}]

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """The whole state dict as `set/` tensors; every adaptable layer counts as active."""
        tensors: dict[str, Tensor] = {
            f"{SET_PREFIX}{key}": cpu_copy(value) for key, value in model.state_dict().items()
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
