"""`taps-cl serve` as a real process on 127.0.0.1: concurrent clients mixing tasks and bad input,
a task registered while it runs, and two servers on one registry."""

from __future__ import annotations

import base64
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import httpx
import pytest

from taps_cl.manager import Manager
from tests.test_serve_http import (
    FAST,
    Expected,
    b64,
    build_serving_registry,
    check_task_response,
    multi_request,
    sample_images,
    v2_request,
)

TASKS = ("stripes", "blobs", "lin", "rlin")
CLIENTS = 8
PER_CLIENT = 27  # 216 requests in all
MAX_BODY_MB = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m taps_cl serve` on a free loopback port; always killed on exit."""

    def __init__(self, home: Path, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TAPS_CL_HOME": str(home)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taps_cl", "serve", "--port", str(self.port), "--no-ui",
             "--poll-seconds", "0.5", "--batch-window-ms", "10",
             "--max-body-mb", str(MAX_BODY_MB), *extra],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited: {self.log()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"the server did not become ready: {self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self._log.close()


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return build_serving_registry(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def servers(registry, tmp_path_factory) -> Iterator[tuple[Server, Server]]:
    """Two servers on the one registry, started together."""
    home, _ = registry
    logs = tmp_path_factory.mktemp("logs")
    started: list[Server] = []
    try:
        for name in ("a", "b"):
            started.append(Server(home, logs / f"{name}.log"))
        for server in started:
            server.wait_ready()
        yield started[0], started[1]
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def expected(registry) -> Expected:
    return Expected(registry[0])


# ------------------------------------------------------------------ the load test
@dataclass
class Call:
    """One request of the load test and what it must get."""

    kind: str
    status: int
    path: str
    kwargs: dict[str, Any]
    task: Optional[str] = None
    images: list[Path] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)  # per image, for /v2/infer
    got: Optional[Any] = None
    seconds: float = 0.0


def plan_calls(paths: list[Path], n: int, seed: int = 0) -> list[Call]:
    """A seeded mix: single-task JSON and multipart, multi-task, and five kinds of bad input."""
    rng = random.Random(seed)
    oversize = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                            "data": ["A" * int(1.5 * MAX_BODY_MB * 2**20)]}]}
    calls = []
    for i in range(n):
        kind = rng.choices(["single", "multipart", "multi", "unknown", "garbage", "oversize",
                            "malformed", "content-type"],
                           weights=[30, 12, 18, 8, 8, 4, 5, 5])[0]
        task = rng.choice(TASKS)
        images = rng.sample(paths, rng.randint(1, 3))
        if kind == "single":
            calls.append(Call(kind, 200, f"/v2/models/{task}/infer",
                              {"json": v2_request(images)}, task, images))
        elif kind == "multipart":
            files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images]
            calls.append(Call(kind, 200, f"/v2/models/{task}/infer", {"files": files}, task,
                              images))
        elif kind == "multi":
            tasks = [",".join(rng.sample(TASKS, rng.randint(1, 4))) for _ in images]
            calls.append(Call(kind, 200, "/v2/infer", {"json": multi_request(images, tasks)},
                              images=images, tasks=tasks))
        elif kind == "unknown":
            calls.append(Call(kind, 404, f"/v2/models/nope{i}/infer",
                              {"json": v2_request(images)}))
        elif kind == "garbage":
            doc = v2_request(images)
            doc["inputs"][0]["data"][-1] = base64.b64encode(os.urandom(64)).decode()
            calls.append(Call(kind, 400, f"/v2/models/{task}/infer", {"json": doc}))
        elif kind == "oversize":
            calls.append(Call(kind, 413, f"/v2/models/{task}/infer", {"json": oversize}))
        elif kind == "malformed":
            calls.append(Call(kind, 400, "/v2/infer", {
                "content": b'{"inputs": [', "headers": {"content-type": "application/json"}}))
        else:
            calls.append(Call(kind, 415, f"/v2/models/{task}/infer", {
                "content": b64(images[0]), "headers": {"content-type": "text/plain"}}))
    return calls


def test_concurrent_clients_with_bad_input_lose_nothing(servers, registry, expected):
    server = servers[0]
    paths = sample_images(registry[1])
    calls = plan_calls(paths, CLIENTS * PER_CLIENT)
    for call in calls:  # the restored models' answers, before the clock starts
        for task in [call.task] if call.task else []:
            for p in call.images:
                expected.logits(task, p)
        for p, names in zip(call.images, call.tasks):
            for task in names.split(","):
                expected.logits(task, p)

    def client(mine: list[Call]) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for call in mine:
                start = time.perf_counter()
                try:
                    call.got = http.post(call.path, **call.kwargs)
                except httpx.HTTPError as exc:  # counted below as lost
                    call.got = exc
                call.seconds = time.perf_counter() - start

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(calls[i::CLIENTS],), daemon=True)
               for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(1.0, 300 - (time.perf_counter() - start)))
    wall = time.perf_counter() - start
    assert not any(t.is_alive() for t in threads), "clients still waiting after 300 s"

    lost = [c for c in calls if not isinstance(c.got, httpx.Response)]
    assert not lost, [(c.kind, c.got) for c in lost]
    for call in calls:
        r = call.got
        assert r.status_code == call.status, (call.kind, call.path, r.status_code, r.text)
        if call.status != 200:
            assert r.json()["error"] and "Traceback" not in r.text
        elif call.task is not None:
            check_task_response(r.json(), call.task, call.images, expected)
        else:
            results = r.json()["results"]
            assert len(results) == len(call.images)
            for p, names, result in zip(call.images, call.tasks, results):
                assert list(result["tasks"]) == names.split(",")
                for task, got in result["tasks"].items():
                    expected.check(task, p, got["logits"])
    good = [c for c in calls if c.status == 200]
    latencies = sorted(c.seconds for c in calls)
    images = sum(len(c.images) for c in good)
    print(f"\n{len(calls)} requests from {CLIENTS} clients in {wall:.1f} s: "
          f"p50 {1000 * latencies[len(latencies) // 2]:.0f} ms, "
          f"p95 {1000 * latencies[int(0.95 * (len(latencies) - 1))]:.0f} ms, "
          f"{images / wall:.1f} images/s ({len(good)} good requests, "
          f"{len(calls) - len(good)} refused)")
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200


def test_two_servers_on_one_registry_answer_alike(servers, registry):
    paths = sample_images(registry[1])
    body = multi_request(paths, [",".join(TASKS)])
    a, b = (httpx.post(f"{s.url}/v2/infer", json=body, timeout=60) for s in servers)
    assert a.status_code == b.status_code == 200
    assert a.json() == b.json()
    for s in servers:
        models = httpx.get(f"{s.url}/v2/models").json()["models"]
        assert [m["name"] for m in models][:4] == list(TASKS)


def test_a_task_registered_while_serving_is_served_without_restart(servers, registry):
    home, folders = registry
    with Manager(home) as m:
        m.add_task("added", "b", f"imagefolder:{folders['d4']}", method="adapter", **FAST)
    paths = sample_images(folders)
    fresh = Expected(home)
    for server in servers:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            names = [t["name"] for t in httpx.get(f"{server.url}/v2/models").json()["models"]]
            if "added" in names:
                break
            time.sleep(0.2)
        assert "added" in names, server.log()
        r = httpx.post(f"{server.url}/v2/models/added/infer", json=v2_request(paths),
                       timeout=60)
        assert r.status_code == 200, r.text
        check_task_response(r.json(), "added", paths, fresh)
        assert server.proc.poll() is None  # the same process all along
