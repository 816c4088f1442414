"""Dataset specs → train/val/test datasets, and the one preprocessing transform they all share.

Reading each kind of source (imagefolder, idx, digits, torchvision) lives in `taps_cl.data.sources`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from taps_cl.data.sampling import carve_validation, stratified_sample
from taps_cl.data.sources import Split, open_source
from taps_cl.errors import DataError

log = logging.getLogger(__name__)

KINDS = ("imagefolder", "idx", "digits", "torchvision")
DEFAULT_TORCHVISION_ROOT = "data"
# torch.nn.functional.interpolate has no lanczos/hamming/box: use the closest filter it has.
_INTERPOLATION = {
    "bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest", "lanczos": "bicubic",
    "hamming": "bilinear", "box": "area", "random": "bilinear",
}
# The max_test subset must not depend on the training seed: every run is scored on the same images.
_TEST_SEED = 0
_RESIZE_CHUNK = 1024
# Resizing works in float: a chunk holds at most this many floats (256 MiB), however large the
# images (1024 images at the 4096-px cap would be 68 GB).
_RESIZE_FLOATS = 2**26
# In-memory sources (idx, digits) are resized once into one uint8 tensor per split, a byte a
# number: a task's splits may take at most this much (all of Fashion-MNIST at 224 px: 3.3 GiB).
# Beyond it the run would fail out of memory, so it is refused before anything is recorded.
MAX_IN_MEMORY_BYTES = 8 * 2**30
# Image files are decoded once when their dataset is built; the resized pixels are kept in memory
# up to this many bytes per dataset (beyond it, items are decoded again each time they are read).
DECODED_CACHE_BYTES = 512 * 1024 * 1024
# What PIL raises for a file it cannot decode (truncated, corrupt, not an image, too large).
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


# ---------------------------------------------------------------- specs


@dataclass(frozen=True)
class DataSpec:
    """Where a task's images come from; stored as JSON in the registry, so paths are absolute."""

    kind: str  # one of KINDS
    path: str | None = None  # absolute folder (imagefolder, idx), torchvision root; None: digits
    name: str | None = None  # torchvision dataset class, e.g. "FashionMNIST"; None otherwise
    classes: tuple[str, ...] | None = None  # subset (names or indices); new labels in this order

    def __post_init__(self) -> None:
        if not all(isinstance(v, (str, type(None))) for v in (self.kind, self.path, self.name)):
            raise DataError(f"data spec fields must be text: {self.kind!r}, {self.path!r}")
        if self.kind not in KINDS:
            raise DataError(f"unknown data spec kind '{self.kind}' (one of {', '.join(KINDS)})")
        if (self.kind == "digits") != (self.path is None):
            need = "takes no path" if self.path else "needs a path"
            raise DataError(f"data spec '{self.kind}' {need}")
        if self.path is not None and not Path(self.path).is_absolute():
            raise DataError(f"data spec path '{self.path}' must be absolute")
        if (self.kind == "torchvision") != bool(self.name):
            raise DataError("only torchvision specs have a dataset name: torchvision:NAME[:ROOT]")
        if self.classes is not None:
            classes = tuple(self.classes)  # JSON hands back a list
            if not classes or not all(isinstance(c, str) and c.strip() for c in classes):
                raise DataError(f"class subset {list(classes)} must be non-empty names or indices")
            if len(set(classes)) != len(classes):
                raise DataError(f"class subset {','.join(classes)} names a class twice")
            object.__setattr__(self, "classes", classes)

    @classmethod
    def parse(cls, text: str, classes: str | None = None) -> DataSpec:
        """Parse imagefolder:PATH, idx:DIR, digits or torchvision:NAME[:ROOT]; classes "a,b"."""
        kind, _, rest = text.strip().partition(":")
        subset = None
        if classes is not None:
            subset = tuple(c.strip() for c in classes.split(","))
            if not all(subset):
                raise DataError(f"bad class subset '{classes}' (expected e.g. 0,1,2 or cat,dog)")
        kind = kind.lower()
        if kind == "digits":
            return cls("digits", path=_absolute(rest) if rest else None, classes=subset)
        if kind in ("imagefolder", "idx"):
            if not rest:
                raise DataError(f"data spec '{text}' needs a path: {kind}:PATH")
            return cls(kind, path=_absolute(rest), classes=subset)
        if kind == "torchvision":
            name, _, root = rest.partition(":")
            if not name:
                raise DataError(f"data spec '{text}' needs a dataset name: torchvision:NAME[:ROOT]")
            root = _absolute(root or DEFAULT_TORCHVISION_ROOT)
            return cls(kind, path=root, name=name, classes=subset)
        raise DataError(
            f"unknown data spec '{text}' "
            "(expected imagefolder:PATH, idx:DIR, digits or torchvision:NAME[:ROOT])"
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-able dict that from_json turns back into an equal spec."""
        classes = list(self.classes) if self.classes is not None else None
        return {"kind": self.kind, "path": self.path, "name": self.name, "classes": classes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DataSpec:
        """Inverse of to_json (unknown keys are ignored so newer registries stay readable)."""
        if not isinstance(data, dict) or "kind" not in data:
            raise DataError(f"bad stored data spec {data!r}")
        return cls(data["kind"], data.get("path"), data.get("name"), data.get("classes"))

    def __str__(self) -> str:
        if self.kind == "digits":
            return "digits"
        if self.kind == "torchvision":
            return f"torchvision:{self.name}:{self.path}"
        return f"{self.kind}:{self.path}"


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


# ---------------------------------------------------------------- preprocessing


class Preprocess:
    """Resize to size×size, 3 channels, scale to [0, 1], normalise; for train, eval and predict."""

    def __init__(self, size: int, interpolation: str, mean: list[float], std: list[float]) -> None:
        self.size = size
        self.mode = _INTERPOLATION.get(interpolation, "bilinear")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def resize(self, images: Tensor) -> Tensor:
        """uint8 [N,C,H,W] → uint8 [N,C,S,S]; chunked so 60k images never need one float copy."""
        n, c, h, w = images.shape
        if images.shape[-2:] == (self.size, self.size):
            return images.contiguous()
        out = torch.empty((n, c, self.size, self.size), dtype=torch.uint8)
        smooth = self.mode in ("bilinear", "bicubic")
        # Each image is resized on its own: the chunk size does not change a pixel.
        step = max(1, min(_RESIZE_CHUNK, _RESIZE_FLOATS // (c * max(h * w, self.size ** 2))))
        for start in range(0, n, step):
            chunk = images[start:start + step].float()
            kwargs = {"align_corners": False, "antialias": True} if smooth else {}
            chunk = F.interpolate(chunk, size=(self.size, self.size), mode=self.mode, **kwargs)
            # Bicubic overshoots; clamp and round like PIL so file and in-memory paths agree.
            out[start:start + step] = chunk.clamp_(0, 255).round_().to(torch.uint8)
        return out

    def normalise(self, image: Tensor) -> Tensor:
        """uint8 [C,S,S] (C = 1 or 3) → normalised float [3,S,S]."""
        x = image.float().div_(255)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1)
        return (x - self.mean) / self.std

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        """A PIL image or uint8 [C,H,W] tensor → normalised float [3,S,S]."""
        pixels = _pil_to_uint8(image) if isinstance(image, Image.Image) else image
        return self.normalise(self.resize(pixels[None])[0])


def build_transform(data_config: dict[str, Any], img_size: int | None = None) -> Preprocess:
    """The preprocessing for a base model's data config; img_size overrides its input size."""
    try:
        size = int(img_size if img_size is not None else data_config["input_size"][-1])
        mean, std = [float(v) for v in data_config["mean"]], [float(v) for v in data_config["std"]]
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise DataError(f"bad data config {data_config!r}: {exc}") from None
    if size < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise DataError(f"bad data config: size {size}, mean {mean}, std {std}")
    return Preprocess(size, str(data_config.get("interpolation", "bilinear")), mean, std)


def _pil_to_uint8(image: Image.Image) -> Tensor:
    if image.mode not in ("L", "RGB"):
        image = image.convert("L" if image.mode in ("1", "LA", "La") else "RGB")
    array = np.array(image, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def _read_image(path: str) -> Tensor:
    """Decode a whole image file (not just its header) to uint8 [C,H,W]; DataError naming it."""
    try:
        with Image.open(path) as image:
            return _pil_to_uint8(image)
    except _DECODE_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot read image '{path}': {reason}") from None


def load_image(
    path: str | Path, data_config: dict[str, Any], img_size: int | None = None
) -> Tensor:
    """One image file → normalised float [3,S,S], exactly as training saw its images."""
    if not Path(path).is_file():
        raise DataError(f"image '{path}' does not exist")
    return build_transform(data_config, img_size)(_read_image(str(path)))


# ---------------------------------------------------------------- datasets


class TensorImageDataset(Dataset):
    """Images resized once into one uint8 tensor; normalised per item (memory: 1 byte/pixel)."""

    def __init__(self, images: Tensor, labels: Tensor, preprocess: Preprocess) -> None:
        self.images, self.labels, self.preprocess = images, labels, preprocess

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.preprocess.normalise(self.images[i]), int(self.labels[i])


class ImageFileDataset(Dataset):
    """Image files, every one decoded when the dataset is built: a broken file fails here.

    A truncated file can have a valid header, so only a full decode finds it before training.
    The decoded pixels, resized to the preprocessing size, are kept while they fit in
    `cache_bytes` (default DECODED_CACHE_BYTES), so no file is decoded twice; past that budget,
    items are decoded again when read.
    """

    def __init__(
        self, paths: list[str], labels: Tensor, preprocess: Preprocess,
        cache_bytes: int | None = None,
    ) -> None:
        self.paths, self.labels, self.preprocess = paths, labels, preprocess
        if cache_bytes is None:
            cache_bytes = DECODED_CACHE_BYTES
        cache: list[Tensor] | None = []
        used = 0
        for path in paths:
            pixels = _read_image(path)
            if cache is None:
                continue  # decoded only to check it
            resized = preprocess.resize(pixels[None])[0]
            used += resized.numel()  # uint8: one byte per number
            if used > cache_bytes:
                log.info("decoded images exceed %d bytes; %d files will be read per item",
                         cache_bytes, len(paths))
                cache = None
            else:
                cache.append(resized)
        # Resized uint8 [C,S,S] per path, or None when they did not fit.
        self.cache = cache

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        if self.cache is not None:
            return self.preprocess.normalise(self.cache[i]), int(self.labels[i])
        return self.preprocess(_read_image(self.paths[i])), int(self.labels[i])


class TorchvisionSubset(Dataset):
    """Chosen items of a torchvision dataset, preprocessed lazily and relabelled."""

    def __init__(
        self, base: Dataset, indices: list[int], labels: Tensor, preprocess: Preprocess
    ) -> None:
        self.base, self.indices, self.labels, self.preprocess = base, indices, labels, preprocess

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        return self.preprocess(self.base[self.indices[i]][0]), int(self.labels[i])


@dataclass
class TaskData:
    """A task's datasets; items are (normalised float [3,S,S], label in 0..len(class_names)-1)."""

    train: Dataset
    val: Dataset
    test: Dataset
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        """Number of classes (the head's output size)."""
        return len(self.class_names)


def _check_in_memory(spec: DataSpec, size: int,
                     chosen: list[tuple[Split, np.ndarray]]) -> None:
    """DataError when the resized images of in-memory splits would exceed MAX_IN_MEMORY_BYTES."""
    images = [(split.images.shape[1], len(positions)) for split, positions in chosen
              if split.images is not None]
    need = sum(channels * count for channels, count in images) * size * size
    if need > MAX_IN_MEMORY_BYTES:
        raise DataError(
            f"{spec}: {sum(count for _, count in images)} images at {size} px would take "
            f"{need / 2**30:.1f} GiB in memory (at most {MAX_IN_MEMORY_BYTES // 2**30} GiB); use "
            "a smaller --img-size, or fewer images with --max-train and --max-test")


def _build_dataset(
    split: Split, indices: np.ndarray, labels: np.ndarray, preprocess: Preprocess
) -> Dataset:
    """Dataset of the chosen indices; in-memory images are resized here, only those chosen."""
    y = torch.as_tensor(labels, dtype=torch.long)
    if split.images is not None:
        images = preprocess.resize(torch.from_numpy(split.images[indices]))
        return TensorImageDataset(images, y, preprocess)
    if split.paths is not None:
        return ImageFileDataset([split.paths[i] for i in indices], y, preprocess)
    return TorchvisionSubset(split.items, indices.tolist(), y, preprocess)


# ---------------------------------------------------------------- selection


def _resolve_classes(subset: tuple[str, ...] | None, names: list[str]) -> list[int]:
    if subset is None:
        return list(range(len(names)))
    index = {name: i for i, name in enumerate(names)}
    chosen: list[int] = []
    for token in subset:
        if token in index:
            label = index[token]
        elif token.isdigit() and int(token) < len(names):
            label = int(token)
        else:
            shown = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
            raise DataError(f"unknown class '{token}' in class subset (classes: {shown})")
        if label in chosen:
            raise DataError(f"class subset names class '{names[label]}' twice")
        chosen.append(label)
    return chosen


def _relabel(split: Split, chosen: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices into split of the chosen classes, and their new labels 0..k-1."""
    size = max(int(split.labels.max(initial=0)), max(chosen)) + 1
    table = np.full(size, -1, dtype=np.int64)
    table[chosen] = np.arange(len(chosen))
    new = table[split.labels]
    keep = np.flatnonzero(new >= 0)
    return keep, new[keep]


def load_task_data(
    spec: DataSpec | str,
    data_config: dict[str, Any],
    img_size: int | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = None,
    max_test: int | None = None,
) -> TaskData:
    """Train/val/test datasets for a spec, preprocessed for a base model's data config.

    Val comes from PATH/val when present, else is carved (stratified, seeded) from the full train
    pool before max_train subsamples train; val is then capped to max(⌈max_train·val_fraction⌉,
    classes). The max_test subset does not depend on seed.
    """
    spec = DataSpec.parse(spec) if isinstance(spec, str) else spec
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if seed < 0:
        raise DataError(f"seed must be ≥ 0, got {seed}")
    for label, cap in (("max_train", max_train), ("max_test", max_test)):
        if cap is not None and cap < 1:
            raise DataError(f"{label} must be ≥ 1, got {cap}")
    preprocess = build_transform(data_config, img_size)
    train, val, test, names = open_source(spec)
    chosen = _resolve_classes(spec.classes, names)
    class_names = [names[i] for i in chosen]

    tr_pos, tr_y = _relabel(train, chosen)
    missing = sorted(set(range(len(chosen))) - set(tr_y.tolist()))
    if missing:
        raise DataError(f"class '{class_names[missing[0]]}' has no training images in {spec}")
    if val is None:
        keep, held = carve_validation(tr_y, val_fraction, (seed, 1))
        val, va_pos, va_y = train, tr_pos[held], tr_y[held]
        tr_pos, tr_y = tr_pos[keep], tr_y[keep]
    else:
        va_pos, va_y = _relabel(val, chosen)
    if max_train is not None:
        keep = stratified_sample(tr_y, max_train, (seed, 2))
        tr_pos, tr_y = tr_pos[keep], tr_y[keep]
        # Keep small runs small: val shrinks with train, yet every class stays in it.
        cap = max(math.ceil(max_train * val_fraction), len(np.unique(va_y)))
        keep = stratified_sample(va_y, cap, (seed, 3))
        va_pos, va_y = va_pos[keep], va_y[keep]
    te_pos, te_y = _relabel(test, chosen)
    if max_test is not None:
        keep = stratified_sample(te_y, max_test, _TEST_SEED)
        te_pos, te_y = te_pos[keep], te_y[keep]

    _check_in_memory(spec, preprocess.size,
                     [(train, tr_pos), (val, va_pos), (test, te_pos)])
    data = TaskData(
        train=_build_dataset(train, tr_pos, tr_y, preprocess),
        val=_build_dataset(val, va_pos, va_y, preprocess),
        test=_build_dataset(test, te_pos, te_y, preprocess),
        class_names=class_names,
    )
    log.info(
        "%s: %d classes, %d train / %d val / %d test images at %d px",
        spec, len(class_names), len(tr_y), len(va_y), len(te_y), preprocess.size,
    )
    return data
