"""Faults injected by signals: Ctrl-C (SIGINT), SIGTERM and SIGKILL during `task add` (while it
trains and while it records), during `group train` and during `task delete`.

After each: the earlier tasks verify, no row points at a missing file, the command said in one
line what happened (`Aborted.`, exit 130, for an interrupt; log lines aside) and what a kill can
leave (a `training` row, staged files) is cleared by `task remove` and `gc`.

Where a signal must arrive while a long step runs, the real console entry runs in a child
process (`python -m taps_cl`) that trains for a very long time, and the signal is sent once its
row is in the registry (polled, with a deadline). Where it must arrive at one exact point of a
short step (recording, deleting), the command runs in this process and a step of it, patched
here in the test only, sends a real signal to this process (`os.kill`): Python runs the handler
the command installed right after that call returns, so the point is exact.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import registry.chain
import registry.tasks
import taps_cl.tasks.recording as recording
from registry import Registry
from registry.store import ArtifactStore
from taps_cl.manager import Manager
from taps_cl.training.fit import MAX_EPOCHS
from tests.conftest import make_imagefolder
from tests.faults import children  # noqa: F401  (the fixture)
from tests.test_cli import run

REPO = Path(__file__).resolve().parents[1]
# Seconds a child may take to start (importing torch on a busy machine) and record its row.
START_DEADLINE = 300
# Seconds a child may take to end once signalled (or to run a short command).
EXIT_DEADLINE = 180
# Epochs no run finishes while a test waits (the most allowed; an epoch of these tiny sets takes
# about a second).
FOREVER = str(MAX_EPOCHS)
# Log lines (`WARNING taps_cl.tasks.adding: …`) are not what the command says.
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
FAST = ("--method", "linear", "--epochs", "1", "--img-size", "32", "--batch-size", "16")
# test_efficientnet has 5 blocks: 2 shared, 2 group, 1 task-specific for `group train`.
PROG = ("--shared-fraction", "0.4", "--task-fraction", "0.2")
SIGNALS = [pytest.param(signal.SIGINT, id="SIGINT"), pytest.param(signal.SIGTERM, id="SIGTERM")]


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("fault_data"))


@pytest.fixture(scope="module")
def template(tmp_path_factory, data) -> Path:
    """A registry with base b and two ready tasks, a and t (built once, copied per test)."""
    home = tmp_path_factory.mktemp("fault_template") / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_efficientnet")
        for name in ("a", "t"):
            m.add_task(name, "b", f"imagefolder:{data}", method="linear", epochs=1,
                       batch_size=16, img_size=32)
    return home


@pytest.fixture
def home(template, tmp_path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(template, copy)
    return copy


def child(home: Path, *args: str, script: str | None = None) -> subprocess.Popen[str]:
    """`taps-cl --home HOME ARGS` in a child process: the real console entry, or `script` (the
    same entry after a patch of this test's) given as `python -c`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    entry = ["-c", script] if script is not None else ["-m", "taps_cl"]
    return subprocess.Popen([sys.executable, *entry, "--home", str(home), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=REPO)




def statuses(home: Path) -> dict[str, str]:
    with Manager(home) as m:
        return {t.name: t.status for t in m.list_tasks()}


def wait_for_rows(home: Path, proc: subprocess.Popen[str], wanted: dict[str, str]) -> None:
    """Poll the registry until it holds exactly `wanted` (name → status); fail at the deadline
    or when the child ends first."""
    deadline = time.monotonic() + START_DEADLINE
    while statuses(home) != wanted:
        if proc.poll() is not None:
            pytest.fail(f"the child ended ({proc.returncode}) before its rows appeared: "
                        f"{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no rows {wanted} after {START_DEADLINE} s: {statuses(home)}")
        time.sleep(0.3)


def told(err: str) -> list[str]:
    """What the command said on stderr: its non-blank lines that are not log lines."""
    return [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]


def assert_aborted(code: int, err: str) -> None:
    assert code == 130, err
    assert told(err) == ["Aborted."], err
    assert "Traceback" not in err


def assert_whole(home: Path, wanted: dict[str, str]) -> None:
    """The registry holds exactly `wanted`, every row's file is there, no file is garbage and
    every ready task verifies."""
    with Manager(home) as m:
        assert {t.name: t.status for t in m.list_tasks()} == wanted
        reg = m.registry
        for artifact in reg.list_artifacts():  # no row points at nothing
            assert reg.store.exists(artifact.path), artifact
        for task in m.list_tasks():
            assert task.status == "ready" and task.artifact is not None
            assert reg.store.exists(task.artifact.path)
        assert m.find_garbage() == []
        report = m.accuracy("b", verify=True, workers=1)
        assert report.verified is True, report
        assert set(report.verified_tasks) == set(wanted)


def send_at(monkeypatch: pytest.MonkeyPatch, owner: Any, attribute: str, signum: int, *,
            after: bool = False, when: Callable[..., bool] = lambda *a, **k: True) -> list[int]:
    """Patch `owner.attribute` so that the call for which `when(*args)` first holds sends
    `signum` to this process, before (or `after`) running the original. Returns the list the
    patch appends the signal to once sent."""
    original = getattr(owner, attribute)
    sent: list[int] = []

    def patched(*args: Any, **kwargs: Any) -> Any:
        fire = not sent and when(*args, **kwargs)
        if fire and not after:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        result = original(*args, **kwargs)
        if fire and after:
            sent.append(signum)
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(owner, attribute, patched)
    return sent


def nth(n: int) -> Callable[..., bool]:
    """A `when` for `send_at`: true at the n-th call (1-based)."""
    calls: list[None] = []

    def when(*_args: Any, **_kwargs: Any) -> bool:
        calls.append(None)
        return len(calls) == n

    return when


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Log messages of level WARNING and above (in this process; a child prints them)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# ------------------------------------------------------------------------ task add, training
@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_while_add_trains_removes_its_row(home, data, children, signum):
    proc = child(home, "task", "add", "n", "--base", "b", "--data", f"imagefolder:{data}",
                 *FAST[:2], "--epochs", FOREVER, "--img-size", "32")
    children.append(proc)
    wait_for_rows(home, proc, {"a": "ready", "t": "ready", "n": "training"})
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=EXIT_DEADLINE)
    assert_aborted(proc.returncode, err)
    assert_whole(home, {"a": "ready", "t": "ready"})


# A SIGKILL in the finishing transaction, after the task's files were staged (a test-side patch
# of the child: the chain link is computed inside that transaction).
KILLED_WHILE_RECORDING = """
import os, signal, sys
import registry.chain
registry.chain.link = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
from taps_cl.cli.app import main
main(sys.argv[1:])
"""


@pytest.mark.parametrize("when", ["training", "recording"])
def test_kill_during_add_leaves_what_remove_and_gc_clear(home, data, children, capsys, when):
    if when == "training":
        proc = child(home, "task", "add", "n", "--base", "b", "--data", f"imagefolder:{data}",
                     *FAST[:2], "--epochs", FOREVER, "--img-size", "32")
        children.append(proc)
        wait_for_rows(home, proc, {"a": "ready", "t": "ready", "n": "training"})
        proc.kill()
    else:
        proc = child(home, "task", "add", "n", "--base", "b", "--data", f"imagefolder:{data}",
                     *FAST, script=KILLED_WHILE_RECORDING)
        children.append(proc)
    proc.communicate(timeout=START_DEADLINE)
    assert proc.returncode == -signal.SIGKILL
    assert statuses(home) == {"a": "ready", "t": "ready", "n": "training"}
    code, out, err = run(capsys, "--home", str(home), "task", "remove", "n")  # its pid is gone
    assert (code, out.splitlines(), err) == (0, ["removed unfinished task n"], "")
    with Manager(home) as m:
        staged = m.find_garbage()
    # Killed in the finishing transaction: the task, probe and signature files were staged.
    assert len(staged) == (3 if when == "recording" else 0)
    assert {f.reason for f in staged} <= {"unreferenced"}
    code, out, err = run(capsys, "--home", str(home), "gc", "--yes")
    assert code == 0 and err == ""
    assert out.splitlines()[-1] == (f"removed {len(staged)} file(s), "
                                    f"{sum(f.bytes for f in staged):,} bytes" if staged else
                                    "no garbage: every artifact file is referenced")
    assert_whole(home, {"a": "ready", "t": "ready"})


# ----------------------------------------------------------------------- task add, recording
# Points of the recording a signal lands on: evaluating the restored model, staging the task's
# files (the probe file is the second), inside the finishing transaction (its chain link), and
# just after that transaction committed. In this process both signals unwind the same way (the
# command's handlers raise KeyboardInterrupt), so each point is taken with one, alternating.
RECORDING_POINTS = [
    pytest.param("evaluating", signal.SIGINT, id="evaluating-SIGINT"),
    pytest.param("staging", signal.SIGTERM, id="staging-SIGTERM"),
    pytest.param("transaction", signal.SIGINT, id="transaction-SIGINT"),
    pytest.param("committed", signal.SIGTERM, id="committed-SIGTERM"),
    pytest.param("committed", signal.SIGINT, id="committed-SIGINT"),
]


def _patch_recording(monkeypatch: pytest.MonkeyPatch, point: str, signum: int) -> list[int]:
    if point == "evaluating":
        return send_at(monkeypatch, recording, "probe_indices", signum)
    if point == "staging":
        return send_at(monkeypatch, ArtifactStore, "put", signum, when=nth(2))
    if point == "transaction":
        return send_at(monkeypatch, registry.chain, "link", signum)
    assert point == "committed"
    return send_at(monkeypatch, Registry, "finish_task", signum, after=True)


@pytest.mark.parametrize(("point", "signum"), RECORDING_POINTS)
def test_signal_while_add_records(home, data, capsys, caplog, monkeypatch, point, signum):
    sent = _patch_recording(monkeypatch, point, signum)
    code, _, err = run(capsys, "--home", str(home), "task", "add", "n", "--base", "b",
                       "--data", f"imagefolder:{data}", *FAST)
    monkeypatch.undo()
    assert sent == [signum]
    assert_aborted(code, err)
    if point == "committed":  # the task was whole before the interrupt took effect: it stays
        assert any(re.search(r"task n was recorded .* it stays", w) for w in warnings(caplog))
        assert_whole(home, {"a": "ready", "t": "ready", "n": "ready"})
    else:
        assert not warnings(caplog)  # "Aborted." says it all: nothing of the run is left
        assert_whole(home, {"a": "ready", "t": "ready"})


# ------------------------------------------------------------------------------ group train
def _group(data: Path, *extra: str) -> list[str]:
    return ["group", "train", "--base", "b", "--task", f"x=imagefolder:{data}",
            "--task", f"y=imagefolder:{data}", "--groups", "1", "--img-size", "32",
            "--batch-size", "16", *PROG, *extra]


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_while_group_trains_removes_every_row(home, data, children, signum):
    proc = child(home, *_group(data, "--epochs", FOREVER))
    children.append(proc)
    wait_for_rows(home, proc, {"a": "ready", "t": "ready", "x": "training", "y": "training"})
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=EXIT_DEADLINE)
    assert_aborted(proc.returncode, err)
    assert_whole(home, {"a": "ready", "t": "ready"})


