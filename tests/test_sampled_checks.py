"""An add re-checks a bounded sample of earlier tasks; the cells in between are derived.

The guarantee stays: a changed probe still shows as CHANGED (and stays so in derived cells), a
tampered task still fails `--verify` whether or not an add sampled it, and the hash chain shows
an altered row without rebuilding a model.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from registry import Registry
from registry.entities import EarlierCell
from taps_cl.manager import Manager
from taps_cl.tasks.recording import recheck_sample
from tests.conftest import make_imagefolder
from tests.test_cli import assert_one_line_error, run
from tests.test_registry import add_base, begin, finish
from tests.test_reports import FAST, copy_home, seq_home  # noqa: F401 — the fixture


def test_recheck_sample_is_bounded_seeded_and_keeps_latest_and_read_tasks():
    names = [f"t{i}" for i in range(1, 1001)]
    sample = recheck_sample(names, 8, "0:new", first=["t17"])
    assert len(sample) == 8 and {"t17", "t1000"} <= set(sample)
    assert sample == sorted(sample, key=names.index)  # in sequence order
    assert recheck_sample(names, 8, "0:new", first=["t17"]) == sample  # seeded
    assert recheck_sample(names, 8, "1:new", first=["t17"]) != sample
    assert recheck_sample(names, 0, "0:new") == []
    assert recheck_sample(names[:3], 8, "0:new") == names[:3]
    assert recheck_sample(names, 1, "s", first=["gone"]) == ["t1000"]  # unknown names dropped
    # Over many adds every task gets spot-checked now and then.
    seen = {name for seed in range(400) for name in recheck_sample(names, 8, f"{seed}:x")}
    assert len(seen) > 0.9 * len(names)


def test_sampled_add_records_few_cells_and_the_rest_are_derived(seq_home, tmp_path, capsys):
    home = copy_home(seq_home, tmp_path / "h")
    d4 = make_imagefolder(tmp_path / "d4", seed=4)
    with Manager(home) as m:
        before = m.accuracy()
        result = m.add_task("t4", "b", f"imagefolder:{d4}", method="linear", recheck=1, **FAST)
        assert [c.task for c in result.probe_checks] == ["t3"]  # only the latest
        rep = m.accuracy()
        cells_after_t4 = {e.task for e in m.registry.list_evaluations("b")
                          if e.after_task == "t4"}
    assert cells_after_t4 == {"t3", "t4"}
    assert rep.stored_cells == before.stored_cells + 2
    assert [row[3] for row in rep.cells] == ["derived", "derived", "probe", "measured"]
    # A derived cell carries the task's last record: here its own accuracy.
    assert [row[3] for row in rep.matrix[:3]] == [row[2] for row in before.matrix]
    assert rep.complete and rep.final_cells == ("derived", "derived", "probe", "measured")
    assert rep.forgetting == 0.0
    code, out, _ = run(capsys, "--home", home, "report", "accuracy", "--verify")
    assert code == 0 and "~ derived" in out and "interference-free" in out
    code, out, _ = run(capsys, "--home", home, "--json", "report", "accuracy")
    doc = json.loads(out)
    assert doc["cells"][0][3] == "derived" and doc["final_cells"][0] == "derived"
    assert doc["stored_cells"] == rep.stored_cells and doc["chain_problems"] == []


def test_changed_probe_stays_changed_in_derived_cells(seq_home, tmp_path, capsys, monkeypatch):
    home = copy_home(seq_home, tmp_path / "h")
    d4 = make_imagefolder(tmp_path / "d4", seed=4)
    d5 = make_imagefolder(tmp_path / "d5", seed=5)
    from taps_cl.tasks import verification

    with Manager(home) as m:
        monkeypatch.setattr(verification, "PROBE_ATOL", -1.0)  # every drift counts as moved
        result = m.add_task("t4", "b", f"imagefolder:{d4}", method="linear", recheck=1, **FAST)
        assert [(c.task, c.ok) for c in result.probe_checks] == [("t3", False)]
        monkeypatch.undo()
        m.add_task("t5", "b", f"imagefolder:{d5}", method="linear", recheck=0, **FAST)
        rep = m.accuracy()
    assert [row[3] for row in rep.cells[:3]] == ["derived", "derived", "changed"]
    assert [row[4] for row in rep.cells[:4]] == ["derived", "derived", "changed", "derived"]
    assert rep.final_cells[2] == "changed" and rep.changed == ("t3 after t4",)
    code, out, err = run(capsys, "--home", home, "report", "accuracy", "--verify")
    assert code == 1 and "CHANGED" in out
    assert_one_line_error(err, "t3: probe logits changed after t4")


def test_tampered_task_fails_verify_though_no_add_sampled_it(seq_home, tmp_path, capsys):
    home = copy_home(seq_home, tmp_path / "h")
    d4 = make_imagefolder(tmp_path / "d4", seed=4)
    with Manager(home) as m:
        m.add_task("t4", "b", f"imagefolder:{d4}", method="linear", recheck=0, **FAST)
        t1 = m.get_task("t1")
        path = m.registry.store.root / t1.artifact.path
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF  # one bit of one stored number
    path.chmod(0o644)
    path.write_bytes(bytes(blob))
    code, out, err = run(capsys, "--home", home, "report", "accuracy")
    assert code == 0  # the recorded history alone cannot see a file edit
    code, out, err = run(capsys, "--home", home, "report", "accuracy", "--verify")
    assert code == 1 and "interference-free" not in out
    assert_one_line_error(err, "verification failed for t1: .*sha256")


def test_altered_rows_break_the_chain_without_rebuilding_a_model(seq_home, tmp_path, capsys):
    home = copy_home(seq_home, tmp_path / "h")
    with Manager(home) as m:
        engine = m.registry.engine
    with engine.begin() as conn:  # t2 now claims t1's probe file as its own
        conn.execute(text("UPDATE tasks SET probe_artifact_id = (SELECT probe_artifact_id FROM "
                          "tasks WHERE name = 't1') WHERE name = 't2'"))
    engine.dispose()
    code, out, _ = run(capsys, "--home", home, "report", "accuracy")
    assert "WARNING: hash chain broken at t2" in out
    code, out, err = run(capsys, "--home", home, "--json", "report", "accuracy", "--verify")
    doc = json.loads(out)
    assert code == 1 and doc["verified"] is False
    assert any(p.startswith("t2: its chain value does not match") for p in doc["problems"])


@pytest.fixture
def long_home(tmp_path):
    """A registry of 30 tasks recorded through the registry API (no model needed to report)."""
    home = tmp_path / "long"
    with Registry(home) as reg:
        add_base(reg)
        names: list[str] = []
        for i in range(30):
            task = begin(reg, f"task{i:02d}")
            # The previous task re-checked: unchanged, so its cell carries its own accuracy.
            earlier = [EarlierCell(names[-1], "probe", 0.5 + (i - 1) / 100, 0.0, True)
                       ] if names else []
            finish(reg, task, f"blob{i}".encode(), acc=0.5 + i / 100, earlier=earlier)
            names.append(task.name)
    return home


def test_long_sequences_report_a_summary_and_store_linear_cells(long_home, capsys):
    code, out, _ = run(capsys, "--home", str(long_home), "report", "accuracy")
    assert code == 0 and "WARNING" not in out
    assert "30 tasks; 59 stored cells; final column: 28 derived, 1 measured, 1 probe" in out
    assert "task \\ after" not in out  # no 30 × 30 table
    assert out.count("task0") + out.count("task1") + out.count("task2") == 10  # --limit 10
    code, out, _ = run(capsys, "--home", str(long_home), "report", "accuracy", "--full",
                       "--limit", "3")
    assert "task \\ after" in out and out.count("~") > 29 * 28 // 2
    code, out, _ = run(capsys, "--home", str(long_home), "--json", "report", "accuracy")
    doc = json.loads(out)
    assert len(doc["matrix"]) == 30 and doc["stored_cells"] == 59
    assert doc["matrix"][0][29] == pytest.approx(0.5) and doc["cells"][0][29] == "derived"
    assert doc["average_accuracy"] == pytest.approx(sum(0.5 + i / 100 for i in range(30)) / 30)
    code, out, err = run(capsys, "--home", str(long_home), "report", "accuracy", "--plot",
                         str(long_home / "m.png"))
    assert code == 1 and not (long_home / "m.png").exists()
    assert_one_line_error(err, "30 tasks are too many to draw")


def test_summary_json_leaves_out_the_dense_matrix(long_home, capsys):
    code, out, _ = run(capsys, "--home", str(long_home), "--json", "report", "accuracy",
                       "--summary")
    doc = json.loads(out)
    assert code == 0 and "matrix" not in doc and "cells" not in doc
    assert len(doc["final"]) == 30 and doc["final_cells"][0] == "derived"
    code, out, _ = run(capsys, "--home", str(long_home), "report", "accuracy", "--full",
                       "--summary")
    assert code == 2


@pytest.mark.parametrize("factor, ok", [(0.5, True), (2.0, False)])
def test_probe_tolerance_scales_with_the_logits(seq_home, monkeypatch, factor, ok):
    """float32 sums in another order (worker threads, another CPU) move Lite0 logits by ~1e-5:
    the tolerance grows with the stored logits; a larger drift still counts as moved."""
    from taps_cl.tasks import rebuilding as restoring
    from taps_cl.tasks import verification

    with Manager(seq_home) as m:
        task = m.get_task("t1")
        scale = restoring.logit_scale(m.models.probe(task))
        assert scale > 0
        drift = restoring.PROBE_ATOL + factor * restoring.PROBE_RTOL * scale
        monkeypatch.setattr(verification, "probe_drift", lambda model, probe: drift)
        (check,) = m.verify("b", tasks=["t1"], workers=1)
    assert check.ok is ok and check.max_drift == pytest.approx(drift)
