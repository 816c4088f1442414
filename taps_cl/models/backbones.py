"""Resolve `timm:NAME` / `torchvision:NAME` backbones, load state into them, describe inputs.

Every spec string a user hands us is checked here and turned into a one-line `BackboneError`.
Weights files are read and converted in `taps_cl.models.weights`.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch import Tensor, nn

from taps_cl.errors import BackboneError, first_line
from taps_cl.models.weights import check_finite

log = logging.getLogger(__name__)

SOURCES = ("timm", "torchvision")
# Seconds to wait for the model hub to answer before giving up on a pretrained download;
# huggingface_hub itself retries with back-off for ~45 s when the network is down.
HUB_PROBE_TIMEOUT = 5.0
# torchvision's classification default when the weights carry no transform metadata.
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """Which library builds the backbone and under which name ("timm:resnet18")."""

    source: str  # "timm" or "torchvision"
    name: str  # the library's model name, e.g. "resnet18" or timm "resnet18.a1_in1k"

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise BackboneError(
                f"unknown model source {self.source!r} in '{self.source}:{self.name}'; "
                f"use one of {', '.join(s + ':NAME' for s in SOURCES)}"
            )
        if not self.name or re.search(r"\s", self.name):
            raise BackboneError(f"bad model name {self.name!r}; expected e.g. 'timm:resnet18'")

    @classmethod
    def parse(cls, text: str | ModelSpec) -> ModelSpec:
        """Parse "timm:NAME" or "torchvision:NAME"."""
        if isinstance(text, ModelSpec):
            return text
        if not isinstance(text, str) or ":" not in text:
            raise BackboneError(
                f"bad model spec {text!r}; expected SOURCE:NAME, e.g. 'timm:resnet18' or "
                "'torchvision:resnet18'"
            )
        source, name = text.strip().split(":", 1)
        return cls(source.strip().lower(), name.strip())

    def __str__(self) -> str:
        return f"{self.source}:{self.name}"


# ---------------------------------------------------------------------------------------------
# model construction


def _close_matches(name: str, candidates: Iterable[str]) -> str:
    matches = difflib.get_close_matches(name, list(candidates), n=5, cutoff=0.6)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def _check_known(spec: ModelSpec) -> None:
    """Raise BackboneError with close matches when the library has no such model."""
    if spec.source == "timm":
        import timm

        arch, _, tag = spec.name.partition(".")
        if not timm.is_model(arch):
            raise BackboneError(
                f"unknown timm model '{spec.name}'" + _close_matches(arch, timm.list_models())
            )
        # timm.is_model ignores the tag, so check the pretrained tag separately.
        if tag:
            tagged = timm.list_pretrained(f"{arch}.*")
            if spec.name not in tagged:
                raise BackboneError(
                    f"unknown timm pretrained tag '{spec.name}'" + _close_matches(spec.name, tagged)
                )
    else:
        import torchvision.models as tvm

        names = tvm.list_models(module=tvm)  # classification models only
        if spec.name not in names:
            raise BackboneError(
                f"unknown torchvision model '{spec.name}'" + _close_matches(spec.name, names)
            )


def _build(spec: ModelSpec, num_classes: int | None) -> nn.Module:
    """Build a randomly initialised model (on the current default device)."""
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if spec.source == "timm":
        import timm

        return timm.create_model(spec.name, pretrained=False, **kwargs)
    import torchvision.models as tvm

    return tvm.get_model(spec.name, weights=None, **kwargs)


def create_model(
    spec: ModelSpec | str, num_classes: int | None = None, pretrained: bool = False
) -> nn.Module:
    """Build a timm/torchvision model; `pretrained` downloads hub weights or fails fast.

    Pretrained weights holding NaN or ±inf are refused (BackboneError naming the tensor).
    """
    spec = ModelSpec.parse(spec)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise BackboneError(f"num_classes must be a positive integer, got {num_classes!r}")
    _check_known(spec)
    if not pretrained:
        return _build(spec, num_classes)
    try:
        if spec.source == "timm":
            model = _timm_pretrained(spec, num_classes)
        else:
            model = _torchvision_pretrained(spec, num_classes)
    except BackboneError:
        raise
    except Exception as exc:  # any download/parse failure from the hub clients
        raise _download_error(spec, f"{type(exc).__name__}: {first_line(exc)}") from exc
    check_finite(model.state_dict(), f"pretrained weights of {spec}")
    return model


def _download_error(spec: ModelSpec, reason: str) -> BackboneError:
    return BackboneError(
        f"could not download pretrained weights for {spec} ({reason}); pass --weights FILE"
    )


def _hf_offline() -> bool:
    """True when Hugging Face offline mode is on, read at call time (the hub reads it at import)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _hf_endpoint() -> str:
    try:
        from huggingface_hub import constants

        default = constants.ENDPOINT
    except ImportError:
        default = "https://huggingface.co"
    return os.environ.get("HF_ENDPOINT", default).rstrip("/")


