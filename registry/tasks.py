"""Ready tasks of the Registry: delete one, list the tasks that read it, look tasks up.

A run's own verbs (begin, heartbeat, finish, discard) are in lifecycle.py.
"""

from __future__ import annotations

import logging
from typing import Optional

from sqlalchemy import delete, func, or_, select
from sqlalchemy.orm import Session, selectinload

from registry.artifacts import _lock_artifacts, _referenced
from registry.entities import Task
from registry.errors import NotFound, RegistryError
from registry.models import (
    ArtifactRow,
    BaseModelRow,
    EvaluationRow,
    TaskDependencyRow,
    TaskRow,
)
from registry.rows import base_row, task_row, to_task
from registry.transactions import Transactions, error_reason

log = logging.getLogger(__name__)


class TaskVerbs(Transactions):
    """Tasks of the Registry once recorded: ``delete_task``, ``list_dependents``, look-ups."""

    def delete_task(self, name: str) -> list[str]:
        """Delete a ready task, its rows, and its artifacts no other row references.

        Refused while another task depends on it (naming them). Its column of the accuracy
        matrix goes with it. Rows go in one transaction; the files after it, each re-checked
        under the artifacts lock (a concurrent write may have recorded the same content again
        meanwhile: its file stays). A crash in between, or a store or database that fails then,
        leaves orphans for `find_garbage` (warned about), never a row pointing at nothing.
        Returns the removed artifact paths.
        """
        with self._session(write=True) as s:
            # Artifacts first, as gc does: a finish that holds the artifacts lock and records a
            # cell of this task is waited for, never deadlocked with (PostgreSQL).
            _lock_artifacts(s)
            row = task_row(s, name)
            if row.status != "ready":
                raise RegistryError(f"task {name!r} is {row.status}; `taps-cl task remove {name}` "
                                    "discards an unfinished run")
            dependents = s.scalars(
                select(TaskRow.name)
                .join(TaskDependencyRow, TaskDependencyRow.task_id == TaskRow.id)
                .where(TaskDependencyRow.depends_on_task_id == row.id)
                .order_by(TaskRow.name)
            ).all()
            if dependents:
                raise RegistryError(f"task {name!r} cannot be deleted: {', '.join(dependents)} "
                                    "depend(s) on it (delete those first)")
            artifact_ids = [i for i in (row.artifact_id, row.probe_artifact_id,
                                        row.signature_artifact_id) if i is not None]
            # Shared artifacts it read go too, once no other task pins them.
            artifact_ids += [dep.artifact_id for dep in row.dependencies
                             if dep.depends_on_task_id is None and dep.artifact_id is not None]
            s.execute(delete(EvaluationRow).where(
                or_(EvaluationRow.task_id == row.id, EvaluationRow.after_task_id == row.id)))
            s.delete(row)
            s.flush()
            paths = []
            for artifact_id in artifact_ids:
                if not _artifact_in_use(s, artifact_id):
                    artifact = s.get(ArtifactRow, artifact_id)
                    assert artifact is not None
                    paths.append(artifact.path)
                    s.delete(artifact)
        return self._remove_unreferenced(name, paths)

    def _remove_unreferenced(self, name: str, paths: list[str]) -> list[str]:
        """Remove the files of deleted artifact rows that no row references again; the paths
        removed. Never raises: the task is gone already, what is left is garbage."""
        removed: list[str] = []
        try:
            with self._session(write=True) as s:
                _lock_artifacts(s)
                for path in paths:
                    if _referenced(s, path, self.store.layout_sha256(path)):
                        log.info("%s was recorded again meanwhile; not removed", path)
                        continue
                    self.store.remove(path)
                    removed.append(path)
        except RegistryError as exc:
            left = len(paths) - len(removed)
            log.warning("task %s was deleted, but %d of its file(s) could not be removed (%s); "
                        "`taps-cl gc --yes` removes them", name, left, error_reason(exc))
        return removed

    def list_dependents(self, name: str) -> list[str]:
        """Names of the tasks that read task `name`."""
        with self._session() as s:
            row = task_row(s, name)
            return list(s.scalars(
                select(TaskRow.name)
                .join(TaskDependencyRow, TaskDependencyRow.task_id == TaskRow.id)
                .where(TaskDependencyRow.depends_on_task_id == row.id)
                .order_by(TaskRow.name)
            ).all())

    def get_task(self, name: str) -> Task:
        with self._session() as s:
            return to_task(task_row(s, name, with_layers=True))

    def get_task_by_token(self, run_token: str) -> Task:
        """The task a run began (NotFound once it was removed)."""
        with self._session() as s:
            row = s.scalar(
                select(TaskRow)
                .where(TaskRow.run_token == run_token)
                .options(selectinload(TaskRow.layers))
            )
            if row is None:
                raise NotFound(f"no task of run {run_token[:8]}… (it was removed)")
            return to_task(row)

    def list_tasks(self, base: Optional[str] = None, *, ready_only: bool = False,
                   method: Optional[str] = None, layers: bool = True) -> list[Task]:
        """Tasks in sequence order: by base, then position (tasks without one last), then id.

        `method` keeps only that method's tasks; `layers=False` leaves their layer rows unread
        (`Task.layers` empty), for callers that need pins and options only.
        """
        with self._session() as s:
            loads = [selectinload(TaskRow.dependencies)]
            if layers:
                loads.append(selectinload(TaskRow.layers))
            query = (
                select(TaskRow)
                .join(BaseModelRow, TaskRow.base_id == BaseModelRow.id)
                .options(*loads)
                .order_by(BaseModelRow.id, TaskRow.position.is_(None), TaskRow.position, TaskRow.id)
            )
            if base is not None:
                query = query.where(BaseModelRow.id == base_row(s, base).id)
            if ready_only:
                query = query.where(TaskRow.status == "ready")
            if method is not None:
                query = query.where(TaskRow.method == method)
            return [to_task(row, layers=layers) for row in s.scalars(query).unique()]


def _artifact_in_use(s: Session, artifact_id: int) -> bool:
    """Whether any task, base or dependency row still references the artifact."""
    uses = [
        select(func.count()).select_from(TaskRow).where(
            or_(TaskRow.artifact_id == artifact_id, TaskRow.probe_artifact_id == artifact_id,
                TaskRow.signature_artifact_id == artifact_id)),
        select(func.count()).select_from(BaseModelRow).where(
            BaseModelRow.weights_artifact_id == artifact_id),
        select(func.count()).select_from(TaskDependencyRow).where(
            TaskDependencyRow.artifact_id == artifact_id),
    ]
    return any(s.scalar(query) for query in uses)
