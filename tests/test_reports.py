"""Budget and accuracy reports on a three-task, two-method registry; --verify catches tampering."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from sqlalchemy import text

from taps_cl import serialization
from taps_cl.manager import Manager
from tests.conftest import make_imagefolder
from tests.test_cli import assert_one_line_error, run

FAST = dict(epochs=2, batch_size=16, img_size=32, seed=0)


@pytest.fixture(scope="module")
def seq_home(tmp_path_factory):
    """A registry with three tasks (taps, linear, taps) on one base."""
    root = tmp_path_factory.mktemp("seq")
    d1 = make_imagefolder(root / "d1", seed=1)
    d2 = make_imagefolder(root / "d2", ("hstripes", "blob"), seed=2)
    d3 = make_imagefolder(root / "d3", ("vstripes", "checker", "blob", "hstripes"), seed=3)
    home = root / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_resnet")
        m.add_task("t1", "b", f"imagefolder:{d1}", **FAST)
        m.add_task("t2", "b", f"imagefolder:{d2}", method="linear", **FAST)
        m.add_task("t3", "b", f"imagefolder:{d3}", method_options={"lam": 2.0}, **FAST)
    return home


def copy_home(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def test_budget_totals_equal_stored_tensors(seq_home, capsys, tmp_path):
    code, out, _ = run(capsys, "--home", str(seq_home), "--json", "report", "budget",
                       "--plot", str(tmp_path / "budget.png"))
    assert code == 0
    rep = json.loads(out)
    with Manager(seq_home) as m:
        stored = 0
        for t in m.list_tasks("b"):
            tensors = serialization.from_bytes(m.registry.read_artifact(t.artifact))
            assert next(r for r in rep["tasks"] if r["name"] == t.name)["task_params"] == serialization.numel(tensors)
            stored += serialization.numel(tensors)
        base = m.get_base("b")
    assert rep["total_params"] == base.num_params + stored
    assert rep["ratio_to_base"] == pytest.approx(rep["total_params"] / base.num_params)
    assert set(rep) >= {"base", "tasks", "total_params", "ratio_to_base", "finetune_total_params"}
    assert rep["finetune_total_params"] > 3 * base.num_params
    assert [r["method"] for r in rep["tasks"]] == ["taps", "linear", "taps"]
    assert Image.open(tmp_path / "budget.png").format == "PNG"


def test_accuracy_matrix_clean_sequence(seq_home, capsys, tmp_path):
    code, out, err = run(capsys, "--home", str(seq_home), "--json", "report", "accuracy", "--verify",
                         "--plot", str(tmp_path / "acc.png"))
    assert code == 0, err
    rep = json.loads(out)
    assert rep["tasks"] == ["t1", "t2", "t3"]
    m = rep["matrix"]
    assert m[1][0] is None and m[2][0] is None and m[2][1] is None
    assert m[0][0] == m[0][1] == m[0][2] and m[1][1] == m[1][2]
    assert rep["cells"][0][2] == "probe" and rep["cells"][0][0] == "measured"
    assert rep["forgetting"] == 0.0 and rep["bwt"] == 0.0
    assert rep["verified"] is True and rep["max_logit_drift"] == 0.0
    assert rep["average_accuracy"] == pytest.approx((m[0][2] + m[1][2] + m[2][2]) / 3)
    assert Image.open(tmp_path / "acc.png").format == "PNG"
    code, out, _ = run(capsys, "--home", str(seq_home), "report", "accuracy", "--verify")
    assert "interference-free" in out
    code, out, _ = run(capsys, "--home", str(seq_home), "report", "layers", "--plot",
                       str(tmp_path / "layers.png"))
    assert code == 0 and "t3" in out
    assert Image.open(tmp_path / "layers.png").format == "PNG"


def test_reevaluate_records_a_measurement(seq_home, capsys, tmp_path):
    home = copy_home(seq_home, tmp_path / "h")
    code, out, err = run(capsys, "--home", home, "--json", "report", "accuracy", "--reevaluate")
    assert code == 0, err
    rep = json.loads(out)
    assert [row[2] for row in rep["cells"]] == ["measured"] * 3
    assert rep["forgetting"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("victim", ["t1", "t2", "t3"])
def test_one_changed_byte_fails_verify(seq_home, capsys, tmp_path, victim):
    home = copy_home(seq_home, tmp_path / "h")
    with Manager(home) as m:
        path = m.registry.store.path_of(m.get_task(victim).artifact.path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))
    code, out, err = run(capsys, "--home", home, "--json", "report", "accuracy", "--verify")
    assert code == 1
    assert_one_line_error(err, rf"verification failed for {victim}: .*corrupt")
    rep = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert rep["verified"] is False
    assert [f["task"] for f in rep["verify_failures"]] == [victim]


def test_changed_probe_logit_fails_verify(seq_home, capsys, tmp_path):
    home = copy_home(seq_home, tmp_path / "h")
    with Manager(home) as m:
        task = m.get_task("t2")
        probe = serialization.from_bytes(m.registry.read_artifact(task.probe))
        probe["logits"][0, 0] += 0.01
        blob = serialization.to_bytes(probe)
        sha, rel = m.registry.write_artifact_file(blob)
        with m.registry.engine.begin() as conn:
            conn.execute(text("UPDATE artifacts SET sha256=:s, path=:p, bytes=:b WHERE sha256=:old"),
                         {"s": sha, "p": rel, "b": len(blob), "old": task.probe.sha256})
    code, out, err = run(capsys, "--home", home, "--json", "report", "accuracy", "--verify")
    assert code == 1
    assert json.loads(out)["verified"] is False
    assert_one_line_error(err, r"verification failed for t2: max drift 0\.01")


def test_budget_needs_a_base_when_ambiguous(seq_home, capsys, tmp_path):
    home = copy_home(seq_home, tmp_path / "h")
    assert run(capsys, "--home", home, "base", "add", "other", "--model", "timm:test_resnet")[0] == 0
    code, _, err = run(capsys, "--home", home, "report", "budget")
    assert code == 1
    assert_one_line_error(err, "--base")
    assert run(capsys, "--home", home, "report", "budget", "--base", "b")[0] == 0


def test_changed_earlier_task_is_flagged_in_the_matrix(seq_home, capsys, tmp_path, monkeypatch):
    """A later addition that moved an earlier task's logits is recorded as a changed cell."""
    home = copy_home(seq_home, tmp_path / "h")
    d4 = make_imagefolder(tmp_path / "d4", seed=4)
    from taps_cl import manager as manager_module

    monkeypatch.setattr(manager_module, "PROBE_ATOL", -1.0)  # every drift (even 0) counts as moved
    with Manager(home) as m:
        result = m.add_task("t4", "b", f"imagefolder:{d4}", method="linear", **FAST)
    assert [c.ok for c in result.probe_checks] == [False, False, False]
    monkeypatch.undo()
    code, out, _ = run(capsys, "--home", home, "--json", "report", "accuracy")
    rep = json.loads(out)
    assert [row[3] for row in rep["cells"]] == ["changed", "changed", "changed", "measured"]
    assert rep["matrix"][0][3] == rep["matrix"][0][0]  # re-measured on its data: same figure
    assert len(rep["changed"]) == 3
    code, _, err = run(capsys, "--home", home, "report", "accuracy", "--verify")
    assert code == 1
    assert_one_line_error(err, "probe logits changed for t1 after t4")
