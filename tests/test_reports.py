"""Budget, accuracy and layer reports on a three-task, two-method registry.

Clean-sequence checks are cheap; the others tamper with files, rows or data and assert that the
report is then *not* verified, naming the task.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import text

from registry.entities import Artifact, BaseModel, Task
from taps_cl import serialization
from taps_cl.analysis import reports
from taps_cl.errors import TapsError
from taps_cl.manager import Manager
from tests.conftest import make_imagefolder
from tests.test_cli import assert_one_line_error, run

FAST = dict(epochs=2, batch_size=16, img_size=32, seed=0)

# The --json documents' keys may be added to, never renamed.
BUDGET_KEYS = {"base", "tasks", "total_params", "ratio_to_base", "finetune_total_params",
               "linear_total_params", "total_bytes"}
BUDGET_ROW_KEYS = {"name", "method", "task_params", "active_layers", "total_layers", "bytes",
                   "budget", "budget_used"}
ACCURACY_KEYS = {"tasks", "matrix", "average_accuracy", "forgetting", "bwt", "verified",
                 "max_logit_drift", "cells", "changed", "problems", "reevaluate_skipped",
                 "verify_failures"}


@pytest.fixture(scope="module")
def seq_home(tmp_path_factory):
    """A registry with three tasks (taps, linear, taps) on one base; data in ../d1, ../d2, ../d3."""
    root = tmp_path_factory.mktemp("seq")
    d1 = make_imagefolder(root / "d1", seed=1)
    d2 = make_imagefolder(root / "d2", ("hstripes", "blob"), seed=2)
    d3 = make_imagefolder(root / "d3", ("vstripes", "checker", "blob", "hstripes"), seed=3)
    home = root / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_resnet")
        # lr 1e-2: t1 learns its patterns (at 1e-3 it stays at chance, 1/3 — too close to the
        # 1/3 that test_reevaluate_on_changed_data_is_not_verified forces).
        m.add_task("t1", "b", f"imagefolder:{d1}", method="taps", **{**FAST, "lr": 1e-2})
        m.add_task("t2", "b", f"imagefolder:{d2}", method="linear", **FAST)
        m.add_task("t3", "b", f"imagefolder:{d3}", method="taps", method_options={"lam": 2.0},
                   **FAST)
    return home


def copy_home(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


def sql(manager: Manager, statement: str, **params) -> int:
    """Tamper with the database directly, as a user with sqlite3 could; returns rows changed."""
    with manager.registry.engine.begin() as conn:
        return conn.execute(text(statement), params).rowcount


def edit_cell(manager: Manager, task: str, after: str, kind: str, accuracy: float) -> None:
    """Overwrite the accuracy of every `kind` row of cell (task, after)."""
    changed = sql(manager, """
        UPDATE evaluations SET accuracy = :acc
        WHERE kind = :kind
          AND task_id = (SELECT id FROM tasks WHERE name = :task)
          AND after_task_id = (SELECT id FROM tasks WHERE name = :after)""",
                  acc=accuracy, kind=kind, task=task, after=after)
    assert changed >= 1


# ------------------------------------------------------------------------ budget
def test_budget_totals_equal_stored_artifacts(seq_home, capsys, tmp_path):
    code, out, _ = run(capsys, "--home", str(seq_home), "--json", "report", "budget",
                       "--plot", str(tmp_path / "budget.png"))
    assert code == 0
    rep = json.loads(out)
    assert set(rep) >= BUDGET_KEYS and set(rep["base"]) >= {"name", "num_params"}
    assert all(set(row) >= BUDGET_ROW_KEYS for row in rep["tasks"])
    with Manager(seq_home) as m:
        assert m.budget().to_json() == rep  # the CLI prints exactly the Python report
        stored_params = stored_bytes = 0
        for t in m.list_tasks("b"):
            path = m.registry.store.path_of(t.artifact.path)
            tensors = serialization.from_bytes(path.read_bytes())
            row = next(r for r in rep["tasks"] if r["name"] == t.name)
            assert row["task_params"] == serialization.numel(tensors)
            assert row["bytes"] == path.stat().st_size
            assert row["budget"] is None and row["budget_used"] is None  # none was given
            stored_params += serialization.numel(tensors)
            stored_bytes += path.stat().st_size
        base = m.get_base("b")
        base_bytes = m.registry.store.path_of(base.weights.path).stat().st_size
    assert rep["total_params"] == base.num_params + stored_params
    assert rep["total_bytes"] == base_bytes + stored_bytes
    assert rep["ratio_to_base"] == pytest.approx(rep["total_params"] / base.num_params)
    assert rep["finetune_total_params"] > 3 * base.num_params
    assert rep["linear_total_params"] == base.num_params + sum(r["head_params"]
                                                               for r in rep["tasks"])
    assert [r["method"] for r in rep["tasks"]] == ["taps", "linear", "taps"]
    assert Image.open(tmp_path / "budget.png").format == "PNG"
    code, out, _ = run(capsys, "--home", str(seq_home), "report", "budget")
    assert code == 0 and "bytes" in out and "× base" in out


def _task(name: str, sha: str, num_params: int, nbytes: int, config: dict) -> Task:
    return Task(
        name=name, base="b", position=0, method="taps", method_config=config,
        train_config={}, dataset_spec={}, num_classes=2, class_names=("a", "b"),
        status="ready", artifact=Artifact(sha, f"{sha}.safetensors", nbytes, num_params, "task"),
        probe=None, head_params=10, train_seconds=1.0, created_at=datetime.now(),
    )


def test_budget_counts_a_shared_artifact_once_and_shows_the_budget_used():
    base = BaseModel(name="b", model_spec="timm:x", architecture="x",
                     weights=Artifact("w" * 64, "w", 4000, 1010, "base"), num_params=1000,
                     total_params=1010, data_config={}, head_keys=(), created_at=datetime.now())
    tasks = [
        _task("a", "1" * 64, 87, 400, {"budget": 0.1}),
        _task("same", "1" * 64, 87, 400, {"budget": None}),  # byte-identical artifact
        _task("c", "2" * 64, 300, 1300, {}),
        replace(_task("running", "3" * 64, 999, 9999, {}), status="training"),
    ]
    rep = reports.budget(base, tasks)
    assert [r.name for r in rep.tasks] == ["a", "same", "c"]  # only ready tasks count
    assert rep.total_params == 1000 + 87 + 300 and rep.total_bytes == 4000 + 400 + 1300
    assert rep.ratio_to_base == pytest.approx(1.387)
    a, same, c = rep.tasks
    assert (a.budget, a.budget_used) == (0.1, pytest.approx(0.087))
    assert same.budget is None and same.budget_used is None and c.budget is None
    assert same.ratio_to_base == pytest.approx(0.087)
    assert rep.finetune_total_params == 3 * 1010 and rep.linear_total_params == 1030
    assert rep.to_json()["tasks"][0]["budget_used"] == pytest.approx(0.087)


def test_budget_needs_a_base_when_ambiguous(seq_home, capsys, tmp_path):
    home = copy_home(seq_home, tmp_path / "h")
    code = run(capsys, "--home", home, "base", "add", "other", "--model", "timm:test_resnet")[0]
    assert code == 0
    code, _, err = run(capsys, "--home", home, "report", "budget")
    assert code == 1
    assert_one_line_error(err, r"--base \(b, other\)")
    assert run(capsys, "--home", home, "report", "budget", "--base", "b")[0] == 0
    with Manager(home) as m:
        with pytest.raises(TapsError, match="b, other"):
            m.accuracy()
        assert m.budget("other").tasks == () and m.budget("other").total_params == \
            m.get_base("other").num_params


# ---------------------------------------------------------------------- accuracy
def test_accuracy_matrix_clean_sequence(seq_home, capsys, tmp_path):
    code, out, err = run(capsys, "--home", str(seq_home), "--json", "report", "accuracy",
                         "--verify", "--plot", str(tmp_path / "acc.png"))
    assert code == 0, err
    rep = json.loads(out)
    assert set(rep) >= ACCURACY_KEYS
    assert rep["tasks"] == ["t1", "t2", "t3"]
    m = rep["matrix"]
    assert m[1][0] is None and m[2][0] is None and m[2][1] is None
    assert rep["cells"][0] == ["measured", "probe", "probe"]
    assert rep["verified"] is True and rep["problems"] == [] and rep["max_logit_drift"] == 0.0
    assert rep["forgetting"] == 0.0 and rep["bwt"] == 0.0
    assert rep["average_accuracy"] == pytest.approx((m[0][2] + m[1][2] + m[2][2]) / 3)
    assert Image.open(tmp_path / "acc.png").format == "PNG"
    code, out, _ = run(capsys, "--home", str(seq_home), "report", "accuracy", "--verify")
    assert code == 0 and "interference-free" in out
    code, out, _ = run(capsys, "--home", str(seq_home), "--json", "report", "layers", "--plot",
                       str(tmp_path / "layers.png"))
    layers = json.loads(out)
    assert code == 0 and layers["tasks"] == ["t1", "t2", "t3"]
    assert set(layers) >= {"tasks", "methods", "layers", "active"}
    assert not any(layers["active"][1])  # the linear probe trains no backbone layer
    assert Image.open(tmp_path / "layers.png").format == "PNG"
    with Manager(seq_home) as mgr:
        unverified = mgr.accuracy()
        assert unverified.verified is None and unverified.matrix == tuple(map(tuple, m))
        assert mgr.layer_map().to_json() == layers


def test_reevaluate_records_a_measurement_and_still_verifies(seq_home, tmp_path):
    home = copy_home(seq_home, tmp_path / "h")
    with Manager(home) as m:
        rep = m.accuracy(verify=True, reevaluate=True)
    assert [row[2] for row in rep.cells] == ["measured"] * 3
    assert rep.reevaluate_skipped == ()
    assert rep.verified is True and rep.contradictions == ()
    assert rep.forgetting == 0.0


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
    assert_one_line_error(err, rf"verification failed for {victim}: ")
    rep = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))
    assert rep["verified"] is False
    assert [f["task"] for f in rep["verify_failures"]] == [victim]
    with Manager(home) as m:
        report = m.accuracy(verify=True)
    assert report.verified is False
    assert [p.split(":")[0] for p in report.problems] == [victim]
    code, out, _ = run(capsys, "--home", home, "report", "accuracy", "--verify")
    assert code == 1 and "interference-free" not in out and "NOT verified" in out


def test_changed_probe_logit_fails_verify(seq_home, capsys, tmp_path):
    home = copy_home(seq_home, tmp_path / "h")
    with Manager(home) as m:
        task = m.get_task("t2")
        old = m.registry.read_artifact(task.probe)
        probe = serialization.from_bytes(old)
        probe["logits"][0, 0] += 0.01
        # Same metadata (it names its task artifact): only the one logit differs.
        blob = serialization.to_bytes(probe, serialization.metadata_from_bytes(old))
        sha, rel = m.registry.write_artifact_file(blob)
        assert sql(m, "UPDATE artifacts SET sha256=:s, path=:p, bytes=:b WHERE sha256=:old",
                   s=sha, p=rel, b=len(blob), old=task.probe.sha256) == 1
        rep = m.accuracy(verify=True)
    assert rep.verified is False
    assert [c.task for c in rep.verify_failures] == ["t2"]
    assert rep.verify_failures[0].max_drift == pytest.approx(0.01, abs=1e-6)
    assert rep.reason is not None and rep.reason.startswith("verification failed for t2: ")
    code, out, err = run(capsys, "--home", home, "--json", "report", "accuracy", "--verify")
    assert code == 1 and json.loads(out)["verified"] is False
    assert_one_line_error(err, r"verification failed for t2: .*0\.01")


def test_edited_recorded_accuracy_fails_verify(seq_home, capsys, tmp_path):
    """The diagonal (a task's own test accuracy) is checked against its artifact's record."""
    home = copy_home(seq_home, tmp_path / "h")
    with Manager(home) as m:
        recorded = m.accuracy().matrix[0][0]
        edit_cell(m, "t1", "t1", "measured", recorded / 2)
        rep = m.accuracy(verify=True)
    assert rep.verified is False
    assert rep.problems and all(p.startswith("t1: ") for p in rep.problems)
    code, out, err = run(capsys, "--home", home, "report", "accuracy", "--verify")
    assert code == 1 and "interference-free" not in out
    assert_one_line_error(err, "verification failed for t1: ")


def test_edited_remeasured_cell_contradicts_an_unchanged_model(seq_home, capsys, tmp_path):
    """A re-measured cell must equal the recorded accuracy of a model whose probe is unchanged."""
    home = copy_home(seq_home, tmp_path / "h")
    with Manager(home) as m:
        assert m.accuracy(reevaluate=True).verified is None
        recorded = m.accuracy().matrix[0][0]
        edit_cell(m, "t1", "t3", "measured", 0.123)
        plain = m.accuracy()  # even without verification, the contradiction is reported
        rep = m.accuracy(verify=True)
    assert plain.verified is None
    assert plain.contradictions == (
        f"t1: re-measured accuracy 12.30% after t3 differs from its recorded "
        f"{100 * recorded:.2f}% although its model is unchanged (its data changed, or rows "
        "were edited)",)
    assert rep.verified is False and any(p.startswith("t1: ") for p in rep.problems)
    assert rep.forgetting != 0.0  # the contradicting figure, never shown as verified
    code, out, err = run(capsys, "--home", home, "report", "accuracy", "--verify")
    assert code == 1 and "interference-free" not in out
    assert not [line for line in out.splitlines() if line.startswith("verified")]
    assert_one_line_error(err, "verification failed for t1: ")


def test_reevaluate_on_changed_data_is_not_verified(seq_home, capsys, tmp_path):
    """--reevaluate on data that changed under an unchanged model: the report says so."""
    home = copy_home(seq_home, tmp_path / "h")
    test_dir = Path(seq_home).parent / "d1" / "test"
    classes = sorted(p.name for p in test_dir.iterdir())
    with Manager(home) as m:
        recorded = m.accuracy().matrix[0][0]
    # Every class folder holds the same images: any model scores exactly 1/3 on them.
    assert recorded > 0.5, "t1 did not learn its patterns: the fixture needs a stronger t1"
    saved = test_dir.with_name("test.orig")
    test_dir.rename(saved)
    try:
        for cls in classes:
            shutil.copytree(saved / classes[0], test_dir / cls)
        code, out, err = run(capsys, "--home", home, "--json", "report", "accuracy",
                             "--verify", "--reevaluate")
    finally:
        shutil.rmtree(test_dir, ignore_errors=True)
        saved.rename(test_dir)
    assert code == 1
    rep = json.loads(out)
    assert rep["matrix"][0][2] == pytest.approx(1 / 3) and rep["cells"][0][2] == "measured"
    assert rep["verified"] is False and rep["verify_failures"] == []
    assert rep["contradictions"] == [rep["problems"][0]]
    assert rep["problems"][0].startswith("t1: re-measured accuracy 33.33% after t3 differs")
    assert_one_line_error(err, r"verification failed for t1: re-measured accuracy 33\.33%")


def test_changed_earlier_task_is_flagged_in_the_matrix(seq_home, capsys, tmp_path, monkeypatch):
    """A later addition that moved an earlier task's logits is recorded as a changed cell."""
    home = copy_home(seq_home, tmp_path / "h")
    d4 = make_imagefolder(tmp_path / "d4", seed=4)
    from taps_cl.tasks import verification

    monkeypatch.setattr(verification, "PROBE_ATOL", -1.0)  # every drift (even 0) counts as moved
    with Manager(home) as m:
        result = m.add_task("t4", "b", f"imagefolder:{d4}", method="linear", **FAST)
    assert [c.ok for c in result.probe_checks] == [False, False, False]
    monkeypatch.undo()
    code, out, _ = run(capsys, "--home", home, "--json", "report", "accuracy")
    rep = json.loads(out)
    assert [row[3] for row in rep["cells"]] == ["changed", "changed", "changed", "measured"]
    assert rep["matrix"][0][3] == rep["matrix"][0][0]  # re-measured on its data: same figure
    assert len(rep["changed"]) == 3 and rep["verified"] is None
    code, out, err = run(capsys, "--home", home, "report", "accuracy", "--verify")
    assert code == 1 and "interference-free" not in out
    assert_one_line_error(err, "t1: probe logits changed after t4")


def test_public_reports_module_re_exports_the_dataclasses_and_plots():
    import taps_cl.reports as public
    from taps_cl.analysis import plots

    for name in public.__all__:
        source = plots if name.startswith("plot_") else reports
        assert getattr(public, name) is getattr(source, name)
    assert {"BudgetReport", "AccuracyReport", "LayerMap", "SimilarityReport", "plot_budget",
            "plot_accuracy", "plot_layers", "plot_similarity"} <= set(public.__all__)
