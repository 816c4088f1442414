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
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

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


class Method(ABC):
    """A way to learn one task on a frozen base; subclasses register by `name` with `@register`."""

    name: ClassVar[str]
    # The dataclass holding this method's options; `get_method` builds it from keyword overrides.
    Config: ClassVar[type]
    # Whether `merge_state` of the extracted tensors gives a plain model of the base's architecture.
    mergeable: ClassVar[bool] = True

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


# --------------------------------------------------------------------------------------- registry

METHODS: dict[str, type[Method]] = {}

M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator adding a Method subclass to `METHODS` under its `name`."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **overrides: Any) -> Method:
    """Build the method `name` with config fields overridden by keyword; None values are ignored."""
    cls = METHODS.get(name)
    if cls is None:
        raise MethodError(f"unknown method {name!r} (choose from {', '.join(sorted(METHODS))})")
    allowed = [f.name for f in dataclasses.fields(cls.Config)]
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        options = ", ".join(allowed) if allowed else "none"
        raise MethodError(
            f"method {name!r} has no option {', '.join(map(repr, unknown))} (options: {options})"
        )
    return cls(cls.Config(**given))


# ----------------------------------------------------------------------------------- validation


def check_number(
    method: str,
    field: str,
    value: Any,
    *,
    minimum: float | None = None,
    positive: bool = False,
    integer: bool = False,
) -> float | int:
    """Validate one numeric config field and return it as float (or int); raise MethodError.

    Float fields must be finite: an inf or NaN learning rate or λ passes every range check
    (`inf > 0`, NaN compares false) and would only fail once training has started.
    """
    # bool is an int subclass, but `lam=True` is certainly a mistake.
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = "an integer" if integer else "a number"
        raise MethodError(f"{method}: {field} must be {wanted}, got {value!r}")
    if not integer:
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise MethodError(f"{method}: {field} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise MethodError(f"{method}: {field} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise MethodError(f"{method}: {field} must be >= {minimum}, got {value!r}")
    return int(value) if integer else float(value)


def check_choice(method: str, field: str, value: Any, choices: tuple[str, ...]) -> str:
    """Validate one config field that must be one of `choices`; raise MethodError."""
    if value not in choices:
        raise MethodError(
            f"{method}: {field} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


# -------------------------------------------------------------------------------- model helpers

# Norm layers whose parameters and statistics become task-specific.
NORM_TYPES: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm)


def _is_head(name: str, module: nn.Module, head: frozenset[str]) -> bool:
    prefix = f"{name}." if name else ""
    return any(f"{prefix}{key}" in head for key, _ in module.named_parameters(recurse=False))


def adaptable_layers(model: nn.Module, head: frozenset[str]) -> list[tuple[str, nn.Module]]:
    """Every Conv2d and Linear (subclasses included) in module order, except the classifier head."""
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not _is_head(name, module, head)
    ]


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every BatchNorm-like (_NormBase), LayerNorm and GroupNorm module, subclasses included."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, NORM_TYPES)]


def layer_kind(module: nn.Module) -> str:
    """The `LayerRecord.kind` of an adaptable layer."""
    return "conv2d" if isinstance(module, nn.Conv2d) else "linear"


def head_parameters(model: nn.Module, head: frozenset[str]) -> list[nn.Parameter]:
    """The parameters of the classifier head; MethodError if `head` names none of them."""
    params = [p for name, p in model.named_parameters() if name in head]
    if not params:
        raise MethodError(f"the model has none of the head parameters {sorted(head)}")
    return params


