"""Fault injected: the S3 artifact store goes away in the middle of a write (`task add` recording
its files) and in the middle of a read (`report accuracy --verify`), then comes back.

The registry's endpoint is a small TCP forwarder on 127.0.0.1 (a thread here) in front of moto's
S3 server (tests/test_s3_store.py starts it). The forwarder watches the bytes going through and,
at the chosen moment, stops: it stops listening and drops every connection, as a store that
crashed or a network that failed, with a request half sent or a response half received. moto
keeps its data in memory, so the store "comes back" when the forwarder listens again on the same
port, with every object still there.

After each outage: the command said so in one `Error:` line (exit 1, no traceback), nothing was
recorded, and with the store back no row points at nothing, the earlier tasks verify, `gc`
removes what the failed write could not remove itself (a file it had stored before the store
went away, and the temp object of a move that never happened, once that is old) and the same
command goes through.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from registry.artifacts import TEMP_GRACE_SECONDS
from registry.store import ArtifactStore
from taps_cl.manager import Manager
from tests.conftest import make_imagefolder
from tests.faults import LOG_LINE, WARNING_LINE, assert_one_error, told  # noqa: F401
from tests.test_cli import run
from tests.test_s3_store import configure_s3, s3_endpoint  # noqa: F401  (the moto fixture)

# Seconds a thread of the forwarder may take to end once its sockets are closed.
JOIN_DEADLINE = 10
# Log lines (`WARNING registry.artifacts: …`) are not what the command says.
FAST = ("--method", "linear", "--epochs", "1", "--img-size", "32", "--batch-size", "16")
REQUEST = re.compile(rb"^(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/1\.[01]\r\n")

# What a cut sees: the direction ("up": client → store, "down": store → client), the bytes just
# read (not yet passed on) and the connection's own state (a dict it may keep things in).
Cut = Callable[[str, bytes, dict[str, Any]], bool]


class Forwarder:
    """127.0.0.1:port → 127.0.0.1:target, byte for byte; ``cut`` decides when it goes away.

    ``stop()`` (or a cut that returns True, before its bytes are passed on) closes the listening
    socket and every connection; ``start()`` listens again on the same port.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.cut: Cut | None = None
        self.tripped = threading.Event()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Listen (again) on the port, after ending what a stop or a cut left."""
        self.stop()
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        with self._lock:
            self._listener = listener
        self.tripped.clear()
        self._spawn(self._accept, listener)

    def stop(self) -> None:
        """Go away: close every socket, and wait (bounded) for every thread to end."""
        self._close()
        with self._lock:
            threads, self._threads = self._threads, []
        for thread in threads:
            thread.join(JOIN_DEADLINE)
            assert not thread.is_alive(), f"forwarder thread {thread.name} did not end"

    def _close(self) -> None:
        with self._lock:
            doomed = list(self._sockets) + ([self._listener] if self._listener else [])
            self._listener = None
            self._sockets.clear()
        for sock in doomed:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept/recv
            except OSError:
                pass
            sock.close()

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:  # stopped meanwhile
                    client.close()
                    upstream.close()
                    return
                self._sockets |= {client, upstream}
            state: dict[str, Any] = {}
            self._spawn(self._pump, client, upstream, "up", state)
            self._spawn(self._pump, upstream, client, "down", state)

    def _pump(self, source: socket.socket, sink: socket.socket, direction: str,
              state: dict[str, Any]) -> None:
        try:
            while True:
                chunk = source.recv(1 << 16)
                if not chunk:
                    break
                cut = self.cut
                if cut is not None and cut(direction, chunk, state):
                    with self._lock:
                        first = not self.tripped.is_set()
                        self.tripped.set()
                    if first:
                        self._close()  # its threads end now; start() or stop() joins them
                    return
                sink.sendall(chunk)
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)  # the other side ended: pass the end on
        except OSError:
            pass


def request(direction: str, chunk: bytes, state: dict[str, Any]) -> str | None:
    """On the first chunk of a request: "METHOD target" (and the state is reset for it)."""
    match = REQUEST.match(chunk) if direction == "up" else None
    if match is None:
        return None
    state.clear()
    state["request"] = f"{match.group(1).decode()} {match.group(2).decode()}"
    state["headers"] = chunk.split(b"\r\n\r\n", 1)[0].lower()
    return state["request"]


def cut_upload(after: int = 100_000) -> Cut:
    """Mid-upload: a PUT of a temp object is cut after `after` bytes (the task's probe file;
    its tensors' file, a few kB, goes through whole)."""
    def cut(direction: str, chunk: bytes, state: dict[str, Any]) -> bool:
        line = request(direction, chunk, state)
        if direction != "up" or not state.get("request", "").startswith("PUT "):
            return False
        if line is not None:
            state["sent"] = 0
        state["sent"] += len(chunk)
        return "/.tmp-" in state["request"] and state["sent"] > after
    return cut


def cut_move(nth: int = 2) -> Cut:
    """Mid-move: the `nth` copy of a temp object to its final name (the probe file's) is never
    sent: the temp object is stored whole, the final name never appears."""
    copies: list[str] = []

    def cut(direction: str, chunk: bytes, state: dict[str, Any]) -> bool:
        line = request(direction, chunk, state)
        if line is None or b"\r\nx-amz-copy-source:" not in state["headers"]:
            return False
        copies.append(line)
        return len(copies) == nth
    return cut


def cut_download(after: int = 200_000) -> Cut:
    """Mid-download: the response to a GET of an artifact is cut after `after` bytes (the base's
    weights, the first artifact a verification reads, are 1.4 MB)."""
    def cut(direction: str, chunk: bytes, state: dict[str, Any]) -> bool:
        request(direction, chunk, state)
        line = state.get("request", "")
        if direction != "down" or not (line.startswith("GET ") and ".safetensors" in line):
            return False
        state["received"] = state.get("received", 0) + len(chunk)
        return state["received"] > after
    return cut


def cut_request(nth: int = 2) -> Cut:
    """As a request goes out: the `nth` GET of an artifact (a verification's second, the first
    task's file) never reaches the store."""
    gets: list[str] = []

    def cut(direction: str, chunk: bytes, state: dict[str, Any]) -> bool:
        line = request(direction, chunk, state)
        if line is None or not (line.startswith("GET ") and ".safetensors" in line):
            return False
        gets.append(line)
        return len(gets) == nth
    return cut


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def forwarder(s3_endpoint) -> Iterator[Forwarder]:  # noqa: F811
    """The forwarder to moto's server, and the process's S3 settings pointing at it."""
    import s3fs

    fwd = Forwarder(int(s3_endpoint.rsplit(":", 1)[1]))
    fwd.start()
    with pytest.MonkeyPatch.context() as patch:
        configure_s3(patch, f"http://127.0.0.1:{fwd.port}")
        try:
            yield fwd
        finally:
            fwd.cut = None
            fwd.stop()
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def store_back(forwarder) -> Iterator[Forwarder]:
    """The forwarder for one test: listening again (same port) and cutting nothing after it."""
    yield forwarder
    forwarder.cut = None
    if forwarder.tripped.is_set() or not _listening(forwarder.port):
        forwarder.start()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("s3_fault_data"))


