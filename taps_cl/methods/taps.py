"""TAPS — Task Adaptive Parameter Sharing (Wallingford et al., CVPR 2022), with a compact mode.

Every adaptable layer l (each Conv2d/Linear of the backbone, not the new head) gets a task delta
ΔW_l, zero at start, and a scalar score s_l. The effective weight is W_l + 1[s_l ≥ τ]·ΔW_l; the
backward pass treats the step as the identity (straight-through), so ∂L/∂s_l = ⟨∂L/∂W_eff, ΔW_l⟩
and a gate that went off can come back on. A penalty λ·Σ_l w_l·|s_l| switches gates off. Norm layers
(parameters and statistics) and the head are task-specific too; the base weights stay frozen.

Compact mode (§4a; the default, R = 8, at lr 1e-2 unless told otherwise: `train_defaults`). With
`rank` R > 0 the delta of every large layer is a product ΔW = B·A (B zero
at start, so training starts at the base); small and depthwise layers keep full deltas, which are
cheaper there. With a `budget` the task may store at most that fraction of the base: λ rises by
dual ascent while the active layers store too much, and `finalize` switches off the active layers
worth least per stored number until the task fits. Stored tensors may be rounded to bfloat16 or
float16 (`store_dtype`, `store_norms_head_dtype`), and B may train at a higher learning rate than A
(`b_lr_ratio`, LoRA+; 1 by default, as before the option existed).

The penalty is normalised by the run's length: a step past the warm-up adds λ·(2/P)·Σ_l w_l·|s_l|,
P being the epochs trained with the penalty (`for_epochs`; 2 = REFERENCE_PENALISED_EPOCHS, the
default run's 3 epochs after its 1-epoch warm-up, which thus uses λ itself). A 10-epoch run pushes
the gates as hard in all as a 3-epoch one instead of switching more layers off merely from taking
more steps. Under a `budget`, dual ascent moves λ; the same factor applies on top.

Norm layers follow the task's norm policy (`norms`, methods/norms.py); `task` by default.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from taps_cl.errors import MethodError
from taps_cl.methods.base import (
    SET_PREFIX,
    LayerRecord,
    Method,
    TaskState,
)
from taps_cl.methods.catalog import register
from taps_cl.methods.gates import (
    GatedDelta,
    LowRankTapsGate,
    TapsGate,
    attach_deltas,
    check_free,
    factor_groups,
    factorised,
    gate_of,
    gated_layers,
)
from taps_cl.methods.layers import (
    adaptable_layers,
    freeze,
    head_parameters,
    layer_kind,
    norm_layers,
    stored_copy,
    trainable,
)
from taps_cl.methods.norms import (
    NormPolicy,
    norm_head_state,
)
from taps_cl.methods.taps_config import (
    BUDGET_LAM_FLOOR,
    BUDGET_RATE,
    COMPACT_LR,
    FACTOR_LR_SCALE,
    LAM_MAX,
    REFERENCE_PENALISED_EPOCHS,
    STORE_DTYPES,
    TapsConfig,
)

logger = logging.getLogger(__name__)

@register
class Taps(Method):
    """Gated per-layer weight deltas with a sparsity penalty; only active layers are stored."""

    name = "taps"
    Config = TapsConfig
    # Full deltas were the default until compact TAPS r=8 became it.
    LEGACY_DEFAULTS = {"rank": 0}

    def train_defaults(self) -> dict[str, Any]:
        """Compact TAPS trains at COMPACT_LR unless told otherwise; full deltas at TrainConfig's."""
        return {"lr": COMPACT_LR} if self.config.rank > 0 else {}

    def for_epochs(self, epochs: int, given: Collection[str]) -> Taps:
        """TAPS for a run of `epochs`: the penalty normalised by the epochs it acts in (see the
        module docstring). A warm-up that would swallow every epoch of a penalised run is
        shortened to leave one epoch for the penalty; one the user set that way is refused."""
        cfg = self.config
        penalised = cfg.lam > 0 or cfg.budget is not None
        if cfg.warmup_epochs >= epochs and penalised:
            if "warmup_epochs" in given:
                raise MethodError(
                    f"--warmup-epochs {cfg.warmup_epochs} leaves no epoch of the {epochs} for the "
                    "sparsity penalty; use fewer warm-up epochs or more epochs")
            cfg = dataclasses.replace(cfg, warmup_epochs=epochs - 1)
        fitted = type(self)(cfg)
        fitted._penalty_scale = REFERENCE_PENALISED_EPOCHS / max(1, epochs - cfg.warmup_epochs)
        return fitted

    def __init__(self, config: TapsConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        # λ of the penalty now: config.lam, or under a budget its floor raised by `after_step`.
        self._lam_floor = cfg.lam if cfg.budget is None or cfg.lam > 0 else BUDGET_LAM_FLOOR
        self._lam = self._lam_floor
        # λ's factor for the run's length (`for_epochs`); 1 for a method not fitted to a run.
        self._penalty_scale = 1.0
        # Set by `prepare`: the base's parameter count and what norms + head store.
        self._base_params: int | None = None
        self._fixed_params: int | None = None
        self._logged_epoch = -1

    @property
    def lam(self) -> float:
        """λ in effect now (differs from config.lam only under a budget, see `after_step`)."""
        return self._lam

    @property
    def penalty_scale(self) -> float:
        """The factor of λ for the run's length (see the module docstring and `for_epochs`)."""
        return self._penalty_scale

    @property
    def norm_policy(self) -> NormPolicy:
        return NormPolicy.of(self.config)

    def prepare(self, model: nn.Module, head: frozenset[str]) -> nn.Module:
        """Freeze the base, gate a zero delta (full or B·A) onto each adaptable layer.

        Norms and head become trainable. With a budget that norms and head alone exceed, raise
        MethodError before changing `model`.
        """
        cfg = self.config
        layers = adaptable_layers(model, head)
        check_free(self.name, layers)
        # The registry's base size (parameters outside the head), counted before any task tensor.
        self._base_params = sum(p.numel() for n, p in model.named_parameters() if n not in head)
        self._fixed_params = sum(
            t.numel() for t in norm_head_state(model, head, self.norm_policy).values())
        if cfg.budget is not None and self._fixed_params > self._limit():
            # Rounded up, so that the named minimum is itself accepted.
            minimum = math.ceil(self._fixed_params / self._base_params * 1e4) / 1e4
            raise MethodError(
                f"taps: --budget {cfg.budget:g} is below what this task needs for norms and head "
                f"alone ({minimum:.4f}× base)"
            )

        def gate(module: nn.Module) -> GatedDelta:
            if factorised(module, cfg.rank, cfg.factor_min_params):
                return LowRankTapsGate(module.weight, cfg.score_init, cfg.tau, cfg.rank)
            return TapsGate(module.weight, cfg.score_init, cfg.tau)

        freeze(model)
        gates = attach_deltas(self.name, layers, gate)
        low_rank = sum(isinstance(g, LowRankTapsGate) for g in gates)
        self.norm_policy.make_trainable(model)
        trainable(head_parameters(model, head))
        self._lam, self._logged_epoch = self._lam_floor, -1
        logger.debug("taps: gated %d layers (%d factorised at rank %d), %d norm layers",
                     len(layers), low_rank, cfg.rank, len(norm_layers(model)))
        return model

    def set_train_mode(self, model: nn.Module) -> None:
        """Train mode, norm layers as the norm policy says."""
        self.norm_policy.train_mode(model)

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        """Full deltas, norms and head at `lr`; scores at `score_lr`; factors A at `factor_lr`
        and B at b_lr_ratio × `factor_lr` (gates.factor_groups).

        Scores get no weight decay; `factor_lr` None means FACTOR_LR_SCALE × `lr`, and factor
        groups exist only when some layer is factorised.
        """
        gates = [gate for _, _, gate in gated_layers(model)]
        if not gates:
            raise MethodError("taps: the model was not prepared by taps")
        cfg = self.config
        factor_lr = FACTOR_LR_SCALE * lr if cfg.factor_lr is None else cfg.factor_lr
        factors = factor_groups(gates, factor_lr, cfg.b_lr_ratio, weight_decay)
        scores = [g.score for g in gates]
        own = {id(p) for p in scores} | {id(p) for g in factors for p in g["params"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in own]
        return [
            {"params": rest, "lr": lr, "weight_decay": weight_decay, "name": "task"},
            {"params": scores, "lr": cfg.score_lr, "weight_decay": 0.0, "name": "scores"},
            *factors,
        ]

    def penalty_weights(self, model: nn.Module) -> Tensor:
        """w_l per gated layer, summing to 1: uniform, or by what the layer would store."""
        gates = [gate for _, _, gate in gated_layers(model)]
        if self.config.penalty == "layers":
            return torch.full((len(gates),), 1.0 / len(gates))
        sizes = torch.tensor([float(g.stored_numel()) for g in gates], dtype=torch.float64)
        return (sizes / sizes.sum()).to(torch.float32)

    def extra_loss(self, model: nn.Module, epoch: int) -> Tensor | None:
        """λ·scale·Σ_l w_l·|s_l| once `epoch` (0-based) reaches the warm-up length (scale: the
        run length's factor, `penalty_scale`)."""
        if epoch < self.config.warmup_epochs or self._lam == 0:
            return None
        scores = torch.stack([gate.score for _, _, gate in gated_layers(model)])
        weights = self.penalty_weights(model).to(device=scores.device, dtype=scores.dtype)
        return self._lam * self._penalty_scale * (weights * scores.abs()).sum()

    def after_step(self, model: nn.Module, epoch: int) -> None:
        """Under a budget and past the warm-up: one dual-ascent step of λ (see BUDGET_RATE)."""
        cfg = self.config
        if cfg.budget is None or epoch < cfg.warmup_epochs:
            return
        size = self._stored_now(model)
        excess = min(max(size / self._limit() - 1.0, -1.0), 1.0)
        self._lam = min(max(self._lam_floor, self._lam * math.exp(BUDGET_RATE * excess)), LAM_MAX)
        if epoch != self._logged_epoch:
            self._logged_epoch = epoch
            logger.info("taps: epoch %d: λ %.4g, active layers store %.4f× base (budget %g×)",
                        epoch + 1, self._lam, size / self._base_params, cfg.budget)

    def finalize(self, model: nn.Module) -> None:
        """Under a budget: switch off active layers until the task fits; no-op without a budget.

        Layers go in order of lowest score per stored number; a switched-off layer's score is set
        just below τ, so the trained model itself changes and trained and stored model agree.
        """
        cfg = self.config
        if cfg.budget is None:
            return
        limit = self._limit()
        size = self._stored_now(model)
        active = [(name, gate) for name, _, gate in gated_layers(model) if gate.is_active()]
        active.sort(key=lambda item: (float(item[1].score.detach()) / item[1].stored_numel(),
                                      item[0]))
        switched_off = []
        for name, gate in active:
            if size <= limit:
                break
            gate.switch_off()
            assert not gate.is_active(), name
            size -= gate.stored_numel()
            switched_off.append(name)
        if switched_off:
            logger.info("taps: switched off %d layer(s) to fit the budget %g× base: %s",
                        len(switched_off), cfg.budget, ", ".join(switched_off))
        logger.info("taps: the task stores %.4f× base (budget %g×, final λ %.4g)",
                    size / self._base_params, cfg.budget, self._lam)

    def stored_params(self, model: nn.Module, head: frozenset[str]) -> int:
        """Numbers `extract` would store now: active layers' deltas/factors, norm state, head."""
        fixed = sum(t.numel() for t in norm_head_state(model, head, self.norm_policy).values())
        return fixed + sum(g.stored_numel() for _, _, g in gated_layers(model) if g.is_active())

    def _limit(self) -> float:
        """The most the task may store, in numbers (needs `prepare` and a budget)."""
        if self._base_params is None or self.config.budget is None:
            raise MethodError("taps: the budget needs a model prepared by this method")
        return self.config.budget * self._base_params

    def _stored_now(self, model: nn.Module) -> int:
        """What the task would store now, with one device synchronisation (called every step)."""
        if self._fixed_params is None:
            raise MethodError("taps: the model was not prepared by this method")
        gates = [gate for _, _, gate in gated_layers(model)]
        on = (torch.stack([g.score.detach() for g in gates]) >= self.config.tau).tolist()
        return self._fixed_params + sum(g.stored_numel() for g, is_on in zip(gates, on) if is_on)

    def selectable(self, epoch: int, epochs: int) -> bool:
        """Only epochs trained with the penalty may be picked (warm-up weights are dense)."""
        return epoch >= self.config.warmup_epochs

    def active_layers(self, model: nn.Module) -> int | None:
        return sum(gate.is_active() for _, _, gate in gated_layers(model))

    def extract(self, model: nn.Module, head: frozenset[str]) -> TaskState:
        """Deltas or factors of active layers, norm tensors by the norm policy, and the head.

        Floating-point tensors are stored in `store_dtype` (deltas, factors) and
        `store_norms_head_dtype` (the rest); `exact` is False when that rounded any of them.
        """
        cfg = self.config
        tensors: dict[str, Tensor] = {}
        layers: list[LayerRecord] = []
        exact = True

        def store(stored: str, value: Tensor, dtype: torch.dtype) -> None:
            nonlocal exact
            tensors[stored] = stored_copy(value, dtype)
            exact = exact and tensors[stored].dtype == value.dtype

        for name, module in adaptable_layers(model, head):
            gate = gate_of(module)
            if gate is None:
                raise MethodError(f"taps: layer {name!r} was not prepared by taps")
            active = gate.is_active()
            key = f"{name}.weight" if name else "weight"
            if active:
                for stored, value in gate.stored_tensors(key).items():
                    store(stored, value, STORE_DTYPES[cfg.store_dtype])
            layers.append(
                LayerRecord(
                    name=name,
                    kind=layer_kind(module),
                    score=float(gate.score.detach()),
                    active=active,
                    base_params=module.parametrizations.weight.original.numel(),
                    task_params=gate.stored_numel() if active else 0,
                )
            )
        for key, value in norm_head_state(model, head, self.norm_policy).items():
            store(f"{SET_PREFIX}{key}", value, STORE_DTYPES[cfg.store_norms_head_dtype])
        return TaskState(tensors=tensors, layers=layers, exact=exact)