def test_signal_as_a_group_member_begins_leaves_no_row(home, data, capsys, caplog,
                                                       monkeypatch):
    """The signal comes just as the second member's row committed, before the run holds it."""
    sent = send_at(monkeypatch, Registry, "begin_task", signal.SIGINT, after=True,
                   when=lambda _reg, name, **_: name == "y")
    code, _, err = run(capsys, "--home", str(home), *_group(data, "--epochs", "1"))
    monkeypatch.undo()
    assert sent == [signal.SIGINT]
    assert_aborted(code, err)
    assert not warnings(caplog)
    assert_whole(home, {"a": "ready", "t": "ready"})


def test_signal_after_a_group_member_committed_leaves_no_partial_group(
        home, data, capsys, caplog, monkeypatch):
    """x's finish committed, then SIGTERM: x goes again with its files (all or nothing)."""
    sent = send_at(monkeypatch, Registry, "finish_task", signal.SIGTERM, after=True)
    code, _, err = run(capsys, "--home", str(home), *_group(data, "--epochs", "1"))
    monkeypatch.undo()
    assert sent == [signal.SIGTERM]
    assert_aborted(code, err)
    assert not warnings(caplog)
    assert_whole(home, {"a": "ready", "t": "ready"})


def test_second_signal_while_a_failed_group_cleans_up(home, data, capsys, monkeypatch):
    """SIGTERM as y records (x is recorded), then Ctrl-C as x's files are being removed again:
    the clean-up still ends, leaving neither rows nor files of the group."""
    first = send_at(monkeypatch, Registry, "finish_task", signal.SIGTERM, when=nth(2))
    second = send_at(monkeypatch, ArtifactStore, "remove", signal.SIGINT)
    code, _, err = run(capsys, "--home", str(home), *_group(data, "--epochs", "1"))
    monkeypatch.undo()
    assert (first, second) == ([signal.SIGTERM], [signal.SIGINT])
    assert_aborted(code, err)
    assert_whole(home, {"a": "ready", "t": "ready"})


