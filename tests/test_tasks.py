"""Adding tasks end to end: stored state, non-interference, restore, predict, clean failures."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load, load_file

from registry import AlreadyExists
from taps_cl import serialization
from taps_cl.errors import TapsError
from taps_cl.manager import Manager
from tests.servers import db_option
from tests.test_cli import assert_one_line_error, run

FAST = dict(epochs=2, batch_size=16, img_size=32, seed=0)


@pytest.fixture
def manager(tmp_path, db_url):
    """A manager with base `b` (timm test_resnet), on SQLite and on PostgreSQL."""
    with Manager(tmp_path / "home", db_url) as m:
        m.add_base("b", "timm:test_resnet")
        yield m


def artifact_files(m: Manager) -> dict[str, bytes]:
    return {a.sha256: m.registry.store.path_of(a.path).read_bytes() for a in m.registry.list_artifacts()}


@pytest.mark.parametrize("method", ["taps", "finetune", "linear"])
def test_add_task_stores_what_the_method_needs(manager, image_data, method):
    result = manager.add_task("t", "b", f"imagefolder:{image_data}", method=method, **FAST)
    task = result.task
    assert task.status == "ready" and task.position == 1 and task.num_classes == 3
    tensors = serialization.from_bytes(manager.registry.read_artifact(task.artifact))
    assert task.task_params == serialization.numel(tensors)
    # a layer's delta, or its factors (compact TAPS, the default, factorises the large layers)
    deltas = {k.split("/", 1)[1].removesuffix(".weight") for k in tensors
              if k.startswith(("delta/", "factor_a/", "factor_b/"))}
    active = {layer.name for layer in task.layers if layer.active}
    if method == "taps":
        assert deltas == active  # inactive layers store nothing
        assert any(k.startswith("factor_b/") for k in tensors)
    else:
        assert not deltas
    if method == "linear":
        assert set(tensors) == {"set/fc.weight", "set/fc.bias"}
        assert task.active_layers == 0
    assert len(task.layers) == sum(
        isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear))
        for name, mod in timm.create_model("test_resnet").named_modules() if name != "fc")
    assert 0.0 <= result.test_accuracy <= 1.0
    assert result.merge_error < 1e-4  # restored model == training-time model on the probe batch
    probe = load(manager.registry.read_artifact(task.probe))
    assert probe["inputs"].shape[0] == 24 and probe["logits"].shape == (24, 3)


def test_taps_lambda_zero_keeps_gates_on_and_large_switches_off(manager, image_data):
    spec = f"imagefolder:{image_data}"
    on = manager.add_task("on", "b", spec, method="taps", method_options={"lam": 0.0},
                          **FAST).task
    assert on.active_layers == on.total_layers
    off = manager.add_task("off", "b", spec, method="taps", epochs=3, batch_size=8, img_size=32,
                           method_options={"lam": 50.0, "warmup_epochs": 0, "score_lr": 0.1}).task
    assert off.active_layers <= off.total_layers // 4
    assert off.task_params < on.task_params


def test_restore_is_a_plain_timm_model(manager, image_data, tmp_path):
    task = manager.add_task("t", "b", f"imagefolder:{image_data}", method="taps", **FAST).task
    model = manager.restore("t")
    assert type(model) is type(timm.create_model("test_resnet"))
    probe = load(manager.registry.read_artifact(task.probe))
    with torch.no_grad():
        assert torch.allclose(model(probe["inputs"]), probe["logits"], atol=1e-5)
    out = manager.restore_to_file("t", tmp_path / "t.safetensors")
    fresh = timm.create_model("test_resnet", num_classes=3)
    fresh.load_state_dict(load_file(str(out)), strict=True)
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(probe["inputs"]), probe["logits"], atol=1e-5)
    import taps_cl

    again = taps_cl.restore("t", home=manager.home, db_url=manager.db_url)
    assert type(again) is type(model)


def test_adding_b_leaves_a_untouched(manager, image_data, image_data4):
    manager.add_task("a", "b", f"imagefolder:{image_data}", **FAST)
    before = artifact_files(manager)
    a_before = manager.get_task("a")
    result = manager.add_task("b2", "b", f"imagefolder:{image_data4}", method="finetune", **FAST)
    after = artifact_files(manager)
    for sha, data in before.items():
        assert after[sha] == data  # base and task A artifacts byte-identical
    assert manager.get_task("a") == a_before
    (check,) = result.probe_checks
    assert check.task == "a" and check.ok and check.max_drift == 0.0
    evals = [(e.task, e.after_task, e.kind) for e in manager.registry.list_evaluations("b")]
    assert ("a", "b2", "probe") in evals


def test_bad_data_fails_cleanly(manager, tmp_path, capsys, db_url):
    before = (manager.list_tasks(), manager.registry.list_artifacts())
    for spec in (f"imagefolder:{tmp_path / 'nope'}", "idx:/nonexistent", "bogus:thing"):
        with pytest.raises(TapsError):
            manager.add_task("t", "b", spec, **FAST)
    assert (manager.list_tasks(), manager.registry.list_artifacts()) == before
    code, _, err = run(capsys, "--home", str(manager.home), *db_option(db_url), "task", "add",
                       "t", "--base", "b", "--data", f"imagefolder:{tmp_path / 'nope'}")
    assert code == 1
    assert_one_line_error(err, "nope")
    code, _, err = run(capsys, "--home", str(manager.home), *db_option(db_url), "task", "add",
                       "t", "--base", "b", "--data", "digits", "--method", "nosuch")
    assert code == 1
    assert_one_line_error(err, "nosuch")


def test_interrupted_training_leaves_no_task(manager, image_data, monkeypatch):
    import taps_cl.tasks.adding as adding

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adding, "fit", boom)
    with pytest.raises(KeyboardInterrupt):
        manager.add_task("t", "b", f"imagefolder:{image_data}", **FAST)
    assert manager.list_tasks() == []
    monkeypatch.undo()
    assert manager.add_task("t", "b", f"imagefolder:{image_data}", **FAST).task.position == 1


def test_cli_task_commands(tmp_path, image_data, capsys, db_url):
    home, db = str(tmp_path / "h"), db_option(db_url)
    assert run(capsys, "--home", home, *db, "base", "add", "b", "--model",
               "timm:test_resnet")[0] == 0
    code, out, err = run(capsys, "--home", home, *db, "--json", "task", "add", "t", "--base", "b",
                         "--data", f"imagefolder:{image_data}", "--epochs", "2", "--img-size", "32",
                         "--batch-size", "16", "--method", "taps", "--lam", "0.5")
    assert code == 0, err
    added = json.loads(out)
    assert added["status"] == "ready" and added["position"] == 1
    code, out, _ = run(capsys, "--home", home, *db, "--json", "task", "list")
    (row,) = json.loads(out)
    assert set(row) >= {"name", "base", "method", "position", "status", "num_classes", "task_params",
                        "active_layers", "total_layers", "test_accuracy"}
    assert row["test_accuracy"] == added["test_accuracy"]
    code, out, _ = run(capsys, "--home", home, *db, "task", "show", "t")
    assert code == 0 and "active layers" in out
    code, out, _ = run(capsys, "--home", home, *db, "--json", "task", "eval", "t")
    assert json.loads(out)["accuracy"] == pytest.approx(added["test_accuracy"])
    image = next((image_data / "test" / "checker").glob("*.png"))
    code, out, _ = run(capsys, "--home", home, *db, "--json", "predict", "t", str(image))
    top = json.loads(out)[0]["top"]
    assert len(top) == 3 and abs(sum(p["probability"] for p in top) - 1) < 1e-4
    code, out, _ = run(capsys, "--home", home, *db, "restore", "t", "--out",
                       str(tmp_path / "r.safetensors"))
    assert code == 0 and (tmp_path / "r.safetensors").exists()
    code, _, err = run(capsys, "--home", home, *db, "restore", "t", "--out", str(tmp_path / "r.pt"))
    assert code == 1
    assert_one_line_error(err, "safetensors")


def test_torchvision_base(tmp_path, image_data):
    with Manager(tmp_path / "tv") as m:
        m.add_base("r18", "torchvision:resnet18")
        task = m.add_task("t", "r18", f"imagefolder:{image_data}", method="taps", epochs=1,
                          batch_size=16, img_size=32, max_train=24).task
        model = m.restore("t")
        import torchvision

        assert type(model) is torchvision.models.ResNet
        fresh = torchvision.models.resnet18(num_classes=3)
        fresh.load_state_dict(model.state_dict(), strict=True)
        assert task.total_layers == 20


def test_default_method_on_a_torchvision_regnet(tmp_path, image_data):
    """The default (adapters) on a torchvision model other than ResNet: RegNet's block names hold
    "-" (`block1-0`), which the adapters' keys escape; the task restores, exports, reloads and
    verifies."""
    import torchvision

    import taps_cl

    with Manager(tmp_path / "tv") as m:
        m.add_base("rx", "torchvision:regnet_x_400mf")
        added = m.add_task("t", "rx", f"imagefolder:{image_data}", epochs=1, batch_size=16,
                           img_size=32, max_train=24, max_test=12)
        assert added.task.method == "adapter"
        assert added.task.active_layers == added.task.total_layers == 22  # 22 blocks adapted
        assert "trunk_output.block1.block1-0" in {layer.name for layer in added.task.layers}
        model = m.restore("t")
        assert type(model) is torchvision.models.RegNet
        assert "trunk_output-block1-block1~0" in model.taps_adapters
        out = tmp_path / "t.safetensors"
        m.restore_to_file("t", out)
        report = m.accuracy(verify=True)
    assert report.verified, report.problems
    x = torch.randn(2, 3, 32, 32)
    loaded = taps_cl.load_file(out)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_sigterm_during_training_removes_the_task(tmp_path, image_data, db_url):
    import os
    import signal
    import subprocess
    import sys
    import time

    home = tmp_path / "h"
    with Manager(home, db_url) as m:
        m.add_base("b", "timm:test_resnet")
    proc = subprocess.Popen(
        [sys.executable, "-m", "taps_cl", "--home", str(home), *db_option(db_url), "task", "add",
         "t", "--base", "b",
         "--data", f"imagefolder:{image_data}", "--epochs", "500", "--img-size", "32"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with Manager(home, db_url) as m:
                if [t.status for t in m.list_tasks()] == ["training"]:
                    break
            time.sleep(0.2)
        else:
            pytest.fail("the task never started training")
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0 and "Traceback" not in err
    with Manager(home, db_url) as m:
        assert m.list_tasks() == []


def test_stale_training_row_is_named_and_removable(manager, image_data, capsys, db_url):
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()  # a pid on this host that no longer runs: the run was killed
    manager.registry.begin_task("t", base="b", method="taps", method_config={}, train_config={},
                                dataset_spec={"kind": "digits"}, class_names=["a", "b"],
                                run_host=socket.gethostname(), run_pid=gone.pid)
    with pytest.raises(AlreadyExists, match="task remove t"):
        manager.add_task("t", "b", f"imagefolder:{image_data}", **FAST)
    cli = ["--home", str(manager.home), *db_option(db_url)]
    code, out, _ = run(capsys, *cli, "task", "remove", "t")
    assert code == 0
    assert manager.add_task("t", "b", f"imagefolder:{image_data}", **FAST).task.status == "ready"
    code, _, err = run(capsys, *cli, "task", "remove", "t")
    assert code == 1
    assert_one_line_error(err, "never removed")


def test_interrupt_during_probe_checks_leaves_no_half_task(manager, image_data, monkeypatch):
    manager.add_task("a", "b", f"imagefolder:{image_data}", **FAST)

    from taps_cl.tasks.verification import Verifier

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Verifier, "check_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        manager.add_task("b2", "b", f"imagefolder:{image_data}", **FAST)
    assert [t.name for t in manager.list_tasks()] == ["a"]
    assert [e.after_task for e in manager.registry.list_evaluations("b")] == ["a"]


def test_taps_options_that_would_disable_taps(manager, image_data):
    spec = f"imagefolder:{image_data}"
    with pytest.raises(TapsError, match="score_init"):
        manager.add_task("t", "b", spec, method="taps", method_options={"tau": 0.2}, **FAST)
    with pytest.raises(TapsError, match="warmup"):
        manager.add_task("t", "b", spec, method="taps", method_options={"warmup_epochs": 2},
                         **FAST)
    # Without an explicit warm-up, a one-epoch run still applies the penalty.
    task = manager.add_task("t", "b", spec, method="taps", epochs=1, batch_size=16,
                            img_size=32).task
    assert task.method_config["warmup_epochs"] == 0
    assert manager.list_tasks() == [manager.get_task("t")]
