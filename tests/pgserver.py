"""A throwaway PostgreSQL server in a temp directory, from the distribution's own binaries.

Test infrastructure (tests/servers.py, benchmarks/team.py), not part of any installed package
and never used by the registry itself. Not for production: the server is made by ``initdb`` in
a fresh directory, listens on 127.0.0.1 only (its unix socket lives in that directory too),
authenticates by a random password (scram-sha-256) and runs with fsync off, so a crash loses
it. ``stop()`` shuts it down and removes the directory; should the process that started it
die first (killed, no ``finally`` run), a watchdog process does that.

PostgreSQL refuses to run as root: as root, ``initdb`` and ``pg_ctl`` run as the unprivileged
system user ``postgres`` (Debian's package creates it) through ``runuser``, in a directory that
user owns. The binaries are looked up in ``$TAPS_CL_PG_BIN``, then on PATH, then in Debian's
``/usr/lib/postgresql/<version>/bin`` (not on PATH), newest version first.

Why not pytest-postgresql: its executor (10.0.0) runs ``pg_ctl initdb``/``start``/``stop`` as
the calling process's own user in a data directory under pytest's private tmp dir, and its
``user`` option is only the PostgreSQL role given to initdb, so it cannot start a server as
root (CI), which PostgreSQL refuses.

Imports no torch and nothing of taps_cl or registry; psycopg is needed only to create databases
(SQLAlchemy's psycopg driver).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

# The server's superuser (created by initdb); every database the helper makes belongs to it.
SUPERUSER = "taps"
# The unprivileged user that runs PostgreSQL when we are root (Debian's `postgresql` creates it).
SYSTEM_USER = "postgres"
# Seconds pg_ctl waits for the server to start or stop.
PG_CTL_WAIT = 60
# Tries with a fresh port when another process took the free port we picked before we bound it.
START_ATTEMPTS = 3
DEBIAN_BIN_GLOB = "/usr/lib/postgresql/*/bin"
_DB_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
# Watches the process that started the server (argv: its pid, the stop command, the server's
# directory): once that process is gone without stopping the server — killed, say, so that no
# `finally` ran — it stops the server and removes the directory. Exits when stop() ran.
_WATCHDOG = """
import os, shutil, subprocess, sys, time
owner, command, root = int(sys.argv[1]), sys.argv[2:-1], sys.argv[-1]
while os.path.exists(root):
    try:
        os.kill(owner, 0)
    except ProcessLookupError:
        subprocess.run(command, capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
        break
    except PermissionError:
        pass
    time.sleep(1)
"""


class ServerUnavailable(RuntimeError):
    """No PostgreSQL server can be started here (binaries, driver or unprivileged user missing)."""


def find_bin_dir() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``; ServerUnavailable naming where it looked."""
    candidates: list[Path] = []
    if os.environ.get("TAPS_CL_PG_BIN"):
        candidates.append(Path(os.environ["TAPS_CL_PG_BIN"]))
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    versioned = [Path(p) for p in Path("/").glob(DEBIAN_BIN_GLOB.lstrip("/"))]
    candidates += sorted(versioned, key=lambda p: _version_key(p.parent.name), reverse=True)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "pg_ctl").is_file():
            return directory
    raise ServerUnavailable(
        "PostgreSQL binaries (initdb, pg_ctl) not found in $TAPS_CL_PG_BIN, on PATH or in "
        f"{DEBIAN_BIN_GLOB} (Debian: apt-get install postgresql)"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class PostgresServer:
    """A running throwaway server; ``url(db)`` addresses one of its databases."""

    bin_dir: Path  # where initdb and pg_ctl were found
    root: Path  # temp directory: data/, the socket and the log; removed by stop()
    port: int  # TCP port on 127.0.0.1
    password: str  # the superuser's random password
    run_as: Optional[str]  # the system user the server runs as (when started by root), else None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of a database on this server."""
        return (f"postgresql+psycopg://{SUPERUSER}:{self.password}@127.0.0.1:{self.port}/"
                f"{database}")

    def create_database(self, name: str) -> str:
        """Create an empty database (a lower-case identifier) and return its URL."""
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name {name!r}: lower-case letters, digits, _")
        from sqlalchemy import create_engine, text

        try:
            engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        except ImportError as exc:  # psycopg missing
            raise ServerUnavailable(f"the psycopg driver is not installed ({exc})") from exc
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        """Shut the server down (fast mode) and remove its directory; safe to call twice."""
        if (self.data_dir / "postmaster.pid").exists():
            result = _run(self, ["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w",
                                 "-t", str(PG_CTL_WAIT), "stop"], check=False)
            if result.returncode != 0:
                _run(self, ["pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w",
                            "stop"], check=False)
        shutil.rmtree(self.root, ignore_errors=True)


def start_postgres(parent: Optional[Path] = None) -> PostgresServer:
    """initdb a new cluster in a temp directory and start it on a free 127.0.0.1 port.

    ``parent`` is where the temp directory goes (default: the system temp dir); when root, the
    server's user must be able to reach it, which a private pytest tmp dir is not.
    """
    bin_dir = find_bin_dir()
    run_as = _unprivileged_user()
    if parent is None and run_as is not None and not _reachable(Path(tempfile.gettempdir())):
        parent = Path("/tmp")  # $TMPDIR is private to root: the server's user cannot enter it
    root = Path(tempfile.mkdtemp(prefix="taps-cl-pg-", dir=parent))
    try:
        if run_as is not None:
            shutil.chown(root, user=run_as)
        server = PostgresServer(bin_dir, root, 0, secrets.token_hex(16), run_as)
        pwfile = root / "pwfile"
        pwfile.write_text(server.password + "\n")
        if run_as is not None:
            shutil.chown(pwfile, user=run_as)
        pwfile.chmod(0o600)
        _run(server, ["initdb", "-D", str(server.data_dir), "-U", SUPERUSER,
                      f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8",
                      "--no-locale", "--no-sync"])
        pwfile.unlink()
        for attempt in range(START_ATTEMPTS):
            server = PostgresServer(bin_dir, root, free_port(), server.password, run_as)
            options = (f"-c listen_addresses=127.0.0.1 -p {server.port} -k {root} "
                       "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
            result = _run(server, ["pg_ctl", "-D", str(server.data_dir), "-l",
                                   str(server.log_file), "-o", options, "-w",
                                   "-t", str(PG_CTL_WAIT), "start"], check=False)
            if result.returncode == 0:
                log.info("PostgreSQL %s on 127.0.0.1:%d (%s)", bin_dir, server.port, root)
                _watch(server)
                return server
            log.warning("PostgreSQL did not start on port %d (attempt %d): %s",
                        server.port, attempt + 1, _tail(server.log_file))
        raise ServerUnavailable(f"PostgreSQL did not start: {_tail(server.log_file)}")
    except BaseException:
        PostgresServer(bin_dir, root, 0, "", run_as).stop()
        raise


def _watch(server: PostgresServer) -> None:
    """Start the watchdog that stops ``server`` if this process dies without stopping it."""
    stop = _command(server, ["pg_ctl", "-D", str(server.data_dir), "-m", "immediate", "-w",
                             "stop"])
    # A session of its own: a signal to this process's group does not end the watchdog too.
    subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()), *stop, str(server.root)],
                     cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)


