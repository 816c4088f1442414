"""Weight deltas on a layer's weight (full, or low-rank B·A), TAPS's gated ones, and finding them.

Through `torch.nn.utils.parametrize` a layer's weight becomes W + ΔW (`WeightDelta`; LoRA) or
W + 1[s ≥ τ]·ΔW with a score s (`GatedDelta`; TAPS), the gate's step taken as 1 in the backward
pass (straight-through), so a gate that went off can come back on. The layer keeps its class.

ΔW is a full tensor of the weight's shape (`FullDelta`, zero at start) or a rank-R product
(`LowRankDelta`): the weight seen as out × rest (a conv's in/groups·k·k), ΔW = (s·B)·A with B
(out × R) zero at start, so the task starts at the base, and a scale s (LoRA's α/R). The stored
B is s·B, the very product the forward pass uses, so `merge_state` folds exactly the trained
weight. Which layers are worth factorising is `factorised`; `factor_groups` gives the factors'
optimizer groups, B optionally at a higher learning rate than A (LoRA+, Hayou et al., 2024).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from taps_cl.errors import MethodError
from taps_cl.methods.base import DELTA_PREFIX, FACTOR_A_PREFIX, FACTOR_B_PREFIX
from taps_cl.methods.merging import factor_product

# How A is drawn (from torch's global RNG on the CPU, so one seed gives the same factors on every
# device): "normal" N(0, 1/rest) (TAPS's compact mode), "kaiming" U(±1/√rest) (LoRA: PEFT's
# kaiming_uniform_ with a = √5, as nn.Linear initialises its weight).
FACTOR_INITS = ("normal", "kaiming")
# Count options past these mean nothing (no weight has more rows than MAX_RANK, none more numbers
# than MAX_FACTOR_MIN_PARAMS, and B a million times A's rate is no rate); refused like any
# value out of range.
MAX_RANK = 65536
MAX_FACTOR_MIN_PARAMS = 2**40
MAX_B_LR_RATIO = 1e6
# The option declarations taps and lora share (one flag each, one help).
RANK_HELP = ("taps/lora: rank R of the low-rank deltas ΔW = B·A on large layers (default 8; "
             "taps: 0 = full deltas).")
FACTOR_MIN_PARAMS_HELP = "taps/lora: factorise only layers with at least this many weights."
B_LR_RATIO_HELP = ("taps/lora: learning rate of the factors B as a multiple of the factors A's "
                   "(LoRA+; taps default 1, lora default 16).")


class WeightDelta(nn.Module):
    """Parametrization of a layer's weight: W ↦ W + ΔW; subclasses say what ΔW is and what the
    task stores for it."""

    def delta_weight(self, shape: torch.Size) -> Tensor:
        """ΔW with the weight's `shape`."""
        raise NotImplementedError

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.delta_weight(weight.shape)

    def is_active(self) -> bool:
        """Whether the layer currently uses its delta (always, without a gate)."""
        return True

    def stored_tensors(self, key: str) -> dict[str, Tensor]:
        """The tensors stored for the weight `key` if the layer is active (not copied)."""
        raise NotImplementedError

    def stored_numel(self) -> int:
        """Numbers the task stores for this layer if it is active."""
        return sum(t.numel() for t in self.stored_tensors("weight").values())


class FullDelta(WeightDelta):
    """A full delta: ΔW is a tensor of the weight's shape, zero at start."""

    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self._init_delta(weight)

    def _init_delta(self, weight: Tensor) -> None:
        self.delta = nn.Parameter(torch.zeros_like(weight, memory_format=torch.contiguous_format))

    def delta_weight(self, shape: torch.Size) -> Tensor:
        return self.delta

    def stored_tensors(self, key: str) -> dict[str, Tensor]:
        return {f"{DELTA_PREFIX}{key}": self.delta}


class LowRankDelta(WeightDelta):
    """A rank-R delta ΔW = (s·B)·A; see the module docstring (B zero, A drawn by `init`)."""

    def __init__(self, weight: Tensor, rank: int, init: str = "normal",
                 scale: float = 1.0) -> None:
        super().__init__()
        self._init_factors(weight, rank, init, scale)

    def _init_factors(self, weight: Tensor, rank: int, init: str, scale: float) -> None:
        if init not in FACTOR_INITS:
            raise ValueError(f"factor init must be one of {FACTOR_INITS}, got {init!r}")
        out = weight.shape[0]
        rest = weight.numel() // out
        self.scale = float(scale)
        self.factor_b = nn.Parameter(
            torch.zeros(out, rank, dtype=weight.dtype, device=weight.device)
        )
        if init == "normal":
            a = torch.randn(rank, rest, dtype=torch.float32) / math.sqrt(rest)
        else:
            a = nn.init.kaiming_uniform_(torch.empty(rank, rest, dtype=torch.float32),
                                         a=math.sqrt(5))
        self.factor_a = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))

    @property
    def rank(self) -> int:
        return self.factor_a.shape[0]

    def scaled_b(self) -> Tensor:
        """s·B: what the forward pass multiplies A with, and what the task stores as B."""
        return self.factor_b if self.scale == 1.0 else self.factor_b * self.scale

    def delta_weight(self, shape: torch.Size) -> Tensor:
        # The same expression as merge_state's fold, so a restored weight equals the trained one.
        return factor_product(self.scaled_b(), self.factor_a, shape)

    def stored_tensors(self, key: str) -> dict[str, Tensor]:
        return {f"{FACTOR_B_PREFIX}{key}": self.scaled_b(),
                f"{FACTOR_A_PREFIX}{key}": self.factor_a}

    def stored_numel(self) -> int:
        return self.factor_b.numel() + self.factor_a.numel()


