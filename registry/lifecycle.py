"""The run lifecycle of a task: a run begins its task, beats, finishes it or discards it.

A task's row lives in status ``training`` from ``begin_task`` until ``finish_task`` makes it
``ready`` (position, matrix column, dependency pins and chain link in one transaction) or
``discard_task`` removes it. Deleting a ready task and looking tasks up are in tasks.py.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from typing import Any, Optional

from sqlalchemy import event, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry import chain, runs
from registry.artifacts import ArtifactFiles
from registry.entities import EarlierCell, LayerEntry, SharedPin, Task
from registry.errors import AlreadyExists, NotFound, RegistryError, RunLost
from registry.models import (
    ArtifactRow,
    BaseModelRow,
    EvaluationRow,
    TaskDependencyRow,
    TaskLayerRow,
    TaskRow,
    utcnow,
)
from registry.rows import base_row, check_name, to_task
from registry.transactions import error_reason

log = logging.getLogger(__name__)


class TaskLifecycle(ArtifactFiles):
    """A run's task, from ``begin_task`` to ``finish_task`` or ``discard_task``."""

    def begin_task(
        self,
        name: str,
        *,
        base: str,
        method: str,
        method_config: dict[str, Any],
        train_config: dict[str, Any],
        dataset_spec: dict[str, Any],
        class_names: Sequence[str],
        run_host: str,
        run_pid: int,
    ) -> Task:
        """Record a task in status ``training`` for a new run (fresh run token, heartbeat now).

        The task has no position yet: it gets the next one when it finishes, so concurrent adds
        of different names never conflict. AlreadyExists only when the name is taken; the
        message says whether by a ready task, a live run or a left-over one.
        """
        check_name(name)
        with self._session(write=True) as s:
            existing = s.scalar(select(TaskRow).where(TaskRow.name == name))
            if existing is not None:
                raise AlreadyExists(_taken_message(existing))
            base_id = base_row(s, base).id
            row = TaskRow(
                name=name,
                base_id=base_id,
                position=None,
                method=method,
                method_config=method_config,
                train_config=train_config,
                dataset_spec=dataset_spec,
                num_classes=len(class_names),
                class_names=list(class_names),
                status="training",
                run_token=uuid.uuid4().hex,
                run_host=run_host,
                run_pid=run_pid,
                heartbeat_at=utcnow(),
            )
            s.add(row)
            try:
                s.flush()
            except IntegrityError as exc:  # a concurrent insert (databases without BEGIN IMMEDIATE)
                s.rollback()
                existing = s.scalar(select(TaskRow).where(TaskRow.name == name))
                if existing is not None:
                    raise AlreadyExists(_taken_message(existing)) from exc
                raise RegistryError(f"cannot record task {name!r}: {error_reason(exc)}") from exc
            return to_task(row, layers=False)

    def heartbeat_task(self, run_token: str) -> None:
        """Mark the run as alive (heartbeat_at = now); nothing happens if its row is gone."""
        with self._session(write=True) as s:
            s.execute(
                update(TaskRow)
                .where(TaskRow.run_token == run_token, TaskRow.status == "training")
                .values(heartbeat_at=utcnow())
                .execution_options(synchronize_session=False)
            )

    def finish_task(
        self,
        run_token: str,
        *,
        task_blob: bytes,
        task_num_params: int,
        probe_blob: bytes,
        probe_num_params: int,
        layers: Sequence[LayerEntry],
        head_params: int,
        train_seconds: float,
        test_accuracy: float,
        test_loss: float,
        test_samples: int,
        earlier: Sequence[EarlierCell] = (),
        dependencies: Sequence[tuple[str, str, str]] = (),
        shared: Sequence[SharedPin] = (),
        signature_blob: Optional[bytes] = None,
        signature_num_params: int = 0,
    ) -> Task:
        """Record the run's task as ``ready`` at the next position of its base.

        ``dependencies`` are (task name, pinned artifact sha256, kind) of the earlier tasks it
        read: each must still be ready on the same base with exactly that artifact, else
        RegistryError (it changed or was deleted while this run trained). ``shared`` are the
        shared artifacts it reads (entities.SharedPin: stored here when given with their bytes,
        else they must be recorded already); ``signature_blob`` is its gradient signature.

        One write transaction, serialised per base against other writers, records the artifacts'
        rows, the layers, the diagonal evaluation, the ``earlier`` cells (the earlier tasks the
        run re-checked — a sample; cells of tasks no longer ready are dropped) and the task's
        link in the base's hash chain (registry.chain). It writes only rows of the new task and
        new cells — checked before commit, so an add cannot alter anything earlier. Its cost does
        not depend on how many tasks the base holds. RunLost when the run's row is gone or no
        longer ``training``.

        Files are written (atomically) before the transaction; if it fails, files this call
        created are removed again, so a failure leaves neither rows nor new files.
        """
        created: list[str] = []
        try:
            task_file = self._stage(task_blob, created)
            probe_file = self._stage(probe_blob, created)
            signature_file = (self._stage(signature_blob, created)
                              if signature_blob is not None else None)
            shared_files = [self._stage(pin.blob, created) if pin.blob is not None else None
                            for pin in shared]
            with self._session(write=True) as s, _Writes(s) as writes:
                row = _run_row(s, run_token)
                # SQLite holds the database's write lock already; other databases lock the base
                # (FOR NO KEY UPDATE: finishers queue, a begin_task's foreign-key check does not).
                s.execute(
                    select(BaseModelRow.id).where(BaseModelRow.id == row.base_id)
                    .with_for_update(key_share=True)
                )
                wanted = {cell.task for cell in earlier}
                ready_ids = dict(s.execute(
                    select(TaskRow.name, TaskRow.id).where(
                        TaskRow.base_id == row.base_id, TaskRow.status == "ready",
                        TaskRow.name.in_(wanted))
                ).tuples().all()) if wanted else {}
                pins = [_pin(s, row, *dependency) for dependency in dependencies]
                pins += [self._shared_pin(s, pin, staged, created)
                         for pin, staged in zip(shared, shared_files)]
                artifact = self._record_artifact(
                    s, task_blob, task_file, "task", task_num_params, created
                )
                probe = self._record_artifact(
                    s, probe_blob, probe_file, "probe", probe_num_params, created
                )
                signature = None
                if signature_blob is not None and signature_file is not None:
                    signature = self._record_artifact(
                        s, signature_blob, signature_file, "signature", signature_num_params,
                        created,
                    )
                top = s.scalar(
                    select(func.max(TaskRow.position)).where(TaskRow.base_id == row.base_id)
                )
                row.position = (top or 0) + 1
                row.chain_prev_sha256 = _chain_head(s, row.base_id)
                row.chain_sha256 = chain.link(
                    row.chain_prev_sha256, row.position, row.name, artifact.sha256, probe.sha256,
                    signature.sha256 if signature is not None else None,
                )
                row.artifact_id = artifact.id
                row.probe_artifact_id = probe.id
                row.signature_artifact_id = signature.id if signature is not None else None
                row.train_seconds = train_seconds
                row.head_params = head_params
                row.status = "ready"
                row.layers = [
                    TaskLayerRow(
                        layer_name=layer.name,
                        kind=layer.kind,
                        score=layer.score,
                        active=layer.active,
                        base_params=layer.base_params,
                        task_params=layer.task_params,
                    )
                    for layer in layers
                ]
                row.dependencies = pins
                s.add(
                    EvaluationRow(
                        task_id=row.id,
                        after_task_id=row.id,
                        split="test",
                        kind="measured",
                        accuracy=test_accuracy,
                        loss=test_loss,
                        num_samples=test_samples,
                        max_logit_drift=0.0,
                        probe_ok=True,
                    )
                )
                for cell in earlier:
                    if cell.task not in ready_ids:
                        continue
                    s.add(
                        EvaluationRow(
                            task_id=ready_ids[cell.task],
                            after_task_id=row.id,
                            split="test",
                            kind=cell.kind,
                            accuracy=cell.accuracy,
                            max_logit_drift=cell.max_logit_drift,
                            probe_ok=cell.probe_ok,
                        )
                    )
                writes.check_only(row)
                s.flush()
                s.refresh(row)
                return to_task(row)
        except BaseException:
            self._remove_created(created)
            raise

    def _shared_pin(self, s: Session, pin: SharedPin, staged: Optional[tuple[str, str]],
                    created: list[str]) -> TaskDependencyRow:
        """The dependency row of a shared artifact; stored first when the pin carries its bytes."""
        if pin.blob is not None and staged is not None:
            if staged[0] != pin.sha256:
                raise RegistryError(f"shared artifact {pin.sha256[:12]}…: its bytes hash to "
                                    f"{staged[0][:12]}…; nothing was recorded")
            artifact = self._record_artifact(s, pin.blob, staged, "shared", pin.num_params,
                                             created)
        else:
            artifact = s.scalar(select(ArtifactRow).where(ArtifactRow.sha256 == pin.sha256))
        if artifact is None or artifact.kind != "shared":
            raise RegistryError(f"shared artifact {pin.sha256[:12]}… that this task reads is not "
                                "recorded (deleted while it trained?); nothing was recorded")
        return TaskDependencyRow(depends_on_task_id=None, artifact_id=artifact.id, kind=pin.kind)

    def discard_task(
        self, name: str, *, run_token: Optional[str] = None, force: bool = False
    ) -> None:
        """Remove a task that did not finish, and its rows.

        With ``run_token`` (a run cleaning up after itself) the row is deleted only while it
        still carries that token and is not ready; otherwise nothing happens. Without one (the
        user's ``task remove``) a ready task is refused, so is a non-ready row with recorded
        results (its rows were altered) and, unless ``force``, a run that is still alive
        (registry.runs.run_is_alive).
        """
        with self._session(write=True) as s:
            task_id = s.scalar(select(TaskRow.id).where(TaskRow.name == name).with_for_update())
            if task_id is None:
                if run_token is not None:
                    return
                raise NotFound(f"no task named {name!r}")
            row = s.get(TaskRow, task_id)
            assert row is not None
            if run_token is not None:
                if row.run_token != run_token or row.status == "ready":
                    log.info("task %s belongs to another run or is ready; left alone", name)
                    return
                s.delete(row)
                return
            if row.status == "ready":
                raise RegistryError(f"task {name!r} is ready; finished tasks are never removed")
            evaluations = s.scalar(
                select(func.count())
                .select_from(EvaluationRow)
                .where(or_(EvaluationRow.task_id == row.id, EvaluationRow.after_task_id == row.id))
            )
            if row.artifact_id is not None or row.probe_artifact_id is not None or evaluations:
                raise RegistryError(
                    f"task {name!r} has stored results but status {row.status!r}: its rows were "
                    "altered; not removing — run `taps-cl report accuracy --verify`"
                )
            task = to_task(row, layers=False)
            if not force and runs.run_is_alive(task):
                raise RegistryError(
                    f"task {name!r} is being added by a run that is still alive "
                    f"({_run_where(task)}); stop that run, or use "
                    f"`taps-cl task remove {name} --force` if it is gone"
                )
            s.delete(row)


