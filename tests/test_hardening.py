"""Issue-8 guarantees end to end: concurrent adds, live runs, complete verification, probes,
devices, garbage, and reads that never create a registry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load
from sqlalchemy import text

from taps_cl import serialization
from taps_cl.errors import TapsError
from taps_cl.manager import Manager
from taps_cl.tasks.probes import probe_indices
from taps_cl.training.fit import MAX_EPOCHS
from tests.test_cli import assert_one_line_error, run

FAST = dict(epochs=1, batch_size=16, img_size=32, seed=0)
REPO = Path(__file__).resolve().parents[1]


def cli(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """The real console entry in a fresh process (own interpreter, own torch threads)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "taps_cl", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def popen(home: Path, *args: str, sigint_ignored: bool = False) -> subprocess.Popen:
    """`taps-cl` in a child process; `sigint_ignored` starts it as a background job of a script
    does (`cmd &`: SIGINT ignored)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))

    def ignore_sigint() -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    return subprocess.Popen([sys.executable, "-m", "taps_cl", "--home", str(home), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO, preexec_fn=ignore_sigint if sigint_ignored else None)


@pytest.fixture
def manager(tmp_path):
    with Manager(tmp_path / "home") as m:
        m.add_base("b", "timm:test_resnet")
        yield m


@pytest.fixture
def two_tasks(manager, image_data):
    spec = f"imagefolder:{image_data}"
    manager.add_task("t1", "b", spec, method="taps", **FAST)
    manager.add_task("t2", "b", spec, method="linear", **FAST)
    return manager


def sql(m: Manager, statement: str, **params) -> None:
    with m.registry.engine.begin() as conn:
        conn.execute(text(statement), params)


def failures(m: Manager) -> dict[str, str]:
    return {c.task: c.error or "" for c in m.verify() if not c.ok}


# ------------------------------------------------------------------------- concurrency
def test_four_concurrent_adds_land_in_order_three_times(tmp_path, image_data):
    home = tmp_path / "home"
    assert cli(home, "base", "add", "b", "--model", "timm:test_resnet").returncode == 0
    spec = f"imagefolder:{image_data}"
    for round_ in range(3):
        procs = [popen(home, "task", "add", f"r{round_}t{i}", "--base", "b", "--data", spec,
                       "--method", "linear", "--epochs", "1", "--img-size", "32")
                 for i in range(4)]
        for p in procs:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err
            assert "locked" not in err
    with Manager(home) as m:
        tasks = m.list_tasks("b")
        assert sorted(t.position for t in tasks) == list(range(1, 13))
        rep = m.accuracy("b", verify=True)
        assert rep.verified is True
        final = [row[-1] for row in rep.matrix]
        assert all(v is not None for v in final)  # the final column is complete
        for i, row in enumerate(rep.matrix):  # nothing below the diagonal
            assert all(v is None for v in row[:i]), row


# ------------------------------------------------------------------------- live runs
@pytest.mark.parametrize("sigint_ignored", [False, True])
def test_live_run_is_not_removable_and_cannot_write_into_a_new_task(tmp_path, image_data,
                                                                    sigint_ignored):
    home = tmp_path / "home"
    assert cli(home, "base", "add", "b", "--model", "timm:test_resnet").returncode == 0
    spec = f"imagefolder:{image_data}"
    # Epochs enough to outlast the test on any machine (5,000 finished in about a minute once;
    # the most a run may ask for is MAX_EPOCHS).
    slow = popen(home, "task", "add", "x", "--base", "b", "--data", spec, "--method", "linear",
                 "--epochs", str(MAX_EPOCHS), "--img-size", "32", sigint_ignored=sigint_ignored)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait until the run has recorded itself
            listed = cli(home, "--json", "task", "list")
            if listed.returncode == 0 and json.loads(listed.stdout):
                break
            assert time.monotonic() < deadline and slow.poll() is None, slow.stderr.read()
            time.sleep(0.5)
        (row,) = json.loads(listed.stdout)
        assert row["status"] == "training" and row["position"] is None
        refused = cli(home, "task", "remove", "x")
        assert refused.returncode == 1
        assert_one_line_error(refused.stderr, r"--force")
        forced = cli(home, "task", "remove", "x", "--force")
        assert forced.returncode == 0, forced.stderr
        # A new task of the same name with other classes is not touched by the old run.
        again = cli(home, "task", "add", "x", "--base", "b", "--data", spec, "--classes",
                    "checker,hstripes", "--method", "linear", "--epochs", "1", "--img-size", "32")
        assert again.returncode == 0, again.stderr
        _, err = slow.communicate(timeout=300)
        assert slow.returncode == 1
        assert_one_line_error(err, r"removed while this run was training")
    finally:
        if slow.poll() is None:
            slow.kill()
    with Manager(home) as m:
        (task,) = m.list_tasks("b")
        assert task.num_classes == 2 and task.status == "ready"
        assert m.restore("x").get_classifier().out_features == 2
        assert not failures(m)


# ------------------------------------------------------------------------- verification
def test_verify_catches_every_kind_of_edited_row(two_tasks):
    m = two_tasks
    assert not failures(m)
    task = m.get_task("t1")
    edits = [
        ("UPDATE evaluations SET accuracy = 0.01 WHERE kind = 'measured' AND task_id = "
         "(SELECT id FROM tasks WHERE name = 't1') AND after_task_id = task_id",
         "UPDATE evaluations SET accuracy = :acc WHERE kind = 'measured' AND task_id = "
         "(SELECT id FROM tasks WHERE name = 't1') AND after_task_id = task_id",
         "test accuracy"),
        ("UPDATE artifacts SET num_params = num_params + 1 WHERE sha256 = :sha",
         "UPDATE artifacts SET num_params = num_params - 1 WHERE sha256 = :sha", "num_params"),
        ("UPDATE artifacts SET bytes = bytes + 1 WHERE sha256 = :sha",
         "UPDATE artifacts SET bytes = bytes - 1 WHERE sha256 = :sha", "bytes"),
        ("UPDATE task_layers SET active = NOT active WHERE id = (SELECT min(id) FROM task_layers "
         "WHERE task_id = (SELECT id FROM tasks WHERE name = 't1'))",
         "UPDATE task_layers SET active = NOT active WHERE id = (SELECT min(id) FROM task_layers "
         "WHERE task_id = (SELECT id FROM tasks WHERE name = 't1'))", "layers"),
        ("UPDATE tasks SET method_config = '{\"lam\": 9}' WHERE name = 't1'", None, "method_config"),
    ]
    accuracy = next(e.accuracy for e in m.registry.list_evaluations("b")
                    if e.task == "t1" and e.after_task == "t1")
    for edit, undo, what in edits:
        sql(m, edit, sha=task.artifact.sha256)
        found = failures(m)
        assert "t1" in found and what in found["t1"], (what, found)
        assert "t2" not in found
        if undo is None:
            sql(m, "UPDATE tasks SET method_config = :cfg WHERE name = 't1'",
                cfg=json.dumps(task.method_config))
        else:
            sql(m, undo, sha=task.artifact.sha256, acc=accuracy)
        assert not failures(m), what


def test_ready_task_set_back_to_training_fails_verify_and_is_not_removable(two_tasks):
    m = two_tasks
    sql(m, "UPDATE tasks SET status = 'training' WHERE name = 't1'")
    assert "stored results" in failures(m)["t1"]
    with pytest.raises(Exception, match="altered"):
        m.remove_task("t1", force=True)
    assert m.get_task("t1").artifact is not None


def test_restore_refuses_a_swapped_artifact(two_tasks):
    m = two_tasks
    sql(m, "UPDATE tasks SET artifact_id = (SELECT artifact_id FROM tasks WHERE name = 't1') "
           "WHERE name = 't2'")
    with pytest.raises(TapsError, match="probe"):
        m.restore("t2")
    assert "t2" in failures(m)


# ------------------------------------------------------------------------- probes and devices
def test_probe_batch_is_stratified_and_seeded():
    labels = torch.arange(4).repeat_interleave(50)  # class-sorted, as in an image folder
    chosen = probe_indices(labels, 32, seed=0)
    assert len(chosen) == 32 and len(set(chosen)) == 32
    assert torch.bincount(labels[chosen], minlength=4).tolist() == [8, 8, 8, 8]
    assert chosen == probe_indices(labels, 32, seed=0)
    assert chosen != probe_indices(labels, 32, seed=1)
    assert probe_indices(labels[:3], 32, seed=0) == [0, 1, 2]


def test_probe_records_trained_logits_and_restore_error(manager, image_data):
    result = manager.add_task("t", "b", f"imagefolder:{image_data}", device="cpu", **FAST)
    blob = manager.registry.read_artifact(result.task.probe)
    probe = load(blob)
    meta = serialization.metadata_from_bytes(blob)
    assert set(probe) == {"inputs", "logits", "trained_logits"}
    assert float(meta["restore_error"]) == result.merge_error <= 1e-5
    assert meta["task_sha256"] == result.task.artifact.sha256
    assert (probe["trained_logits"] - probe["logits"]).abs().max() <= 1e-5
    assert result.task.train_config["device"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_unavailable_device_is_refused_before_anything_is_recorded(capsys, tmp_path, image_data):
    home = str(tmp_path / "home")
    assert run(capsys, "--home", home, "base", "add", "b", "--model", "timm:test_resnet")[0] == 0
    code, _, err = run(capsys, "--home", home, "task", "add", "t", "--base", "b", "--data",
                       f"imagefolder:{image_data}", "--device", "cuda", "--img-size", "32")
    assert code == 1
    assert_one_line_error(err, "CUDA is not available")
    code, out, _ = run(capsys, "--home", home, "--json", "task", "list")
    assert json.loads(out) == []


# ------------------------------------------------------------------------- garbage, reads
def test_gc_lists_and_removes_only_unreferenced_files(capsys, two_tasks):
    m = two_tasks
    root = m.registry.store.root
    kept = {p: p.read_bytes() for p in root.rglob("*.safetensors")}
    orphan = root / "ab" / ("ab" + "0" * 62 + ".safetensors")
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"orphan")
    temp = root / "cd" / ".tmp-interrupted.safetensors"
    temp.parent.mkdir(exist_ok=True)
    temp.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(temp, (old, old))
    home = str(m.home)
    code, out, _ = run(capsys, "--home", home, "--json", "gc")
    assert code == 0
    listed = json.loads(out)
    assert sorted(f["reason"] for f in listed["files"]) == ["temp", "unreferenced"]
    assert orphan.exists() and temp.exists()
    code, out, _ = run(capsys, "--home", home, "gc", "--yes")
    assert code == 0 and "removed 2 file(s)" in out
    assert not orphan.exists() and not temp.exists()
    assert {p: p.read_bytes() for p in root.rglob("*.safetensors")} == kept
    assert not failures(m)


@pytest.mark.parametrize("args", [["task", "list"], ["report", "budget"], ["base", "list"],
                                  ["report", "accuracy", "--verify"]])
def test_read_commands_never_create_a_registry(capsys, tmp_path, args):
    home = tmp_path / "home"
    code, _, err = run(capsys, "--home", str(home), *args)
    assert code == 1
    assert_one_line_error(err, "no registry")
    assert not home.exists()


@pytest.mark.parametrize("content", [b"", b"x"])
def test_db_over_an_existing_file_is_never_turned_into_a_registry(capsys, tmp_path, content):
    target = tmp_path / "some.db"
    target.write_bytes(content)
    code, _, err = run(capsys, "--db", f"sqlite:///{target}", "task", "list")
    assert code == 1 and "Traceback" not in err
    assert target.read_bytes() == content


def test_restore_out_does_not_follow_a_planted_symlink(capsys, two_tasks, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "model.safetensors"
    (tmp_path / ".model.safetensors.tmp").symlink_to(victim)
    code, _, err = run(capsys, "--home", str(two_tasks.home), "restore", "t1", "--out", str(out))
    assert code == 0, err
    assert victim.read_text() == "keep me"
    assert load(out.read_bytes())  # a real safetensors file landed at --out


def test_run_whose_row_vanished_after_training_records_nothing_and_discards_nothing(
        manager, image_data, monkeypatch, caplog):
    """Training ended just as the row was force-removed: the finish is refused (RunLost) and the
    run does not try to clean up a row that is no longer its own."""
    from registry import RunLost
    from taps_cl.tasks import adding

    trained = adding.fit

    def fit_then_removed(model, learner, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = trained(model, learner, *args, **kwargs)
        manager.registry.discard_task("x", force=True)  # `task remove x --force` meanwhile
        return result

    monkeypatch.setattr(adding, "fit", fit_then_removed)
    with pytest.raises(RunLost, match="removed while this run was training"):
        manager.add_task("x", "b", f"imagefolder:{image_data}", method="linear", epochs=1,
                         img_size=32)
    assert "did not finish" not in caplog.text
    assert manager.list_tasks() == []
    assert len(manager.registry.list_artifacts()) == 1  # the base's weights only
