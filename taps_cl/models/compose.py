"""Task models from the base and a task's tensors: plain (mergeable) or composed.

A mergeable method's tensors fold into the base's weights (`plain_model`); a composed method's
modules are attached to the base class and loaded with its own and its dependencies' tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from registry.entities import BaseModel
from taps_cl.methods.base import Dependency, Method
from taps_cl.methods.merging import build_composed, merge_state
from taps_cl.models import backbones
from taps_cl.models.backbones import example_input


def plain_model(
    base: BaseModel, base_state: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
    num_classes: int,
) -> nn.Module:
    """The base architecture with the task's tensors folded in, on the CPU, in eval mode."""
    head = frozenset(base.head_keys)
    merged = merge_state(base_state, tensors, head)
    model = backbones.create_model(backbones.ModelSpec.parse(base.model_spec),
                                   num_classes=num_classes)
    backbones.apply_weights(model, merged)
    return model.eval()


def task_model(
    base: BaseModel, base_state: dict[str, torch.Tensor], method: Method,
    tensors: dict[str, torch.Tensor], num_classes: int, dependencies: Sequence[Dependency],
    img_size: Optional[int],
) -> nn.Module:
    """The task's inference model: a plain model for mergeable methods, else the base class
    with the method's modules attached (its own and its dependencies' tensors loaded)."""
    if method.mergeable:
        return plain_model(base, base_state, tensors, num_classes)
    model = backbones.create_model(backbones.ModelSpec.parse(base.model_spec),
                                   num_classes=num_classes)
    return build_composed(method, model, frozenset(base.head_keys), base_state, tensors,
                          dependencies, example_input(base.data_config, img_size))
