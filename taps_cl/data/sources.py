"""Dataset sources: read imagefolder, idx, digits and torchvision data into raw splits.

A source hands back original labels and where each split's images are (uint8 arrays in memory,
image files, or a torchvision dataset); `taps_cl.data.specs` selects classes, splits and
preprocesses.
"""

from __future__ import annotations

import difflib
import gzip
import inspect
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from torch.utils.data import Dataset

from taps_cl.errors import DataError


class SourceSpec(Protocol):
    """What `open_source` reads of a data spec (`taps_cl.data.specs.DataSpec` is one)."""

    kind: str  # "imagefolder", "idx", "digits" or "torchvision"
    path: str | None  # the folder (imagefolder, idx) or torchvision root
    name: str | None  # the torchvision data set class


log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class Split:
    """One split of a source before selection: original labels and where the images are."""

    labels: np.ndarray  # int64 original labels
    images: np.ndarray | None = None  # uint8 [N,C,H,W], in-memory sources
    paths: list[str] | None = None  # image files, imagefolder
    items: Dataset | None = None  # torchvision dataset read lazily


# train, val (when the source has its own), test, class names
Source = tuple[Split, Split | None, Split, list[str]]


def _imagefolder(root: Path) -> Source:
    _require_folder(root)
    for required in ("train", "test"):
        if not (root / required).is_dir():
            raise DataError(
                f"'{root}' has no {required}/ folder (expected {root}/{required}/<class>/<image>)"
            )
    names = _class_folders(root / "train")
    splits: dict[str, Split] = {}
    for split in ("train", "val", "test"):
        folder = root / split
        if not folder.is_dir():
            continue
        found = _class_folders(folder)
        if found != names:
            missing, extra = sorted(set(names) - set(found)), sorted(set(found) - set(names))
            raise DataError(
                f"class folders of '{folder}' differ from train: missing {missing}, extra {extra}"
            )
        paths, labels = [], []
        for label, name in enumerate(names):
            files = _image_files(folder / name)
            paths += files
            labels += [label] * len(files)
        splits[split] = Split(np.asarray(labels, dtype=np.int64), paths=paths)
    return splits["train"], splits.get("val"), splits["test"], names


def _require_folder(folder: Path) -> None:
    if not folder.is_dir():
        state = "is not a folder" if folder.exists() else "does not exist"
        raise DataError(f"data path '{folder}' {state}")


def _class_folders(folder: Path) -> list[str]:
    names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(f"no class folders in '{folder}' (expected {folder}/<class>/<image>)")
    return names


def _image_files(folder: Path) -> list[str]:
    files = sorted(
        str(p) for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        kinds = " ".join(IMAGE_EXTENSIONS)
        raise DataError(f"class folder '{folder}' has no image files ({kinds})")
    return files


def _idx(folder: Path) -> Source:
    _require_folder(folder)
    arrays = {key: _read_idx(_find_idx(folder, stem)) for key, stem in IDX_FILES.items()}
    splits = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f"idx {split} files in '{folder}' disagree: "
                f"images {images.shape}, labels {labels.shape}"
            )
        splits.append(Split(labels.astype(np.int64), images=images[:, None]))
    top = int(max(splits[0].labels.max(initial=0), splits[1].labels.max(initial=0)))
    return splits[0], None, splits[1], _idx_class_names(folder, top)


def _find_idx(folder: Path, stem: str) -> Path:
    dotted = stem.replace("-idx", ".idx")  # some mirrors name them train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise DataError(f"'{folder}' has no {stem}[.gz] (MNIST-format idx files expected)")


