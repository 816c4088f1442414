"""The servers the tests start: PostgreSQL on loopback only; the skip-or-fail rule."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.pgserver import start_postgres
from tests.servers import REQUIRE_ENV, require_or_skip


def test_postgres_server_listens_on_loopback_only(postgres_server, postgres_url):
    engine = create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SHOW listen_addresses")).scalar() == "127.0.0.1"
            assert conn.execute(text("SHOW unix_socket_directories")).scalar() == str(
                postgres_server.root)
            assert conn.execute(text("SELECT current_database()")).scalar() == \
                postgres_url.rsplit("/", 1)[1]
    finally:
        engine.dispose()


def test_postgres_server_stop_leaves_nothing_running(postgres_server):
    # The session's server proves a server can start here; this one is started to be stopped.
    server = start_postgres()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10):
        pass
    server.stop()
    assert not server.root.exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=10).close()
    server.stop()  # twice is harmless


def test_postgres_server_of_a_killed_process_is_stopped(postgres_server):
    # A test session killed outright runs no fixture teardown: the watchdog stops its server.
    script = ("import json, time\n"
              "from tests.pgserver import start_postgres\n"
              "s = start_postgres()\n"
              "print(json.dumps([s.port, str(s.root)]), flush=True)\n"
              "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    try:
        port, root = json.loads(child.stdout.readline())
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    deadline = time.monotonic() + 60
    while Path(root).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(root).exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()


def test_missing_servers_skip_unless_required(monkeypatch):
    monkeypatch.delenv(REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no server here"):
        require_or_skip("no server here")
    monkeypatch.setenv(REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="no server here.*may not skip"):
        require_or_skip("no server here")
