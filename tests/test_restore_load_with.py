"""`restore --out` says how to load what it wrote: a mergeable task's file into the plain model
(`load_state_dict(strict=True)`), a composed task's file (modules attached to the backbone) with
`taps_cl.load_file`. Which one is decided by the method's `mergeable`, not by its name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file as read_tensors

import taps_cl
from taps_cl.manager import Manager
from taps_cl.methods.catalog import METHODS, load_builtin
from tests.test_cli import run

FAST = {"epochs": 1, "batch_size": 16, "img_size": 32, "max_train": 40, "max_test": 20,
        "seed": 0}


@pytest.fixture(scope="module")
def restorable(tmp_path_factory):
    """test_resnet with a composed task (adapter) and a mergeable one (linear) on digits."""
    home = tmp_path_factory.mktemp("restore") / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_resnet")
        m.add_task("ad", "b", "digits", method="adapter", **FAST)
        m.add_task("lin", "b", "digits", method="linear", **FAST)
    return str(home)


def probe_of(home: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    with Manager(home) as m:
        probe = m.models.probe(m.get_task(name))
    return probe["inputs"], probe["logits"]


def test_a_composed_task_is_loaded_with_load_file(restorable, tmp_path, capsys):
    out = tmp_path / "ad.safetensors"
    code, stdout, err = run(capsys, "--home", restorable, "--json", "restore", "ad",
                            "--out", str(out))
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["load_with"] == "taps_cl.load_file"
    # What the hint promises works, and reproduces the task's probe logits ...
    inputs, logits = probe_of(restorable, "ad")
    with torch.no_grad():
        assert (taps_cl.load_file(out)(inputs) - logits).abs().max() <= 1e-5
    # ... and what it no longer says would fail: the file has keys no plain model has.
    plain = timm.create_model("test_resnet", num_classes=doc["num_classes"])
    with pytest.raises(RuntimeError, match="Unexpected key"):
        plain.load_state_dict(read_tensors(str(out)), strict=True)

    code, text, err = run(capsys, "--home", restorable, "restore", "ad", "--out", str(out))
    assert code == 0, err
    assert f"load it with taps_cl.load_file('{out}')" in text
    assert "strict=True" not in text and "timm.create_model" not in text


def test_a_mergeable_task_loads_into_the_plain_model(restorable, tmp_path, capsys):
    out = tmp_path / "lin.safetensors"
    code, stdout, err = run(capsys, "--home", restorable, "--json", "restore", "lin",
                            "--out", str(out))
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["load_with"] == "timm.create_model"
    plain = timm.create_model("test_resnet", num_classes=doc["num_classes"])
    plain.load_state_dict(read_tensors(str(out)), strict=True)
    inputs, logits = probe_of(restorable, "lin")
    with torch.no_grad():
        assert (plain.eval()(inputs) - logits).abs().max() <= 1e-5
    code, text, _ = run(capsys, "--home", restorable, "restore", "lin", "--out", str(out))
    assert "load it into timm.create_model('test_resnet', num_classes=10) with " \
           "load_state_dict(strict=True)" in text


def test_the_hint_follows_mergeable_not_the_method_s_name(restorable, tmp_path, capsys,
                                                           monkeypatch):
    # Each method's `mergeable` flipped (the file itself is not written): the hint flips too.
    monkeypatch.setattr(Manager, "restore_to_file", lambda self, name, out: Path(out))
    load_builtin()
    monkeypatch.setattr(METHODS["adapter"], "mergeable", True)
    monkeypatch.setattr(METHODS["linear"], "mergeable", False)
    for name, expected in (("ad", "timm.create_model"), ("lin", "taps_cl.load_file")):
        code, stdout, err = run(capsys, "--home", restorable, "--json", "restore", name,
                                "--out", str(tmp_path / f"{name}.safetensors"))
        assert code == 0, err
        assert json.loads(stdout)["load_with"] == expected
