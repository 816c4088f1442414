"""`taps-cl serve` in-process: the /v2 endpoints through FastAPI's TestClient on a real registry,
the dynamic batcher, image decoding, hot-added tasks, and a server that writes nothing."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from taps_cl.data.specs import load_image
from taps_cl.manager import Manager
from taps_cl.serving.app import AppConfig, create_app
from taps_cl.serving.batching import Batcher
from taps_cl.serving.images import Limits, RequestError, decode_base64, decode_image, decode_v2
from taps_cl.tasks.probes import PROBE_ATOL, PROBE_RTOL
from tests.conftest import PATTERNS, make_imagefolder
from tests.test_cli import assert_one_line_error, run

FAST = dict(epochs=1, batch_size=16, img_size=32, seed=0)
LIMITS = Limits(max_images=8)


# ------------------------------------------------------------------ registries
def build_serving_registry(root: Path) -> tuple[Path, dict[str, Path]]:
    """Two bases: `b` (test_efficientnet: a TAPS, an adapter and a linear task) and `r`
    (test_resnet: a linear task); returns the home and the two image folders."""
    d3 = make_imagefolder(root / "d3")
    d4 = make_imagefolder(root / "d4", PATTERNS, seed=1)
    home = root / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_efficientnet")
        m.add_task("stripes", "b", f"imagefolder:{d3}", method="taps", **FAST)
        m.add_task("blobs", "b", f"imagefolder:{d4}", method="adapter", **FAST)
        m.add_task("lin", "b", f"imagefolder:{d3}", method="linear", **FAST)
        m.add_base("r", "timm:test_resnet")
        m.add_task("rlin", "r", f"imagefolder:{d4}", method="linear", **FAST)
    return home, {"d3": d3, "d4": d4}


@pytest.fixture(scope="module")
def served_registry(tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    return build_serving_registry(tmp_path_factory.mktemp("serve"))


def sample_images(folders: dict[str, Path], n: int = 6) -> list[Path]:
    """Test images of both folders, and one JPEG (decoded by the server exactly as predict
    decodes the file)."""
    paths = sorted((folders["d3"] / "test").rglob("*.png"))[: n // 2]
    paths += sorted((folders["d4"] / "test").rglob("*.png"))[: n - n // 2 - 1]
    jpeg = folders["d3"].parent / "photo.jpg"
    if not jpeg.exists():
        Image.open(paths[0]).convert("RGB").resize((40, 28)).save(jpeg, quality=90)
    return paths + [jpeg]


class Expected:
    """What the restored models (the registry's own path) say about image files."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._models: dict[str, Any] = {}
        self._cache: dict[tuple[str, str], torch.Tensor] = {}
        self._tasks: dict[str, tuple[tuple[str, ...], dict[str, Any], Any]] = {}

    def _task(self, task: str) -> tuple[tuple[str, ...], dict[str, Any], Any]:
        """The task's classes, its base's data config and its image size; its restored model
        on the side (read once)."""
        if task not in self._tasks:
            with Manager(self.home) as m:
                t = m.get_task(task)
                self._models[task] = m.restore(task).eval()
                self._tasks[task] = (t.class_names, m.get_base(t.base).data_config,
                                     t.dataset_spec.get("img_size"))
        return self._tasks[task]

    def logits(self, task: str, path: Path) -> torch.Tensor:
        key = (task, str(path))
        if key not in self._cache:
            _, data_config, img_size = self._task(task)
            with torch.no_grad():
                self._cache[key] = self._models[task](load_image(path, data_config,
                                                                 img_size)[None])[0]
        return self._cache[key]

    def classes(self, task: str) -> tuple[str, ...]:
        return self._task(task)[0]

    def check(self, task: str, path: Path, logits: list[float]) -> None:
        """`logits` from the server equal the restored model's within the probe tolerance."""
        want = self.logits(task, path)
        got = torch.tensor(logits)
        assert got.shape == want.shape, (task, path)
        tol = PROBE_ATOL + PROBE_RTOL * float(want.abs().max())
        assert float((got - want).abs().max()) <= tol, (task, path, got, want)


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def v2_request(paths: list[Path], **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(paths)],
                        "data": [b64(p) for p in paths]}], **extra}


def multi_request(paths: list[Path], tasks: list[str], **extra: Any) -> dict[str, Any]:
    return {"inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [len(paths)],
         "data": [b64(p) for p in paths]},
        {"name": "tasks", "datatype": "BYTES", "shape": [len(tasks)], "data": tasks}], **extra}


