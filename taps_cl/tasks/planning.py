"""What a method may consult when a new task is planned, read from the registry for it.

A task's gradient signature (taps_cl.analysis.similarity) is computed here, on the CPU in float32
from a fresh copy of the base, so that signatures of tasks added on different machines compare;
`planning` gives a method the base's earlier tasks, their stored signatures' similarity to the new
one and the bytes of shared artifacts — methods never see the registry itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from registry import Registry
from registry.entities import BaseModel, Task
from taps_cl.analysis import similarity
from taps_cl.data.specs import TaskData
from taps_cl.methods.base import EarlierTask, Planning
from taps_cl.models import backbones
from taps_cl.models.compose import example_input
from taps_cl.tasks.rebuilding import TaskModels


def task_signature(models: TaskModels, base: BaseModel, task_data: TaskData,
                   img_size: Optional[int], name: str) -> Optional[tuple[torch.Tensor, bytes]]:
    """The task's gradient signature and its artifact's bytes; None for a one-class task (its
    loss has no gradient to compare)."""
    if len(task_data.class_names) < 2:
        return None
    head = frozenset(base.head_keys)
    model = backbones.build_task_model(
        backbones.ModelSpec.parse(base.model_spec), models.base_state(base),
        len(task_data.class_names), head)
    signature = similarity.task_signature(
        model, head, task_data.train, example=example_input(base.data_config, img_size))
    meta = {**similarity.signature_meta(model), "task": name, "base_sha256": base.sha256}
    return signature, similarity.signature_to_bytes(signature, meta)


def earlier_task(task: Task) -> EarlierTask:
    """A recorded task as a method sees an earlier one."""
    return EarlierTask(task.name, task.method, task.method_config,
                       tuple((pin.kind, pin.sha256) for pin in task.depends_on if pin.task is None),
                       task.signature.sha256 if task.signature is not None else None)


def planning(registry: Registry, base: BaseModel, name: str, given: Mapping[str, Any],
             signature: Optional[tuple[torch.Tensor, bytes]]) -> Planning:
    """The Planning of new task `name` on `base` (earlier tasks are read when first asked for)."""
    cache: dict[Optional[str], list[EarlierTask]] = {}

    def earlier(method: Optional[str]) -> list[EarlierTask]:
        if method not in cache:
            cache[method] = [earlier_task(t) for t in registry.list_tasks(
                base.name, ready_only=True, method=method, layers=False)]
        return cache[method]

    def read(sha256: str) -> bytes:
        return registry.read_artifact(registry.get_artifact(sha256))

    def similar(sha256: str) -> Optional[float]:
        if signature is None:
            return None
        theirs = read(sha256)
        if similarity.signature_recipe(theirs) != similarity.signature_recipe(signature[1]):
            return None
        return float(similarity.cosine_matrix(
            [signature[0], similarity.signature_from_bytes(theirs)])[0, 1])

    return Planning(task=name, base=base.name, base_sha256=base.sha256, given=dict(given),
                    signature=signature, similarity=similar, earlier=earlier, read=read)