def _chain_head(s: Session, base_id: int) -> str:
    """The chain value a task finishing now follows: the top ready task's, or the base's."""
    top = s.execute(
        select(TaskRow.chain_sha256)
        .where(TaskRow.base_id == base_id, TaskRow.status == "ready")
        .order_by(TaskRow.position.desc())
        .limit(1)
    ).first()
    if top is not None and top[0] is not None:
        return str(top[0])
    if top is not None:  # a ready task without a chain value: its row was altered
        raise RegistryError("the last ready task of this base has no chain value (its row was "
                            "altered); run `taps-cl report accuracy --verify`")
    weights = s.scalar(select(BaseModelRow.weights_sha256).where(BaseModelRow.id == base_id))
    return chain.genesis(str(weights))


class _Writes:
    """Every row a session inserts, changes or deletes, across all its flushes (autoflush too)."""

    def __init__(self, s: Session) -> None:
        self.session = s
        self.new: list[object] = []
        self.dirty: list[object] = []
        self.deleted: list[object] = []

    def __enter__(self) -> _Writes:
        event.listen(self.session, "before_flush", self._collect)
        return self

    def __exit__(self, *exc: object) -> None:
        event.remove(self.session, "before_flush", self._collect)

    def _collect(self, s: Session, *_: object) -> None:
        self.new += list(s.new)
        self.dirty += [obj for obj in s.dirty if s.is_modified(obj)]
        self.deleted += list(s.deleted)

    def check_only(self, row: TaskRow) -> None:
        """Refuse to commit a finish that would change anything but `row`'s own rows.

        New rows may be artifacts, the task's layers, pins and evaluations in its column (or its
        diagonal); the only changed row may be the task itself; nothing may be deleted.
        """
        self._collect(self.session)  # what the last flush has not sent yet
        foreign = [f"changed {type(obj).__name__}" for obj in self.dirty if obj is not row]
        foreign += [f"deleted {type(obj).__name__}" for obj in self.deleted]
        own = {id(obj) for obj in [*row.layers, *row.dependencies]}
        for obj in self.new:
            if isinstance(obj, EvaluationRow):
                if obj.after_task_id != row.id:
                    foreign.append("an evaluation outside the new column")
            elif isinstance(obj, (TaskLayerRow, TaskDependencyRow)):
                if id(obj) not in own:
                    foreign.append(f"a {type(obj).__name__} of another task")
            elif not isinstance(obj, ArtifactRow):
                foreign.append(f"new {type(obj).__name__}")
        if foreign:
            raise RegistryError("internal error: finishing a task would write beyond its own rows "
                                f"({', '.join(sorted(set(foreign)))}); nothing was recorded")


