"""Training one task with several processes: torchrun, DistributedDataParallel, rank 0 records.

Each test that starts torchrun runs two gloo processes of one thread each on a timm test model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from taps_cl.manager import Manager
from taps_cl.training import distributed
from tests.conftest import make_imagefolder
from tests.test_cli import run

ENTRY = Path(__file__).with_name("distributed_entry.py")
INJECTED = "injected failure on rank 1"


@pytest.fixture
def children(monkeypatch):
    # Two processes on two cores: one thread each, and no torchrun variables of our own.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", distributed.INIT_METHOD_ENV):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def registry(tmp_path, capsys, children):
    """A home with base `b` (timm test_resnet) and a small 3-class image folder."""
    home = tmp_path / "home"
    data = make_imagefolder(tmp_path / "data", n_train=12, n_test=6)
    code, _, err = run(capsys, "--home", str(home), "base", "add", "b",
                       "--model", "timm:test_resnet")
    assert code == 0, err
    return home, data


def _add_args(home: Path, data: Path, name: str) -> list[str]:
    return ["--home", str(home), "task", "add", name, "--base", "b",
            "--data", f"imagefolder:{data}", "--img-size", "32", "--epochs", "1",
            "--batch-size", "8", "--device", "cpu"]


def test_distributed_task_add_nproc_2_lands_one_verified_task(registry, capsys, tmp_path):
    home, data = registry
    code, out, err = run(capsys, "--json", *_add_args(home, data, "t"), "--nproc", "2")
    assert code == 0, err
    added = json.loads(out)  # rank 0's document, and nothing else on stdout
    assert added["name"] == "t" and added["status"] == "ready" and added["position"] == 1

    code, out, _ = run(capsys, "--home", str(home), "--json", "task", "list")
    (row,) = json.loads(out)
    assert row["name"] == "t" and row["status"] == "ready"
    code, out, _ = run(capsys, "--home", str(home), "--json", "task", "show", "t")
    shown = json.loads(out)
    # The default method (adapters: forward hooks on the blocks) under DistributedDataParallel.
    assert shown["train_config"]["processes"] == 2 and shown["method"] == "adapter"

    restored = tmp_path / "t.safetensors"
    code, _, err = run(capsys, "--home", str(home), "restore", "t", "--out", str(restored))
    assert code == 0, err
    import taps_cl

    with Manager(home) as m:
        model = m.restore("t")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(taps_cl.load_file(restored).eval()(x), model.eval()(x),
                                   atol=0, rtol=0)

    code, out, err = run(capsys, "--home", str(home), "report", "accuracy", "--verify")
    assert code == 0, out + err
    assert "verified: interference-free" in out


@pytest.mark.parametrize("mode", ["fail-before", "fail-after"])
def test_distributed_failure_on_rank_1_leaves_no_task(registry, mode):
    """Rank 1 alone fails, as its training starts or once it is done (rank 0 then waits for
    every rank's agreement): no task row and no training row remain, and each rank said why
    in one line."""
    home, data = registry
    launched = distributed.launch(2, [str(ENTRY), mode, *_add_args(home, data, "bad")])
    assert launched.returncode != 0
    assert launched.error == f"rank 1 of 2: {INJECTED}", launched
    assert launched.stdout == ""
    assert launched.rank_stderr[1].splitlines() == [f"Error: {INJECTED}"]
    # Rank 0 stops on its broken collective or on torchrun's SIGTERM, whichever comes first,
    # and says so in one line after the warning that it removed its row.
    # (click starts its "Aborted." with a newline of its own on a Ctrl-C/SIGTERM abort.)
    said = [line for line in launched.rank_stderr[0].splitlines()
            if line.strip()
            and not line.startswith("WARNING taps_cl.tasks.adding: task bad did not finish")]
    assert len(said) == 1 and (said[0] == "Aborted." or said[0].startswith(
        f"Error: {distributed.PEER_FAILED}")), launched.rank_stderr[0]
    with Manager(home) as manager:
        assert manager.list_tasks() == []  # neither ready nor left in training


def test_distributed_ranks_shard_the_data_and_end_identical(tmp_path, children):
    """Each epoch the two ranks read disjoint halves of the training set in a new order, agree
    on every reduced number and end with the same parameters and buffers."""
    launched = distributed.launch(2, [str(ENTRY), "fit", str(tmp_path)])
    assert launched.returncode == 0, launched
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    per_epoch = 12  # 24 samples over 2 ranks
    orders = []
    for epoch in range(2):
        shards = [r["read"][epoch * per_epoch:(epoch + 1) * per_epoch] for r in ranks]
        assert set(shards[0]).isdisjoint(shards[1])
        assert sorted(shards[0] + shards[1]) == list(range(24))
        orders.append(shards[0])
    assert orders[0] != orders[1]  # set_epoch: a new shuffle each epoch
    for row0, row1 in zip(*(r["history"] for r in ranks)):
        row0.pop("seconds"), row1.pop("seconds")
        assert row0 == row1
    assert ranks[0]["best_epoch"] == ranks[1]["best_epoch"]
    states = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    assert states[0].keys() == states[1].keys()
    differ = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
    assert not differ
    # the run trained something: TAPS deltas moved away from zero
    assert any(k.endswith("delta") and states[0][k].abs().sum() > 0 for k in states[0])


@pytest.mark.parametrize("extra, pattern", [
    (["--device", "cuda", "--nproc", "2"], r"needs 2 GPUs"),
    (["--device", "cuda:1", "--nproc", "2"], r"its own GPU.*--device cuda"),
    (["--device", "mps", "--nproc", "2"], r"not on mps"),
    (["--batch-size", "7", "--nproc", "2"], r"--batch-size 7 does not split evenly"),
])
def test_distributed_nproc_refuses_bad_combinations(registry, capsys, extra, pattern,
                                                      monkeypatch):
    home, data = registry
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    code, out, err = run(capsys, *_add_args(home, data, "t"), *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("Error: ") and re.search(pattern, lines[0]), err
    with Manager(home) as manager:
        assert manager.list_tasks() == []


def test_distributed_nproc_under_torchrun_is_refused(registry, capsys, monkeypatch):
    home, data = registry
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = run(capsys, *_add_args(home, data, "t"), "--nproc", "2")
    assert code == 1 and err.startswith("Error: --nproc starts torchrun itself"), err
    assert len(err.strip().splitlines()) == 1


def test_distributed_launch_passes_on_the_command_without_nproc():
    args = ["--home", "h", "task", "add", "t", "--nproc", "2", "--lr", "0.1", "--nproc=3"]
    assert distributed.without_option(args, "--nproc") == [
        "--home", "h", "task", "add", "t", "--lr", "0.1"]
    argv, env = distributed.torchrun_command(2, ["-m", "taps_cl"], Path("/tmp/x"))
    assert "--standalone" not in argv  # its TCP store would listen on every interface
    assert argv[argv.index("--local-addr") + 1] == "127.0.0.1"
    assert env[distributed.INIT_METHOD_ENV] == "file:///tmp/x/group"
    assert argv[-2:] == ["-m", "taps_cl"]
