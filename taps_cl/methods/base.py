"""The interface every task-learning method implements, its registry and shared helpers.

A method turns a fresh copy of the base model into a trainable task model (`prepare`), tells the
training loop what to optimise (`param_groups`, `extra_loss`, `set_train_mode`, `selectable`) and
extracts what the task must store (`extract`). What it stores is a flat dict of tensors whose names
say how they combine with the base (`merge_state`): `delta/<state-dict key>` is added to the base
value; `factor_b/<key>` (out × r) and `factor_a/<key>` (r × rest) always come as a pair and add
their product B·A, reshaped to the base weight's shape (a conv weight seen as out × in·k·k);
`set/<state-dict key>` replaces the base value. Stored tensors may be in a narrower float type than
the base (e.g. bfloat16); merging casts them to the base's type.

Composed methods (`mergeable = False`: adapters, fusion) also add modules to the base. They store
those modules' tensors as `module/<state-dict key of the attached module>` and may read earlier
tasks' tensors or shared artifacts (`dependencies`, handed over frozen as `Dependency` values;
`dependency_state` may also place base entries, e.g. shared norm layers). Their inference model
is rebuilt by `build_composed`: the base architecture with `set/` tensors merged, the method's
modules attached (`attach`), the dependencies' tensors placed (`dependency_state`) and the task's
own `module/` tensors loaded.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from taps_cl.errors import MethodError

DELTA_PREFIX = "delta/"
SET_PREFIX = "set/"
# A low-rank delta B·A: B (out × r) and A (r × in·k·k) of the weight `<key>`, always both.
FACTOR_B_PREFIX = "factor_b/"
FACTOR_A_PREFIX = "factor_a/"
# A tensor of a module a composed method attaches to the base (its key in the built model).
MODULE_PREFIX = "module/"


@dataclass(frozen=True)
class Dependency:
    """An earlier task a composed method reads, frozen: its name, method, options and tensors.

    `tensors` is None when the model is rebuilt from an exported file that already holds every
    tensor under its key in the built model (then only the structure is needed).
    """

    name: str
    method: str
    config: dict[str, Any]
    tensors: dict[str, Tensor] | None
    # For a shared artifact: the `task_dependencies.kind` a pin on it must have, as the artifact's
    # own bytes state it (`Method.read_shared`; a progressive band's `band` metadata). A pin's
    # kind row is only a copy of this; None where the artifact states none.
    kind: str | None = None


def agrees_with_artifact(kind: str, dependency: Dependency, sha256: str = "") -> None:
    """MethodError unless a pin of `kind` on `dependency` means what the artifact says it is."""
    if dependency.kind is not None and dependency.kind != kind:
        where = f"{sha256[:12]}…" if sha256 else repr(dependency.name)
        raise MethodError(f"shared artifact {where} is a {dependency.kind!r} artifact by its own "
                          f"metadata, not {kind!r}: the registry's pin kinds disagree with the "
                          "artifacts they pin (see `taps-cl report accuracy --verify`)")


@dataclass(frozen=True)
class LayerRecord:
    """What a task does with one adaptable layer of the base (one row of `task_layers`)."""

    name: str  # module name in the model, e.g. "blocks.3.0.conv_pw"
    kind: str  # "conv2d" or "linear"
    score: float | None  # learned gate score (TAPS); None for methods without gates
    active: bool  # whether the task changes this layer's weight
    base_params: int  # numbers in the base weight of this layer
    task_params: int  # numbers the task stores for this layer (0 when inactive)


@dataclass
class TaskState:
    """Everything a task stores: named tensors (see `merge_state`), a record per adaptable layer."""

    tensors: dict[str, Tensor]
    layers: list[LayerRecord]
    # False when some tensor was stored in a narrower type than trained (e.g. bfloat16): the model
    # rebuilt from `tensors` then differs from the trained one by that rounding.
    exact: bool = True

    @property
    def num_params(self) -> int:
        """Numbers stored by the task, buffers included (e.g. BatchNorm running statistics)."""
        return sum(t.numel() for t in self.tensors.values())

    @property
    def active_layers(self) -> int:
        """How many adaptable layers the task changes."""
        return sum(1 for layer in self.layers if layer.active)


@dataclass(frozen=True)
class EarlierTask:
    """What a method may know of an earlier ready task of the same base when it plans a new one."""

    name: str
    method: str
    config: dict[str, Any]
    pins: tuple[tuple[str, str], ...]  # (pin kind, sha256) of the shared artifacts it reads
    signature: str | None  # sha256 of its gradient signature artifact (None: none recorded)


@dataclass(frozen=True)
class Planning:
    """What a method may consult while it plans a new task (`Method.plan`).

    The task layer fills it in from the registry; methods never see the registry itself.
    """

    task: str  # the new task's name
    base: str  # the base's name
    base_sha256: str
    # The options the user gave (method config fields), as opposed to the config's defaults.
    given: Mapping[str, Any]
    # The new task's gradient signature and its artifact bytes (None for a one-class task).
    signature: tuple[Tensor, bytes] | None
    # Cosine similarity of the new task's signature to a stored one (by its sha256); None where
    # the two cannot be compared (another recipe, or the new task has none).
    similarity: Callable[[str], float | None]
    # The base's ready tasks in sequence order, only those of the named method if one is given.
    earlier: Callable[[str | None], Sequence[EarlierTask]]
    # The bytes of a recorded artifact by sha256, hash-checked.
    read: Callable[[str], bytes]


@dataclass(frozen=True)
class SharedRead:
    """A shared artifact a task reads frozen: as the dependency its model reads, and its pin."""

    dependency: Dependency
    sha256: str
    kind: str  # task_dependencies.kind of the pin: must be what the artifact says it is

    def __post_init__(self) -> None:
        # A planner that took a band from an edited row must not copy that edit into new pins.
        agrees_with_artifact(self.kind, self.dependency, self.sha256)


@dataclass(frozen=True)
class SharedWrite:
    """A shared artifact a task trained and stores (once, whoever else will read it)."""

    blob: bytes  # the artifact's bytes (safetensors)
    kind: str  # task_dependencies.kind of the pin
    num_params: int
    dependency: Dependency  # the artifact as the dependency the stored task model reads

    def __post_init__(self) -> None:
        agrees_with_artifact(self.kind, self.dependency)


@dataclass(frozen=True)
class GroupPlanning:
    """What a method may consult while it plans several new tasks trained together."""

    planning: Planning  # the base's earlier tasks and artifacts (its task/signature: unused)
    names: Sequence[str]  # the new tasks, in order
    # Cosine similarity of their gradient signatures, and the similarity group of each (labels).
    matrix: Sequence[Sequence[float]]
    labels: Sequence[Any]
    class_counts: Sequence[int]
    head: frozenset[str]  # the base's classifier-head keys
    # A fresh copy of the base with a new head of that many classes.
    build: Callable[[int], nn.Module]
    example: Tensor  # an input batch of the tasks' size, for shapes
    seed: int


@dataclass
class GroupPlan:
    """Several new tasks trained together: one configured method and one model per task (the
    models share modules), the shared artifacts they all read, their groups and similarity."""

    methods: list[Method]
    models: list[nn.Module]
    reads: list[SharedRead]
    groups: dict[str, list[str]]
    matrix: list[list[float]]


@dataclass
class Plan:
    """How a new task is trained: the method configured for it, and what shared artifacts it
    reads frozen; `details` are facts for logs and results (e.g. group similarity)."""

    method: Method
    reads: list[SharedRead] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)


class Method(ABC):
    """A way to learn one task on a frozen base; subclasses register by `name` with `@register`."""

    name: ClassVar[str]
    # The dataclass holding this method's options; `get_method` builds it from keyword overrides.
    Config: ClassVar[type]
    # Whether `merge_state` of the extracted tensors gives a plain model of the base's architecture.
    mergeable: ClassVar[bool] = True
    # Options whose default changed, with the default they had before: a stored config that
    # predates such an option is restored with its old value (`stored_method`), not today's.
    LEGACY_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, config: Any = None) -> None:
        if config is None:
            config = self.Config()
        if not isinstance(config, self.Config):
            raise MethodError(
                f"{self.name}: config must be a {self.Config.__name__}, got {type(config).__name__}"
            )
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def train_defaults(self) -> dict[str, Any]:
        """Training options (TrainConfig fields: `lr`, `clip_grad`) a run of this method uses
        where the user gives none; an option left out here takes TrainConfig's default."""
        return {}

    def config_dict(self) -> dict[str, Any]:
        """The method's options as a JSON-able dict (stored with the task)."""
        return dataclasses.asdict(self.config)

    @abstractmethod
    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze the base of `model` (a fresh copy with a new head), attach task parameters."""

    @abstractmethod
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups of the trainable task parameters."""

    def extra_loss(self, model: nn.Module, epoch: int) -> Tensor | None:
        """A loss term added to the task loss in `epoch` (0-based), or None."""
        return None

    def after_step(self, model: nn.Module, epoch: int) -> None:
        """Called by `fit` after every optimizer step of `epoch` (0-based), e.g. to adapt λ."""

    def finalize(self, model: nn.Module) -> None:
        """Called once after `fit` and before `extract`: a last change to the trained model itself.

        Whatever it changes is what gets stored and evaluated, so trained and stored model agree.
        """

    def set_train_mode(self, model: nn.Module) -> None:
        """Put `model` in the mode used for training steps."""
        model.train()

    def selectable(self, epoch: int, epochs: int) -> bool:
        """Whether validation may pick the weights of `epoch` (0-based) out of `epochs`."""
        return True

    def active_layers(self, model: nn.Module) -> int | None:
        """How many adaptable layers are on now, for progress reports; None if not meaningful."""
        return None

    @abstractmethod
    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """The tensors the task must store (on CPU, copied) and a record per adaptable layer."""

    # ---------------------------------------------- planning (generic code calls these hooks)
    # Whether `plan` reads the new task's gradient signature (every process of a distributed
    # run then computes it, not only the one that records).
    uses_signature: ClassVar[bool] = False

    def for_epochs(self, epochs: int, given: Collection[str]) -> Method:
        """This method fitted to a run of `epochs` epochs; `given` names the options the user set.

        MethodError where a given option cannot work in that many epochs.
        """
        return self

    def plan(self, planning: Planning) -> Plan:
        """How the new task `planning.task` is trained: the method (possibly configured from
        what the base's earlier tasks share) and the shared artifacts it reads frozen."""
        return Plan(self)

    def plan_group(self, planning: GroupPlanning) -> GroupPlan:
        """Configured methods and tied models for several new tasks trained together."""
        raise MethodError(f"{self.name} cannot train several tasks as a group")

    def shared_outputs(self, model: nn.Module, base_sha256: str) -> list[SharedWrite]:
        """The shared artifacts the trained `model` stores besides the task's own tensors."""
        return []

    def describe(self) -> dict[str, Any]:
        """Facts of the configured method that listings show beside its name (e.g. a group)."""
        return {}

    def read_shared(self, blob: bytes) -> Dependency:
        """A shared artifact this method's tasks pin, as the dependency their models read.

        Its `kind` is the `task_dependencies.kind` a pin on the artifact must have, taken from
        the artifact's own bytes: rebuilding and verification compare every pin's row with it.
        """
        raise MethodError(f"{self.name} reads no shared artifact")

    def task_pin_kind(self) -> str:
        """The `task_dependencies.kind` of this task's pins on the earlier tasks it reads
        (`dependencies()`): the method's name, as a finishing task records them."""
        return self.name

    # ------------------------------------------------ composed methods (mergeable = False)
    def dependencies(self) -> tuple[str, ...]:
        """Names of the earlier tasks whose stored tensors this task reads (from its options)."""
        return ()

    def check_dependency(self, name: str, method: str) -> None:
        """Refuse (MethodError) an earlier task of `method` that this method cannot read."""
        raise MethodError(f"{self.name} reads no earlier task (got {name!r})")

    def attach(
        self, model: nn.Module, head: frozenset[str], dependencies: Sequence[Dependency],
        example: Tensor,
    ) -> None:
        """Add this method's modules, and the dependencies' modules, to `model` in place.

        Only the structure: tensors are loaded afterwards (`build_composed`, or `prepare` for
        training). `example` is an input batch of the task's size, for shapes. The model keeps
        its class; the added modules' state-dict keys are what `module/` tensors name.
        """
        raise MethodError(f"{self.name} attaches no modules to the base")

    def dependency_state(self, dependency: Dependency) -> dict[str, Tensor]:
        """A dependency's stored tensors under their keys in the model `attach` built."""
        return {}
