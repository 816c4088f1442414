"""ORM rows of the registry (SQLAlchemy 2.0 typed style, every constraint named)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Named constraints make Alembic batch migrations (SQLite) and downgrades deterministic.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

TASK_STATUSES = ("training", "ready")
ARTIFACT_KINDS = ("base", "task", "probe", "shared", "signature")


def utcnow() -> datetime:
    """Timezone-aware now, recorded as UTC."""
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ArtifactRow(Base):
    __tablename__ = "artifacts"
    __table_args__ = (
        CheckConstraint(f"kind IN {ARTIFACT_KINDS!r}", name="kind"),
        CheckConstraint("bytes >= 0", name="bytes_nonneg"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(255))  # relative to <home>/artifacts
    bytes: Mapped[int] = mapped_column(BigInteger)
    num_params: Mapped[int] = mapped_column(BigInteger, default=0)
    kind: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class BaseModelRow(Base):
    __tablename__ = "base_models"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    model_spec: Mapped[str] = mapped_column(String(255))  # e.g. timm:tf_efficientnet_lite0
    architecture: Mapped[str] = mapped_column(String(128))
    weights_artifact_id: Mapped[int] = mapped_column(ForeignKey("artifacts.id"))
    weights_sha256: Mapped[str] = mapped_column(String(64))
    num_params: Mapped[int] = mapped_column(BigInteger)  # backbone without its classifier head
    total_params: Mapped[int] = mapped_column(BigInteger)  # including the original head
    data_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    head_keys: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    weights: Mapped[ArtifactRow] = relationship(lazy="joined")
    tasks: Mapped[list[TaskRow]] = relationship(back_populates="base", order_by="TaskRow.position")


class TaskRow(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("base_id", "position", name="uq_tasks_base_id_position"),
        CheckConstraint(f"status IN {TASK_STATUSES!r}", name="status"),
        CheckConstraint("position >= 1", name="position_positive"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    base_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"), index=True)
    # 1-based place in its base's sequence, given when the task becomes ready (NULL before):
    # positions and accuracy-matrix columns follow the order in which tasks finished.
    position: Mapped[Optional[int]] = mapped_column(Integer)
    method: Mapped[str] = mapped_column(String(32))
    method_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    train_config: Mapped[dict[str, Any]] = mapped_column(JSON)
    dataset_spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    num_classes: Mapped[int] = mapped_column(Integer)
    class_names: Mapped[list[str]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16), default="training")
    artifact_id: Mapped[Optional[int]] = mapped_column(ForeignKey("artifacts.id"))
    probe_artifact_id: Mapped[Optional[int]] = mapped_column(ForeignKey("artifacts.id"))
    # Numbers in the task's new classifier head: what a head-only baseline of this task would train.
    head_params: Mapped[Optional[int]] = mapped_column(BigInteger)
    train_seconds: Mapped[Optional[float]] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # The `task add` run that owns the row: finish_task and a run's own clean-up match this
    # token (uuid4 hex), never the name, so a removed-and-re-added name is not overwritten.
    run_token: Mapped[Optional[str]] = mapped_column(String(36), unique=True)
    run_host: Mapped[Optional[str]] = mapped_column(String(255))  # hostname of the run
    run_pid: Mapped[Optional[int]] = mapped_column(Integer)  # its process id on run_host
    # Refreshed by the live run; a stale heartbeat means the run is gone (registry.runs).
    heartbeat_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True))
    # The base's sequence as a hash chain (registry.chain): set when the task becomes ready, from
    # the chain of the ready task it followed (or the base's weights) and its own artifacts, so
    # any later rewrite of an earlier task's rows shows without re-running a model.
    chain_prev_sha256: Mapped[Optional[str]] = mapped_column(String(64))
    chain_sha256: Mapped[Optional[str]] = mapped_column(String(64))
    # The task's gradient signature (taps_cl.analysis.similarity), recorded when it is added; NULL for
    # tasks added before signatures existed.
    signature_artifact_id: Mapped[Optional[int]] = mapped_column(ForeignKey("artifacts.id"))

    base: Mapped[BaseModelRow] = relationship(back_populates="tasks", lazy="joined")
    artifact: Mapped[Optional[ArtifactRow]] = relationship(
        foreign_keys=[artifact_id], lazy="joined"
    )
    probe: Mapped[Optional[ArtifactRow]] = relationship(
        foreign_keys=[probe_artifact_id], lazy="joined"
    )
    signature: Mapped[Optional[ArtifactRow]] = relationship(
        foreign_keys=[signature_artifact_id], lazy="joined"
    )
    layers: Mapped[list[TaskLayerRow]] = relationship(
        back_populates="task", cascade="all, delete-orphan", order_by="TaskLayerRow.id"
    )
    # What this task reads, pinned to the exact artifact it was trained against.
    dependencies: Mapped[list[TaskDependencyRow]] = relationship(
        foreign_keys="TaskDependencyRow.task_id", cascade="all, delete-orphan",
        order_by="TaskDependencyRow.id",
    )


class TaskLayerRow(Base):
    __tablename__ = "task_layers"
    __table_args__ = (UniqueConstraint("task_id", "layer_name", name="uq_task_layers_task_id_layer_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    layer_name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(32))
    score: Mapped[Optional[float]] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(Boolean)
    base_params: Mapped[int] = mapped_column(BigInteger)
    task_params: Mapped[int] = mapped_column(BigInteger)

    task: Mapped[TaskRow] = relationship(back_populates="layers")


class EvaluationRow(Base):
    __tablename__ = "evaluations"
    __table_args__ = (
        Index("ix_evaluations_task_id_after_task_id", "task_id", "after_task_id"),
        # A column of the accuracy matrix (what one add recorded) without a table scan.
        Index("ix_evaluations_after_task_id", "after_task_id"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    # The accuracy-matrix column: the task whose addition preceded this measurement.
    after_task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    split: Mapped[str] = mapped_column(String(16))
    # "measured" (accuracy recomputed on data) or "probe" (probe logits re-checked; accuracy carried).
    kind: Mapped[str] = mapped_column(String(16), default="measured")
    accuracy: Mapped[Optional[float]] = mapped_column(Float)
    loss: Mapped[Optional[float]] = mapped_column(Float)
    num_samples: Mapped[Optional[int]] = mapped_column(Integer)
    max_logit_drift: Mapped[Optional[float]] = mapped_column(Float)
    probe_ok: Mapped[Optional[bool]] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class TaskDependencyRow(Base):
    __tablename__ = "task_dependencies"
    __table_args__ = (
        CheckConstraint(
            "depends_on_task_id IS NOT NULL OR artifact_id IS NOT NULL", name="has_target"
        ),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    depends_on_task_id: Mapped[Optional[int]] = mapped_column(ForeignKey("tasks.id"))
    artifact_id: Mapped[Optional[int]] = mapped_column(ForeignKey("artifacts.id"))
    kind: Mapped[str] = mapped_column(String(32))  # e.g. "fusion", "shared_adapter"

    depends_on: Mapped[Optional[TaskRow]] = relationship(
        foreign_keys=[depends_on_task_id], lazy="joined"
    )
    artifact: Mapped[Optional[ArtifactRow]] = relationship(
        foreign_keys=[artifact_id], lazy="joined"
    )


class ArtifactStoreRow(Base):
    """The artifact store this registry belongs to (registry.binding): one row, id 1."""

    __tablename__ = "artifact_store"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    # uuid4 hex, also written in the store's marker object: the same store seen through another
    # mount path or URL carries the same id, any other store does not. NULL for a default
    # <home>/artifacts store, which holds no marker and is known by its directory.
    store_id: Mapped[Optional[str]] = mapped_column(String(32))
    # Where clients find the store when they name none: a URL or absolute path, or a path
    # relative to the SQLite database file's directory (the default <home>/artifacts is
    # recorded as "artifacts", so a moved or copied home keeps working).
    url: Mapped[str] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
