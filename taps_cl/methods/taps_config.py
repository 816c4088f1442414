"""TAPS' options (`TapsConfig`) and the constants its training and storage use (methods/taps.py).

Declared apart from the method so that the option declarations, their checks and the measured
defaults (rank 8 at lr 1e-2, the factor rate, the budget's dual ascent) can be read on their own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taps_cl.errors import MethodError
from taps_cl.methods.gates import (
    B_LR_RATIO_HELP,
    FACTOR_MIN_PARAMS_HELP,
    MAX_B_LR_RATIO,
    MAX_FACTOR_MIN_PARAMS,
    MAX_RANK,
    RANK_HELP,
)
from taps_cl.methods.norms import check_norm_options, norm_split_option, norms_option
from taps_cl.methods.options import check_choice, check_number, option

PENALTIES = ("layers", "params")
# Types stored tensors may be rounded to (`store_dtype`, `store_norms_head_dtype`).
STORE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
# Factor learning rate as a multiple of the task lr when `factor_lr` is None. Factors need a larger
# step than full deltas (rank-4 factors under-fit at lr 1e-3 on Lite0: 60.9 %, and reached
# full-delta accuracy at 5e-3–1e-2), which compact TAPS gets from its own default rate, 1e-2
# (COMPACT_LR), for every trained tensor: the benchmark's compact rows trained so. A 5× scale
# instead made the grid choose lr 3e-3 (factors 1.5e-2) and scored no better: 86.6 ± 0.4 against
# 87.0 ± 1.2 over 3 seeds (docs/results.md).
FACTOR_LR_SCALE = 1.0
# Dual ascent on λ under a budget, after every step past the warm-up:
#   λ ← clamp(λ · exp(BUDGET_RATE · clip(size / limit − 1, −1, 1)), floor, LAM_MAX).
# At most ×1.105 a step while over the limit (×150 in 50 steps, so within the first epochs after
# the warm-up, while the cosine schedule still lets scores move), and back down towards the floor
# (config.lam) while under it, so gates the task needs may come back on. Tried on timm's tiny
# test_efficientnet (rank 2, random images, 6–8 steps an epoch; every gate on stores 0.15×):
# budget 0.09×, λ from 1: λ went to 2.1 and 17 → 7 layers on, fitting without `finalize`;
# budget 0.07×, λ from the 0.01 floor: at a rate of 0.05 λ only reached 0.65 in 88 steps and
# gates barely moved, at 0.2 it shot to 85 and left 2 layers on where the budget allowed more.
BUDGET_RATE = 0.1
# λ's start and floor when `lam` is 0 but a budget is set: a multiplicative rule cannot leave 0.
BUDGET_LAM_FLOOR = 0.01
# λ's ceiling: keeps the penalty finite (with SGD, λ scales a score's step directly).
LAM_MAX = 1e4
# A warm-up is at most the longest run (training.fit.MAX_EPOCHS).
MAX_EPOCHS = 100_000
# Penalised epochs of the default run (3 epochs, warm-up 1): a run penalised for P epochs weighs
# each step's penalty by REFERENCE_PENALISED_EPOCHS / P (see the module docstring).
REFERENCE_PENALISED_EPOCHS = 2
# Learning rate of compact TAPS (rank > 0) when none is given, for every trained tensor: the rate
# the benchmark's validation grid {1e-3, 3e-3, 1e-2} chose for its compact rows (docs/results.md).
COMPACT_LR = 1e-2
# TAPS' default rank (compact TAPS r=8, chosen by the benchmark: docs/results.md; `task add`'s
# default method until adapters replaced it); 0, full deltas everywhere, was the
# default before.
DEFAULT_RANK = 8


@dataclass(frozen=True)
class TapsConfig:
    """Options of TAPS: compact (rank 8) by default; `rank` 0 gives full deltas everywhere. A
    `budget` and 16-bit storage are off by default."""

    # Weight λ of the sparsity penalty λ·Σ w_l·|s_l| (0 keeps every gate on); with a budget, the
    # floor that dual ascent raises λ from.
    lam: float = option(1.0, "TAPS sparsity weight λ.", minimum=0)
    # Gate threshold τ: a layer uses its delta iff its score s_l >= τ.
    tau: float = option(0.1, "TAPS gate threshold τ.")
    # Starting score; above τ so every layer starts on.
    score_init: float = 0.15
    # Learning rate of the scores: Adam moves a score by about this much per step whatever λ is.
    score_lr: float = option(
        1e-2, "TAPS learning rate of the gate scores.",
        minimum=0, open_minimum=True)
    # Epochs trained before the penalty starts; validation only picks epochs after the warm-up.
    warmup_epochs: int = option(1, "TAPS epochs before the penalty.", minimum=0,
                                maximum=MAX_EPOCHS)
    # Penalty weights w_l: "layers" = 1/L (as in the paper), "params" = the layer's share of the
    # numbers all layers would store if active (factors for factorised layers, else the weight).
    penalty: str = option(
        "layers", "TAPS penalty weights: 1/L per layer, or by the numbers a layer would store.",
        choices=("layers", "params"))
    # Rank R of factorised deltas ΔW = B·A (conv weight seen as out × in·k·k); 0 = full deltas.
    rank: int = option(DEFAULT_RANK, RANK_HELP, minimum=0, maximum=MAX_RANK)
    # A layer is factorised only if groups == 1, its weight has at least this many numbers and
    # R·(out + in·k·k) < its size: small and depthwise layers keep (cheaper) full deltas.
    factor_min_params: int = option(
        20000, FACTOR_MIN_PARAMS_HELP, minimum=0, maximum=MAX_FACTOR_MIN_PARAMS)
    # Learning rate of the factors A and B; None = FACTOR_LR_SCALE × the task learning rate.
    factor_lr: float | None = option(
        None, "TAPS learning rate of the factors (default --lr).",
        minimum=0, open_minimum=True)
    # Learning rate of the factors B as a multiple of A's (factor_lr); 1 keeps them together.
    b_lr_ratio: float = option(1.0, B_LR_RATIO_HELP, minimum=0, open_minimum=True,
                               maximum=MAX_B_LR_RATIO)
    # Most the task may store, as a fraction of the base's parameters (backbone without its
    # head): active deltas/factors + norm parameters and statistics + head. None = no limit.
    budget: float | None = option(
        None, "TAPS: store at most this fraction of the base's parameters (norms, head "
        "included); λ is raised during training until the task fits.",
        minimum=0, open_minimum=True)
    # Type the deltas/factors are stored in: "float32", "bfloat16" or "float16".
    store_dtype: str = option(
        "float32", "TAPS: precision of the stored deltas/factors.",
        choices=("float32", "bfloat16", "float16"))
    # Type the norm parameters/statistics and the head are stored in (integer buffers such as
    # BatchNorm's num_batches_tracked keep theirs).
    store_norms_head_dtype: str = option(
        "float32", "TAPS: precision of the stored norms and head.",
        choices=("float32", "bfloat16", "float16"))
    # Norm policy (methods/norms.py): task, affine, base or split (at norm_split).
    norms: str = norms_option()
    norm_split: float = norm_split_option()

    def __post_init__(self) -> None:
        def fix(field: str, value: object) -> None:
            object.__setattr__(self, field, value)

        fix("lam", check_number("taps", "lam", self.lam, minimum=0))
        fix("tau", check_number("taps", "tau", self.tau, positive=True))
        fix("score_init", check_number("taps", "score_init", self.score_init, minimum=0))
        fix("score_lr", check_number("taps", "score_lr", self.score_lr, positive=True))
        fix("warmup_epochs",
            check_number("taps", "warmup_epochs", self.warmup_epochs, minimum=0,
                         maximum=MAX_EPOCHS, integer=True))
        fix("penalty", check_choice("taps", "penalty", self.penalty, PENALTIES))
        fix("rank", check_number("taps", "rank", self.rank, minimum=0, maximum=MAX_RANK,
                                 integer=True))
        fix("factor_min_params",
            check_number("taps", "factor_min_params", self.factor_min_params, minimum=0,
                         maximum=MAX_FACTOR_MIN_PARAMS,
                         integer=True))
        if self.factor_lr is not None:
            fix("factor_lr", check_number("taps", "factor_lr", self.factor_lr, positive=True))
        if self.budget is not None:
            fix("budget", check_number("taps", "budget", self.budget, positive=True))
        fix("b_lr_ratio", check_number("taps", "b_lr_ratio", self.b_lr_ratio, positive=True,
                                       maximum=MAX_B_LR_RATIO))
        check_norm_options("taps", self)
        dtypes = tuple(STORE_DTYPES)
        fix("store_dtype", check_choice("taps", "store_dtype", self.store_dtype, dtypes))
        fix("store_norms_head_dtype", check_choice(
            "taps", "store_norms_head_dtype", self.store_norms_head_dtype, dtypes))
        if self.score_init < self.tau:
            raise MethodError(
                f"taps: score_init {self.score_init} must be at least tau {self.tau}, "
                "or every gate starts off"
            )
