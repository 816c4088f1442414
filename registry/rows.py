"""ORM rows for the Registry's verbs: look-ups by name, name checks, rows to frozen entities."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from registry.entities import (
    Artifact,
    BaseModel,
    Evaluation,
    LayerEntry,
    Task,
    TaskDependency,
)
from registry.errors import NotFound, RegistryError
from registry.models import ArtifactRow, BaseModelRow, EvaluationRow, TaskRow


def check_name(name: str) -> None:
    """Refuse a base or task name: empty, over 128 characters, or with slashes, tabs, newlines."""
    if not name or not name.strip() or len(name) > 128 or any(c in name for c in "/\\\n\t"):
        raise RegistryError(
            f"invalid name {name!r}: 1–128 characters, no slashes, tabs or newlines"
        )


def base_row(s: Session, name: str) -> BaseModelRow:
    row = s.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
    if row is None:
        raise NotFound(f"no base model named {name!r}")
    return row


def task_row(s: Session, name: str, with_layers: bool = False) -> TaskRow:
    query = select(TaskRow).where(TaskRow.name == name)
    if with_layers:
        query = query.options(selectinload(TaskRow.layers), selectinload(TaskRow.dependencies))
    row = s.scalar(query)
    if row is None:
        raise NotFound(f"no task named {name!r}")
    return row


def to_artifact(row: ArtifactRow) -> Artifact:
    return Artifact(
        sha256=row.sha256, path=row.path, bytes=row.bytes, num_params=row.num_params, kind=row.kind
    )


def to_base(row: BaseModelRow) -> BaseModel:
    return BaseModel(
        name=row.name,
        model_spec=row.model_spec,
        architecture=row.architecture,
        weights=to_artifact(row.weights),
        num_params=row.num_params,
        total_params=row.total_params,
        data_config=dict(row.data_config),
        head_keys=tuple(row.head_keys),
        created_at=row.created_at,
    )


def to_task(row: TaskRow, layers: bool = True) -> Task:
    return Task(
        name=row.name,
        base=row.base.name,
        position=row.position,
        method=row.method,
        method_config=dict(row.method_config),
        train_config=dict(row.train_config),
        dataset_spec=dict(row.dataset_spec),
        num_classes=row.num_classes,
        class_names=tuple(row.class_names),
        status=row.status,
        artifact=to_artifact(row.artifact) if row.artifact else None,
        probe=to_artifact(row.probe) if row.probe else None,
        signature=to_artifact(row.signature) if row.signature else None,
        head_params=row.head_params,
        train_seconds=row.train_seconds,
        created_at=row.created_at,
        run_token=row.run_token,
        run_host=row.run_host,
        run_pid=row.run_pid,
        heartbeat_at=row.heartbeat_at,
        chain_prev_sha256=row.chain_prev_sha256,
        chain_sha256=row.chain_sha256,
        depends_on=tuple(
            TaskDependency(
                task=dep.depends_on.name if dep.depends_on is not None else None,
                sha256=dep.artifact.sha256 if dep.artifact is not None else "",
                kind=dep.kind,
            )
            for dep in row.dependencies
        ),
        layers=tuple(
            LayerEntry(
                name=layer.layer_name,
                kind=layer.kind,
                score=layer.score,
                active=layer.active,
                base_params=layer.base_params,
                task_params=layer.task_params,
            )
            for layer in row.layers
        )
        if layers
        else (),
    )


def to_evaluation(row: EvaluationRow, task: str, after: str) -> Evaluation:
    return Evaluation(
        task=task,
        after_task=after,
        split=row.split,
        kind=row.kind,
        accuracy=row.accuracy,
        loss=row.loss,
        num_samples=row.num_samples,
        max_logit_drift=row.max_logit_drift,
        probe_ok=row.probe_ok,
        created_at=row.created_at,
    )
