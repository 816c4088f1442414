"""Exported task files: written atomically, read back into a model without a registry."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from torch import nn

import taps_cl.serialization as serialization
from taps_cl.errors import TapsError
from taps_cl.methods.base import Dependency
from taps_cl.methods.catalog import get_method
from taps_cl.models import backbones
from taps_cl.models.backbones import example_input


def load_file(path: str | os.PathLike[str]) -> nn.Module:
    """A model exported by `taps-cl restore --out`, rebuilt without a registry.

    A mergeable task's file is a plain state dict; a composed task's file holds every tensor
    (base, its own and its dependencies' modules) and names method, options and dependencies.
    """
    try:
        blob = Path(path).read_bytes()
        meta = serialization.metadata_from_bytes(blob)
        tensors = serialization.from_bytes(blob)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TapsError(f"cannot read {path}: {exc}") from exc
    if "model" not in meta or "num_classes" not in meta:
        raise TapsError(f"{path} is not a model exported by taps-cl (no model in its metadata)")
    spec = backbones.ModelSpec.parse(meta["model"])
    model = backbones.create_model(spec, num_classes=int(meta["num_classes"]))
    method = get_method(meta.get("method", "linear"),
                        **(serialization.json_field(meta, "method_config") or {}))
    if not method.mergeable:
        dependencies = [Dependency(d["name"], d["method"], d["config"], None)
                        for d in serialization.json_field(meta, "dependencies") or []]
        data_config = serialization.json_field(meta, "data_config")
        method.attach(model, backbones.head_keys(spec), dependencies,
                      example_input(data_config, serialization.json_field(meta, "img_size")))
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def write_atomic(path: Path, blob: bytes) -> None:
    """Write `blob` to `path` through a unique temp file in the same directory, then rename.

    mkstemp opens with O_EXCL, so a file or symlink planted at a predictable temp name is
    never followed; the rename replaces `path` itself, never a symlink's target.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
