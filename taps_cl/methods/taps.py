"""TAPS — Task Adaptive Parameter Sharing (Wallingford et al., CVPR 2022), as in DESIGN §4.

Every adaptable layer l (each Conv2d/Linear of the backbone, not the new head) gets a task delta
ΔW_l, zero at start, and a scalar score s_l. The effective weight is W_l + 1[s_l ≥ τ]·ΔW_l; the
backward pass treats the step as the identity (straight-through), so ∂L/∂s_l = ⟨∂L/∂W_eff, ΔW_l⟩
and a gate that went off can come back on. A penalty λ·Σ_l w_l·|s_l| switches gates off. Norm layers
(parameters and statistics) and the head are task-specific too; the base weights stay frozen.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from taps_cl.errors import MethodError
from taps_cl.methods.base import (
    DELTA_PREFIX,
    SET_PREFIX,
    LayerRecord,
    Method,
    TaskState,
    adaptable_layers,
    check_choice,
    check_number,
    cpu_copy,
    freeze,
    head_parameters,
    head_state,
    layer_kind,
    module_state,
    norm_layers,
    register,
    trainable,
)

logger = logging.getLogger(__name__)

PENALTIES = ("layers", "params")


@dataclass(frozen=True)
class TapsConfig:
    """Options of TAPS; defaults follow DESIGN §4."""

    # Weight λ of the sparsity penalty λ·Σ w_l·|s_l| (0 keeps every gate on).
    lam: float = 1.0
    # Gate threshold τ: a layer uses its delta iff its score s_l >= τ.
    tau: float = 0.1
    # Starting score; above τ so every layer starts on.
    score_init: float = 0.15
    # Learning rate of the scores: Adam moves a score by about this much per step whatever λ is.
    score_lr: float = 1e-2
    # Epochs trained before the penalty starts; validation only picks epochs after the warm-up.
    warmup_epochs: int = 1
    # Penalty weights w_l: "layers" = 1/L (as in the paper), "params" = layer's share of weights.
    penalty: str = "layers"

    def __post_init__(self) -> None:
        def fix(field: str, value: object) -> None:
            object.__setattr__(self, field, value)

        fix("lam", check_number("taps", "lam", self.lam, minimum=0))
        fix("tau", check_number("taps", "tau", self.tau, positive=True))
        fix("score_init", check_number("taps", "score_init", self.score_init, minimum=0))
        fix("score_lr", check_number("taps", "score_lr", self.score_lr, positive=True))
        fix("warmup_epochs",
            check_number("taps", "warmup_epochs", self.warmup_epochs, minimum=0, integer=True))
        fix("penalty", check_choice("taps", "penalty", self.penalty, PENALTIES))
        if self.score_init < self.tau:
            raise MethodError(
                f"taps: score_init {self.score_init} must be at least tau {self.tau}, "
                "or every gate starts off"
            )


class TapsGate(nn.Module):
    """Parametrization of a layer's weight: W ↦ W + (1[s ≥ τ] + s − sg(s))·ΔW."""

    def __init__(self, weight: Tensor, score_init: float, tau: float) -> None:
        super().__init__()
        self.tau = tau
        self.delta = nn.Parameter(torch.zeros_like(weight, memory_format=torch.contiguous_format))
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
        return weight + self.gate() * self.delta

    def is_active(self) -> bool:
        """Whether the layer currently uses its delta (same comparison as the forward pass)."""
        return bool(self.score.detach() >= self.tau)


def gate_of(module: nn.Module) -> TapsGate | None:
    """The TapsGate on `module.weight`, or None."""
    if not parametrize.is_parametrized(module, "weight"):
        return None
    found = [p for p in module.parametrizations.weight if isinstance(p, TapsGate)]
    return found[0] if found else None


def gated_layers(model: nn.Module) -> list[tuple[str, nn.Module, TapsGate]]:
    """(name, module, gate) of every layer of `model` prepared by TAPS, in module order."""
    out = []
    for name, module in model.named_modules():
        gate = gate_of(module)
        if gate is not None:
            out.append((name, module, gate))
    return out


