"""Tensors ⇄ safetensors bytes, with string metadata; the only format artifacts are stored in."""

from __future__ import annotations

import json
import struct
from typing import Any

import torch
from safetensors.torch import load, save


def to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> bytes:
    """Serialise tensors (copied to contiguous CPU memory) with JSON-encoded metadata values."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    return _sorted_metadata(save(clean, metadata=meta))


def _sorted_metadata(data: bytes) -> bytes:
    """`data` with its header's metadata keys in sorted order, so equal input gives equal bytes.

    safetensors (0.8) writes the metadata map in hash order, which changes from call to call:
    the same tensors and metadata would otherwise get another sha256 each time.
    """
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads its header to 8 bytes with spaces
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors byte string."""
    return load(data)


def metadata_from_bytes(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors byte string (header only; tensors are not read).

    The format: an 8-byte little-endian header length, then a JSON header whose optional
    ``__metadata__`` entry maps strings to strings.
    """
    if len(data) < 8:
        raise ValueError("not a safetensors file: shorter than its header length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("not a safetensors file: header longer than the file")
    header = json.loads(data[8 : 8 + length])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("safetensors metadata is not a string map")
    return {str(k): str(v) for k, v in meta.items()}


def json_field(meta: dict[str, str], key: str) -> Any:
    """A metadata value written by `to_bytes` (JSON-encoded unless it was a plain string)."""
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def numel(tensors: dict[str, torch.Tensor]) -> int:
    """How many numbers the tensors hold."""
    return sum(int(t.numel()) for t in tensors.values())
