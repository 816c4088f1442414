"""Task summaries (SQL aggregates) agree with full Task entities; paging; the fast read commands.

Most tests build registries through the Registry API with small byte blobs (no model), so they
need no torch; the last one checks the same on real taps and linear tasks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from registry import NotFound, Registry, runs
from registry.entities import LayerEntry, Task, TaskSummary
from taps_cl.analysis import reports
from tests.servers import cli_home, db_option
from tests.test_cli import run

# The `task list --json` keys (docs/commands.md) (keys may be added, never renamed).
TASK_LIST_KEYS = {"name", "base", "method", "position", "status", "num_classes", "task_params",
                  "active_layers", "total_layers", "test_accuracy"}


def add_base(reg: Registry, name: str) -> None:
    reg.add_base(
        name, model_spec="timm:test_resnet", architecture="test_resnet",
        weights=f"weights-{name}".encode(), weights_num_params=10, num_params=1000,
        total_params=1010, data_config={"input_size": [3, 32, 32]}, head_keys=["fc.weight"],
    )


def add_task(reg: Registry, name: str, base: str, *, method: str, layers: list[LayerEntry],
             acc: float, config: dict | None = None, blob: bytes | None = None,
             reads: tuple[str, ...] = ()) -> Task:
    """A ready task recorded as a run records it (begin, then finish with fake artifacts)."""
    started = reg.begin_task(
        name, base=base, method=method, method_config=config or {}, train_config={},
        dataset_spec={"kind": "digits"}, class_names=["a", "b", "c"],
        run_host=runs.this_host(), run_pid=os.getpid(),
    )
    blob = blob if blob is not None else f"task-{name}".encode()
    pins = []
    for dep in reads:
        artifact = reg.get_task(dep).artifact
        assert artifact is not None
        pins.append((dep, artifact.sha256, "fusion"))
    assert started.run_token is not None
    return reg.finish_task(
        started.run_token, task_blob=blob, task_num_params=len(blob) * 3,
        probe_blob=b"probe-" + name.encode(), probe_num_params=5, layers=layers,
        head_params=7, train_seconds=1.0, test_accuracy=acc, test_loss=1.0, test_samples=10,
        dependencies=pins,
    )


def taps_layers(active: int, inactive: int) -> list[LayerEntry]:
    on = [LayerEntry(f"conv{i}", "conv2d", 0.9, True, 100, 100) for i in range(active)]
    off = [LayerEntry(f"conv{active + i}", "conv2d", 0.01, False, 100, 0)
           for i in range(inactive)]
    return on + off


def linear_layers(count: int) -> list[LayerEntry]:
    return [LayerEntry(f"conv{i}", "conv2d", None, False, 100, 0) for i in range(count)]


def latest_measured(reg: Registry, base: str) -> dict[str, float]:
    """What `task list` always showed: each task's latest measured accuracy."""
    out: dict[str, float] = {}
    for ev in reg.list_evaluations(base):
        if ev.kind == "measured" and ev.accuracy is not None:
            out[ev.task] = ev.accuracy
    return out


@pytest.fixture
def reg(tmp_path, db_url):
    """Two bases: b holds taps, linear, a fusion-like reader, a byte-identical copy and a run
    still training; c holds one task. One re-measurement of `t` is recorded after `lin`.
    On SQLite and on PostgreSQL (tests.servers.db_url)."""
    with Registry(tmp_path / "home", db_url) as registry:
        add_base(registry, "b")
        add_base(registry, "c")
        add_task(registry, "t", "b", method="taps", layers=taps_layers(3, 4), acc=0.8,
                 config={"lam": 1.0, "budget": 0.2})
        add_task(registry, "other", "c", method="linear", layers=linear_layers(7), acc=0.4)
        add_task(registry, "lin", "b", method="linear", layers=linear_layers(7), acc=0.6)
        registry.add_evaluation("t", after_task="lin", kind="measured", accuracy=0.75)
        registry.add_evaluation("t", after_task="lin", kind="probe", accuracy=0.1)  # not measured
        add_task(registry, "reader", "b", method="fusion", layers=taps_layers(1, 6), acc=0.7,
                 reads=("t",))
        add_task(registry, "copy", "b", method="linear", layers=[], acc=0.5, blob=b"task-lin")
        registry.begin_task("running", base="b", method="taps", method_config={},
                            train_config={}, dataset_spec={}, class_names=["a", "b"],
                            run_host=runs.this_host(), run_pid=os.getpid())
        yield registry