@register
class Taps(Method):
    """Gated per-layer weight deltas with a sparsity penalty; only active layers are stored."""

    name = "taps"
    Config = TapsConfig

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze the base, gate a zero delta onto every adaptable layer, train norms and head."""
        cfg = self.config
        freeze(model)
        layers = adaptable_layers(model, head)
        if not layers:
            raise MethodError("taps: the model has no Conv2d or Linear layer outside the head")
        for name, module in layers:
            if parametrize.is_parametrized(module, "weight"):
                raise MethodError(f"taps: layer {name!r} already has a parametrized weight")
            # parametrize keeps the module (and its class's forward, e.g. timm's Conv2dSame).
            parametrize.register_parametrization(
                module, "weight", TapsGate(module.weight, cfg.score_init, cfg.tau)
            )
        for _, module in norm_layers(model):
            trainable(list(module.parameters()))
        trainable(head_parameters(model, head))
        logger.debug("taps: gated %d layers, %d norm layers", len(layers), len(norm_layers(model)))
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Deltas, norms and head at `lr`; scores at `score_lr` without weight decay."""
        scores = [gate.score for _, _, gate in gated_layers(model)]
        if not scores:
            raise MethodError("taps: the model was not prepared by taps")
        score_ids = {id(s) for s in scores}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in score_ids]
        return [
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "task"},
            {"params": scores, "lr": self.config.score_lr, "weight_decay": 0.0, "name": "scores"},
        ]

    def penalty_weights(self, model: nn.Module) -> Tensor:
        """w_l per gated layer, summing to 1: uniform, or by the layer's weight count."""
        gates = [gate for _, _, gate in gated_layers(model)]
        if self.config.penalty == "layers":
            return torch.full((len(gates),), 1.0 / len(gates))
        sizes = torch.tensor([float(g.delta.numel()) for g in gates], dtype=torch.float64)
        return (sizes / sizes.sum()).to(torch.float32)

    def extra_loss(self, model: nn.Module, epoch: int) -> Tensor | None:
        """λ·Σ_l w_l·|s_l| once `epoch` (0-based) reaches the warm-up length."""
        if epoch < self.config.warmup_epochs or self.config.lam == 0:
            return None
        scores = torch.stack([gate.score for _, _, gate in gated_layers(model)])
        weights = self.penalty_weights(model).to(device=scores.device, dtype=scores.dtype)
        return self.config.lam * (weights * scores.abs()).sum()

    def selectable(self, epoch: int, epochs: int) -> bool:
        """Only epochs trained with the penalty may be picked (warm-up weights are dense)."""
        return epoch >= self.config.warmup_epochs

    def active_layers(self, model: nn.Module) -> int | None:
        return sum(gate.is_active() for _, _, gate in gated_layers(model))

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """Deltas of active layers, every norm layer's state and the head."""
        tensors: dict[str, Tensor] = {}
        layers: list[LayerRecord] = []
        for name, module in adaptable_layers(model, head):
            gate = gate_of(module)
            if gate is None:
                raise MethodError(f"taps: layer {name!r} was not prepared by taps")
            active = gate.is_active()
            key = f"{name}.weight" if name else "weight"
            if active:
                tensors[f"{DELTA_PREFIX}{key}"] = cpu_copy(gate.delta)
            layers.append(
                LayerRecord(
                    name=name,
                    kind=layer_kind(module),
                    score=float(gate.score.detach()),
                    active=active,
                    base_params=module.parametrizations.weight.original.numel(),
                    task_params=gate.delta.numel() if active else 0,
                )
            )
        for name, module in norm_layers(model):
            for key, value in module_state(name, module).items():
                tensors[f"{SET_PREFIX}{key}"] = cpu_copy(value)
        tensors.update(head_state(model, head))
        return TaskState(tensors=tensors, layers=layers)
