"""The Registry API: verb_noun methods that take plain values and return frozen entities.

Registry is built in layers, one module each: transactions.py opens the database and the
artifact store and runs transactions; artifacts.py reads, checks, records and cleans up
artifact files; lifecycle.py holds a run's task verbs (begin, heartbeat, finish, discard);
tasks.py deletes ready tasks, lists their dependents and looks tasks up; summaries.py lists
tasks with SQL aggregates (no layer rows loaded); this module the base and evaluation verbs.
Row look-ups and the conversion of rows to entities are in rows.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from registry import chain
from registry.artifacts import TEMP_GRACE_SECONDS
from registry.entities import Artifact, BaseModel, Evaluation
from registry.errors import AlreadyExists, NotFound, RegistryError
from registry.lifecycle import TaskLifecycle
from registry.models import ArtifactRow, BaseModelRow, EvaluationRow, TaskRow
from registry.rows import base_row, check_name, task_row, to_artifact, to_base, to_evaluation
from registry.summaries import TaskSummaries
from registry.tasks import TaskVerbs
from registry.transactions import DB_FILENAME, error_reason

__all__ = ["DB_FILENAME", "TEMP_GRACE_SECONDS", "Registry"]


class Registry(TaskLifecycle, TaskVerbs, TaskSummaries):
    """Base models, tasks, layers, artifacts and evaluations under one home directory.

    With ``create=False`` (read commands) a missing or empty database raises NoRegistry and
    nothing is created, neither the file nor the home directory.
    """

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
        """Store the weights once as a ``base`` artifact and record the base model.

        If recording fails, a weights file this call created is removed again.
        """
        check_name(name)
        with self._session() as s:  # cheap refusal before writing the weights
            _refuse_taken_base(s, name)
        created: list[str] = []
        try:
            staged = self._stage(weights, created)
            with self._session(write=True) as s:
                _refuse_taken_base(s, name)
                artifact = self._record_artifact(
                    s, weights, staged, "base", weights_num_params, created
                )
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
                    s.rollback()
                    _refuse_taken_base(s, name, cause=exc)
                    raise RegistryError(
                        f"cannot record base model {name!r}: {error_reason(exc)}"
                    ) from exc
                s.refresh(row)
                return to_base(row)
        except BaseException:
            self._remove_created(created)
            raise

    def get_base(self, name: str) -> BaseModel:
        with self._session() as s:
            return to_base(base_row(s, name))

    def list_bases(self) -> list[BaseModel]:
        with self._session() as s:
            return [to_base(r) for r in s.scalars(select(BaseModelRow).order_by(BaseModelRow.id))]

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
        with self._session(write=True) as s:
            measured = task_row(s, task)
            after = task_row(s, after_task)
            row = EvaluationRow(
                task_id=measured.id,
                after_task_id=after.id,
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
            return to_evaluation(row, measured.name, after.name)

    def list_evaluations(
        self, base: Optional[str] = None, *, tasks: Optional[Sequence[str]] = None
    ) -> list[Evaluation]:
        """Every evaluation (oldest first), optionally of one base's tasks or of named tasks.

        Read as plain rows (no ORM objects): a base of 10,000 tasks has ~10⁵ cells.
        """
        measured, after = aliased(TaskRow), aliased(TaskRow)
        ev = EvaluationRow
        query = (
            select(measured.name, after.name, ev.split, ev.kind, ev.accuracy, ev.loss,
                   ev.num_samples, ev.max_logit_drift, ev.probe_ok, ev.created_at)
            .join(measured, ev.task_id == measured.id)
            .join(after, ev.after_task_id == after.id)
            .order_by(ev.id)
        )
        with self._session() as s:
            if base is not None:
                query = query.where(measured.base_id == base_row(s, base).id)
            if tasks is not None:
                query = query.where(measured.name.in_(list(tasks)))
            return [Evaluation(*values) for values in s.execute(query).tuples()]

    def list_task_names(self, base: str, *, ready_only: bool = True) -> list[str]:
        """Names of a base's tasks in sequence order, without loading their rows."""
        with self._session() as s:
            query = (
                select(TaskRow.name)
                .where(TaskRow.base_id == base_row(s, base).id)
                .order_by(TaskRow.position.is_(None), TaskRow.position, TaskRow.id)
            )
            if ready_only:
                query = query.where(TaskRow.status == "ready")
            return list(s.scalars(query))

    def get_artifact(self, sha256: str) -> Artifact:
        """The recorded artifact with this content hash (NotFound if none)."""
        with self._session() as s:
            row = s.scalar(select(ArtifactRow).where(ArtifactRow.sha256 == sha256))
            if row is None:
                raise NotFound(f"no artifact {sha256[:12]}… is recorded")
            return to_artifact(row)

    def chain_problems(self, base: str) -> dict[str, str]:
        """Task name → why its link in the base's hash chain fails (registry.chain); {} if none.

        Reads rows only: no artifact file is opened.
        """
        task_art, probe_art = aliased(ArtifactRow), aliased(ArtifactRow)
        signature_art = aliased(ArtifactRow)
        with self._session() as s:
            b = base_row(s, base)
            rows = s.execute(
                select(TaskRow.name, TaskRow.position, task_art.sha256, probe_art.sha256,
                       TaskRow.chain_prev_sha256, TaskRow.chain_sha256, signature_art.sha256)
                .outerjoin(task_art, TaskRow.artifact_id == task_art.id)
                .outerjoin(probe_art, TaskRow.probe_artifact_id == probe_art.id)
                .outerjoin(signature_art, TaskRow.signature_artifact_id == signature_art.id)
                .where(TaskRow.base_id == b.id, TaskRow.status == "ready")
                .order_by(TaskRow.position)
            ).tuples().all()
            return chain.chain_problems(b.weights_sha256,
                                        [chain.ChainEntry(*values) for values in rows])


def _refuse_taken_base(s: Session, name: str, cause: Optional[Exception] = None) -> None:
    """AlreadyExists (from ``cause``) when a base model of that name is recorded."""
    if s.scalar(select(BaseModelRow.id).where(BaseModelRow.name == name)) is not None:
        raise AlreadyExists(f"base model {name!r} already exists") from cause
