"""The gated weight deltas TAPS attaches to a layer's weight, and finding them on a model.

A gate holds a score s and a task delta (a full tensor, or low-rank factors B·A); through
`torch.nn.utils.parametrize` the layer's weight becomes W + 1[s ≥ τ]·ΔW, the step's gradient taken
as 1 (straight-through), so a gate that went off can come back on. The layer keeps its class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from taps_cl.methods.base import DELTA_PREFIX, FACTOR_A_PREFIX, FACTOR_B_PREFIX
from taps_cl.methods.merging import factor_product


class GatedDelta(nn.Module):
    """Parametrization of a layer's weight: W ↦ W + (1[s ≥ τ] + s − sg(s))·ΔW.

    Subclasses say what ΔW is (`delta_weight`) and what the task stores for it.
    """

    def __init__(self, weight: Tensor, score_init: float, tau: float) -> None:
        super().__init__()
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

    def delta_weight(self, shape: torch.Size) -> Tensor:
        """ΔW with the weight's `shape`."""
        raise NotImplementedError

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.gate() * self.delta_weight(weight.shape)

    def is_active(self) -> bool:
        """Whether the layer currently uses its delta (same comparison as the forward pass)."""
        return bool(self.score.detach() >= self.tau)

    def stored_numel(self) -> int:
        """Numbers the task stores for this layer if it is active."""
        return sum(t.numel() for t in self.stored_tensors("weight").values())

    def stored_tensors(self, key: str) -> dict[str, Tensor]:
        """The tensors stored for the weight `key` if the layer is active (not copied)."""
        raise NotImplementedError


class TapsGate(GatedDelta):
    """A gated full delta: ΔW is a tensor of the weight's shape, zero at start."""

    def __init__(self, weight: Tensor, score_init: float, tau: float) -> None:
        super().__init__(weight, score_init, tau)
        self.delta = nn.Parameter(torch.zeros_like(weight, memory_format=torch.contiguous_format))

    def delta_weight(self, shape: torch.Size) -> Tensor:
        return self.delta

    def stored_tensors(self, key: str) -> dict[str, Tensor]:
        return {f"{DELTA_PREFIX}{key}": self.delta}


class LowRankTapsGate(GatedDelta):
    """A gated rank-R delta ΔW = B·A, the weight seen as out × rest (a conv's in/groups·k·k).

    B (out × R) is zero at start, so the task starts at the base; A (R × rest) ~ N(0, 1/rest) is
    drawn from torch's global RNG on the CPU, so one seed gives the same factors on every device.
    """

    def __init__(self, weight: Tensor, score_init: float, tau: float, rank: int) -> None:
        super().__init__(weight, score_init, tau)
        out = weight.shape[0]
        rest = weight.numel() // out
        self.factor_b = nn.Parameter(
            torch.zeros(out, rank, dtype=weight.dtype, device=weight.device)
        )
        a = torch.randn(rank, rest, dtype=torch.float32) / math.sqrt(rest)
        self.factor_a = nn.Parameter(a.to(device=weight.device, dtype=weight.dtype))

    @property
    def rank(self) -> int:
        return self.factor_a.shape[0]

    def delta_weight(self, shape: torch.Size) -> Tensor:
        # The same expression as merge_state's fold, so a restored weight equals the trained one.
        return factor_product(self.factor_b, self.factor_a, shape)

    def stored_tensors(self, key: str) -> dict[str, Tensor]:
        return {f"{FACTOR_B_PREFIX}{key}": self.factor_b, f"{FACTOR_A_PREFIX}{key}": self.factor_a}


def factorised(module: nn.Module, rank: int, min_params: int) -> bool:
    """Whether TAPS gives `module` a rank-`rank` factor, not a full delta (see TapsConfig)."""
    weight = module.weight
    if rank == 0 or getattr(module, "groups", 1) != 1 or weight.numel() < min_params:
        return False
    out = weight.shape[0]
    return rank * (out + weight.numel() // out) < weight.numel()


def gate_of(module: nn.Module) -> GatedDelta | None:
    """The TAPS gate (full or low-rank) on `module.weight`, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations.weight if isinstance(p, GatedDelta)]
    return found[0] if found else None


def gated_layers(model: nn.Module) -> list[tuple[str, nn.Module, GatedDelta]]:
    """(name, module, gate) of every layer of `model` prepared by TAPS, in module order."""
    out = []
    for name, module in model.named_modules():
        gate = gate_of(module)
        if gate is not None:
            out.append((name, module, gate))
    return out