def _unreachable(url: str) -> str | None:
    """Return why `url`'s host cannot be reached within HUB_PROBE_TIMEOUT, or None if it answers."""
    parts = urlsplit(url)
    root = f"{parts.scheme}://{parts.netloc}/"
    try:
        with urllib.request.urlopen(
            urllib.request.Request(root, method="HEAD"), timeout=HUB_PROBE_TIMEOUT
        ):
            return None
    except urllib.error.HTTPError:
        return None  # the server answered, if only with an error status
    except Exception as exc:  # DNS failure, refused, timeout, proxy error …
        reason = getattr(exc, "reason", exc)
        return f"{parts.netloc} unreachable: {reason}"


def _hf_cached_file(repo_id: str, filenames: Iterable[str]) -> str | None:
    """Path of an already downloaded hub file, so a cached model never needs the network."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    cache_dir = os.environ.get("HF_HUB_CACHE") or (
        os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None
    )
    for filename in filenames:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


def _torch_hub_cached_file(url: str) -> str | None:
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlsplit(url).path)
    return str(path) if url and path.is_file() else None


def _timm_pretrained(spec: ModelSpec, num_classes: int | None) -> nn.Module:
    import timm

    with torch.device("meta"):
        cfg = dict(timm.create_model(spec.name, pretrained=False).pretrained_cfg)
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if cfg.get("file") or cfg.get("state_dict") is not None:
        local = None  # timm's own config already points at local weights
    elif not hub_id and not url:
        raise BackboneError(f"timm has no pretrained weights for {spec}; pass --weights FILE")
    else:
        filenames = (
            [cfg["hf_hub_filename"]]
            if cfg.get("hf_hub_filename")
            else ["model.safetensors", "pytorch_model.bin"]
        )
        local = (_hf_cached_file(hub_id, filenames) if hub_id else None) or (
            _torch_hub_cached_file(url) if url else None
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if local:
        log.info("loading cached pretrained weights for %s from %s", spec, local)
        return timm.create_model(
            spec.name, pretrained=True, pretrained_cfg_overlay={"file": local}, **kwargs
        )
    if hub_id and _hf_offline():
        raise _download_error(spec, "Hugging Face offline mode is on and nothing is cached")
    if hub_id or url:
        reason = _unreachable(_hf_endpoint() if hub_id else url)
        if reason:
            raise _download_error(spec, reason)
    log.info("downloading pretrained weights for %s", spec)
    return timm.create_model(spec.name, pretrained=True, **kwargs)


def _torchvision_pretrained(spec: ModelSpec, num_classes: int | None) -> nn.Module:
    import torchvision.models as tvm

    weights = tvm.get_model_weights(spec.name).DEFAULT
    if not _torch_hub_cached_file(weights.url):
        reason = _unreachable(weights.url)
        if reason:
            raise _download_error(spec, reason)
    pretrained = tvm.get_model(spec.name, weights=weights)
    categories = len(weights.meta.get("categories") or [])
    if num_classes is None or num_classes == categories:
        return pretrained
    # torchvision refuses weights with another num_classes: load the body into a fresh model.
    model = _build(spec, num_classes)
    head = head_keys(spec)
    _load_checked(model, base_state_for_task(pretrained.state_dict(), head), allow_missing=head)
    return model


# ---------------------------------------------------------------------------------------------
# heads


@functools.lru_cache(maxsize=64)
def _head_keys_cached(spec: ModelSpec) -> frozenset[str]:
    def shapes(num_classes: int) -> dict[str, tuple[int, ...]]:
        try:
            with torch.device("meta"):  # no memory, no init cost
                model = _build(spec, num_classes)
        except Exception:  # a model whose __init__ needs real tensors (e.g. calls .item())
            model = _build(spec, num_classes)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # Two odd class counts that no backbone width will coincide with.
    a, b = shapes(7), shapes(11)
    keys = frozenset(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if not keys:
        raise BackboneError(f"could not find the classifier head of {spec}")
    return keys


def head_keys(spec: ModelSpec | str) -> frozenset[str]:
    """State-dict keys of the classifier head: those whose shape follows num_classes."""
    spec = ModelSpec.parse(spec)
    _check_known(spec)
    return _head_keys_cached(spec)


# ---------------------------------------------------------------------------------------------
# loading state into models


def _mismatch(
    model: nn.Module, sd: Mapping[str, Tensor], allow_missing: frozenset[str] = frozenset()
) -> str | None:
    """Describe how `sd` fails to fit `model` exactly (one line), or None when it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and k not in allow_missing]
    unexpected = [k for k in sd if k not in expected]
    shaped = [
        f"{k} {list(sd[k].shape)} vs model {list(expected[k].shape)}"
        for k in sd
        if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)
    ]
    if not (missing or unexpected or shaped):
        return None

    def part(label: str, items: list[str]) -> str:
        more = f", … +{len(items) - 3}" if len(items) > 3 else ""
        return f"{len(items)} {label} ({', '.join(items[:3])}{more})"

    parts = [part(lbl, items) for lbl, items in
             (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", shaped))
             if items]
    return "; ".join(parts)


def _load_checked(
    model: nn.Module, sd: Mapping[str, Tensor], allow_missing: frozenset[str] = frozenset()
) -> None:
    # Check before load_state_dict: a strict load that fails has already copied the matching keys.
    problem = _mismatch(model, sd, allow_missing)
    if problem:
        raise BackboneError(f"weights do not fit {type(model).__name__}: {problem}")
    model.load_state_dict(sd, strict=not allow_missing)


def apply_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load `state_dict` strictly; on a mismatch raise a one-line BackboneError, change nothing."""
    _load_checked(model, state_dict)


def base_state_for_task(
    base_state: Mapping[str, Tensor], head: frozenset[str]
) -> dict[str, Tensor]:
    """The base state without the classifier head keys (a task brings its own head)."""
    return {k: v for k, v in base_state.items() if k not in head}


def build_task_model(
    spec: ModelSpec | str,
    base_state: Mapping[str, Tensor],
    num_classes: int,
    head: frozenset[str],
) -> nn.Module:
    """A fresh model with `num_classes` outputs: base weights everywhere, a new head.

    Only the head may be missing from the base state; the head keeps the fresh init, so the
    caller seeds torch before calling for a reproducible head.
    """
    model = create_model(spec, num_classes=num_classes)
    missing_head = head - model.state_dict().keys()
    if missing_head:
        raise BackboneError(f"head keys not in {spec}: {', '.join(sorted(missing_head))}")
    _load_checked(model, base_state_for_task(base_state, head), allow_missing=head)
    return model


# ---------------------------------------------------------------------------------------------
# input description, sizes


def data_config(model: nn.Module, spec: ModelSpec | str) -> dict:
    """JSON-able input description: input_size [3,H,W], mean, std, interpolation, crop_pct."""
    spec = ModelSpec.parse(spec)
    if spec.source == "timm":
        import timm.data

        cfg = timm.data.resolve_data_config({}, model=model)
        size, mean, std = cfg["input_size"], cfg["mean"], cfg["std"]
        interpolation, crop_pct = cfg.get("interpolation", "bicubic"), cfg.get("crop_pct", 0.875)
    else:
        size, mean, std = (3, 224, 224), _IMAGENET_MEAN, _IMAGENET_STD
        interpolation, crop_pct = "bilinear", 0.875
        # Prefer the preprocessing torchvision publishes with the model's default weights.
        try:
            import torchvision.models as tvm

            preset = tvm.get_model_weights(spec.name).DEFAULT.transforms()
            crop, resize = preset.crop_size[0], preset.resize_size[0]
            size, mean, std = (3, crop, crop), tuple(preset.mean), tuple(preset.std)
            interpolation, crop_pct = preset.interpolation.value, crop / resize
        except Exception:  # no published weights or an unusual preset: keep the defaults
            log.debug("no torchvision preset for %s; using ImageNet defaults", spec)
    return {
        "input_size": [int(x) for x in size],
        "mean": [float(x) for x in mean],
        "std": [float(x) for x in std],
        "interpolation": str(interpolation),
        "crop_pct": float(crop_pct),
    }


def count_params(model: nn.Module, exclude: frozenset[str] = frozenset()) -> int:
    """Numbers in the model's parameters (not buffers), leaving out the keys in `exclude`."""
    return sum(p.numel() for name, p in model.named_parameters() if name not in exclude)


def example_input(data_config: dict, img_size: int | None) -> torch.Tensor:
    """A zero batch of one image at the task's input size (composed methods read shapes off it)."""
    size = img_size or int(data_config["input_size"][-1])
    return torch.zeros(1, 3, size, size)
