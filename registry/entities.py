"""Frozen values the registry hands to callers (never ORM rows)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Optional


@dataclass(frozen=True)
class Artifact:
    sha256: str
    path: str  # relative to the artifact root
    bytes: int
    num_params: int
    kind: str


@dataclass(frozen=True)
class BaseModel:
    name: str
    model_spec: str
    architecture: str
    weights: Artifact
    num_params: int  # backbone without its classifier: the budget's base
    total_params: int
    data_config: dict[str, Any]
    head_keys: tuple[str, ...]
    created_at: datetime

    @property
    def sha256(self) -> str:
        return self.weights.sha256


@dataclass(frozen=True)
class LayerEntry:
    name: str
    kind: str
    score: Optional[float]
    active: bool
    base_params: int
    task_params: int


@dataclass(frozen=True)
class TaskDependency:
    """An earlier task (or shared artifact) a task reads, pinned to the artifact it trained with."""

    task: Optional[str]  # the task read, or None for a shared artifact
    sha256: str  # the pinned artifact
    kind: str  # how it is read, e.g. "fusion"


@dataclass(frozen=True)
class Task:
    name: str
    base: str
    position: Optional[int]  # given when the task becomes ready; None while it trains
    method: str
    method_config: dict[str, Any]
    train_config: dict[str, Any]
    dataset_spec: dict[str, Any]
    num_classes: int
    class_names: tuple[str, ...]
    status: str
    artifact: Optional[Artifact]
    probe: Optional[Artifact]
    head_params: Optional[int]
    train_seconds: Optional[float]
    created_at: datetime
    layers: tuple[LayerEntry, ...] = field(default=())
    run_token: Optional[str] = None  # the `task add` run that owns the row (uuid4 hex)
    run_host: Optional[str] = None  # hostname of that run
    run_pid: Optional[int] = None  # its process id on run_host
    heartbeat_at: Optional[datetime] = None  # last sign of life of the run (UTC)
    depends_on: tuple[TaskDependency, ...] = ()  # what it reads, pinned (fusion, sharing)

    @property
    def task_params(self) -> int:
        return self.artifact.num_params if self.artifact else 0

    @property
    def active_layers(self) -> int:
        return sum(1 for layer in self.layers if layer.active)

    @property
    def total_layers(self) -> int:
        return len(self.layers)


@dataclass(frozen=True)
class Evaluation:
    task: str
    after_task: str
    split: str
    kind: str  # "measured" or "probe"
    accuracy: Optional[float]
    loss: Optional[float]
    num_samples: Optional[int]
    max_logit_drift: Optional[float]
    probe_ok: Optional[bool]
    created_at: datetime


@dataclass(frozen=True)
class EarlierCell:
    """An earlier task re-checked when a new task is recorded (its cell in the new column)."""

    task: str
    kind: str  # "probe" (logits unchanged, accuracy carried) or "measured" (re-measured)
    accuracy: Optional[float]
    max_logit_drift: Optional[float]
    probe_ok: bool


@dataclass(frozen=True)
class GarbageFile:
    """A file in the artifact store that no row needs (see Registry.find_garbage)."""

    path: str  # relative to the artifact root
    bytes: int
    reason: str  # "unreferenced" (an artifact file no row names) or "temp" (an abandoned write)
