"""Read weights files a user hands us and convert foreign key layouts to timm's.

Reads .safetensors or weights-only torch checkpoints (no pickle is ever loaded except through
`torch.load(weights_only=True)`), unwraps training checkpoints, refuses NaN/inf values, and renames
lukemelas EfficientNet(-Lite) keys. Every failure becomes a one-line `BackboneError`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from taps_cl.errors import BackboneError, first_line

log = logging.getLogger(__name__)

# Wrapper keys found in training checkpoints, tried in this order when unwrapping.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "params")
# Prefixes added by DataParallel/DDP and torch.compile; stripped when every key has them.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
# Lite0's blocks per stage (timm `blocks.S`), used when a caller wants to be explicit.
LITE0_STAGE_LENGTHS = (1, 2, 2, 3, 3, 4, 1)


def _is_safetensors(path: Path) -> bool:
    """Sniff the safetensors header: u64 little-endian length, then a JSON object."""
    try:
        with path.open("rb") as fh:
            head = fh.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _unwrap(obj: object, path: Path) -> dict[str, Tensor]:
    """Dig the state dict out of common checkpoint wrappers and validate it."""
    for _ in range(4):  # wrappers nest at most a couple of levels in practice
        if isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
            inner = next(
                (obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None
            )
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise BackboneError(f"{path} does not contain a state dict (tensor name → tensor)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise BackboneError(
            f"{path} is not a plain state dict: {len(bad)} entries are not tensors "
            f"(e.g. {', '.join(map(str, bad[:3]))})"
        )
    sd = dict(obj)
    for prefix in _STRIP_PREFIXES:
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def check_finite(state: Mapping[str, Tensor], source: str) -> None:
    """Raise BackboneError naming the first tensor of `state` that holds NaN or ±inf.

    A base with such a value trains every task into NaN losses; refusing it up front keeps the
    registry free of a base no task can use.
    """
    for key, value in state.items():
        if not (value.is_floating_point() or value.is_complex()):
            continue  # integer buffers (e.g. num_batches_tracked) cannot hold NaN
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            nan = int(torch.isnan(value).sum())
            inf = int((~finite).sum()) - nan
            raise BackboneError(
                f"{source}: tensor '{key}' holds non-finite values ({nan} NaN, {inf} inf of "
                f"{value.numel()})"
            )


def is_lukemelas_efficientnet(sd: Mapping[str, Tensor]) -> bool:
    """True for lukemelas/EfficientNet-PyTorch key names (`_conv_stem.weight`, `_blocks.0…`)."""
    return "_conv_stem.weight" in sd and any(k.startswith("_blocks.") for k in sd)


def read_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read .safetensors or a weights-only torch file; lukemelas EfficientNet keys become timm's.

    Raises BackboneError (one line) for a missing or unreadable file, anything but a state dict,
    and a tensor holding NaN or ±inf.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a weights file" if path.is_dir() else "not found"
        raise BackboneError(f"weights file {what}: {path}")
    if path.suffix.lower() == ".safetensors" or _is_safetensors(path):
        from safetensors.torch import load_file

        try:
            obj: object = load_file(str(path), device="cpu")
        except Exception as exc:
            raise BackboneError(f"cannot read safetensors file {path}: {first_line(exc)}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError for non-tensor objects, RuntimeError for junk
            raise BackboneError(
                f"cannot read {path} as a weights-only torch checkpoint "
                f"({type(exc).__name__}: {first_line(exc)})"
            ) from exc
    sd = _unwrap(obj, path)
    check_finite(sd, f"weights file {path}")  # names the key as it is in the file
    if is_lukemelas_efficientnet(sd):
        log.info("%s uses lukemelas EfficientNet key names; converting to timm's", path)
        sd = convert_lukemelas_efficientnet_lite(sd)
    return sd


_LM_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
           "_fc": "classifier"}
_LM_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
# Depthwise-separable block (no expansion), timm DepthwiseSeparableConv.
_LM_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
          **_LM_SE}
# Inverted-residual block, timm InvertedResidual.
_LM_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3", **_LM_SE}


def _infer_stage_lengths(sd: Mapping[str, Tensor], n_blocks: int) -> tuple[int, ...]:
    """Stages are the runs of blocks with equal output channels (every stage changes them)."""
    lengths: list[int] = []
    previous = None
    for i in range(n_blocks):
        key = f"_blocks.{i}._project_conv.weight"
        if key not in sd:
            raise BackboneError(f"lukemelas EfficientNet weights lack {key}")
        channels = sd[key].shape[0]
        if channels == previous:
            lengths[-1] += 1
        else:
            lengths.append(1)
        previous = channels
    return tuple(lengths)


def convert_lukemelas_efficientnet_lite(
    sd: Mapping[str, Tensor], stage_lengths: Iterable[int] | None = None
) -> dict[str, Tensor]:
    """Rename lukemelas EfficientNet(-Lite) keys to timm's `tf_efficientnet_*` names.

    `_blocks.N` becomes `blocks.S.I`, walking timm's stages in order; stage lengths are
    inferred from the blocks' output channels unless given (Lite0: LITE0_STAGE_LENGTHS).
    """
    block_ids = sorted({int(k.split(".")[1]) for k in sd if k.startswith("_blocks.")})
    n_blocks = len(block_ids)
    if block_ids != list(range(n_blocks)):
        raise BackboneError("lukemelas EfficientNet weights have gaps in their _blocks numbering")
    if stage_lengths is None:
        lengths = _infer_stage_lengths(sd, n_blocks)
    else:
        lengths = tuple(stage_lengths)
    if sum(lengths) != n_blocks or any(n < 1 for n in lengths):
        raise BackboneError(
            f"stage lengths {lengths} do not add up to the {n_blocks} blocks in the weights"
        )
    position = [(s, i) for s, n in enumerate(lengths) for i in range(n)]
    expands = {int(k.split(".")[1]) for k in sd if re.match(r"_blocks\.\d+\._expand_conv\.", k)}

    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in sd.items():
        parts = key.split(".")
        new = None
        if parts[0] == "_blocks" and len(parts) >= 4:
            n = int(parts[1])
            table = _LM_IR if n in expands else _LM_DS
            if parts[2] in table:
                s, i = position[n]
                new = ".".join(["blocks", str(s), str(i), table[parts[2]], *parts[3:]])
        elif parts[0] in _LM_TOP:
            new = ".".join([_LM_TOP[parts[0]], *parts[1:]])
        if new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise BackboneError(
            f"unrecognised lukemelas EfficientNet keys: {', '.join(unknown[:5])}"
            + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")
        )
    return out