def test_summaries_equal_the_full_entities(reg):
    full = reg.list_tasks()
    summaries = reg.task_summaries()
    accuracy = {**latest_measured(reg, "b"), **latest_measured(reg, "c")}
    assert [s.name for s in summaries] == [t.name for t in full] == [
        "t", "lin", "reader", "copy", "running", "other"]  # base b (its training run last), c
    for summary, task in zip(summaries, full):
        assert summary == TaskSummary.of(task, accuracy.get(task.name))
    by_name = {s.name: s for s in summaries}
    t = by_name["t"]
    # The aggregates themselves, not only their agreement with TaskSummary.of.
    assert (t.active_layers, t.total_layers) == (3, 7)
    assert t.test_accuracy == 0.75  # the re-measurement, not the probe row recorded after it
    assert t.method_config == {"lam": 1.0, "budget": 0.2}
    assert (by_name["lin"].active_layers, by_name["lin"].total_layers) == (0, 7)
    assert by_name["lin"].test_accuracy == 0.6
    assert by_name["reader"].depends_on == ("t",)
    assert by_name["copy"].sha256 == by_name["lin"].sha256  # one file, two tasks
    assert by_name["copy"].total_layers == 0
    running = by_name["running"]
    assert (running.position, running.status, running.sha256, running.bytes) == (
        None, "training", None, 0)
    assert running.test_accuracy is None and running.task_params == 0


def test_summaries_page_filter_and_count(reg):
    every = [s.name for s in reg.task_summaries()]
    assert [s.name for s in reg.task_summaries(limit=2)] == every[:2]
    assert [s.name for s in reg.task_summaries(limit=3, offset=2)] == every[2:5]
    assert [s.name for s in reg.task_summaries(offset=4)] == every[4:]
    assert reg.task_summaries(offset=99) == [] and reg.task_summaries(limit=0) == []
    assert [s.name for s in reg.task_summaries("b", ready_only=True)] == [
        "t", "lin", "reader", "copy"]
    assert [s.name for s in reg.task_summaries("b", ready_only=True, limit=2, offset=1)] == [
        "lin", "reader"]
    assert [s.name for s in reg.task_summaries("c")] == ["other"]
    paged = reg.task_summaries("b", limit=1, offset=2)[0]
    assert paged == next(s for s in reg.task_summaries() if s.name == "reader")  # same values
    assert reg.count_tasks() == 6 and reg.count_tasks("b") == 5
    assert reg.count_tasks("b", ready_only=True) == 4 and reg.count_tasks("c") == 1
    with pytest.raises(NotFound):
        reg.task_summaries("nope")
    with pytest.raises(NotFound):
        reg.count_tasks("nope")


def test_budget_from_summaries_equals_budget_from_tasks(reg):
    base = reg.get_base("b")
    from_tasks = reports.budget(base, reg.list_tasks("b", ready_only=True))
    from_summaries = reports.budget(base, reg.task_summaries("b", ready_only=True))
    assert from_summaries == from_tasks
    # The identical artifact of `copy` and `lin` counts once; the training run not at all.
    distinct = {t.artifact.sha256: t.artifact for t in reg.list_tasks("b", ready_only=True)}
    assert len(distinct) == 3 and len(from_summaries.tasks) == 4
    assert from_summaries.total_bytes == base.weights.bytes + sum(
        a.bytes for a in distinct.values())
    row = from_summaries.tasks[0]
    assert (row.name, row.budget, row.active_layers, row.total_layers) == ("t", 0.2, 3, 7)
    assert from_summaries.tasks[2].depends_on == ("t",)


