"""Tensors ⇄ safetensors bytes, with string metadata; the only format artifacts are stored in."""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load, save


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> bytes:
    """Serialise tensors (copied to contiguous CPU memory) with JSON-encoded metadata values."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return save(clean, metadata=meta)


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors byte string."""
    return load(data)


def metadata_of(path: str) -> dict[str, str]:
    """The string metadata of a safetensors file."""
    with safe_open(path, framework="pt") as handle:
        return dict(handle.metadata() or {})


def numel(tensors: dict[str, torch.Tensor]) -> int:
    """How many numbers the tensors hold."""
    return sum(int(t.numel()) for t in tensors.values())