def cpu_copy(tensor: Tensor) -> Tensor:
    """A detached, contiguous CPU copy: safe to serialise, shares nothing with the model."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def module_state(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    """State-dict entries (parameters, persistent buffers) of one module, keyed as in the model."""
    dotted = f"{prefix}." if prefix else ""
    return {f"{dotted}{key}": value for key, value in module.state_dict().items()}


def norm_head_state(model: nn.Module, head: frozenset[str]) -> dict[str, Tensor]:
    """What a task stores whole (`set/`, not copied): norm parameters and buffers, then the head.

    Buffers include BatchNorm's running statistics and num_batches_tracked.
    """
    state: dict[str, Tensor] = {}
    for name, module in norm_layers(model):
        state.update(module_state(name, module))
    full = model.state_dict()
    missing = sorted(head - full.keys())
    if missing:
        raise MethodError(f"the model has no head key(s) {missing}")
    state.update({key: full[key] for key in sorted(head)})
    return state


def head_state(model: nn.Module, head: frozenset[str]) -> dict[str, Tensor]:
    """`set/` tensors for every head key of `model`."""
    state = model.state_dict()
    missing = sorted(head - state.keys())
    if missing:
        raise MethodError(f"the model has no head key(s) {missing}")
    return {f"{SET_PREFIX}{key}": cpu_copy(state[key]) for key in sorted(head)}


# -------------------------------------------------------------------------------------- merging


def factor_product(b: Tensor, a: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """The low-rank delta B·A reshaped to a weight's `shape`.

    TAPS's training forward and `merge_state` both use this one expression, so a restored weight
    is the trained one (not merely close to it).
    """
    return (b @ a).reshape(shape)


def merge_state(
    base_state: dict[str, Tensor], tensors: dict[str, Tensor], head: frozenset[str]
) -> dict[str, Tensor]:
    """A plain state dict for the task: base without its head, deltas added, `set/` replacing.

    The result loads with `strict=True` into the base architecture built with the task's number of
    classes. Base entries that the task does not change are shared with `base_state`, not copied.
    Stored tensors are cast to the base entry's type; B·A is computed in float32.
    """
    merged = {key: value for key, value in base_state.items() if key not in head}
    sets: dict[str, Tensor] = {}
    factors: dict[str, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith(DELTA_PREFIX):
            key = name[len(DELTA_PREFIX):]
            base = merged.get(key)
            if base is None:
                raise MethodError(f"task delta {name!r} has no matching base weight")
            if base.shape != value.shape:
                raise MethodError(
                    f"task delta {name!r} has shape {tuple(value.shape)}, "
                    f"base weight has {tuple(base.shape)}"
                )
            merged[key] = base + value.to(device=base.device, dtype=base.dtype)
        elif name.startswith((FACTOR_B_PREFIX, FACTOR_A_PREFIX)):
            prefix = FACTOR_B_PREFIX if name.startswith(FACTOR_B_PREFIX) else FACTOR_A_PREFIX
            factors.setdefault(name[len(prefix):], {})[prefix] = value
        elif name.startswith(SET_PREFIX):
            sets[name[len(SET_PREFIX):]] = value
        else:
            raise MethodError(
                f"task tensor {name!r} is neither 'delta/…', 'factor_b/…', 'factor_a/…' "
                "nor 'set/…'"
            )
    for key, pair in factors.items():
        merged[key] = _fold_factors(merged, key, pair, has_delta=f"{DELTA_PREFIX}{key}" in tensors)
    # Replacements win over deltas: they hold the trained value itself.
    for key, value in sets.items():
        if key not in merged and key not in head:
            raise MethodError(f"task tensor 'set/{key}' has no matching base entry")
        reference = base_state.get(key)
        merged[key] = value if reference is None else value.to(dtype=reference.dtype)
    missing = sorted(head - merged.keys())
    if missing:
        raise MethodError(f"task state lacks head tensor(s) {missing}")
    return merged


def _fold_factors(
    merged: dict[str, Tensor], key: str, pair: dict[str, Tensor], has_delta: bool
) -> Tensor:
    """The weight `key` of `merged` plus B·A; MethodError for a lone or inconsistent factor."""
    b, a = pair.get(FACTOR_B_PREFIX), pair.get(FACTOR_A_PREFIX)
    if b is None or a is None:
        given, lacking = (FACTOR_B_PREFIX, FACTOR_A_PREFIX) if a is None else (
            FACTOR_A_PREFIX, FACTOR_B_PREFIX)
        raise MethodError(f"task tensor '{given}{key}' has no matching '{lacking}{key}'")
    base = merged.get(key)
    if base is None:
        raise MethodError(f"task factors of {key!r} have no matching base weight")
    if has_delta:
        raise MethodError(f"task stores both a delta and factors for {key!r}")
    if b.dim() != 2 or a.dim() != 2 or b.shape[1] != a.shape[0]:
        raise MethodError(
            f"task factors of {key!r} disagree on the rank: B {tuple(b.shape)}, A {tuple(a.shape)}"
        )
    if base.dim() == 0 or b.shape[0] != base.shape[0] or b.shape[0] * a.shape[1] != base.numel():
        raise MethodError(
            f"task factors of {key!r} give shape ({b.shape[0]}, {a.shape[1]}), "
            f"base weight has {tuple(base.shape)}"
        )
    # float32 like the training forward (bfloat16 factors are widened exactly), then the base type.
    f32 = {"device": base.device, "dtype": torch.float32}
    delta = factor_product(b.to(**f32), a.to(**f32), base.shape)
    return (base.to(torch.float32) + delta).to(base.dtype)


def build_composed(
    method: Method, model: nn.Module, head: frozenset[str], base_state: dict[str, Tensor],
    tensors: dict[str, Tensor], dependencies: Sequence[Dependency], example: Tensor,
) -> nn.Module:
    """A composed task's inference model, built in place on `model` (the base architecture with
    the task's number of classes): base merged with the task's `set/`/`delta/` tensors, the
    method's modules attached, the dependencies' and the task's own `module/` tensors loaded.

    Every attached tensor must be given exactly once: a missing or unknown one is a MethodError.
    """
    plain = {k: v for k, v in tensors.items() if not k.startswith(MODULE_PREFIX)}
    merged = merge_state(base_state, plain, head)
    model.load_state_dict(merged, strict=True)
    method.attach(model, head, dependencies, example)
    placed: dict[str, Tensor] = {}
    for dependency in dependencies:
        placed.update(method.dependency_state(dependency))
    # A dependency may also replace base entries (progressive: shared norm layers), never one
    # the task sets itself.
    clash = sorted(k for k in placed if f"{SET_PREFIX}{k}" in tensors)
    if clash:
        raise MethodError(f"{method.name}: the task and a dependency both set {clash[:3]}")
    placed.update({k[len(MODULE_PREFIX):]: v for k, v in tensors.items()
                   if k.startswith(MODULE_PREFIX)})
    state = model.state_dict()
    attached = set(state) - set(merged)
    missing, unknown = sorted(attached - set(placed)), sorted(set(placed) - set(state))
    if missing or unknown:
        raise MethodError(f"{method.name}: stored module tensors do not fit the attached modules "
                          f"(missing {missing[:3]}, unknown {unknown[:3]})")
    for key, value in placed.items():
        if state[key].shape != value.shape:
            raise MethodError(f"{method.name}: module tensor {key!r} has shape "
                              f"{tuple(value.shape)}, the model {tuple(state[key].shape)}")
    model.load_state_dict({**merged, **{k: v.to(state[k].dtype) for k, v in placed.items()}},
                          strict=True)
    return model.eval()


def trainable(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Mark `params` trainable and return them."""
    for p in params:
        p.requires_grad_(True)
    return params


def freeze(model: nn.Module) -> None:
    """Make every parameter of `model` frozen."""
    for p in model.parameters():
        p.requires_grad_(False)