class GatedDelta(WeightDelta):
    """A delta behind a gate: W ↦ W + (1[s ≥ τ] + s − sg(s))·ΔW, with a trained score s.

    Combined with a delta class (`TapsGate`, `LowRankTapsGate`), which says what ΔW is.
    """

    tau: float
    score: nn.Parameter

    def _init_gate(self, weight: Tensor, score_init: float, tau: float) -> None:
        self.tau = tau
        self.score = nn.Parameter(
            torch.tensor(score_init, dtype=weight.dtype, device=weight.device)
        )

    def gate(self) -> Tensor:
        """The hard gate in the forward pass, with gradient 1 with respect to the score."""
        s = self.score
        hard = (s >= self.tau).to(s.dtype)
        # Parenthesised so the value is exactly 0 or 1: (1 + s) - s can round away from 1.
        return hard + (s - s.detach())

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.gate() * self.delta_weight(weight.shape)

    def is_active(self) -> bool:
        """Whether the layer currently uses its delta (same comparison as the forward pass)."""
        return bool(self.score.detach() >= self.tau)

    def switch_off(self) -> None:
        """Set the score to the largest value of its type below τ: off in that type and in
        float64 alike, and as close to τ as a score can be while off."""
        s = self.score
        tau = torch.tensor(self.tau, dtype=s.dtype, device=s.device)
        with torch.no_grad():
            s.copy_(torch.nextafter(tau, torch.tensor(-math.inf, dtype=s.dtype, device=s.device)))


class TapsGate(GatedDelta, FullDelta):
    """A gated full delta."""

    def __init__(self, weight: Tensor, score_init: float, tau: float) -> None:
        WeightDelta.__init__(self)
        self._init_gate(weight, score_init, tau)
        self._init_delta(weight)


class LowRankTapsGate(GatedDelta, LowRankDelta):
    """A gated rank-R delta ΔW = B·A (A ~ N(0, 1/rest), scale 1)."""

    def __init__(self, weight: Tensor, score_init: float, tau: float, rank: int) -> None:
        WeightDelta.__init__(self)
        self._init_gate(weight, score_init, tau)
        self._init_factors(weight, rank, "normal", 1.0)


def factorised(module: nn.Module, rank: int, min_params: int) -> bool:
    """Whether `module` gets a rank-`rank` factor, not a full delta: groups == 1, at least
    `min_params` weights and fewer numbers in the factors than in the weight."""
    weight = module.weight
    if rank == 0 or getattr(module, "groups", 1) != 1 or weight.numel() < min_params:
        return False
    out = weight.shape[0]
    return rank * (out + weight.numel() // out) < weight.numel()


def check_free(method: str, layers: list[tuple[str, nn.Module]]) -> None:
    """MethodError unless there are `layers` and none has a parametrized weight yet."""
    if not layers:
        raise MethodError(f"{method}: the model has no Conv2d or Linear layer outside the head")
    for name, module in layers:
        if parametrize.is_parametrized(module, "weight"):
            raise MethodError(f"{method}: layer {name!r} already has a parametrized weight")


def attach_deltas(method: str, layers: list[tuple[str, nn.Module]],
                  make: Callable[[nn.Module], WeightDelta]) -> list[WeightDelta]:
    """Put the delta `make(module)` on the weight of every layer of `layers`, through
    `parametrize` (the module keeps its class and forward, e.g. timm's Conv2dSame); `check_free`
    first, so a refused model is left unchanged."""
    check_free(method, layers)
    deltas = []
    for _, module in layers:
        deltas.append(make(module))
        parametrize.register_parametrization(module, "weight", deltas[-1])
    return deltas


def factor_groups(deltas: list[WeightDelta], lr: float, b_lr_ratio: float,
                  weight_decay: float) -> list[dict]:
    """Optimizer groups of the low-rank factors among `deltas`: A at `lr`, B at b_lr_ratio × lr.

    One group "factors" when the ratio is 1, else "factors" (A) and "factors_b" (B); none
    without a factorised layer.
    """
    low = [d for d in deltas if isinstance(d, LowRankDelta)]
    if not low:
        return []
    a = [d.factor_a for d in low]
    b = [d.factor_b for d in low]
    if b_lr_ratio == 1:
        return [{"params": [p for d in low for p in (d.factor_b, d.factor_a)], "lr": lr,
                 "weight_decay": weight_decay, "name": "factors"}]
    return [{"params": a, "lr": lr, "weight_decay": weight_decay, "name": "factors"},
            {"params": b, "lr": b_lr_ratio * lr, "weight_decay": weight_decay,
             "name": "factors_b"}]


def delta_of(module: nn.Module) -> WeightDelta | None:
    """The weight delta (gated or not, full or low-rank) on `module.weight`, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations.weight if isinstance(p, WeightDelta)]
    return found[0] if found else None


def gate_of(module: nn.Module) -> GatedDelta | None:
    """The TAPS gate (full or low-rank) on `module.weight`, or None."""
    delta = delta_of(module)
    return delta if isinstance(delta, GatedDelta) else None


def delta_layers(model: nn.Module) -> list[tuple[str, nn.Module, WeightDelta]]:
    """(name, module, delta) of every layer of `model` carrying a weight delta, in module order."""
    out = []
    for name, module in model.named_modules():
        delta = delta_of(module)
        if delta is not None:
            out.append((name, module, delta))
    return out


def gated_layers(model: nn.Module) -> list[tuple[str, nn.Module, GatedDelta]]:
    """(name, module, gate) of every layer of `model` prepared by TAPS, in module order."""
    return [(name, module, delta) for name, module, delta in delta_layers(model)
            if isinstance(delta, GatedDelta)]
