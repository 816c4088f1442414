"""LoRA (Hu et al., ICLR 2022) on every adaptable layer: compact TAPS's low-rank deltas, no gates.

Every adaptable layer l (each Conv2d/Linear of the backbone, not the new head) gets a delta that
is always on. A large layer's is a rank-R product ΔW_l = s·B·A, the weight seen as out × rest (a
conv's in·k·k), with s = α/R, or α/√R with `rslora` (rank-stabilised LoRA, Kalajdzievski 2023:
the update's size then does not shrink as R grows). Small and depthwise layers, where a rank-R
factor would store more than the weight (the rule of TAPS's compact mode, `gates.factorised`), get
a full delta ΔW_l instead. As in LoRA practice and PEFT, A is Kaiming-uniform, U(±1/√rest), and B
is zero, so training starts exactly at the base.

B trains at `b_lr_ratio` × the task's learning rate and A at the rate itself (LoRA+, Hayou et
al., ICML 2024, whose recommended ratio 16 is the default); full deltas, norm layers (as the
task's norm policy says, `norms`: methods/norms.py) and the head train at the task's rate.

The task stores `factor_b/<weight>` = s·B (the product the forward pass uses, so the scale is
folded in exactly) and `factor_a/<weight>` for factorised layers, `delta/<weight>` for the others,
`set/` norm tensors and the head: `merge_state` folds them into a plain model of the base's
architecture that computes what the trained model computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from taps_cl.errors import MethodError
from taps_cl.methods.base import LayerRecord, Method, TaskState
from taps_cl.methods.catalog import register
from taps_cl.methods.gates import (
    B_LR_RATIO_HELP,
    FACTOR_MIN_PARAMS_HELP,
    MAX_B_LR_RATIO,
    MAX_FACTOR_MIN_PARAMS,
    MAX_RANK,
    RANK_HELP,
    FullDelta,
    LowRankDelta,
    WeightDelta,
    attach_deltas,
    delta_layers,
    delta_of,
    factor_groups,
    factorised,
)
from taps_cl.methods.layers import (
    adaptable_layers,
    cpu_copy,
    freeze,
    head_parameters,
    layer_kind,
    trainable,
)
from taps_cl.methods.norms import (
    NormPolicy,
    check_norm_options,
    norm_split_option,
    norms_option,
    stored_norm_head,
)
from taps_cl.methods.options import check_number, option


# Learning rate of a lora task when none is given: the rate the benchmark's validation grid
# {1e-3, 3e-3, 1e-2} chose for lora r=8 (with B at 16× it; at 1e-2 training collapsed to 18 %
# validation accuracy). docs/results.md.
LORA_LR = 3e-3


@dataclass(frozen=True)
class LoraConfig:
    """Options of LoRA: rank, scale, B's learning rate, which layers factorise, norm policy."""

    # Rank R of the factors B (out × R) and A (R × rest).
    rank: int = option(8, RANK_HELP, minimum=1, maximum=MAX_RANK)
    # α of the update's scale α/R (α/√R with rslora); None means α = R, a scale of 1 (PEFT's
    # default when lora_alpha equals r, and the benchmark's PEFT baseline).
    alpha: float | None = option(
        None, "lora: α of the update's scale α/rank (α/√rank with --rslora); default: the "
        "rank, a scale of 1.", minimum=0, open_minimum=True)
    # Scale by α/√R (rsLoRA) instead of α/R.
    rslora: bool = option(False, "lora: scale the update by α/√rank (rsLoRA), not α/rank.",
                          flag="--rslora", flag_value=True)
    # Learning rate of B as a multiple of A's (the task's learning rate).
    b_lr_ratio: float = option(16.0, B_LR_RATIO_HELP, minimum=0, open_minimum=True,
                               maximum=MAX_B_LR_RATIO)
    # A layer is factorised only if groups == 1, its weight has at least this many numbers and
    # R·(out + rest) < its size; the others get full deltas (as TAPS's compact mode).
    factor_min_params: int = option(20000, FACTOR_MIN_PARAMS_HELP, minimum=0,
                                    maximum=MAX_FACTOR_MIN_PARAMS)
    # Norm policy (methods/norms.py): task, affine, base or split (at norm_split).
    norms: str = norms_option()
    norm_split: float = norm_split_option()

    def __post_init__(self) -> None:
        def fix(field: str, value: object) -> None:
            object.__setattr__(self, field, value)

        fix("rank", check_number("lora", "rank", self.rank, minimum=1, maximum=MAX_RANK,
                                 integer=True))
        if self.alpha is not None:
            fix("alpha", check_number("lora", "alpha", self.alpha, positive=True))
        if not isinstance(self.rslora, bool):
            raise MethodError(f"lora: rslora must be true or false, got {self.rslora!r}")
        fix("b_lr_ratio", check_number("lora", "b_lr_ratio", self.b_lr_ratio, positive=True,
                                       maximum=MAX_B_LR_RATIO))
        fix("factor_min_params", check_number(
            "lora", "factor_min_params", self.factor_min_params, minimum=0,
            maximum=MAX_FACTOR_MIN_PARAMS, integer=True))
        check_norm_options("lora", self)

    @property
    def scale(self) -> float:
        """s = α/R, or α/√R with rslora (α = R when not given)."""
        alpha = float(self.rank) if self.alpha is None else self.alpha
        return alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@register
class Lora(Method):
    """Low-rank deltas (full ones on small layers) on every adaptable layer, always on."""

    name = "lora"
    Config = LoraConfig

    def train_defaults(self) -> dict[str, Any]:
        return {"lr": LORA_LR}

    @property
    def norm_policy(self) -> NormPolicy:
        return NormPolicy.of(self.config)

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze the base, put a delta (s·B·A, or full on small layers) on each adaptable layer;
        norms (by the norm policy) and head become trainable."""
        cfg = self.config

        def delta(module: nn.Module) -> WeightDelta:
            if factorised(module, cfg.rank, cfg.factor_min_params):
                return LowRankDelta(module.weight, cfg.rank, init="kaiming", scale=cfg.scale)
            return FullDelta(module.weight)

        layers = adaptable_layers(model, head)
        freeze(model)
        attach_deltas(self.name, layers, delta)
        self.norm_policy.make_trainable(model)
        trainable(head_parameters(model, head))
        return model

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode, norm layers as the norm policy says."""
        self.norm_policy.train_mode(model)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Full deltas, norms, head and the factors A at `lr`; B at b_lr_ratio × `lr`."""
        deltas = [delta for _, _, delta in delta_layers(model)]
        if not deltas:
            raise MethodError("lora: the model was not prepared by lora")
        factors = factor_groups(deltas, lr, self.config.b_lr_ratio, weight_decay)
        own = {id(p) for g in factors for p in g["params"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "task"},
                *factors]

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """Factors (s·B, A) or full deltas of every adaptable layer, norm tensors by the norm
        policy, and the head; every layer is active."""
        tensors: dict[str, Tensor] = {}
        layers: list[LayerRecord] = []
        for name, module in adaptable_layers(model, head):
            delta = delta_of(module)
            if delta is None:
                raise MethodError(f"lora: layer {name!r} was not prepared by lora")
            key = f"{name}.weight" if name else "weight"
            tensors.update({k: cpu_copy(v) for k, v in delta.stored_tensors(key).items()})
            layers.append(LayerRecord(
                name=name, kind=layer_kind(module), score=None, active=True,
                base_params=module.parametrizations.weight.original.numel(),
                task_params=delta.stored_numel()))
        tensors.update(stored_norm_head(model, head, self.norm_policy))
        return TaskState(tensors=tensors, layers=layers)