def _read_idx(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, EOFError) as exc:
        raise DataError(f"cannot read '{path}': {exc}") from None
    if len(data) < 4 or data[:3] != b"\x00\x00\x08":
        raise DataError(f"'{path}' is not an unsigned-byte idx file")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if len(data) < offset:
        raise DataError(f"'{path}' is truncated")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if len(data) - offset != math.prod(shape):
        raise DataError(f"'{path}' holds {len(data) - offset} bytes, its header says {shape}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def _idx_class_names(folder: Path, top_label: int) -> list[str]:
    listing = folder / "classes.txt"
    if listing.is_file():
        lines = listing.read_text(encoding="utf-8").splitlines()
        names = [line.strip() for line in lines if line.strip()]
        if len(names) <= top_label:
            raise DataError(f"'{listing}' names {len(names)} classes; labels go up to {top_label}")
        return names
    fashion = any("fashion" in part.lower() for part in (folder.name, folder.parent.name))
    if fashion and top_label < len(FASHION_MNIST_CLASSES):
        return list(FASHION_MNIST_CLASSES)
    return [str(i) for i in range(top_label + 1)]


def _digits() -> Source:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # pixels are 0..16
    labels = digits.target.astype(np.int64)
    # Fixed seed: the train/test split is part of the dataset, not of a run.
    train, test = train_test_split(
        np.arange(len(labels)), test_size=0.25, stratify=labels, random_state=0
    )
    split = [Split(labels[i], images=images[i]) for i in (np.sort(train), np.sort(test))]
    return split[0], None, split[1], [str(i) for i in range(10)]


def _torchvision(name: str, root: Path) -> Source:
    import torchvision.datasets as tvd

    known = {n.lower(): n for n in tvd.__all__ if n[0].isupper()}
    if name.lower() not in known:
        close = difflib.get_close_matches(name, list(known.values()), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise DataError(f"unknown torchvision dataset '{name}'{hint}")
    cls = getattr(tvd, known[name.lower()])
    params = inspect.signature(cls).parameters
    if "train" not in params and "split" not in params:
        raise DataError(f"torchvision dataset '{cls.__name__}' has no train/test split")

    def make(split: str) -> Dataset | None:
        kwargs: dict[str, Any] = {"download": False} if "download" in params else {}
        if "train" in params:
            kwargs["train"] = split == "train"
        else:
            kwargs["split"] = split
        try:
            return cls(str(root), **kwargs)
        except ValueError:  # this dataset does not offer that split name
            return None
        except (RuntimeError, OSError, ImportError) as exc:
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise DataError(
                f"torchvision dataset '{cls.__name__}' not found under '{root}' "
                f"(downloads are off; put its files there): {reason}"
            ) from None

    train, test = make("train"), make("test")
    # A "trainval" split (OxfordIIITPet) already holds val; only a plain "train" has a separate one.
    val = make("val") if train is not None and "split" in params else None
    if train is None and "split" in params:
        train = make("trainval")
    if train is None or test is None:
        raise DataError(f"torchvision dataset '{cls.__name__}' has no train and test split")
    splits = [_torchvision_split(ds) if ds is not None else None for ds in (train, val, test)]
    top = int(max(s.labels.max(initial=0) for s in splits if s is not None))
    classes = getattr(train, "classes", None)
    if classes and len(classes) > top:
        return splits[0], splits[1], splits[2], [str(c) for c in classes]
    return splits[0], splits[1], splits[2], [str(i) for i in range(top + 1)]


def _torchvision_split(ds: Dataset) -> Split:
    import torchvision.datasets as tvd

    labels = None
    for attr in ("targets", "labels", "_labels"):
        value = getattr(ds, attr, None)
        if value is not None and len(value) == len(ds):
            labels = np.asarray(value, dtype=np.int64)
            break
    if labels is None and hasattr(ds, "_samples"):
        labels = np.asarray([s[1] for s in ds._samples], dtype=np.int64)
    if labels is None:
        log.info("reading every item of %s to find its labels", type(ds).__name__)
        labels = np.asarray([ds[i][1] for i in range(len(ds))], dtype=np.int64)
    if isinstance(ds, (tvd.MNIST, tvd.CIFAR10)):  # pixels already in memory: take the fast path
        data = np.asarray(ds.data)
        images = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)  # NHWC → NCHW
        return Split(labels, images=images)
    return Split(labels, items=ds)


def open_source(spec: SourceSpec) -> Source:
    """Read the splits and class names a data spec points at (images may stay on disk)."""
    if spec.kind == "imagefolder":
        return _imagefolder(Path(spec.path))
    if spec.kind == "idx":
        return _idx(Path(spec.path))
    if spec.kind == "digits":
        return _digits()
    return _torchvision(spec.name, Path(spec.path))
