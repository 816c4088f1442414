"""Data specs, sources (imagefolder, idx, digits, torchvision), splits, subsets, preprocessing."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from taps_cl.data import specs as data_module
from taps_cl.data.sources import FASHION_MNIST_CLASSES
from taps_cl.data.specs import (
    DataSpec,
    ImageFileDataset,
    TensorImageDataset,
    build_transform,
    load_image,
    load_task_data,
)
from taps_cl.errors import DataError

MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.5]
CFG = {"input_size": [3, 24, 24], "mean": MEAN, "std": STD, "interpolation": "bicubic"}
COLORS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "eel": (0, 0, 255)}


def make_imagefolder(
    root: Path, counts: dict[str, int] | None = None, classes: tuple[str, ...] = tuple(COLORS)
) -> Path:
    """root/<split>/<class>/<i>.png, each class a solid colour with a little noise."""
    rng = np.random.default_rng(0)
    for split, n in (counts or {"train": 10, "test": 3}).items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-20, 20, (18, 14, 3))
                pixels = np.clip(np.array(COLORS[name]) + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    """Write an unsigned-byte idx file (MNIST format)."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def make_idx(
    folder: Path, gz: bool = False, n_train: int = 60, n_test: int = 20, classes: int = 4
) -> Path:
    """Idx files whose images carry their own index in pixels [0,0] and [0,1], to trace them."""
    folder.mkdir(parents=True, exist_ok=True)
    for n, prefix in ((n_train, "train"), (n_test, "t10k")):
        images = np.zeros((n, 7, 7), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        images[:, 3:, 3:] = 200
        write_idx(folder / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", np.arange(n) % classes, gz)
    return folder


def ids(dataset: TensorImageDataset) -> set[int]:
    """Indices encoded by make_idx (needs img_size 7, i.e. no resize)."""
    images = dataset.images
    return set((images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist())


# ------------------------------------------------------------------ specs


def test_spec_parse_makes_paths_absolute_and_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = DataSpec.parse("imagefolder:sub/data", classes="cat, 2")
    assert spec.path == str((tmp_path / "sub" / "data").resolve())
    assert spec.classes == ("cat", "2")
    for s in (spec, DataSpec.parse("digits"), DataSpec.parse("idx:x"),
              DataSpec.parse("torchvision:FashionMNIST"), DataSpec.parse("torchvision:MNIST:/r")):
        stored = json.loads(json.dumps(s.to_json()))
        assert DataSpec.from_json(stored) == s
    tv = DataSpec.parse("torchvision:MNIST:/r")
    assert (tv.name, tv.path, str(tv)) == ("MNIST", "/r", "torchvision:MNIST:/r")
    assert str(DataSpec.parse("digits")) == "digits"


@pytest.mark.parametrize(
    "text, classes",
    [("nope:x", None), ("imagefolder:", None), ("idx", None), ("digits:/x", None),
     ("torchvision:", None), ("digits", "1,,2"), ("digits", "1,1")],
)
def test_spec_parse_errors(text, classes):
    with pytest.raises(DataError):
        DataSpec.parse(text, classes=classes)


@pytest.mark.parametrize(
    "stored",
    [{"kind": "idx", "path": "relative"}, {"kind": "what", "path": "/x"}, {"path": "/x"}, [],
     {"kind": "digits", "name": "MNIST"}, {"kind": "digits", "classes": []},
     {"kind": "idx", "path": 5}, {"kind": "digits", "classes": [1]}],
)
def test_spec_from_json_errors(stored):
    with pytest.raises(DataError):
        DataSpec.from_json(stored)


# ------------------------------------------------------------------ imagefolder


def test_imagefolder_shapes_labels_and_carved_val(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    data = load_task_data(DataSpec.parse(f"imagefolder:{root}"), CFG, img_size=16, val_fraction=0.2)
    assert data.class_names == ["cat", "dog", "eel"] and data.num_classes == 3
    assert (len(data.train), len(data.val), len(data.test)) == (24, 6, 9)
    assert data.val.labels.bincount().tolist() == [2, 2, 2]
    x, y = data.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and isinstance(y, int)
    assert not set(data.train.paths) & set(data.val.paths)
    assert all(Path(p).parts[-3] == "test" for p in data.test.paths)
    batch, labels = next(iter(DataLoader(data.train, batch_size=5)))
    assert batch.shape == (5, 3, 16, 16) and labels.dtype == torch.long


def test_imagefolder_default_size_comes_from_data_config(tmp_path):
    data = load_task_data(f"imagefolder:{make_imagefolder(tmp_path / 'd')}", CFG)
    assert data.test[0][0].shape == (3, 24, 24)


def test_imagefolder_uses_its_own_val_folder(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"train": 6, "val": 2, "test": 2})
    data = load_task_data(f"imagefolder:{root}", CFG, img_size=8)
    assert (len(data.train), len(data.val), len(data.test)) == (18, 6, 6)
    assert all(Path(p).parts[-3] == "val" for p in data.val.paths)


def test_normalisation_and_grayscale_to_three_channels(tmp_path):
    colour, gray = tmp_path / "c.png", tmp_path / "g.png"
    Image.new("RGB", (9, 5), (255, 0, 102)).save(colour)
    Image.new("L", (9, 5), 51).save(gray)
    expected = [(v / 255 - m) / s for v, m, s in zip((255, 0, 102), MEAN, STD, strict=True)]
    x = load_image(colour, CFG, img_size=6)
    assert x.shape == (3, 6, 6)
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    g = load_image(gray, CFG)
    assert g.shape == (3, 24, 24)
    expected = [(0.2 - m) / s for m, s in zip(MEAN, STD, strict=True)]
    assert torch.allclose(g[:, 0, 0], torch.tensor(expected))


def test_load_image_matches_dataset_item(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    data = load_task_data(f"imagefolder:{root}", CFG, img_size=11)
    x, _ = data.test[4]
    assert torch.equal(load_image(data.test.paths[4], CFG, img_size=11), x)


def test_load_image_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_image(tmp_path / "missing.png", CFG)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(tmp_path / "bad.png", CFG)


def truncate_to_half(path: Path) -> None:
    """Keep the first half of an image file: the header stays valid, the pixel data ends early."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_png_is_refused_when_the_data_is_loaded(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    broken = root / "train" / "dog" / "7.png"
    truncate_to_half(broken)
    with Image.open(broken) as image:  # the header still reads: a header check lets it through
        assert image.size == (14, 18)
    with pytest.raises(DataError, match=r"cannot read image '.*7\.png'") as info:
        load_task_data(f"imagefolder:{root}", CFG, img_size=8)
    assert str(broken) in str(info.value) and "\n" not in str(info.value)


def test_files_left_out_of_the_task_are_not_read(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    truncate_to_half(root / "train" / "eel" / "3.png")
    # Not in the class subset: never decoded, so not refused.
    data = load_task_data(DataSpec.parse(f"imagefolder:{root}", classes="cat,dog"), CFG, img_size=8)
    assert data.class_names == ["cat", "dog"]
    assert not any("eel" in p for p in data.train.paths + data.val.paths + data.test.paths)
    with pytest.raises(DataError, match="3.png"):
        load_task_data(f"imagefolder:{root}", CFG, img_size=8)


def test_image_files_are_decoded_once(tmp_path, monkeypatch):
    root = make_imagefolder(tmp_path / "d")
    reads: list[str] = []
    real = data_module._read_image

    def counting(path: str):
        reads.append(path)
        return real(path)

    monkeypatch.setattr(data_module, "_read_image", counting)
    data = load_task_data(f"imagefolder:{root}", CFG, img_size=8)
    everything = data.train.paths + data.val.paths + data.test.paths
    assert sorted(reads) == sorted(everything) and len(set(reads)) == len(reads) == 39
    for dataset in (data.train, data.val, data.test):
        for i in range(len(dataset)):
            dataset[i]
    assert len(reads) == 39  # items come from the decoded cache, not from the files again


def test_image_cache_budget_changes_nothing_but_memory(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    cached = load_task_data(f"imagefolder:{root}", CFG, img_size=8).test
    assert cached.cache is not None
    uncached = ImageFileDataset(cached.paths, cached.labels, cached.preprocess, cache_bytes=100)
    assert uncached.cache is None
    for i in range(len(cached)):
        assert torch.equal(cached[i][0], uncached[i][0]) and cached[i][1] == uncached[i][1]
    truncate_to_half(Path(cached.paths[-1]))
    with pytest.raises(DataError, match="cannot read image"):  # still decoded up front
        ImageFileDataset(cached.paths, cached.labels, cached.preprocess, cache_bytes=100)


def _no_test(root: Path) -> None:
    make_imagefolder(root, {"train": 2})


def _no_train(root: Path) -> None:
    make_imagefolder(root, {"test": 2})


def _empty_class(root: Path) -> None:
    make_imagefolder(root, {"train": 2, "test": 1})
    (root / "train" / "fox").mkdir()
    (root / "test" / "fox").mkdir()


def _no_images(root: Path) -> None:
    make_imagefolder(root, {"train": 2, "test": 1})
    for split in ("train", "test"):
        (root / split / "fox").mkdir()
        (root / split / "fox" / "notes.txt").write_text("hi")


def _no_class_folders(root: Path) -> None:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    Image.new("L", (4, 4)).save(root / "train" / "loose.png")


def _mismatched(root: Path) -> None:
    make_imagefolder(root, {"train": 2})
    make_imagefolder(root, {"test": 1}, classes=("cat", "dog"))


def _mismatched_val(root: Path) -> None:
    make_imagefolder(root, {"train": 2, "test": 1})
    make_imagefolder(root, {"val": 1}, classes=("cat",))


def _unreadable(root: Path) -> None:
    make_imagefolder(root, {"train": 2, "test": 1})
    (root / "test" / "dog" / "broken.png").write_bytes(b"\x89PNG garbage")


def _is_file(root: Path) -> None:
    root.write_text("a file")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda root: None, "does not exist"),
        (_is_file, "is not a folder"),
        (_no_test, "no test/ folder"),
        (_no_train, "no train/ folder"),
        (_empty_class, "has no image files"),
        (_no_images, "has no image files"),
        (_no_class_folders, "no class folders"),
        (_mismatched, "differ from train"),
        (_mismatched_val, "differ from train"),
        (_unreadable, "cannot read image"),
    ],
)
def test_imagefolder_errors(tmp_path, build, message):
    root = tmp_path / "d"
    build(root)
    with pytest.raises(DataError, match=message) as info:
        load_task_data(f"imagefolder:{root}", CFG, img_size=8)
    assert "\n" not in str(info.value)


def test_class_subset_by_name_and_index_relabels_in_given_order(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    data = load_task_data(DataSpec.parse(f"imagefolder:{root}", classes="eel,0"), CFG, img_size=4)
    assert data.class_names == ["eel", "cat"]
    assert set(data.train.labels.tolist()) == {0, 1} and len(data.test) == 6
    for x, y in data.test:
        # Un-normalise: eel images are blue (channel 2), cat images red (channel 0).
        rgb = x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
        assert int(rgb.mean(dim=(1, 2)).argmax()) == (2 if y == 0 else 0)


@pytest.mark.parametrize("classes", ["cow", "7", "cat,0"])
def test_class_subset_errors(tmp_path, classes):
    root = make_imagefolder(tmp_path / "d", {"train": 2, "test": 1})
    with pytest.raises(DataError):
        load_task_data(DataSpec.parse(f"imagefolder:{root}", classes=classes), CFG, img_size=4)


# ------------------------------------------------------------------ idx


@pytest.mark.parametrize("gz", [False, True])
def test_idx_reads_raw_and_gz_files(tmp_path, gz):
    folder = make_idx(tmp_path / "digits-idx", gz=gz)
    cfg = {**CFG, "interpolation": "nearest"}
    data = load_task_data(f"idx:{folder}", cfg, img_size=7, val_fraction=0.25)
    assert data.class_names == ["0", "1", "2", "3"]
    assert (len(data.train), len(data.val), len(data.test)) == (44, 16, 20)
    assert isinstance(data.train, TensorImageDataset) and data.train.images.dtype == torch.uint8
    assert ids(data.test) == set(range(20))
    x, y = data.test[5]
    assert y == 5 % 4 and x.shape == (3, 7, 7)
    expected = [(200 / 255 - m) / s for m, s in zip(MEAN, STD, strict=True)]
    assert torch.allclose(x[:, 6, 6], torch.tensor(expected))


def test_idx_class_names_from_classes_txt_or_fashion_folder(tmp_path):
    folder = make_idx(tmp_path / "plain")
    (folder / "classes.txt").write_text("ant\nbee\n\ncow\ndoe\n")
    data = load_task_data(DataSpec.parse(f"idx:{folder}", classes="doe,bee"), CFG, img_size=7)
    assert data.class_names == ["doe", "bee"]
    fashion = make_idx(tmp_path / "fashion-mnist", gz=True, classes=10)
    assert load_task_data(f"idx:{fashion}", CFG, img_size=7).class_names == list(
        FASHION_MNIST_CLASSES
    )
    (folder / "classes.txt").write_text("ant\nbee\n")
    with pytest.raises(DataError, match="classes.txt"):
        load_task_data(f"idx:{folder}", CFG, img_size=7)


def test_idx_errors(tmp_path):
    folder = make_idx(tmp_path / "a")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_task_data(f"idx:{folder}", CFG)
    write_idx(folder / "t10k-labels-idx1-ubyte", np.zeros(3), gz=False)
    with pytest.raises(DataError, match="disagree"):
        load_task_data(f"idx:{folder}", CFG)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x0d\x01" + b"\x00" * 8)
    with pytest.raises(DataError, match="not an unsigned-byte idx"):
        load_task_data(f"idx:{folder}", CFG)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x14" + b"\x01")
    with pytest.raises(DataError, match="header says"):
        load_task_data(f"idx:{folder}", CFG)
    (folder / "t10k-labels-idx1-ubyte").write_bytes(b"\x1f\x8b broken gzip")
    with pytest.raises(DataError, match="cannot read"):
        load_task_data(f"idx:{folder}", CFG)
    with pytest.raises(DataError, match="does not exist"):
        load_task_data(f"idx:{tmp_path / 'missing'}", CFG)


# ------------------------------------------------------------------ splits


def test_val_is_disjoint_stratified_and_seeded(tmp_path):
    folder = make_idx(tmp_path / "i", n_train=200, n_test=40)

    def load(seed: int, **kw):
        return load_task_data(f"idx:{folder}", CFG, img_size=7, seed=seed, **kw)

    a, b, c = load(0), load(0), load(1)
    assert not ids(a.train) & ids(a.val) and len(ids(a.train) | ids(a.val)) == 200
    assert a.val.labels.bincount().tolist() == [5, 5, 5, 5]
    assert ids(a.val) == ids(b.val) and torch.equal(a.train.images, b.train.images)
    assert ids(a.val) != ids(c.val)
    assert ids(a.test) == ids(c.test) == set(range(40))  # the test set never feeds val


def test_max_train_and_max_test_subsample_stratified(tmp_path):
    folder = make_idx(tmp_path / "i", n_train=200, n_test=40)
    full = load_task_data(f"idx:{folder}", CFG, img_size=7)
    data = load_task_data(f"idx:{folder}", CFG, img_size=7, max_train=22, max_test=10)
    assert len(data.train) == 22 and len(data.test) == 10
    assert sorted(data.train.labels.bincount().tolist()) == [5, 5, 6, 6]
    assert data.test.labels.bincount().min() >= 2
    # Val is carved from the full pool first, then capped to max(ceil(22·0.1), 4 classes) = 4.
    assert len(data.val) == 4 and data.val.labels.bincount().tolist() == [1, 1, 1, 1]
    assert ids(data.val) <= ids(full.val) and ids(data.train) <= ids(full.train)
    bigger = load_task_data(f"idx:{folder}", CFG, img_size=7, max_train=100, val_fraction=0.2)
    assert len(bigger.val) == math.ceil(100 * 0.2)
    other_seed = load_task_data(f"idx:{folder}", CFG, img_size=7, seed=5, max_train=22, max_test=10)
    assert ids(other_seed.test) == ids(data.test)  # every run is scored on the same test images
    assert ids(other_seed.train) != ids(data.train)
    assert len(load_task_data(f"idx:{folder}", CFG, img_size=7, max_train=1000).train) == 180


@pytest.mark.parametrize(
    "kwargs", [{"val_fraction": 1.0}, {"val_fraction": -0.1}, {"max_train": 0}, {"max_test": 0},
               {"seed": -1}]
)
def test_bad_load_arguments(tmp_path, kwargs):
    with pytest.raises(DataError):
        load_task_data(f"idx:{make_idx(tmp_path / 'i')}", CFG, **kwargs)


@pytest.mark.parametrize(
    "cfg", [{}, {"input_size": [3, 8, 8], "mean": [0.5], "std": [0.5] * 3},
            {"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.0] * 3}]
)
def test_bad_data_config(cfg):
    with pytest.raises(DataError):
        build_transform(cfg)


# ------------------------------------------------------------------ digits, torchvision


def test_digits_split_subset_and_upscale():
    data = load_task_data(DataSpec.parse("digits", classes="3,5"), CFG, img_size=16, max_test=20)
    assert data.class_names == ["3", "5"]
    assert len(data.test) == 20 and data.train[0][0].shape == (3, 16, 16)
    full = load_task_data("digits", CFG, img_size=8, val_fraction=0.1)
    assert len(full.train) + len(full.val) == 1347 and len(full.test) == 450
    assert full.train.images.shape[1:] == (1, 8, 8) and full.train.images.max() == 255
    again = load_task_data("digits", CFG, img_size=8, val_fraction=0.1)
    assert torch.equal(full.test.images, again.test.images)


def test_torchvision_dataset_from_local_files(tmp_path):
    make_idx(tmp_path / "FashionMNIST" / "raw", n_train=30, n_test=10, classes=10)
    data = load_task_data(f"torchvision:fashionmnist:{tmp_path}", CFG, img_size=7, max_test=5)
    assert data.class_names == list(FASHION_MNIST_CLASSES)
    assert (len(data.train) + len(data.val), len(data.test)) == (30, 5)
    assert data.train[0][0].shape == (3, 7, 7)


def test_torchvision_errors(tmp_path):
    with pytest.raises(DataError, match="not found under"):
        load_task_data(f"torchvision:MNIST:{tmp_path}", CFG)
    with pytest.raises(DataError, match="unknown torchvision dataset 'MNSIT'.*MNIST"):
        load_task_data(f"torchvision:MNSIT:{tmp_path}", CFG)