def _pin(s: Session, row: TaskRow, name: str, sha256: str, kind: str) -> TaskDependencyRow:
    """A dependency row of `row` on task `name`, checked to be ready with artifact `sha256`."""
    dep = s.scalar(select(TaskRow).where(TaskRow.name == name))
    if (dep is None or dep.status != "ready" or dep.base_id != row.base_id
            or dep.artifact is None or dep.artifact.sha256 != sha256):
        raise RegistryError(f"task {name!r}, which {row.name!r} reads, was deleted or changed "
                            "while it trained; nothing was recorded")
    return TaskDependencyRow(depends_on_task_id=dep.id, artifact_id=dep.artifact_id, kind=kind)


def _run_row(s: Session, run_token: str) -> TaskRow:
    """The run's task row, locked for the write; RunLost unless it is still ``training``."""
    task_id = s.scalar(select(TaskRow.id).where(TaskRow.run_token == run_token).with_for_update())
    row = s.get(TaskRow, task_id) if task_id is not None else None
    if row is None:
        raise RunLost(
            f"the task of this run ({run_token[:8]}…) was removed while the run was "
            "training; nothing was recorded"
        )
    if row.status != "training":
        raise RunLost(
            f"task {row.name!r} is {row.status}, not training: its row was altered while "
            "this run was training; nothing was recorded"
        )
    return row


def _run_where(task: Task) -> str:
    """Where a run is, for messages: its pid, host and last heartbeat."""
    age = runs.heartbeat_age(task)
    beat = "never" if age is None else f"{max(age, 0):.0f} s ago"
    return f"pid {task.run_pid} on {task.run_host}, last heartbeat {beat}"


def _taken_message(row: TaskRow) -> str:
    """Why a task name is taken: a ready task, a live run, or a left-over row."""
    task = to_task(row, layers=False)
    if task.status == "ready":
        return (
            f"task {task.name!r} already exists (ready, position {task.position} "
            f"of base {task.base!r})"
        )
    if runs.run_is_alive(task):
        return (
            f"task {task.name!r} is being added by a run in progress ({_run_where(task)}); "
            f"wait for it, or `taps-cl task remove {task.name} --force` if that run is gone"
        )
    return (
        f"task {task.name!r} is left over from a run that did not finish (status {task.status}); "
        f"remove it with `taps-cl task remove {task.name}`"
    )