def outputs(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {o["name"]: o for o in doc["outputs"]}


def check_task_response(doc: dict[str, Any], task: str, paths: list[Path], expected: Expected,
                        top_k: int = 3) -> None:
    """A V2 response: shapes as documented, logits equal the restored model's, and the top
    classes and probabilities are those of its own logits."""
    out = outputs(doc)
    assert doc["model_name"] == task
    n, c = out["logits"]["shape"]
    assert n == len(paths) and out["logits"]["datatype"] == "FP32"
    logits = torch.tensor(out["logits"]["data"]).reshape(n, c)
    k = min(top_k, c)
    assert out["probabilities"]["shape"] == [n, k] and out["classes"]["shape"] == [n, k]
    assert out["classes"]["datatype"] == "BYTES"
    classes = expected.classes(task)
    probs, index = torch.softmax(logits, 1).topk(k, 1)
    assert out["classes"]["data"] == [classes[i] for i in index.flatten().tolist()]
    assert torch.allclose(torch.tensor(out["probabilities"]["data"]), probs.flatten())
    for row, path in zip(logits, paths):
        expected.check(task, path, row.tolist())


def wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/v2/health/ready")
        if r.status_code == 200:
            return
        assert r.status_code == 503 and r.json()["ready"] is False
        time.sleep(0.05)
    raise AssertionError("the server did not become ready")


@pytest.fixture(scope="module")
def client(served_registry) -> Iterator[TestClient]:
    home, _ = served_registry
    app = create_app(AppConfig(home=str(home), ui=False, batch_window_ms=300, max_batch=16,
                               max_body_bytes=2**20, poll_seconds=0))
    with TestClient(app) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def expected(served_registry) -> Expected:
    return Expected(served_registry[0])


# ------------------------------------------------------------------ the batcher
def test_batcher_runs_requests_of_one_window_as_one_call():
    calls: list[tuple[list[Any], list[list[str]]]] = []

    def run(images, tasks):
        calls.append((list(images), [list(t) for t in tasks]))
        return [{t: (image, t) for t in names} for image, names in zip(images, tasks)]

    b = Batcher(run, window_s=0.3, max_batch=10)
    b.start()
    try:
        futures = [b.submit([f"img{i}a", f"img{i}b"], [["x"], ["x", "y"]]) for i in range(4)]
        results = [f.result(timeout=10) for f in futures]
        # A request bigger than what is left of max_batch waits for the next batch.
        big = [b.submit([f"m{i}"] * 6, [["z"]] * 6) for i in range(2)]
        [f.result(timeout=10) for f in big]
    finally:
        b.stop()
    assert len(calls[0][0]) == 8  # the four requests in one call
    for i, result in enumerate(results):
        assert result == [{"x": (f"img{i}a", "x")},
                          {"x": (f"img{i}b", "x"), "y": (f"img{i}b", "y")}]
    assert [len(c[0]) for c in calls[1:]] == [6, 6]  # 12 images do not fit max_batch 10
    assert b.stats.batches == 3 and b.stats.requests == 6 and b.stats.largest_requests == 4


def test_batcher_isolates_a_failing_request_and_keeps_running():
    threads: set[str] = set()

    def run(images, tasks):
        threads.add(threading.current_thread().name)
        if "bad" in images:
            raise ValueError("cannot run 'bad'")
        return [{names[0]: image.upper()} for image, names in zip(images, tasks)]

    b = Batcher(run, window_s=0.3, max_batch=64)
    b.start()
    try:
        good1 = b.submit(["a"], [["t"]])
        bad = b.submit(["b", "bad"], [["t"], ["t"]])
        good2 = b.submit(["c"], [["t"]])
        assert good1.result(timeout=10) == [{"t": "A"}]
        assert good2.result(timeout=10) == [{"t": "C"}]
        with pytest.raises(ValueError, match="bad"):
            bad.result(timeout=10)
        assert b.stats.retried == 1
        assert b.submit(["d"], [["t"]]).result(timeout=10) == [{"t": "D"}]
    finally:
        b.stop()
    assert threads == {"taps-cl-batcher"}


# --------------------------------------------------------------------- decoding
def _png(size: tuple[int, int] = (8, 8), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_decoding_accepts_png_and_jpeg_and_refuses_the_rest():
    assert decode_image(_png(), "x", LIMITS).size == (8, 8)
    buf = io.BytesIO()
    Image.new("RGB", (5, 7)).save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), "x", LIMITS).size == (5, 7)
    gif = io.BytesIO()
    Image.new("P", (4, 4)).save(gif, format="GIF")
    cases = [(b"garbage bytes", 400, "not a PNG or JPEG"),
             (gif.getvalue(), 400, "not a PNG or JPEG"),
             (_png()[:-30], 400, "cannot decode"),  # truncated: caught before any batch
             (_png((300, 300)), 413, "pixels")]
    for data, status, message in cases:
        with pytest.raises(RequestError, match=message) as info:
            decode_image(data, "x", Limits(max_images=8, max_pixels=200 * 200))
        assert info.value.status == status
    assert decode_base64("data:image/png;base64," + base64.b64encode(b"ab").decode(), "x") == b"ab"
    with pytest.raises(RequestError, match="base64"):
        decode_base64("not base64!", "x")


