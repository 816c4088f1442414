"""PostgreSQL restarted (`pg_ctl stop`, then `pg_ctl start`) under a team registry: while a
`task add` trains, while it records, and while a reader runs.

The add either completes or fails cleanly: one line (log lines aside), and no `training` row
that `task remove` cannot clear; its heartbeat thread survives the lost connection and beats
again. A reader while the server is down gets one error line, and the next command works.
After each, the earlier task verifies, no row points at a missing file and `gc` finds nothing.

These tests restart their own server (module scope), never the session's shared one. Where the
restart must come at one exact point of the recording, the command runs in this process (or, for
a child that must end before the server returns, in a child started with a test-side patch) and
a step of it, patched here in the test only, runs `pg_ctl`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

import registry.chain
import taps_cl.tasks.adding as adding
from registry.runs import HEARTBEAT_INTERVAL_SECONDS
from registry.store import ArtifactStore
from taps_cl.manager import Manager
from taps_cl.training.fit import MAX_EPOCHS
from tests.conftest import make_imagefolder
from tests.faults import children  # noqa: F401  (the fixture)
from tests.pgserver import (
    PG_CTL_WAIT,
    PostgresServer,
    ServerUnavailable,
    _command,
    _run,
    start_postgres,
)
from tests.servers import require_or_skip
from tests.test_cli import run

REPO = Path(__file__).resolve().parents[1]
START_DEADLINE = 300  # seconds for a child to start (torch import on a busy machine) and begin
EXIT_DEADLINE = 180  # seconds for a child to end once signalled, or a short command to run
BEAT_DEADLINE = 6 * HEARTBEAT_INTERVAL_SECONDS  # seconds for a heartbeat after the restart
FOREVER = str(MAX_EPOCHS)  # epochs no run finishes while a test waits (the most allowed)
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
FAST = ("--method", "linear", "--epochs", "1", "--img-size", "32", "--batch-size", "16")

_numbers = itertools.count(1)


# ------------------------------------------------------------------------------------ server
@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    """A server of this module's own, since its tests stop and start it."""
    try:
        import psycopg  # noqa: F401  # the driver SQLAlchemy's postgresql+psycopg URLs use
    except ImportError:
        require_or_skip("PostgreSQL tests need psycopg (pip install 'taps-cl[postgres]')")
    try:
        started = start_postgres()
    except ServerUnavailable as exc:
        require_or_skip(f"PostgreSQL tests need a local server: {exc}")
    try:
        yield started
    finally:
        started.stop()


def is_up(server: PostgresServer) -> bool:
    return (server.data_dir / "postmaster.pid").exists()


def pg_stop(server: PostgresServer) -> None:
    """`pg_ctl stop -m fast`: sessions are ended, then the server shuts down."""
    _run(server, ["pg_ctl", "-D", str(server.data_dir), "-m", "fast", "-w",
                  "-t", str(PG_CTL_WAIT), "stop"])


def pg_start(server: PostgresServer) -> None:
    """`pg_ctl start` on the same port and options as tests/pgserver.py started it with."""
    options = (f"-c listen_addresses=127.0.0.1 -p {server.port} -k {server.root} "
               "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
    _run(server, ["pg_ctl", "-D", str(server.data_dir), "-l", str(server.log_file), "-o",
                  options, "-w", "-t", str(PG_CTL_WAIT), "start"])


def pg_restart(server: PostgresServer) -> None:
    pg_stop(server)
    pg_start(server)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("pg_fault_data"))


@pytest.fixture
def team(server, tmp_path, data) -> Iterator[tuple[Path, str]]:
    """(home, database URL): a fresh registry with base b and one ready task a. The server is
    running again at the end, whatever the test did to it."""
    url = server.create_database(f"faults_{os.getpid()}_{next(_numbers)}")
    home = tmp_path / "home"
    with Manager(home, url) as m:
        m.add_base("b", "timm:test_resnet")
        m.add_task("a", "b", f"imagefolder:{data}", method="linear", epochs=1, batch_size=16,
                   img_size=32)
    try:
        yield home, url
    finally:
        if not is_up(server):
            pg_start(server)


# ------------------------------------------------------------------------------------ helpers
def cli_args(home: Path, url: str, *args: str) -> list[str]:
    return ["--home", str(home), "--db", url, *args]


