"""Task summaries for listings and budgets, aggregated in SQL: Registry's read path at scale.

`list_tasks` builds whole Task entities with every layer row; a base of 10,000 tasks on a
network with 50 adaptable layers has half a million of them. A listing or a budget needs only
counts and sizes, so the database computes them: layer counts with correlated COUNT/SUM
subqueries over ``task_layers`` (its unique (task_id, layer_name) index finds a task's rows),
the artifact's size and hash by a join, the latest measured accuracy by a subquery over the
task's evaluations (index on task_id). Only the page asked for (`limit`, `offset`) is computed.
"""

from __future__ import annotations

from typing import Optional

from sqlalchemy import Select, case, func, select
from sqlalchemy.orm import Session, aliased

from registry.entities import SharedUse, TaskSummary
from registry.models import (
    ArtifactRow,
    BaseModelRow,
    EvaluationRow,
    TaskDependencyRow,
    TaskLayerRow,
    TaskRow,
)
from registry.rows import base_row
from registry.transactions import Transactions

# Sequence order, as `list_tasks`: by base, then position (tasks without one last), then id.
_SEQUENCE_ORDER = (TaskRow.base_id, TaskRow.position.is_(None), TaskRow.position, TaskRow.id)


class TaskSummaries(Transactions):
    """Registry verbs that list tasks without loading their layer rows."""

    def list_shared(self, base: str) -> list[SharedUse]:
        """The shared artifacts the base's ready tasks pin, each once, with who pins them."""
        with self._session() as s:
            b = base_row(s, base)
            rows = s.execute(
                select(ArtifactRow.sha256, ArtifactRow.num_params, ArtifactRow.bytes,
                       TaskDependencyRow.kind, TaskRow.name)
                .join(TaskDependencyRow, TaskDependencyRow.artifact_id == ArtifactRow.id)
                .join(TaskRow, TaskRow.id == TaskDependencyRow.task_id)
                .where(TaskDependencyRow.depends_on_task_id.is_(None),
                       TaskRow.base_id == b.id, TaskRow.status == "ready")
                .order_by(ArtifactRow.id, TaskRow.position)
            ).tuples().all()
        uses: dict[str, SharedUse] = {}
        for sha, params, nbytes, kind, task in rows:
            use = uses.get(sha) or SharedUse(sha, params, nbytes, (), ())
            uses[sha] = SharedUse(sha, params, nbytes,
                                  use.kinds if kind in use.kinds else (*use.kinds, kind),
                                  (*use.tasks, task))
        return list(uses.values())

    def task_summaries(
        self,
        base: Optional[str] = None,
        *,
        ready_only: bool = False,
        limit: Optional[int] = None,
        offset: int = 0,
    ) -> list[TaskSummary]:
        """Tasks in sequence order (as `list_tasks`: by base, position, id), as summaries.

        `limit` and `offset` page through that order. `test_accuracy` is the task's latest
        measured accuracy (its own, on the diagonal, unless it was re-measured since).
        """
        if limit is not None and limit < 0:
            raise ValueError(f"limit must be ≥ 0, got {limit}")
        if offset < 0:
            raise ValueError(f"offset must be ≥ 0, got {offset}")
        layer = TaskLayerRow
        total = (
            select(func.count()).where(layer.task_id == TaskRow.id)
            .correlate(TaskRow).scalar_subquery()
        )
        active = (
            select(func.coalesce(func.sum(case((layer.active, 1), else_=0)), 0))
            .where(layer.task_id == TaskRow.id)
            .correlate(TaskRow).scalar_subquery()
        )
        ev = EvaluationRow
        accuracy = (
            select(ev.accuracy)
            .where(ev.task_id == TaskRow.id, ev.kind == "measured", ev.accuracy.is_not(None))
            .order_by(ev.id.desc())
            .limit(1)
            .correlate(TaskRow).scalar_subquery()
        )
        query = (
            select(
                TaskRow.id, TaskRow.name, BaseModelRow.name, TaskRow.method, TaskRow.position,
                TaskRow.status, TaskRow.num_classes, TaskRow.method_config,
                func.coalesce(ArtifactRow.num_params, 0), TaskRow.head_params,
                active, total, func.coalesce(ArtifactRow.bytes, 0), ArtifactRow.sha256,
                accuracy, TaskRow.created_at,
            )
            .join(BaseModelRow, TaskRow.base_id == BaseModelRow.id)
            .outerjoin(ArtifactRow, TaskRow.artifact_id == ArtifactRow.id)
            .order_by(*_SEQUENCE_ORDER)
        )
        with self._session() as s:
            query = _filtered(s, query, base, ready_only)
            if limit is not None or offset:
                # The page's ids first, by the cheap columns alone: SQLite computes selected
                # subqueries before it sorts, so paging the full query would compute them all.
                page = _filtered(s, select(TaskRow.id), base, ready_only)
                page = page.order_by(*_SEQUENCE_ORDER).limit(limit).offset(offset)
                query = query.where(TaskRow.id.in_(page.scalar_subquery()))
            rows = s.execute(query).tuples().all()
            reads = _dependencies(s, base, ready_only) if rows else {}
        return [
            TaskSummary(
                name=name, base=base_name, method=method, position=position, status=status,
                num_classes=num_classes, method_config=dict(config or {}),
                task_params=int(task_params), head_params=head_params,
                active_layers=int(active_layers or 0), total_layers=int(total_layers or 0),
                bytes=int(nbytes), sha256=sha256, test_accuracy=test_accuracy,
                created_at=created_at, depends_on=tuple(reads.get(task_id, ())),
            )
            for (task_id, name, base_name, method, position, status, num_classes, config,
                 task_params, head_params, active_layers, total_layers, nbytes, sha256,
                 test_accuracy, created_at) in rows
        ]

    def count_tasks(self, base: Optional[str] = None, ready_only: bool = False) -> int:
        """How many tasks there are (of one base; only ready ones with `ready_only`)."""
        with self._session() as s:
            query = _filtered(s, select(func.count(TaskRow.id)), base, ready_only)
            return int(s.scalar(query) or 0)


def _filtered(s: Session, query: Select, base: Optional[str], ready_only: bool) -> Select:
    """`query` over TaskRow limited to one base (NotFound if there is none) and/or ready tasks."""
    if base is not None:
        query = query.where(TaskRow.base_id == base_row(s, base).id)
    if ready_only:
        query = query.where(TaskRow.status == "ready")
    return query


def _dependencies(s: Session, base: Optional[str], ready_only: bool) -> dict[int, list[str]]:
    """Task id → names of the tasks it reads, for the tasks `_filtered` selects.

    Dependency rows are few (fusion tasks only), so all of them are read rather than a page's.
    """
    read = aliased(TaskRow)
    query = (
        select(TaskDependencyRow.task_id, read.name)
        .join(read, TaskDependencyRow.depends_on_task_id == read.id)
        .join(TaskRow, TaskDependencyRow.task_id == TaskRow.id)
        .order_by(TaskDependencyRow.id)
    )
    out: dict[int, list[str]] = {}
    for task_id, name in s.execute(_filtered(s, query, base, ready_only)).tuples():
        out.setdefault(task_id, []).append(name)
    return out
