"""The Registry API: verb_noun methods that take plain values and return frozen entities.

Writes run in transactions that take the database's write lock first (SQLite ``BEGIN
IMMEDIATE``; elsewhere a row lock on the base), so a read-then-write is never raced by another
writer. Artifact files are written before the transaction that records them; a transaction
that fails removes the files its call created, unless a row references them by then.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

from sqlalchemy import func, or_, select, text, update
from sqlalchemy.exc import DatabaseError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from registry import db, runs
from registry.entities import (
    Artifact,
    BaseModel,
    EarlierCell,
    Evaluation,
    GarbageFile,
    LayerEntry,
    Task,
)
from registry.errors import (
    AlreadyExists,
    EarlierChanged,
    IntegrityFailure,
    NotFound,
    RegistryError,
    RunLost,
)
from registry.models import (
    ARTIFACT_KINDS,
    ArtifactRow,
    BaseModelRow,
    EvaluationRow,
    TaskLayerRow,
    TaskRow,
    utcnow,
)
from registry.store import ArtifactStore

log = logging.getLogger(__name__)

DB_FILENAME = "registry.db"
# A temp file of a write is garbage only when older than this: a live write's is left alone.
TEMP_GRACE_SECONDS = 600


class Registry:
    """Base models, tasks, layers, artifacts and evaluations under one home directory.

    With ``create=False`` (read commands) a missing or empty database raises NoRegistry and
    nothing is created, neither the file nor the home directory.
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        db_url: Optional[str] = None,
        *,
        create: bool = True,
    ) -> None:
        self.home = Path(home)
        self.url = db_url or db.sqlite_url(self.home / DB_FILENAME)
        self.engine = db.make_engine(self.url, create=create)
        try:
            db.ensure_schema(self.engine, create=create)
        except BaseException:
            self.engine.dispose()
            raise
        self.store = ArtifactStore(self.home / "artifacts")
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(db.writer(self.engine), expire_on_commit=False)

    def close(self) -> None:
        """Release the engine's connections."""
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _session(self, write: bool = False) -> Iterator[Session]:
        """A transaction; ``write`` ones take the write lock at BEGIN (SQLite: BEGIN IMMEDIATE)."""
        with (self._write_sessions if write else self._sessions)() as session:
            try:
                yield session
                session.commit()
            except (OperationalError, DatabaseError) as exc:
                # Locked, read-only or full database: a user-facing error, not a traceback.
                session.rollback()
                reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
                raise RegistryError(f"database {db.location(self.engine)}: {reason}") from exc
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

    def check_artifact(self, artifact: Artifact) -> bytes:
        """The artifact's bytes after checking every recorded fact a file can confirm.

        Checks the path is the content-addressed place of its sha256 inside the store, the
        content hashes to the sha256, and the row's ``bytes`` (and ``kind``) are right; raises
        IntegrityFailure naming the field otherwise. ``num_params`` needs torch: callers check it.
        """
        data = self.store.read(artifact.path, artifact.sha256)
        if artifact.bytes != len(data):
            raise IntegrityFailure(
                f"artifact {artifact.sha256[:12]}… records bytes={artifact.bytes}, "
                f"but its file holds {len(data)} bytes"
            )
        if artifact.kind not in ARTIFACT_KINDS:
            raise IntegrityFailure(
                f"artifact {artifact.sha256[:12]}… has unknown kind {artifact.kind!r}"
            )
        return data

    def list_artifacts(self) -> list[Artifact]:
        with self._session() as s:
            return [_artifact(row) for row in s.scalars(select(ArtifactRow).order_by(ArtifactRow.id))]

    def _stage(self, data: bytes, created: list[str]) -> tuple[str, str]:
        """Write a file before its transaction; note it in ``created`` if this call made it."""
        sha, relative, made = self.store.put(data)
        if made:
            created.append(relative)
        return sha, relative

    def _record_artifact(
        self,
        s: Session,
        data: bytes,
        staged: tuple[str, str],
        kind: str,
        num_params: int,
        created: list[str],
    ) -> ArtifactRow:
        """Get or create the row of a staged file inside the write transaction ``s``.

        Under the write lock the file is looked at again: a failed concurrent call or gc may
        have removed it since it was staged (neither removes a file a row references), and
        then it is written once more, so a committed row never points at nothing.
        """
        if kind not in ARTIFACT_KINDS:
            raise RegistryError(f"unknown artifact kind {kind!r}")
        _lock_artifacts(s)
        sha, relative = staged
        if not self.store.path_of(relative).exists():
            self._stage(data, created)
        row = s.scalar(select(ArtifactRow).where(ArtifactRow.sha256 == sha))
        if row is None:
            row = ArtifactRow(
                sha256=sha, path=relative, bytes=len(data), num_params=num_params, kind=kind
            )
            s.add(row)
            s.flush()
        return row

    def _remove_created(self, created: list[str]) -> None:
        """After a failed write: delete the files this call created that no row references.

        Done under the write lock so that a concurrent call that found the file already there
        either committed its row first (the file stays) or writes the file again (see
        _record_artifact). When the database cannot be written at all (read-only), the check
        runs without the lock. Never raises: the caller is already handling an error.
        """
        if not created:
            return
        for write in (True, False):
            try:
                with self._session(write=write) as s:
                    if write:
                        _lock_artifacts(s)
                    for relative in created:
                        sha = self.store.layout_sha256(relative)
                        used = s.scalar(
                            select(func.count())
                            .select_from(ArtifactRow)
                            .where(or_(ArtifactRow.path == relative, ArtifactRow.sha256 == sha))
                        )
                        if not used:
                            self.store.remove(relative)
                            log.info("removed %s, written by a call that did not commit", relative)
                return
            except RegistryError as exc:
                log.warning("cannot clean up files of a failed write (%s): %s", created, exc)
            except Exception:  # never mask the caller's error
                log.exception("cannot clean up files of a failed write: %s", created)
                return

    # ------------------------------------------------------------------- garbage
    def find_garbage(self, now: Optional[float] = None) -> list[GarbageFile]:
        """Files in the store that no row needs: artifact files no row references, and temp
        files of writes older than TEMP_GRACE_SECONDS (younger ones may belong to a live write).

        Files that do not have the store's layout are not listed: they are not ours to delete.
        """
        # Files are listed before rows are read: a file recorded meanwhile counts as referenced.
        files = list(self.store.files())
        with self._session() as s:
            paths = set(s.scalars(select(ArtifactRow.path)))
            shas = set(s.scalars(select(ArtifactRow.sha256)))
        now = time.time() if now is None else now
        garbage = []
        for relative, size, mtime in files:
            if self.store.is_temp(relative):
                if now - mtime >= TEMP_GRACE_SECONDS:
                    garbage.append(GarbageFile(relative, size, "temp"))
                continue
            sha = self.store.layout_sha256(relative)
            if sha is None or relative in paths or sha in shas:
                continue
            garbage.append(GarbageFile(relative, size, "unreferenced"))
        return garbage

    def remove_garbage(self, files: Sequence[GarbageFile], now: Optional[float] = None) -> int:
        """Delete the given files, each re-checked under the write lock; returns the bytes freed.

        A file a row references by now, a temp file younger than TEMP_GRACE_SECONDS, or a path
        that is neither an artifact file nor a temp file of the store is left alone.
        """
        freed = 0
        with self._session(write=True) as s:
            _lock_artifacts(s)
            for garbage in files:
                relative = garbage.path
                path = self.store.path_of(relative)  # refuses paths outside the store
                if self.store.is_temp(relative):
                    try:
                        mtime = path.lstat().st_mtime
                    except FileNotFoundError:
                        continue
                    except OSError as exc:
                        raise RegistryError(
                            f"cannot look at {path}: {exc.strerror or exc}"
                        ) from exc
                    current = time.time() if now is None else now
                    if current - mtime >= TEMP_GRACE_SECONDS:
                        freed += self.store.remove(relative)
                    continue
                sha = self.store.layout_sha256(relative)
                if sha is None:
                    log.warning("%s is not an artifact file of the store; not removed", relative)
                    continue
                used = s.scalar(
                    select(func.count())
                    .select_from(ArtifactRow)
                    .where(or_(ArtifactRow.path == relative, ArtifactRow.sha256 == sha))
                )
                if used:
                    log.info("%s is referenced (again); not removed", relative)
                    continue
                freed += self.store.remove(relative)
        return freed

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
        _check_name(name)
        with self._session() as s:  # cheap refusal before writing the weights
            if s.scalar(select(BaseModelRow.id).where(BaseModelRow.name == name)) is not None:
                raise AlreadyExists(f"base model {name!r} already exists")
        created: list[str] = []
        try:
            staged = self._stage(weights, created)
            return self._insert_base(
                name,
                staged=staged,
                created=created,
                model_spec=model_spec,
                architecture=architecture,
                weights=weights,
                weights_num_params=weights_num_params,
                num_params=num_params,
                total_params=total_params,
                data_config=data_config,
                head_keys=head_keys,
            )
        except BaseException:
            self._remove_created(created)
            raise

    def _insert_base(
        self,
        name: str,
        *,
        staged: tuple[str, str],
        created: list[str],
        model_spec: str,
        architecture: str,
        weights: bytes,
        weights_num_params: int,
        num_params: int,
        total_params: int,
        data_config: dict[str, Any],
        head_keys: Sequence[str],
    ) -> BaseModel:
        with self._session(write=True) as s:
            if s.scalar(select(BaseModelRow.id).where(BaseModelRow.name == name)) is not None:
                raise AlreadyExists(f"base model {name!r} already exists")
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
                if s.scalar(select(BaseModelRow.id).where(BaseModelRow.name == name)) is not None:
                    raise AlreadyExists(f"base model {name!r} already exists") from exc
                raise RegistryError(f"cannot record base model {name!r}: {_reason(exc)}") from exc
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
        run_host: str,
        run_pid: int,
    ) -> Task:
        """Record a task in status ``training`` for a new run (fresh run token, heartbeat now).

        The task has no position yet: it gets the next one when it finishes, so concurrent adds
        of different names never conflict. AlreadyExists only when the name is taken; the
        message says whether by a ready task, a live run or a left-over one.
        """
        _check_name(name)
        with self._session(write=True) as s:
            existing = s.scalar(select(TaskRow).where(TaskRow.name == name))
            if existing is not None:
                raise AlreadyExists(_taken_message(existing))
            base_row = self._base_row(s, base)
            row = TaskRow(
                name=name,
                base_id=base_row.id,
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
                raise RegistryError(f"cannot record task {name!r}: {_reason(exc)}") from exc
            return _task(row, layers=False)

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
    ) -> Task:
        """Record the run's task as ``ready`` at the next position of its base.

        One write transaction, serialised per base against other writers, stores the artifacts'
        rows, the layers, the diagonal evaluation and the ``earlier`` cells (this task's column
        of the accuracy matrix). Every task of the base that is ready at that moment must have
        a cell in ``earlier``, else EarlierChanged names the missing ones (check them, call
        again); cells of tasks that are no longer ready are ignored. RunLost when the run's row
        is gone or no longer ``training``.

        Files are written (atomically) before the transaction; if it fails, files this call
        created are removed again, so a failure leaves neither rows nor new files.
        """
        created: list[str] = []
        try:
            task_file = self._stage(task_blob, created)
            probe_file = self._stage(probe_blob, created)
            with self._session(write=True) as s:
                row = self._run_row(s, run_token)
                # SQLite holds the database's write lock already; other databases lock the base.
                s.execute(
                    select(BaseModelRow.id).where(BaseModelRow.id == row.base_id).with_for_update()
                )
                ready = s.execute(
                    select(TaskRow.name, TaskRow.id)
                    .where(TaskRow.base_id == row.base_id, TaskRow.status == "ready")
                    .order_by(TaskRow.position, TaskRow.id)
                ).all()
                ready_ids = {task_name: task_id for task_name, task_id in ready}
                cells = {cell.task: cell for cell in earlier if cell.task in ready_ids}
                missing = [task_name for task_name, _ in ready if task_name not in cells]
                if missing:
                    raise EarlierChanged(missing)
                artifact = self._record_artifact(
                    s, task_blob, task_file, "task", task_num_params, created
                )
                probe = self._record_artifact(
                    s, probe_blob, probe_file, "probe", probe_num_params, created
                )
                top = s.scalar(
                    select(func.max(TaskRow.position)).where(TaskRow.base_id == row.base_id)
                )
                row.position = (top or 0) + 1
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
                for cell in cells.values():
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
                s.flush()
                s.refresh(row)
                return _task(row)
        except BaseException:
            self._remove_created(created)
            raise

    def discard_task(
        self, name: str, *, run_token: Optional[str] = None, force: bool = False
    ) -> None:
        """Remove a task that did not finish, and its rows.

        With ``run_token`` (a run cleaning up after itself) the row is deleted only while it
        still carries that token and is not ready; otherwise nothing happens. Without one (the
        user's ``task remove``) a ready task is refused, so is a non-ready row with stored
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
            task = _task(row, layers=False)
            if not force and runs.run_is_alive(task):
                raise RegistryError(
                    f"task {name!r} is being added by a run that is still alive "
                    f"({_run_where(task)}); stop that run, or use "
                    f"`taps-cl task remove {name} --force` if it is gone"
                )
            s.delete(row)

    def get_task(self, name: str) -> Task:
        with self._session() as s:
            return _task(self._task_row(s, name, with_layers=True))

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
            return _task(row)

    def list_tasks(self, base: Optional[str] = None, *, ready_only: bool = False) -> list[Task]:
        """Tasks in sequence order: by base, then position (tasks without one last), then id."""
        with self._session() as s:
            query = (
                select(TaskRow)
                .join(BaseModelRow, TaskRow.base_id == BaseModelRow.id)
                .options(selectinload(TaskRow.layers))
                .order_by(
                    BaseModelRow.id, TaskRow.position.is_(None), TaskRow.position, TaskRow.id
                )
            )
            if base is not None:
                query = query.where(BaseModelRow.id == self._base_row(s, base).id)
            if ready_only:
                query = query.where(TaskRow.status == "ready")
            return [_task(row) for row in s.scalars(query).unique()]

    @staticmethod
    def _run_row(s: Session, run_token: str) -> TaskRow:
        task_id = s.scalar(
            select(TaskRow.id).where(TaskRow.run_token == run_token).with_for_update()
        )
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
        with self._session(write=True) as s:
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


def _lock_artifacts(s: Session) -> None:
    """Serialise writers of artifact rows and files (SQLite's BEGIN IMMEDIATE does already)."""
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("LOCK TABLE artifacts IN SHARE ROW EXCLUSIVE MODE"))


def _reason(exc: Exception) -> str:
    return str(getattr(exc, "orig", None) or exc).splitlines()[0]


def _run_where(task: Task) -> str:
    age = runs.heartbeat_age(task)
    beat = "never" if age is None else f"{max(age, 0):.0f} s ago"
    return f"pid {task.run_pid} on {task.run_host}, last heartbeat {beat}"


def _taken_message(row: TaskRow) -> str:
    """Why a task name is taken: a ready task, a live run, or a left-over row."""
    task = _task(row, layers=False)
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
        run_token=row.run_token,
        run_host=row.run_host,
        run_pid=row.run_pid,
        heartbeat_at=row.heartbeat_at,
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