def test_task_list_limit_and_offset(reg, capsys, db_url):
    home, db = str(reg.home), db_option(db_url)
    code, out, _ = run(capsys, "--home", home, *db, "--json", "task", "list")
    assert code == 0
    rows = json.loads(out)
    assert [r["name"] for r in rows] == ["t", "lin", "reader", "copy", "running", "other"]
    assert all(set(r) >= TASK_LIST_KEYS for r in rows)
    t = rows[0]
    assert (t["active_layers"], t["total_layers"], t["test_accuracy"]) == (3, 7, 0.75)
    assert t["task_params"] == reg.get_task("t").task_params
    code, out, _ = run(capsys, "--home", home, *db, "--json", "task", "list", "--limit", "2",
                       "--offset", "1")
    assert code == 0 and json.loads(out) == rows[1:3]
    code, out, _ = run(capsys, "--home", home, *db, "--json", "task", "list", "--base", "b",
                       "--offset", "3")
    assert code == 0 and [r["name"] for r in json.loads(out)] == ["copy", "running"]
    code, out, _ = run(capsys, "--home", home, *db, "task", "list", "--limit", "2")
    assert code == 0
    assert "lin" in out and "reader" not in out and "… 4 more (use --limit/--offset/--json)" in out
    code, out, _ = run(capsys, "--home", home, *db, "task", "list")
    assert code == 0 and "more" not in out and "other" in out
    assert run(capsys, "--home", home, *db, "task", "list", "--limit", "-1")[0] == 2  # bad usage


def test_long_listings_are_cut_for_humans_not_for_json(tmp_path, capsys, db_url):
    with Registry(tmp_path / "home", db_url) as reg:
        add_base(reg, "b")
        for i in range(53):
            add_task(reg, f"t{i:02d}", "b", method="linear", layers=linear_layers(2), acc=0.5)
    home, db = str(tmp_path / "home"), db_option(db_url)
    code, out, _ = run(capsys, "--home", home, *db, "task", "list")
    assert code == 0 and "t49" in out and "t50" not in out
    assert "… 3 more (use --limit/--offset/--json)" in out
    code, out, _ = run(capsys, "--home", home, *db, "--json", "task", "list")
    assert code == 0 and len(json.loads(out)) == 53
    code, out, _ = run(capsys, "--home", home, *db, "report", "budget")
    assert code == 0 and "t49" in out and "t50" not in out
    assert "… 3 more (use --limit/--json)" in out
    assert "53 fine-tuned models" in out  # the totals still cover every task
    code, out, _ = run(capsys, "--home", home, *db, "report", "budget", "--limit", "5")
    assert code == 0 and "t04" in out and "t05" not in out and "… 48 more" in out
    code, out, _ = run(capsys, "--home", home, *db, "--json", "report", "budget", "--limit", "5")
    assert code == 0 and len(json.loads(out)["tasks"]) == 53


def test_reading_commands_do_not_import_torch(reg, db_url):
    """`task list`, `report budget` and `report accuracy` must answer fast: importing torch
    alone takes about a second, so the read path must not import it."""
    script = (
        "import sys\n"
        "from taps_cl.cli.app import main\n"
        "for args in (['task', 'list'], ['report', 'budget', '--base', 'b'],\n"
        "             ['report', 'accuracy', '--base', 'b']):\n"
        "    try:\n"
        "        main([*sys.argv[1:], '--json', *args])\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, (args, exc.code)\n"
        "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH', len(loaded), file=sys.stderr)\n"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", script, *cli_home(reg.home, db_url)],
                          capture_output=True,
                          text=True, timeout=120, cwd=root)
    assert done.returncode == 0, done.stderr
    assert "TORCH 0" in done.stderr, done.stderr


def test_summaries_of_real_taps_and_linear_tasks(tmp_path, image_data, db_url):
    """On trained tasks (TAPS with a large λ switches layers off) the SQL aggregates equal what
    the full entities and the recorded evaluations say."""
    from taps_cl.manager import Manager

    fast = dict(epochs=2, batch_size=16, img_size=32, seed=0)
    with Manager(tmp_path / "home", db_url) as m:
        m.add_base("b", "timm:test_resnet")
        # Penalised by size, the large layers switch off and the small ones stay (5 of 15).
        m.add_task("sparse", "b", f"imagefolder:{image_data}", method="taps", epochs=3,
                   batch_size=8, img_size=32,
                   method_options={"lam": 1.0, "warmup_epochs": 0, "penalty": "params",
                                   "score_lr": 0.05})
        m.add_task("lin", "b", f"imagefolder:{image_data}", method="linear", **fast)
        full = m.list_tasks("b")
        accuracy = m.test_accuracies("b")
        summaries = m.task_summaries("b")
        assert summaries == [TaskSummary.of(t, accuracy[t.name]) for t in full]
        sparse = summaries[0]
        assert 0 < sparse.active_layers < sparse.total_layers  # some on, some off
        assert summaries[1].active_layers == 0 and summaries[1].total_layers > 0
        assert m.budget("b") == reports.budget(m.get_base("b"), full)
        assert m.count_tasks("b") == 2