def test_v2_requests_are_checked_field_by_field():
    good = base64.b64encode(_png()).decode()
    ok = decode_v2({"inputs": [{"name": "i", "datatype": "BYTES", "shape": [2, 1],
                                "data": [[good], [good]]}], "parameters": {"top_k": 1},
                    "id": "r1", "outputs": [{"name": "classes"}]}, LIMITS, multi=False)
    assert len(ok.images) == 2 and ok.top_k == 1 and ok.id == "r1" and ok.outputs == ["classes"]
    multi = decode_v2({"inputs": [
        {"name": "images", "datatype": "BYTES", "shape": [2], "data": [good, good]},
        {"name": "tasks", "datatype": "BYTES", "shape": [1], "data": ["a, b,a"]}]},
        LIMITS, multi=True)
    assert multi.tasks == [["a", "b"], ["a", "b"]]
    image = {"name": "i", "datatype": "BYTES", "shape": [1], "data": [good]}
    bad = [
        ({}, "inputs"),
        ({"inputs": [{**image, "datatype": "FP32"}]}, "datatype FP32"),
        ({"inputs": [{**image, "shape": [2]}]}, "1 items for shape"),
        ({"inputs": [{**image, "shape": [1, 3]}]}, "shape"),
        ({"inputs": [{**image, "data": [3]}]}, "string"),
        ({"inputs": [image, {**image, "name": "j"}]}, "one input"),
        ({"inputs": [image], "parameters": {"top_k": 0}}, "top_k"),
        ({"inputs": [image], "outputs": [{"name": "embedding"}]}, "unknown output"),
    ]
    for doc, message in bad:
        with pytest.raises(RequestError, match=message) as info:
            decode_v2(doc, LIMITS, multi=False)
        assert info.value.status == 422
    with pytest.raises(RequestError, match="at most 8") as info:
        decode_v2({"inputs": [{**image, "shape": [9], "data": [good] * 9}]}, LIMITS, False)
    assert info.value.status == 413
    with pytest.raises(RequestError, match="2 entries for 3 images"):
        decode_v2({"inputs": [{**image, "name": "images", "shape": [3], "data": [good] * 3},
                              {**image, "name": "tasks", "shape": [2], "data": ["a", "b"]}]},
                  LIMITS, multi=True)


# --------------------------------------------------------------- the endpoints
def test_health_and_metadata(client, served_registry):
    home, _ = served_registry
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2").json()
    assert meta["name"] == "taps-cl" and meta["ready"] is True and meta["tasks"] == 4
    listed = client.get("/v2/models").json()["models"]
    assert [t["name"] for t in listed] == ["stripes", "blobs", "lin", "rlin"]
    with Manager(home) as m:
        for row in listed:
            task = m.get_task(row["name"])
            doc = client.get(f"/v2/models/{task.name}").json()
            assert doc["name"] == task.name and doc["platform"] == "pytorch"
            assert doc["base"] == task.base and doc["method"] == task.method
            assert doc["classes"] == list(task.class_names)
            assert doc["sha256"] == task.artifact.sha256 == row["sha256"]
            assert doc["input_size"] == [3, 32, 32]
            assert doc["inputs"] == [{"name": "images", "datatype": "BYTES", "shape": [-1]}]
            assert {o["name"]: o["shape"] for o in doc["outputs"]} == {
                "logits": [-1, task.num_classes], "probabilities": [-1, -1],
                "classes": [-1, -1]}
            assert client.get(f"/v2/models/{task.name}/ready").json() == {
                "name": task.name, "ready": True}
    for path in ("/v2/models/nope", "/v2/models/nope/ready"):
        r = client.get(path)
        assert r.status_code == 404 and "'nope' is not served" in r.json()["error"]


