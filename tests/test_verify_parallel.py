"""Verification at scale: the base read once, tasks checked in worker processes, named tasks only.

One module-scoped registry of three tasks; tests that tamper with it work on a copy.
"""

from __future__ import annotations

import atexit
import json
import shutil

import pytest
import torch

from registry import NotFound
from taps_cl.errors import TapsError
from taps_cl.manager import Manager
from taps_cl.tasks import verify_pool
from taps_cl.tasks.probes import PROBE_ATOL
from tests import pool_jobs
from tests.test_cli import assert_one_line_error, run

FAST = dict(epochs=1, batch_size=16, img_size=32, seed=0)
NAMES = ["t1", "t2", "t3"]


@pytest.fixture(scope="module")
def clean_home(tmp_path_factory, image_data):
    home = tmp_path_factory.mktemp("verify") / "home"
    spec = f"imagefolder:{image_data}"
    with Manager(home) as m:
        m.add_base("b", "timm:test_resnet")
        m.add_task("t1", "b", spec, method="linear", **FAST)
        m.add_task("t2", "b", spec, method="taps", **FAST)
        m.add_task("t3", "b", spec, method="linear", classes="checker,vstripes", **FAST)
    return home


@pytest.fixture
def home(clean_home, tmp_path):
    """A copy of the registry to tamper with."""
    return shutil.copytree(clean_home, tmp_path / "home")


def count_base_reads(m: Manager, monkeypatch) -> list[str]:
    """Every read of the base's weights file through the store, from now on (this process)."""
    base_sha = m.get_base("b").sha256
    store = m.registry.store
    reads: list[str] = []
    original = store.read

    def read(path, sha256, *args, **kwargs):
        if sha256 == base_sha:
            reads.append(sha256)
        return original(path, sha256, *args, **kwargs)

    monkeypatch.setattr(store, "read", read)
    return reads


def flip_byte(m: Manager, task: str) -> None:
    path = m.registry.store.path_of(m.get_task(task).artifact.path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


def test_parallel_and_serial_give_the_same_checks_reading_the_base_once(
        clean_home, monkeypatch, capsys):
    with Manager(clean_home) as m:
        reads = count_base_reads(m, monkeypatch)
        serial = m.verify(workers=1, progress=True)
        assert len(reads) == 1  # hashed by the base check, then trusted for every task
        assert "verify" in capsys.readouterr().err  # the progress bar, on stderr
        parallel = m.verify(workers=2)
        assert len(reads) == 2  # the parent read it once more; the workers never do
    assert [c.task for c in serial] == NAMES == [c.task for c in parallel]
    assert all(c.ok and c.error is None for c in serial + parallel), serial + parallel
    for s, p in zip(serial, parallel, strict=True):
        # Workers run fewer torch threads: the same logits up to summation order.
        assert p.max_drift == pytest.approx(s.max_drift, abs=PROBE_ATOL)


def test_workers_trust_the_parents_base_state(clean_home, tmp_path, monkeypatch):
    """A worker checks tasks from the shared state alone: its base file is never opened."""
    home = shutil.copytree(clean_home, tmp_path / "home")
    with Manager(home) as m:
        base = m.get_base("b")
        state = m.models.base_state(base)
        task = m.get_task("t2")
        evaluations = m.registry.list_evaluations("b")
        m.registry.store.path_of(base.weights.path).unlink()  # a re-read would now fail
        monkeypatch.setattr(verify_pool, "_WORKER", {})
        packed = verify_pool.pack_state(state)
        unpacked = verify_pool.unpack_state(packed)
        assert list(unpacked) == list(state)
        assert all(torch.equal(unpacked[k], v) and unpacked[k].dtype == v.dtype
                   for k, v in state.items())
        hooks = atexit._ncallbacks()
        verify_pool._start_worker(str(m.registry.home), m.registry.url, [(base, packed)],
                                  torch.get_num_threads())
        # Its quick exit is for worker processes only: here it would turn pytest's status to 0.
        assert atexit._ncallbacks() == hooks
        check = verify_pool._check(task, base, evaluations)
        assert check.ok, check
        # Whereas without the trusted state the missing base file is found.
        assert not m.verify(workers=1)[0].ok


def test_tampered_task_fails_in_parallel_and_the_others_pass(home, capsys):
    """`--workers 2 --json`: the changed task fails with its one-line reason, the others pass."""
    with Manager(home) as m:
        flip_byte(m, "t2")
    code, out, err = run(capsys, "--home", str(home), "--json", "report", "accuracy", "--verify",
                         "--workers", "2")
    assert code == 1
    assert_one_line_error(err, r"verification failed for t2: .*sha256")
    rep = json.loads(out)
    assert rep["verified"] is False and rep["verified_tasks"] == NAMES
    assert [f["task"] for f in rep["verify_failures"]] == ["t2"]
    assert "\n" not in rep["verify_failures"][0]["error"]
    assert rep["verify_tasks_per_s"] > 0 and rep["verify_seconds"] > 0


def test_named_tasks_limit_the_check(home):
    with Manager(home) as m:
        assert [c.task for c in m.verify(tasks=["t3", "t1"], workers=1)] == ["t1", "t3"]
        with pytest.raises(NotFound):
            m.verify(tasks=["t1", "nope"])
        flip_byte(m, "t2")
        others = m.accuracy(verify=True, tasks=["t1", "t3"], workers=1)
        assert others.verified is True and others.verified_tasks == ("t1", "t3")
        assert others.verify_seconds > 0 and others.verify_tasks_per_s > 0
        victim = m.accuracy(verify=True, tasks=["t2"], workers=1)
        assert victim.verified is False and victim.verified_tasks == ("t2",)
        assert [c.task for c in victim.verify_failures] == ["t2"]
        with pytest.raises(TapsError, match="verify"):
            m.accuracy(tasks=["t1"])
        plain = m.accuracy()
        assert plain.verify_seconds is None and plain.to_json()["verify_tasks_per_s"] is None


def test_cli_task_option(clean_home, capsys):
    home = str(clean_home)
    code, out, err = run(capsys, "--home", home, "--json", "report", "accuracy", "--verify",
                         "--task", "t3", "--workers", "1")
    assert code == 0, err
    rep = json.loads(out)
    assert rep["verified"] is True and rep["verified_tasks"] == ["t3"]
    code, out, err = run(capsys, "--home", home, "report", "accuracy", "--verify", "--task", "t2",
                         "--task", "t3", "--workers", "1")
    assert code == 0, err
    assert "verify: 2 tasks checked in " in out and " tasks/s)" in out
    code, _, err = run(capsys, "--home", home, "report", "accuracy", "--task", "t1")
    assert code == 2
    assert [line for line in err.splitlines() if line.startswith("Error: ")] == [
        "Error: --task limits verification: give --verify too"]
    code, _, err = run(capsys, "--home", home, "report", "accuracy", "--verify", "--task", "nope")
    assert code == 1
    assert_one_line_error(err, "nope")
    code, _, err = run(capsys, "--home", home, "report", "accuracy", "--verify", "--workers", "0")
    assert code == 2


def test_a_dying_worker_fails_only_its_own_job():
    jobs = [("a",), ("boom",), ("c",), ("raise",), ("e",)]
    done = []
    results = verify_pool.run_pool(jobs, pool_jobs.job, workers=2, failed=pool_jobs.failed,
                                   on_done=lambda: done.append(1))
    assert results == [
        "ok a",
        f"failed boom: {verify_pool.DIED}",
        "ok c",
        "failed raise: unexpected ValueError: cannot check raise",
        "ok e",
    ]
    assert len(done) == len(jobs)  # the progress callback, once per job
