"""The probe batch of a task: which test images it holds, and how far logits may drift.

Every task stores a probe batch (a seeded, class-stratified sample of its test images with the
logits its restored model gave them); later checks recompute those logits from the task's files.
"""

from __future__ import annotations

import torch
from torch import nn

from taps_cl.data.sampling import stratified_sample
from taps_cl.training import evaluate

PROBE_SIZE = 32  # test inputs kept per task to prove later additions did not change it

# Largest probe-logit drift still counted as "unchanged": PROBE_ATOL + PROBE_RTOL × the largest
# stored |logit|. The relative part absorbs float32 rounding that differs with the order of a
# convolution's sums — another thread count (verify's worker processes), another CPU — which on
# Lite0 reaches 1e-5 for logits of a few units; a changed weight moves logits far more.
PROBE_ATOL = 1e-5
PROBE_RTOL = 1e-5


def probe_drift(model: nn.Module, probe: dict[str, torch.Tensor]) -> float:
    """Largest |logit − stored logit| of `model` on a stored probe batch (computed on the CPU)."""
    if probe["logits"].numel() == 0:
        return 0.0
    return float((evaluate.logits(model, probe["inputs"]) - probe["logits"]).abs().max())


def logit_scale(probe: dict[str, torch.Tensor]) -> float:
    """The largest stored |logit| of a probe batch (0 for an empty one)."""
    logits = probe["logits"]
    return float(logits.abs().max()) if logits.numel() else 0.0


def probe_indices(labels: torch.Tensor, n: int, seed: int) -> list[int]:
    """Sorted positions of a seeded, class-stratified sample of `n` items (every class when n
    allows; see `taps_cl.data.sampling.stratified_sample`)."""
    return stratified_sample(labels.cpu().numpy(), n, seed).tolist()