def test_single_task_inference_equals_the_restored_model(client, served_registry, expected):
    paths = sample_images(served_registry[1])
    for task in ("stripes", "blobs", "lin", "rlin"):
        r = client.post(f"/v2/models/{task}/infer", json=v2_request(paths))
        assert r.status_code == 200, r.text
        check_task_response(r.json(), task, paths, expected)
    # top_k, requested outputs and the id echoed; the same answer as `taps-cl predict`.
    r = client.post("/v2/models/blobs/infer",
                    json=v2_request(paths[:2], id="abc", parameters={"top_k": 2},
                                    outputs=[{"name": "classes"}, {"name": "probabilities"}]))
    doc = r.json()
    assert doc["id"] == "abc" and [o["name"] for o in doc["outputs"]] == [
        "classes", "probabilities"]
    with Manager(served_registry[0]) as m:
        predicted = m.predict("blobs", [str(p) for p in paths[:2]], top_k=2, device="cpu")
    out = outputs(doc)
    for i, pred in enumerate(predicted):
        assert out["classes"]["data"][2 * i:2 * i + 2] == [k for k, _ in pred]
        assert out["probabilities"]["data"][2 * i:2 * i + 2] == pytest.approx(
            [p for _, p in pred], abs=1e-5)


def test_multipart_uploads(client, served_registry, expected):
    paths = sample_images(served_registry[1])[:3]
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in paths]
    r = client.post("/v2/models/stripes/infer", files=files, data={"top_k": "1"})
    assert r.status_code == 200, r.text
    check_task_response(r.json(), "stripes", paths, expected, top_k=1)
    r = client.post("/v2/infer", files=files, data={"tasks": ["lin,rlin", "stripes", "blobs"]})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [sorted(x["tasks"]) for x in results] == [["lin", "rlin"], ["stripes"], ["blobs"]]
    for path, result in zip(paths, results):
        for task, got in result["tasks"].items():
            expected.check(task, path, got["logits"])


def test_multi_task_inference_across_bases(client, served_registry, expected):
    paths = sample_images(served_registry[1])
    tasks = ["stripes,blobs,rlin", "lin", "rlin", "blobs,stripes", "lin,stripes,rlin,blobs",
             "stripes"]
    r = client.post("/v2/infer", json=multi_request(paths, tasks, id="m1",
                                                    parameters={"top_k": 2}))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["id"] == "m1" and len(doc["results"]) == len(paths)
    with Manager(served_registry[0]) as m:
        classes = {t: m.get_task(t).class_names for t in ("stripes", "blobs", "lin", "rlin")}
    for path, names, result in zip(paths, tasks, doc["results"]):
        assert list(result["tasks"]) == names.split(",")  # in the order asked
        for task, got in result["tasks"].items():
            expected.check(task, path, got["logits"])
            probs = torch.softmax(torch.tensor(got["logits"]), 0)
            top = probs.topk(2)
            assert [t["class"] for t in got["top"]] == [classes[task][i] for i in top.indices]
            assert [t["probability"] for t in got["top"]] == pytest.approx(
                top.values.tolist(), abs=1e-6)
    # One task list for every image.
    r = client.post("/v2/infer", json=multi_request(paths[:2], ["rlin,lin"]))
    assert [list(x["tasks"]) for x in r.json()["results"]] == [["rlin", "lin"]] * 2