# ------------------------------------------------------------------------------ task delete
@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_while_delete_removes_files_leaves_it_gone_without_orphans(
        home, capsys, caplog, monkeypatch, signum):
    """The rows are gone and the first file is about to be removed when the signal comes."""
    sent = send_at(monkeypatch, ArtifactStore, "remove", signum)
    code, _, err = run(capsys, "--home", str(home), "task", "delete", "t")
    monkeypatch.undo()
    assert sent == [signum]
    assert_aborted(code, err)
    assert any(re.search(r"task t was deleted \(3 artifact file\(s\) removed\) before the "
                         r"interrupt", w) for w in warnings(caplog))
    assert_whole(home, {"a": "ready"})


@pytest.mark.parametrize("signum", SIGNALS)
def test_signal_inside_the_delete_transaction_leaves_it_whole_or_gone(
        home, capsys, caplog, monkeypatch, signum):
    sent = send_at(monkeypatch, registry.tasks, "_artifact_in_use", signum)
    code, _, err = run(capsys, "--home", str(home), "task", "delete", "t")
    monkeypatch.undo()
    assert sent == [signum]
    assert_aborted(code, err)
    if "t" in statuses(home):
        assert_whole(home, {"a": "ready", "t": "ready"})
    else:  # the delete went through: the warning says so
        assert any("task t was deleted" in w for w in warnings(caplog))
        assert_whole(home, {"a": "ready"})
