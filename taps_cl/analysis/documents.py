"""The JSON documents of `base list|show`, `task list|show` and `predict`, built in one place.

`taps-cl … --json` prints them and the web overview (taps_cl.serving.ui) serves them as the JSON
view of its pages, so both give the same document for the same registry. The report documents
(`report budget|accuracy|layers|similarity`) are the reports' own `to_json()`
(taps_cl.analysis.reports). Keys may be added to these documents, never renamed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, Optional

from registry.entities import BaseModel, Task, TaskSummary


def dumps(document: Any) -> str:
    """A document as `--json` prints it into a pipe or file: compact, strict JSON (no NaN, which
    JavaScript and jq refuse), values JSON lacks (datetimes) as their str()."""
    return json.dumps(document, default=str, allow_nan=False)


def base_json(b: BaseModel) -> dict[str, Any]:
    """`base show NAME` (and `base add`)."""
    return {"name": b.name, "model": b.model_spec, "architecture": b.architecture,
            "num_params": b.num_params, "total_params": b.total_params, "sha256": b.sha256,
            "bytes": b.weights.bytes, "data_config": b.data_config,
            "created_at": b.created_at.isoformat()}


def base_list_json(bases: Sequence[BaseModel]) -> list[dict[str, Any]]:
    """`base list`."""
    return [{"name": b.name, "model": b.model_spec, "num_params": b.num_params,
             "sha256": b.sha256} for b in bases]


def summary_json(t: TaskSummary) -> dict[str, Any]:
    """One row of `task list`."""
    return {"name": t.name, "base": t.base, "method": t.method, "position": t.position,
            "status": t.status, "num_classes": t.num_classes, "task_params": t.task_params,
            "active_layers": t.active_layers, "total_layers": t.total_layers,
            "test_accuracy": t.test_accuracy}


def task_json(t: Task, accuracy: Optional[float]) -> dict[str, Any]:
    """What `task add` and `group train` say of a task they recorded; `task show` adds to it."""
    return {"name": t.name, "base": t.base, "method": t.method, "position": t.position,
            "status": t.status, "num_classes": t.num_classes, "task_params": t.task_params,
            "active_layers": t.active_layers, "total_layers": t.total_layers,
            "test_accuracy": accuracy}


def task_show_json(t: Task, base_params: int, accuracy: Optional[float],
                   dependents: Sequence[str]) -> dict[str, Any]:
    """`task show NAME`: the task, its options, data, classes, pins, readers and layer rows.

    `base_params` is its base's parameter count (the unit of `budget_used`), `accuracy` its
    latest measured test accuracy, `dependents` the tasks that read it.
    """
    data = task_json(t, accuracy)
    budget = t.method_config.get("budget")
    data.update(budget=budget, budget_used=t.task_params / base_params if base_params else None,
                depends_on=[asdict(pin) for pin in t.depends_on],
                dependents=list(dependents))
    data.update(method_config=t.method_config, train_config=t.train_config,
                dataset=t.dataset_spec, class_names=list(t.class_names),
                train_seconds=t.train_seconds,
                artifact=t.artifact.sha256 if t.artifact else None,
                layers=[asdict(layer) for layer in t.layers])
    return data


def predictions_json(images: Sequence[str],
                     predictions: Sequence[Sequence[tuple[str, float]]]) -> list[dict[str, Any]]:
    """`predict NAME IMAGE…`: each image with its top classes and their probabilities."""
    return [{"image": image, "top": [{"class": k, "probability": p} for k, p in top]}
            for image, top in zip(images, predictions)]
