"""Shared fixtures: generated image folders and small registries on timm test models."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.servers import db_url, postgres_server, postgres_url  # noqa: F401  (fixtures)

torch.set_num_threads(2)

PATTERNS = ("hstripes", "vstripes", "checker", "blob")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):  # type: ignore[no-untyped-def]
    """examples/NAME.py as a module (scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"taps_cl_example_{name}",
                                                  EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def one_thread():
    # A second busy process on 2 cores makes 2 OpenMP threads spin-wait for seconds per step;
    # one thread keeps the example smoke tests fast whatever else runs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _pattern(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size]
    period = rng.integers(4, 8)
    phase = rng.integers(0, period)
    if kind == "hstripes":
        mask = ((y + phase) // (period // 2)) % 2
    elif kind == "vstripes":
        mask = ((x + phase) // (period // 2)) % 2
    elif kind == "checker":
        mask = (((x + phase) // period) + ((y + phase) // period)) % 2
    else:
        cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
        mask = ((y - cy) ** 2 + (x - cx) ** 2) < (size // 4) ** 2
    color = rng.integers(60, 256, size=3)
    img = mask[..., None] * color[None, None, :] + rng.normal(0, 12, (size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def make_imagefolder(root: Path, classes: tuple[str, ...] = PATTERNS[:3], n_train: int = 16,
                     n_test: int = 8, size: int = 32, seed: int = 0) -> Path:
    """Write root/{train,test}/<class>/*.png with a learnable pattern per class."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_pattern(cls, size, rng)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("patterns3"))


@pytest.fixture(scope="session")
def image_data4(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("patterns4"), PATTERNS, seed=1)
