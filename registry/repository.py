"""The Registry API: verb_noun methods that take plain values and return frozen entities."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import func, select
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from registry import db
from registry.entities import Artifact, BaseModel, EarlierCell, Evaluation, LayerEntry, Task
from registry.errors import AlreadyExists, NotFound, RegistryError
from registry.models import (
    ARTIFACT_KINDS,
    ArtifactRow,
    BaseModelRow,
    EvaluationRow,
    TaskLayerRow,
    TaskRow,
)
from registry.store import ArtifactStore

DB_FILENAME = "registry.db"


class Registry:
    """Base models, tasks, layers, artifacts and evaluations under one home directory."""

    def __init__(self, home: str | os.PathLike[str], db_url: Optional[str] = None) -> None:
        self.home = Path(home)
        self.url = db_url or db.sqlite_url(self.home / DB_FILENAME)
        self.engine = db.make_engine(self.url)
        db.ensure_schema(self.engine)
        self.store = ArtifactStore(self.home / "artifacts")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions() as session:
            try:
                yield session
                session.commit()
            except (OperationalError, DatabaseError) as exc:
                # Locked, read-only or full database: a user-facing error, not a traceback.
                session.rollback()
                reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
                raise RegistryError(f"database {self.engine.url}: {reason}") from exc
            except BaseException:
                session.rollback()
                raise

    # ----------------------------------------------------------------- artifacts
    def write_artifact_file(self, data: bytes) -> tuple[str, str]:
        """Write content to the store (no row yet); returns (sha256, relative path)."""
        return self.store.write(data)

    def read_artifact(self, artifact: Artifact) -> bytes:
        """The artifact's bytes, verified against its sha256."""
        return self.store.read(artifact.path, artifact.sha256)

    def verify_artifact(self, artifact: Artifact) -> None:
        """Raise IntegrityFailure unless the artifact's file matches its hash."""
        self.store.verify(artifact.path, artifact.sha256)

    def list_artifacts(self) -> list[Artifact]:
        with self._session() as s:
            return [_artifact(row) for row in s.scalars(select(ArtifactRow).order_by(ArtifactRow.id))]

    def _record_artifact(
        self, s: Session, data: bytes, kind: str, num_params: int
    ) -> ArtifactRow:
        """Write the file (atomic, fsynced) and get-or-create its row inside session ``s``."""
        if kind not in ARTIFACT_KINDS:
            raise RegistryError(f"unknown artifact kind {kind!r}")
        sha, relative = self.store.write(data)
        row = s.scalar(select(ArtifactRow).where(ArtifactRow.sha256 == sha))
        if row is None:
            row = ArtifactRow(
                sha256=sha, path=relative, bytes=len(data), num_params=num_params, kind=kind
            )
            s.add(row)
            s.flush()
        return row

    # --------------------------------------------------------------- base models
    def add_base(
        self,
        name: str,
        *,
        model_spec: str,
        architecture: str,
        weights: bytes,
        weights_num_params: int,
        num_params: int,
        total_params: int,
        data_config: dict[str, Any],
        head_keys: Sequence[str],
    ) -> BaseModel:
        """Store the weights once as a ``base`` artifact and record the base model."""
        _check_name(name)
        with self._session() as s:
            if s.scalar(select(BaseModelRow.id).where(BaseModelRow.name == name)) is not None:
                raise AlreadyExists(f"base model {name!r} already exists")
            artifact = self._record_artifact(s, weights, "base", weights_num_params)
            row = BaseModelRow(
                name=name,
                model_spec=model_spec,
                architecture=architecture,
                weights_artifact_id=artifact.id,
                weights_sha256=artifact.sha256,
                num_params=num_params,
                total_params=total_params,
                data_config=data_config,
                head_keys=sorted(head_keys),
            )
            s.add(row)
            try:
                s.flush()
            except IntegrityError as exc:
                raise AlreadyExists(f"base model {name!r} already exists") from exc
            s.refresh(row)
            return _base(row)

    def get_base(self, name: str) -> BaseModel:
        with self._session() as s:
            return _base(self._base_row(s, name))

    def list_bases(self) -> list[BaseModel]:
        with self._session() as s:
            return [_base(r) for r in s.scalars(select(BaseModelRow).order_by(BaseModelRow.id))]

    @staticmethod
    def _base_row(s: Session, name: str) -> BaseModelRow:
        row = s.scalar(select(BaseModelRow).where(BaseModelRow.name == name))
        if row is None:
            raise NotFound(f"no base model named {name!r}")
        return row

    # --------------------------------------------------------------------- tasks
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
    ) -> Task:
        """Record a task in status ``training`` at the end of its base's sequence."""
        _check_name(name)
        with self._session() as s:
            if s.scalar(select(TaskRow.id).where(TaskRow.name == name)) is not None:
                raise AlreadyExists(f"task {name!r} already exists")
            base_row = self._base_row(s, base)
            position = (
                s.scalar(select(func.max(TaskRow.position)).where(TaskRow.base_id == base_row.id))
                or 0
            ) + 1
            row = TaskRow(
                name=name,
                base_id=base_row.id,
                position=position,
                method=method,
                method_config=method_config,
                train_config=train_config,
                dataset_spec=dataset_spec,
                num_classes=len(class_names),
                class_names=list(class_names),
                status="training",
            )
            s.add(row)
            try:
                s.flush()
            except IntegrityError as exc:
                raise AlreadyExists(f"task {name!r} (or its position) already exists") from exc
            return _task(row, layers=False)

    def finish_task(
        self,
        name: str,
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
    ) -> Task:
        """Store the task's artifacts, layers and test evaluation, and mark it ``ready``.

        ``earlier`` are the re-checks of the base's earlier tasks: they are recorded in the same
        transaction as this task's column of the accuracy matrix.

        Files are written (atomically) before the single transaction that records them, so a
        crash leaves at most an orphan file, never a row pointing at nothing.
        """
        with self._session() as s:
            row = self._task_row(s, name)
            if row.status != "training":
                raise RegistryError(f"task {name!r} is {row.status}, not training")
            artifact = self._record_artifact(s, task_blob, "task", task_num_params)
            probe = self._record_artifact(s, probe_blob, "probe", probe_num_params)
            row.artifact_id = artifact.id
            row.probe_artifact_id = probe.id
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
                s.add(
                    EvaluationRow(
                        task_id=self._task_row(s, cell.task).id,
                        after_task_id=row.id,
                        split="test",
                        kind=cell.kind,
                        accuracy=cell.accuracy,
                        max_logit_drift=cell.max_logit_drift,
                        probe_ok=cell.probe_ok,
                    )
                )
            s.flush()
            s.refresh(row)
            return _task(row)

    def discard_task(self, name: str) -> None:
        """Remove a task that did not finish (status ``training`` or ``failed``) and its rows."""
        with self._session() as s:
            row = self._task_row(s, name)
            if row.status == "ready":
                raise RegistryError(f"task {name!r} is ready; finished tasks are never removed")
            s.delete(row)

    def get_task(self, name: str) -> Task:
        with self._session() as s:
            return _task(self._task_row(s, name, with_layers=True))

    def list_tasks(self, base: Optional[str] = None, *, ready_only: bool = False) -> list[Task]:
        """Tasks in sequence order (by base, then position)."""
        with self._session() as s:
            query = (
                select(TaskRow)
                .join(BaseModelRow, TaskRow.base_id == BaseModelRow.id)
                .options(selectinload(TaskRow.layers))
                .order_by(BaseModelRow.id, TaskRow.position)
            )
            if base is not None:
                query = query.where(BaseModelRow.id == self._base_row(s, base).id)
            if ready_only:
                query = query.where(TaskRow.status == "ready")
            return [_task(row) for row in s.scalars(query).unique()]

    @staticmethod
    def _task_row(s: Session, name: str, with_layers: bool = False) -> TaskRow:
        query = select(TaskRow).where(TaskRow.name == name)
        if with_layers:
            query = query.options(selectinload(TaskRow.layers))
        row = s.scalar(query)
        if row is None:
            raise NotFound(f"no task named {name!r}")
        return row

    # --------------------------------------------------------------- evaluations
    def add_evaluation(
        self,
        task: str,
        *,
        after_task: str,
        split: str = "test",
        kind: str = "measured",
        accuracy: Optional[float] = None,
        loss: Optional[float] = None,
        num_samples: Optional[int] = None,
        max_logit_drift: Optional[float] = None,
        probe_ok: Optional[bool] = None,
    ) -> Evaluation:
        """Record one cell of the accuracy matrix: ``task`` measured after ``after_task``."""
        if kind not in ("measured", "probe"):
            raise RegistryError(f"unknown evaluation kind {kind!r}")
        with self._session() as s:
            task_row = self._task_row(s, task)
            after_row = self._task_row(s, after_task)
            row = EvaluationRow(
                task_id=task_row.id,
                after_task_id=after_row.id,
                split=split,
                kind=kind,
                accuracy=accuracy,
                loss=loss,
                num_samples=num_samples,
                max_logit_drift=max_logit_drift,
                probe_ok=probe_ok,
            )
            s.add(row)
            s.flush()
            return _evaluation(row, task_row.name, after_row.name)

    def list_evaluations(self, base: Optional[str] = None) -> list[Evaluation]:
        """Every evaluation (oldest first), optionally of one base's tasks."""
        with self._session() as s:
            names = dict(s.execute(select(TaskRow.id, TaskRow.name)).tuples().all())
            query = select(EvaluationRow).order_by(EvaluationRow.id)
            if base is not None:
                base_id = self._base_row(s, base).id
                query = query.join(TaskRow, EvaluationRow.task_id == TaskRow.id).where(
                    TaskRow.base_id == base_id
                )
            return [
                _evaluation(row, names[row.task_id], names[row.after_task_id])
                for row in s.scalars(query)
            ]


def _check_name(name: str) -> None:
    if not name or not name.strip() or len(name) > 128 or any(c in name for c in "/\\\n\t"):
        raise RegistryError(f"invalid name {name!r}: 1–128 characters, no slashes, tabs or newlines")


def _artifact(row: ArtifactRow) -> Artifact:
    return Artifact(
        sha256=row.sha256, path=row.path, bytes=row.bytes, num_params=row.num_params, kind=row.kind
    )


def _base(row: BaseModelRow) -> BaseModel:
    return BaseModel(
        name=row.name,
        model_spec=row.model_spec,
        architecture=row.architecture,
        weights=_artifact(row.weights),
        num_params=row.num_params,
        total_params=row.total_params,
        data_config=dict(row.data_config),
        head_keys=tuple(row.head_keys),
        created_at=row.created_at,
    )


def _task(row: TaskRow, layers: bool = True) -> Task:
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
        artifact=_artifact(row.artifact) if row.artifact else None,
        probe=_artifact(row.probe) if row.probe else None,
        head_params=row.head_params,
        train_seconds=row.train_seconds,
        created_at=row.created_at,
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


def _evaluation(row: EvaluationRow, task: str, after: str) -> Evaluation:
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
