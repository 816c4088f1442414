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
from taps_cl.analysis import reports, similarity
from taps_cl.data.specs import TaskData
from taps_cl.methods.base import EarlierTask, Planning
from taps_cl.models import backbones
from taps_cl.models.backbones import example_input
from taps_cl.tasks.rebuilding import TaskModels


def task_signature(models: TaskModels, base: BaseModel, task_data: TaskData,
                   img_size: Optional[int], name: str) -> Optional[tuple[torch.Tensor, bytes]]:
    """The task's gradient signature and its artifact's bytes; None for a one-class task (its
    loss has no gradient to compare)."""
    if len(task_data.class_names) < 2:
        return None
    signature, meta = _signature(models, base, task_data, img_size)
    meta = {**meta, "task": name, "base_sha256": base.sha256}
    return signature, similarity.signature_to_bytes(signature, meta)


def _signature(models: TaskModels, base: BaseModel, task_data: TaskData,
               img_size: Optional[int]) -> tuple[torch.Tensor, dict[str, Any]]:
    """A signature of `task_data` on `base` (a fresh copy with a new head), and its recipe."""
    head = frozenset(base.head_keys)
    model = backbones.build_task_model(
        backbones.ModelSpec.parse(base.model_spec), models.base_state(base),
        len(task_data.class_names), head)
    signature = similarity.task_signature(
        model, head, task_data.train, example=example_input(base.data_config, img_size))
    return signature, similarity.signature_meta(model)


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


def similarity_report(
    registry: Registry, models: TaskModels, b: BaseModel, data: Optional[str], *,
    classes: Optional[str] = None, img_size: Optional[int] = None,
    max_train: Optional[int] = None, seed: int = 0,
) -> reports.SimilarityReport:
    """The cosine similarity of `b`'s ready tasks' stored signatures (and of a candidate's, with
    `data`); see `Manager.similarity`."""
    names: list[str] = []
    signatures: list[Any] = []
    recipes: list[dict[str, Any]] = []
    missing: list[tuple[str, str]] = []
    for task in registry.list_tasks(b.name, ready_only=True):
        if task.signature is None:
            missing.append((task.name, "no signature recorded (added before signatures "
                                       "were stored)"))
            continue
        blob = registry.read_artifact(task.signature)
        recipes.append(similarity.signature_recipe(blob))
        signatures.append(similarity.signature_from_bytes(blob))
        names.append(task.name)
    candidate = None
    if data is not None:
        candidate, recipe = _candidate_signature(models, b, data, classes, img_size, max_train,
                                                 seed)
        recipes.append(recipe)
    similarity.check_comparable(recipes, [*names, "the candidate"])
    full = similarity.cosine_matrix(
        signatures + ([candidate] if candidate is not None else []))
    n = len(names)
    matrix = full[:n, :n]
    spec_text = None
    if data is not None:
        spec_text = data if classes is None else f"{data} (classes {classes})"
    return reports.SimilarityReport(
        base_name=b.name, tasks=tuple(names),
        matrix=tuple(tuple(float(v) for v in row) for row in matrix),
        groups=tuple(similarity.cluster(matrix)), threshold=similarity.DEFAULT_THRESHOLD,
        without_signature=tuple(missing), candidate=spec_text,
        candidate_row=(tuple(float(v) for v in full[n, :n]) if candidate is not None
                       else None),
    )


def _candidate_signature(
    models: TaskModels, b: BaseModel, spec: str, classes: Optional[str],
    img_size: Optional[int], max_train: Optional[int], seed: int,
) -> tuple[Any, dict[str, Any]]:
    """The signature (and its recipe) of data not (yet) in the registry, as an add computes it."""
    from taps_cl.data import specs as task_data

    loaded = task_data.load_task_data(
        task_data.DataSpec.parse(spec, classes=classes), b.data_config, img_size=img_size,
        seed=seed, max_train=max_train, max_test=1)
    signature, meta = _signature(models, b, loaded, img_size)
    return signature, {key: meta.get(key) for key in ("recipe", "config", "blocks")}
