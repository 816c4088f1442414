"""Which torch device training runs on (every number the registry compares is computed on the
CPU)."""

from __future__ import annotations

import torch

from taps_cl.errors import MethodError


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(name: str) -> torch.device:
    """The torch device for a TrainConfig.device value; MethodError if it is not available.

    "auto" picks CUDA, then Apple's MPS, then the CPU. Only training uses it: every number the
    registry compares (restore check, probe logits) is computed on the CPU in float32.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise MethodError(f"unknown device {name!r} (auto, cpu, cuda, cuda:N or mps)") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MethodError(f"device {name!r} requested but CUDA is not available")
    if device.type == "mps" and not _mps_available():
        raise MethodError(f"device {name!r} requested but Apple MPS is not available")
    return device
