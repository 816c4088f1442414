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
class SharedPin:
    """A shared artifact a finishing task reads (progressive adapters shared by several tasks).

    With `blob`, the finish stores it (content-addressed: a second member finishing with the
    same bytes finds the row already there); without, an artifact with `sha256` must already be
    recorded as kind ``shared``. Either way the task pins it (a `task_dependencies` row).
    """

    sha256: str  # the artifact's content hash
    kind: str  # how the task reads it, e.g. "progressive_shared" or "progressive_group"
    blob: Optional[bytes] = None  # the bytes, when this finish may be the first to store them
    num_params: int = 0  # numbers in it (with `blob`)


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
    # Its link in the base's hash chain (registry.chain); None until it is ready.
    chain_prev_sha256: Optional[str] = None
    chain_sha256: Optional[str] = None
    # Its gradient signature (taps_cl.analysis.similarity); None for tasks added before signatures.
    signature: Optional[Artifact] = None

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
class TaskSummary:
    """What a listing or a budget shows of a task: counts and sizes, no layer rows.

    `Registry.task_summaries` computes it in SQL, so listing 10,000 tasks does not load their
    layers; `TaskSummary.of` gives the same values from a full Task.
    """

    name: str
    base: str
    method: str
    position: Optional[int]  # None while the task trains
    status: str
    num_classes: int
    method_config: dict[str, Any]
    task_params: int  # numbers in the task's artifact (0 without one)
    head_params: Optional[int]  # numbers in its new classifier head
    active_layers: int  # layers whose task-specific weights are stored
    total_layers: int  # adaptable layers recorded for the task
    bytes: int  # size of the task's artifact file (0 without one)
    sha256: Optional[str]  # the task artifact's content hash (None without one)
    test_accuracy: Optional[float]  # its latest measured test accuracy (None: none recorded)
    created_at: datetime
    depends_on: tuple[str, ...] = ()  # names of the earlier tasks it reads (fusion)

    @classmethod
    def of(cls, task: Task, test_accuracy: Optional[float] = None) -> TaskSummary:
        """The summary of a full Task entity (its accuracy is not part of it: pass it)."""
        return cls(
            name=task.name, base=task.base, method=task.method, position=task.position,
            status=task.status, num_classes=task.num_classes,
            method_config=dict(task.method_config), task_params=task.task_params,
            head_params=task.head_params, active_layers=task.active_layers,
            total_layers=task.total_layers,
            bytes=task.artifact.bytes if task.artifact is not None else 0,
            sha256=task.artifact.sha256 if task.artifact is not None else None,
            test_accuracy=test_accuracy, created_at=task.created_at,
            depends_on=tuple(pin.task for pin in task.depends_on if pin.task),
        )


@dataclass(frozen=True)
class SharedUse:
    """A shared artifact of a base (progressive bands) and the ready tasks that pin it."""

    sha256: str
    num_params: int
    bytes: int
    kinds: tuple[str, ...]  # how the tasks read it (pin kinds, e.g. "progressive_group")
    tasks: tuple[str, ...]  # the ready tasks pinning it, in sequence order


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


@dataclass(frozen=True)
class StoreRecord:
    """The artifact store a registry recorded (registry.binding)."""

    url: str  # as recorded: a URL, an absolute path, or a path relative to the SQLite file's dir
    store_id: Optional[str]  # the id in the store's marker; None: a default store, no marker
    location: str  # where this client reads and writes artifacts (the store it opened)
