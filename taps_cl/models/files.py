"""Exported task files: written atomically, read back into a model without a registry.

`load_file` trusts nothing in the file: every way an export can be damaged or crafted (not
safetensors, truncated, a header or metadata value that is not JSON, a missing or unknown model,
a bad class count, an unknown method or malformed options or dependencies, tensors that do not
fit the model) is a TapsError with one line naming the file and what is wrong.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

import taps_cl.serialization as serialization
from registry.store import create_temp
from taps_cl.errors import TapsError, first_line
from taps_cl.methods.base import Dependency, Method
from taps_cl.methods.catalog import stored_method
from taps_cl.models import backbones
from taps_cl.models.backbones import example_input

HEADER_LIMIT = 100_000_000  # safetensors' own limit on the JSON header's length


def load_file(path: str | os.PathLike[str]) -> nn.Module:
    """A model exported by `taps-cl restore --out`, rebuilt without a registry.

    A mergeable task's file is a plain state dict; a composed task's file holds every tensor
    (base, its own and its dependencies' modules) and names method, options and dependencies.
    A file that is not such an export, or a damaged one, is a TapsError naming what is wrong.
    """
    try:
        blob = Path(path).read_bytes()
    except OSError as exc:
        raise TapsError(f"cannot read {path}: {exc.strerror or first_line(exc)}") from exc
    meta, tensors = _contents(blob, path)
    if "model" not in meta:
        raise TapsError(f"{path} is not a model exported by taps-cl (no model in its metadata)")
    if "num_classes" not in meta:
        raise TapsError(f"{path} is not a model exported by taps-cl (no num_classes in its "
                        "metadata)")
    num_classes = _json(meta, "num_classes", path)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise TapsError(f"{path}: metadata num_classes must be a positive integer, got "
                        f"{meta['num_classes']!r}")
    try:
        spec = backbones.ModelSpec.parse(meta["model"])
        model = backbones.create_model(spec, num_classes=num_classes)
    except TapsError as exc:
        raise type(exc)(f"{path}: metadata model: {first_line(exc)}") from exc
    except Exception as exc:  # the model library failing on a name it claims to know
        raise TapsError(f"{path}: cannot build its model {meta['model']!r}: "
                        f"{type(exc).__name__}: {first_line(exc)}") from exc
    method = _method(meta, path)
    if not method.mergeable:
        _attach(method, model, spec, meta, path)
    try:
        backbones.apply_weights(model, tensors)  # checked first: a mismatch changes nothing
    except TapsError as exc:
        raise TapsError(f"{path}: its tensors do not fit the model its metadata names ({spec}, "
                        f"{num_classes} classes, method {method.name}): "
                        f"{first_line(exc)}") from exc
    except RuntimeError as exc:  # e.g. a tensor whose dtype cannot be copied into the model's
        raise TapsError(f"{path}: its tensors cannot be loaded into the model its metadata "
                        f"names ({spec}): {first_line(exc)}") from exc
    return model.eval()


def _contents(blob: bytes, path: Any) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The string metadata and tensors of a safetensors byte string; any defect a TapsError."""
    if len(blob) < 8:
        raise TapsError(f"{path} is not a safetensors file: {len(blob)} bytes, shorter than "
                        "the 8-byte header length")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > HEADER_LIMIT:
        raise TapsError(f"{path} is not a safetensors file: its first 8 bytes give a header "
                        f"length of {length:,} bytes")
    if length > len(blob) - 8:
        raise TapsError(f"{path} is truncated or not a safetensors file: its header needs "
                        f"{length:,} bytes, the file holds {len(blob) - 8:,} after the length")
    try:
        header = json.loads(blob[8:8 + length])
    except (ValueError, UnicodeDecodeError) as exc:
        raise TapsError(f"{path} is not a safetensors file: its header is not JSON "
                        f"({first_line(exc)})") from exc
    if not isinstance(header, dict):
        raise TapsError(f"{path} is not a safetensors file: its header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise TapsError(f"{path}: its safetensors metadata is not a map of strings")
    ends = [entry.get("data_offsets", [0, 0])[-1] for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict)
            and isinstance(entry.get("data_offsets"), list) and entry["data_offsets"]]
    data = len(blob) - 8 - length
    needed = max((e for e in ends if isinstance(e, int)), default=0)
    if needed > data:
        raise TapsError(f"{path} is truncated: its header describes {needed:,} bytes of tensor "
                        f"data, the file holds {data:,}")
    try:
        tensors = serialization.from_bytes(blob)
    except Exception as exc:  # safetensors' own error type for every other defect
        raise TapsError(f"{path}: its tensors cannot be read (a damaged safetensors file): "
                        f"{first_line(exc)}") from exc
    return meta, tensors


def _json(meta: dict[str, str], key: str, path: Any) -> Any:
    """A JSON-encoded metadata value (None when absent); a value that is not JSON is a TapsError."""
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise TapsError(f"{path}: metadata {key} is not JSON: {raw[:80]!r}") from exc


def _method(meta: dict[str, str], path: Any) -> Method:
    """The method the metadata names, configured with its options."""
    name = meta.get("method", "linear")
    config = _json(meta, "method_config", path)
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise TapsError(f"{path}: metadata method_config must be a JSON object of options, got "
                        f"{type(config).__name__} {meta['method_config'][:80]!r}")
    try:
        return stored_method(name, config)
    except TapsError as exc:
        raise type(exc)(f"{path}: metadata method {name!r}: {first_line(exc)}") from exc
    except (TypeError, ValueError, AttributeError) as exc:  # an option no validator expected
        raise TapsError(f"{path}: metadata method_config of {name!r} is invalid: "
                        f"{first_line(exc)}") from exc


def _dependencies(meta: dict[str, str], path: Any) -> list[Dependency]:
    """The dependencies the metadata names (structure only: their tensors are in the file)."""
    listed = _json(meta, "dependencies", path)
    if listed is None:
        return []
    if not isinstance(listed, list):
        raise TapsError(f"{path}: metadata dependencies must be a JSON list, got "
                        f"{type(listed).__name__}")
    found = []
    for i, entry in enumerate(listed, 1):
        if not isinstance(entry, dict):
            raise TapsError(f"{path}: metadata dependencies: entry {i} is not a JSON object")
        for key, kind in (("name", str), ("method", str), ("config", dict)):
            if not isinstance(entry.get(key), kind):
                raise TapsError(f"{path}: metadata dependencies: entry {i} has no {key} "
                                f"({'a JSON object' if kind is dict else 'a string'})")
        found.append(Dependency(entry["name"], entry["method"], entry["config"], None))
    return found


def _example(meta: dict[str, str], path: Any) -> torch.Tensor:
    """An input batch of the task's size, from img_size or the base's data_config."""
    img_size = _json(meta, "img_size", path)
    if img_size is not None:
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise TapsError(f"{path}: metadata img_size must be a positive integer, got "
                            f"{meta['img_size'][:80]!r}")
        return example_input({}, img_size)
    data_config = _json(meta, "data_config", path)
    size = data_config.get("input_size") if isinstance(data_config, dict) else None
    side = size[-1] if isinstance(size, list) and size else None
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise TapsError(f"{path}: metadata names neither img_size nor a data_config with an "
                        "input_size: the input size of the composed model is unknown")
    return example_input(data_config, None)


def _attach(method: Method, model: nn.Module, spec: backbones.ModelSpec,
            meta: dict[str, str], path: Any) -> None:
    """Add a composed method's modules (its own and its dependencies') to `model`."""
    dependencies = _dependencies(meta, path)
    example = _example(meta, path)
    try:
        method.attach(model, backbones.head_keys(spec), dependencies, example)
    except TapsError as exc:
        raise type(exc)(f"{path}: {first_line(exc)}") from exc
    except Exception as exc:  # options or dependencies the method's code did not expect
        raise TapsError(f"{path}: cannot rebuild the {method.name} modules its metadata "
                        f"describes: {type(exc).__name__}: {first_line(exc)}") from exc


def write_atomic(path: Path, blob: bytes) -> None:
    """Write `blob` to `path` through a unique temp file in the same directory, then rename.

    The temp file is opened with O_EXCL (and O_NOFOLLOW) under a random name, so a file or
    symlink planted there is never followed, and the rename replaces `path` itself, never a
    symlink's target. It is created with mode 0666 less the umask, as any file the user
    creates (mkstemp's 0600 would lock a team out of an export on a shared mount).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = create_temp(path.parent, ".tmp")  # the store's: umask-honouring, O_EXCL
    except OSError as exc:
        raise TapsError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise TapsError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        Path(tmp).unlink(missing_ok=True)