def _unprivileged_user() -> Optional[str]:
    """The user to run the server as: None when we are not root, else SYSTEM_USER."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam(SYSTEM_USER)
    except KeyError as exc:
        raise ServerUnavailable(f"running as root and there is no {SYSTEM_USER!r} user to run "
                                "PostgreSQL as (it refuses to run as root)") from exc
    if shutil.which("runuser") is None:
        raise ServerUnavailable("running as root and `runuser` is missing")
    return SYSTEM_USER


def _reachable(directory: Path) -> bool:
    """Whether any user may pass through ``directory`` and every directory above it."""
    return all(path.stat().st_mode & 0o001 for path in [directory.resolve(),
                                                         *directory.resolve().parents])


def _run(server: PostgresServer, argv: list[str],
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """A PostgreSQL binary, as the server's user; ServerUnavailable with its output if ``check``."""
    command = _command(server, argv)
    # cwd inside the server's directory: pg_ctl must be able to read its working directory.
    result = subprocess.run(command, cwd=server.root, capture_output=True, text=True,
                            env={**os.environ, "LC_ALL": "C"}, stdin=subprocess.DEVNULL,
                            check=False)
    if check and result.returncode != 0:
        output = (result.stderr or result.stdout).strip().splitlines()
        raise ServerUnavailable(f"{argv[0]} failed: {output[-1] if output else result.returncode}")
    return result


def _command(server: PostgresServer, argv: list[str]) -> list[str]:
    """The argv running PostgreSQL binary ``argv[0]`` as the server's user."""
    command = [str(server.bin_dir / argv[0]), *argv[1:]]
    if server.run_as is not None:
        command = ["runuser", "-u", server.run_as, "--", *command]
    return command


def _tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no server log)"
    return lines[-1] if lines else "(empty server log)"


__all__ = ["PostgresServer", "ServerUnavailable", "find_bin_dir", "free_port", "start_postgres"]