@pytest.fixture(scope="module")
def s3_home(tmp_path_factory, forwarder, data) -> tuple[Path, str]:
    """A home (its database local) whose artifact store is on S3: base b and ready task a."""
    import s3fs

    url = f"s3://taps-faults-{uuid.uuid4().hex[:12]}/store"
    s3fs.S3FileSystem().mkdir(url.removeprefix("s3://").split("/")[0])
    home = tmp_path_factory.mktemp("s3_fault") / "home"
    with Manager(home, artifacts_url=url) as m:
        m.add_base("b", "timm:test_efficientnet")
        m.add_task("a", "b", f"imagefolder:{data}", method="linear", epochs=1, batch_size=16,
                   img_size=32)
    return home, url


# ------------------------------------------------------------------------------------ helpers


def snapshot(home: Path) -> tuple[dict[str, str], list[str], int]:
    """What the database records: task statuses, artifact rows, evaluation rows."""
    with Manager(home) as m:
        reg = m.registry
        return ({t.name: t.status for t in m.list_tasks()},
                sorted(a.sha256 for a in reg.list_artifacts()),
                len(reg.list_evaluations("b")))


def objects(url: str) -> set[str]:
    """Every object of the store, temp objects included."""
    return {relative for relative, _, _ in ArtifactStore(url).files()}