def test_bad_input_gets_a_json_4xx_and_the_server_keeps_serving(client, served_registry):
    paths = sample_images(served_registry[1])[:1]
    good = v2_request(paths)
    huge = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1],
                        "data": ["A" * (2 * 2**20)]}]}
    garbage = v2_request(paths)
    garbage["inputs"][0]["data"] = [base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()]
    cases = [
        ("post", "/v2/models/nope/infer", {"json": good}, 404, "not served"),
        ("post", "/v2/infer", {"json": multi_request(paths, ["stripes,nope"])}, 404, "nope"),
        ("post", "/v2/models/stripes/infer", {"content": b"{not json",
                                               "headers": {"content-type": "application/json"}},
         400, "malformed JSON"),
        ("post", "/v2/models/stripes/infer", {"content": b"[1, 2]",
                                               "headers": {"content-type": "application/json"}},
         422, "JSON object"),
        ("post", "/v2/models/stripes/infer", {"content": paths[0].read_bytes(),
                                               "headers": {"content-type": "image/png"}},
         415, "unsupported content type"),
        ("post", "/v2/models/stripes/infer", {"json": garbage}, 400, "cannot decode image 0"),
        ("post", "/v2/models/stripes/infer",
         {"json": {"inputs": [{**good["inputs"][0], "datatype": "FP32"}]}}, 422, "FP32"),
        ("post", "/v2/models/stripes/infer", {"json": huge}, 413, "over 1,048,576 bytes"),
        ("post", "/v2/models/stripes/infer",
         {"files": [("image", ("x.png", b"garbage", "image/png"))]}, 400, "not a PNG or JPEG"),
        ("post", "/v2/infer", {"files": [("image", ("x.png", paths[0].read_bytes()))]}, 422,
         "'tasks' field"),
        ("post", "/v2/models/stripes/infer",
         {"content": b"--x\r\nbroken", "headers": {
             "content-type": "multipart/form-data; boundary=x"}}, 422, "no image file"),
        ("get", "/v2/nothing/here", {}, 404, "Not Found"),
        ("get", "/v2/models/stripes/infer", {}, 405, "Method Not Allowed"),
    ]
    for method, path, kwargs, status, message in cases:
        r = getattr(client, method)(path, **kwargs)
        assert r.status_code == status, (path, kwargs.keys(), r.status_code, r.text)
        assert message in r.json()["error"], r.text
        assert "Traceback" not in r.text
        # ... and the next good request is answered.
        assert client.post("/v2/models/stripes/infer", json=good).status_code == 200


def test_concurrent_requests_share_batches(client, served_registry, expected):
    """Requests that arrive within the window run as one mixed call; each gets its own
    answer."""
    paths = sample_images(served_registry[1])
    stats = client.app.state.taps.extra["inference"].batcher.stats
    before = (stats.batches, stats.requests)
    jobs = [("stripes", paths[:2]), ("rlin", paths[2:3]), ("blobs", paths[3:6]),
            ("lin", paths[1:2]), ("stripes", paths[4:5]), ("rlin", paths[:4])]
    answers: dict[int, Any] = {}

    def send(i: int) -> None:
        task, ps = jobs[i]
        answers[i] = client.post(f"/v2/models/{task}/infer", json=v2_request(ps))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(answers) == list(range(len(jobs)))
    for i, (task, ps) in enumerate(jobs):
        assert answers[i].status_code == 200, answers[i].text
        check_task_response(answers[i].json(), task, ps, expected)
    batches, requests = stats.batches - before[0], stats.requests - before[1]
    assert requests == len(jobs) and batches < requests and stats.largest_requests > 1