def child_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def child(home: Path, url: str, *args: str, script: str | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    entry = ["-c", script] if script is not None else ["-m", "taps_cl"]
    return subprocess.Popen([sys.executable, *entry, *cli_args(home, url, *args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**child_env(), **(env or {})}, cwd=REPO)


def command(home: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A short command in a child process, to its end."""
    return subprocess.run([sys.executable, "-m", "taps_cl", *cli_args(home, url, *args)],
                          capture_output=True, text=True, env=child_env(), cwd=REPO,
                          timeout=EXIT_DEADLINE)




def statuses(home: Path, url: str) -> dict[str, str]:
    with Manager(home, url) as m:
        return {t.name: t.status for t in m.list_tasks()}


def wait_for_rows(home: Path, url: str, proc: subprocess.Popen[str],
                  wanted: dict[str, str]) -> None:
    deadline = time.monotonic() + START_DEADLINE
    while statuses(home, url) != wanted:
        if proc.poll() is not None:
            pytest.fail(f"the child ended ({proc.returncode}) before its rows appeared: "
                        f"{proc.communicate()[1]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no rows {wanted} after {START_DEADLINE} s")
        time.sleep(0.3)


def told(err: str) -> list[str]:
    """What the command said on stderr: its non-blank lines that are not log lines."""
    return [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]


def assert_whole(home: Path, url: str, wanted: dict[str, str]) -> None:
    """Exactly `wanted` (name → status), every row's file there, no garbage, all verified."""
    with Manager(home, url) as m:
        assert {t.name: t.status for t in m.list_tasks()} == wanted
        reg = m.registry
        for artifact in reg.list_artifacts():
            assert reg.store.exists(artifact.path), artifact
        for task in m.list_tasks():
            assert task.artifact is not None and reg.store.exists(task.artifact.path)
        assert m.find_garbage() == []
        report = m.accuracy("b", verify=True, workers=1)
        assert report.verified is True, report
        assert set(report.verified_tasks) == set(wanted)


def run_at(monkeypatch: pytest.MonkeyPatch, owner: Any, attribute: str,
           action: Callable[[], None]) -> list[None]:
    """Patch `owner.attribute` so that its first call runs `action` first; returns a list that
    holds one item once it ran."""
    original = getattr(owner, attribute)
    ran: list[None] = []

    def patched(*args: Any, **kwargs: Any) -> Any:
        if not ran:
            ran.append(None)
            action()
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, patched)
    return ran


def utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


# -------------------------------------------------------------------------------------- tests
def test_restart_while_add_trains(server, team, data, children):
    """The heartbeat thread survives the lost connection and beats again; a reader while the
    server is down says one line; the next command works; the run still ends cleanly."""
    home, url = team
    proc = child(home, url, "task", "add", "n", "--base", "b", "--data", f"imagefolder:{data}",
                 *FAST[:2], "--epochs", FOREVER, "--img-size", "32")
    children.append(proc)
    wait_for_rows(home, url, proc, {"a": "ready", "n": "training"})

    pg_stop(server)
    stopped = time.monotonic()
    reader = command(home, url, "task", "list")
    assert reader.returncode == 1, reader
    (line,) = told(reader.stderr)
    assert line.startswith("Error: ") and "database" in line, reader.stderr
    assert "Traceback" not in reader.stderr and reader.stdout == ""
    # Down for longer than a heartbeat interval, so that at least one beat fails.
    time.sleep(max(0.0, HEARTBEAT_INTERVAL_SECONDS + 1 - (time.monotonic() - stopped)))
    assert proc.poll() is None  # training goes on
    pg_start(server)
    restarted = datetime.now(timezone.utc)

    listed = command(home, url, "--json", "task", "list")
    assert listed.returncode == 0, listed.stderr
    assert {r["name"]: r["status"] for r in json.loads(listed.stdout)} == {
        "a": "ready", "n": "training"}
    deadline = time.monotonic() + BEAT_DEADLINE
    while True:  # the heartbeat thread beats again, on a fresh connection
        with Manager(home, url) as m:
            beat = m.get_task("n").heartbeat_at
        if beat is not None and utc(beat) > restarted:
            break
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"no heartbeat since the restart ({beat})"
        time.sleep(1)

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=EXIT_DEADLINE)
    assert proc.returncode == 130, err
    assert told(err) == ["Aborted."], err
    assert "Traceback" not in err
    # The failed beat was said once (a warning), not at every beat.
    assert len(re.findall(r"heartbeat failed", err)) == 1, err
    assert_whole(home, url, {"a": "ready"})


@pytest.mark.parametrize("point", ["training", "staging", "transaction"])
def test_restart_at_a_point_of_an_add(server, team, data, capsys, caplog, monkeypatch, point):
    """Restarted as training starts or as the task's files are staged (the connections in the
    pool are stale: the run reconnects and the add completes), or inside the finishing
    transaction (that transaction is lost: the add fails in one line and removes its files and
    its row)."""
    home, url = team
    owner, attribute = {"training": (adding, "fit"), "staging": (ArtifactStore, "put"),
                        "transaction": (registry.chain, "link")}[point]
    ran = run_at(monkeypatch, owner, attribute, lambda: pg_restart(server))
    code, out, err = run(capsys, *cli_args(home, url, "task", "add", "n", "--base", "b",
                                           "--data", f"imagefolder:{data}", *FAST))
    monkeypatch.undo()
    assert ran and is_up(server)
    assert "Traceback" not in err
    if point != "transaction":
        assert code == 0, err
        assert out.startswith("task n (linear) on b, position 2"), out
        assert_whole(home, url, {"a": "ready", "n": "ready"})
    else:
        assert code == 1, err
        (line,) = told(err)
        assert re.match(r"Error: database postgresql\+psycopg://taps:\*\*\*@", line), line
        assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert_whole(home, url, {"a": "ready"})
    code, out, err = run(capsys, *cli_args(home, url, "task", "list"))  # the next one works
    assert code == 0 and err == ""


# The child stops the server inside its finishing transaction (a test-side patch: the chain
# link is computed there) and ends before the server is back.
STOPPED_WHILE_RECORDING = """
import json, os, subprocess, sys
import registry.chain
import taps_cl.tasks.adding as adding
stop, root = json.loads(os.environ["TAPS_CL_TEST_PG_STOP"]), os.environ["TAPS_CL_TEST_PG_ROOT"]
link = registry.chain.link
def stopped(*args, **kwargs):
    subprocess.run(stop, cwd=root, check=True, capture_output=True)
    return link(*args, **kwargs)
registry.chain.link = stopped
from taps_cl.cli.app import main
main(sys.argv[1:])
"""


def test_server_down_while_add_records_leaves_what_remove_and_gc_clear(
        server, team, data, capsys, children):
    home, url = team
    stop = _command(server, ["pg_ctl", "-D", str(server.data_dir), "-m", "fast", "-w",
                             "-t", str(PG_CTL_WAIT), "stop"])
    proc = child(home, url, "task", "add", "n", "--base", "b", "--data", f"imagefolder:{data}",
                 *FAST, script=STOPPED_WHILE_RECORDING,
                 env={"TAPS_CL_TEST_PG_STOP": json.dumps(stop),
                      "TAPS_CL_TEST_PG_ROOT": str(server.root)})
    children.append(proc)
    _, err = proc.communicate(timeout=START_DEADLINE)
    assert not is_up(server)
    assert proc.returncode == 1, err
    (line,) = told(err)
    assert line.startswith("Error: database ") and "Traceback" not in err, err
    # It says what it left and how to clear it.
    assert re.search(r"task n did not finish and its row could not be removed .*"
                     r"`taps-cl task remove n`", err), err
    pg_start(server)
    assert statuses(home, url) == {"a": "ready", "n": "training"}
    code, out, err = run(capsys, *cli_args(home, url, "task", "remove", "n"))  # its pid is gone
    assert (code, out.splitlines(), err) == (0, ["removed unfinished task n"], "")
    with Manager(home, url) as m:
        staged = m.find_garbage()
    assert len(staged) == 3 and {f.reason for f in staged} == {"unreferenced"}  # task, probe,
    code, out, err = run(capsys, *cli_args(home, url, "gc", "--yes"))           # signature
    assert code == 0 and err == "" and out.splitlines()[-1].startswith("removed 3 file(s)")
    assert_whole(home, url, {"a": "ready"})