def assert_whole(home: Path, tasks: dict[str, str]) -> None:
    """The registry holds exactly `tasks`, every row's file is there and every task verifies."""
    with Manager(home) as m:
        assert {t.name: t.status for t in m.list_tasks()} == tasks
        reg = m.registry
        for artifact in reg.list_artifacts():  # no row points at nothing
            assert reg.store.exists(artifact.path), artifact
        report = m.accuracy("b", verify=True, workers=1)
        assert report.verified is True, report
        assert set(report.verified_tasks) == set(tasks)


# ------------------------------------------------------------------------ task add, recording
UNREACHABLE = r"artifact store s3://\S+ is unreachable"


@pytest.mark.parametrize("point", ["upload", "move"])
def test_store_goes_away_while_add_records(s3_home, store_back, data, capsys, caplog, point):
    home, url = s3_home
    name = f"n_{point}"
    tasks, artifacts, evaluations = snapshot(home)
    stored = objects(url)
    store_back.cut = cut_upload() if point == "upload" else cut_move()
    add = ("--home", str(home), "task", "add", name, "--base", "b",
           "--data", f"imagefolder:{data}", *FAST)
    code, _, err = run(capsys, *add)
    assert store_back.tripped.is_set(), err
    assert_one_error(code, err, UNREACHABLE + r": cannot write ", caplog)

    store_back.cut = None
    store_back.start()  # the store is back, on the same port, with the same objects
    assert snapshot(home) == (tasks, artifacts, evaluations)  # nothing recorded, no row left
    assert_whole(home, tasks)
    # What the failed write could not remove: the task's first file, stored whole before the
    # store went away (gc removes it now), and after a cut move the probe's temp object (gc
    # removes it once it is older than a live write's could be).
    with Manager(home) as m:
        left = {f.path: f.reason for f in m.find_garbage()}
        later = {f.path: f.reason for f in m.registry.find_garbage(
            now=time.time() + TEMP_GRACE_SECONDS)}
    assert list(left.values()) == ["unreferenced"]
    temps = {path for path, reason in later.items() if reason == "temp"}
    assert later == {**left, **{path: "temp" for path in temps}}
    assert len(temps) == (1 if point == "move" else 0)
    assert objects(url) == stored | set(left) | temps
    code, out, err = run(capsys, "--home", str(home), "gc", "--yes")
    assert code == 0 and out.splitlines()[-1].startswith("removed 1 file(s)"), err
    with Manager(home) as m:
        m.registry.remove_garbage(m.registry.find_garbage(now=time.time() + TEMP_GRACE_SECONDS),
                                  now=time.time() + TEMP_GRACE_SECONDS)
    assert objects(url) == stored

    code, _, err = run(capsys, *add)  # everything works again
    assert code == 0, err
    assert_whole(home, {**tasks, name: "ready"})


# --------------------------------------------------------------------- report accuracy --verify
@pytest.mark.parametrize("point", ["download", "request"])
def test_store_goes_away_while_verifying(s3_home, store_back, capsys, caplog, point):
    home, url = s3_home
    before = snapshot(home)
    stored = objects(url)
    store_back.cut = cut_download() if point == "download" else cut_request()
    code, _, err = run(capsys, "--home", str(home), "report", "accuracy", "--verify")
    assert store_back.tripped.is_set(), err
    assert_one_error(code, err, UNREACHABLE + r": cannot read ", caplog)

    store_back.cut = None
    store_back.start()
    assert snapshot(home) == before and objects(url) == stored  # nothing recorded or written
    assert_whole(home, before[0])
    code, out, err = run(capsys, "--home", str(home), "--json", "report", "accuracy", "--verify")
    assert code == 0 and json.loads(out)["verified"] is True, err