# ------------------------------------------------------------------- registries
def _snapshot(home: Path) -> dict[str, str]:
    """Every file of a home with its content hash (SQLite's -wal/-shm aside: a reader's)."""
    return {str(p.relative_to(home)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(home.rglob("*"))
            if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


def test_new_tasks_are_served_without_restart_and_nothing_is_written(
        served_registry, tmp_path, expected):
    home = tmp_path / "home"
    shutil.copytree(served_registry[0], home)
    folders = served_registry[1]
    before = _snapshot(home)
    app = create_app(AppConfig(home=str(home), ui=False, base="b", poll_seconds=0.2))
    with TestClient(app) as c:
        wait_ready(c)
        engine = app.state.taps.extra["inference"]
        polls = engine.watcher.polls
        deadline = time.monotonic() + 30
        while engine.watcher.polls < polls + 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.watcher.polls >= polls + 3
        # Only base b is served; polling wrote nothing.
        assert [t["name"] for t in c.get("/v2/models").json()["models"]] == [
            "stripes", "blobs", "lin"]
        assert c.get("/v2/models/rlin").status_code == 404
        assert _snapshot(home) == before
        with Manager(home) as m:  # another process's `task add`, as far as the server knows
            m.add_task("late", "b", f"imagefolder:{folders['d4']}", method="taps", **FAST)
            m.add_task("late-r", "r", f"imagefolder:{folders['d3']}", method="linear", **FAST)
        deadline = time.monotonic() + 60
        while "late" not in engine.served.tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        names = [t["name"] for t in c.get("/v2/models").json()["models"]]
        assert names == ["stripes", "blobs", "lin", "late"]  # not late-r: another base
        paths = sample_images(folders)
        r = c.post("/v2/infer", json=multi_request(paths, ["late,stripes"]))
        assert r.status_code == 200, r.text
        fresh = Expected(home)
        for path, result in zip(paths, r.json()["results"]):
            fresh.check("late", path, result["tasks"]["late"]["logits"])
            expected.check("stripes", path, result["tasks"]["stripes"]["logits"])


def test_a_task_whose_files_fail_is_not_served(served_registry, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(served_registry[0], home)
    with Manager(home) as m:
        victim = m.registry.store.path_of(m.get_task("blobs").artifact.path)
    victim.chmod(0o644)
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    app = create_app(AppConfig(home=str(home), ui=False, base="b", poll_seconds=0))
    with TestClient(app) as c:
        wait_ready(c)
        assert [t["name"] for t in c.get("/v2/models").json()["models"]] == ["stripes", "lin"]
        r = c.get("/v2/models/blobs")
        assert r.status_code == 404 and "'blobs' is not served:" in r.json()["error"]
        assert "blobs" in c.get("/v2").json()["unavailable"]


def test_named_tasks_only(served_registry):
    app = create_app(AppConfig(home=str(served_registry[0]), ui=False,
                               tasks=("rlin", "stripes"), poll_seconds=0))
    with TestClient(app) as c:
        wait_ready(c)
        assert sorted(t["name"] for t in c.get("/v2/models").json()["models"]) == [
            "rlin", "stripes"]


def test_pages_and_inference_in_one_app(served_registry):
    """`taps-cl serve` mounts the pages too: both answer, /v2 errors stay JSON, and handlers
    installed with FastAPI's `on_event` still run at start and stop."""
    app = create_app(AppConfig(home=str(served_registry[0]), poll_seconds=0))
    events: list[str] = []
    app.router.add_event_handler("startup", lambda: events.append("start"))
    app.router.add_event_handler("shutdown", lambda: events.append("stop"))
    with TestClient(app) as c:
        assert events == ["start"]
        wait_ready(c)
        page = c.get("/", headers={"accept": "text/html"})
        assert page.status_code == 200, page.text
        assert ">b</a>" in page.text and ">r</a>" in page.text  # the two bases, linked
        r = c.get("/v2/nothing", headers={"accept": "text/html"})
        assert r.status_code == 404 and r.json() == {"error": "Not Found"}
        assert c.get("/v2/models/lin").json()["name"] == "lin"
    assert events == ["start", "stop"]


# --------------------------------------------------------------------- the CLI
def test_serve_refuses_what_it_could_never_serve(capsys, served_registry, tmp_path):
    home = str(served_registry[0])
    code, _, err = run(capsys, "--home", home, "serve", "--task", "stripes,nope")
    assert code == 1
    assert_one_line_error(err, "nope")
    code, _, err = run(capsys, "--home", home, "serve", "--base", "b", "--task", "rlin")
    assert code == 1
    assert_one_line_error(err, "belongs to base 'r'")
    code, _, err = run(capsys, "--home", home, "serve", "--poll-seconds", "nan")
    assert code == 1
    assert_one_line_error(err, "--poll-seconds must be a finite number")
    code, _, err = run(capsys, "--home", str(tmp_path / "none"), "serve")
    assert code == 1
    assert_one_line_error(err, "no registry")
    assert not (tmp_path / "none").exists()


def test_serve_without_fastapi_names_the_extra(served_registry):
    code = ("import sys; sys.modules['fastapi'] = None; from taps_cl.cli.app import main; "
            f"main(['--home', {str(served_registry[0])!r}, 'serve', '--port', '1'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1
    assert_one_line_error(proc.stderr, r"FastAPI.*taps-cl\[serve\]")


def test_serve_plan_prints_the_segment_plan(capsys, served_registry):
    home = str(served_registry[0])
    code, out, err = run(capsys, "--home", home, "--json", "serve", "--base", "b", "--plan")
    assert code == 0, err
    plan = json.loads(out)
    text = json.dumps(plan)
    for name in ("stripes", "blobs", "lin"):
        assert name in text
    code, out, err = run(capsys, "--home", home, "serve", "--base", "b", "--plan")
    assert code == 0 and "stripes" in out, err
