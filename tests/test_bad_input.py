"""Bad input through the command line: one `Error:` line, exit 1 (usage: 2), no traceback, and
nothing written.

To add a case, build the bad input in a test and call `assert_refused(home, *args)`; it runs the
CLI in this process (`run_cli`), checks the error contract (`assert_one_error`) and compares every
file under the home and every database row before and after (`snapshot`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import sqlite3
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from taps_cl.cli import app as cli_module
from taps_cl.cli.app import main
from taps_cl.models.backbones import create_model

DB_FILE = "registry.db"
MODEL = "timm:test_resnet"


@dataclass(frozen=True)
class Result:
    """What one CLI run left behind."""

    code: int  # exit status
    out: str  # stdout
    err: str  # stderr, log records included


def run_cli(home: str | Path, *args: str) -> Result:
    """Run `taps-cl --home HOME ARGS…` in this process; returns exit code, stdout and stderr.

    Warnings logged by the library go to the captured stderr, as `logging.basicConfig` in the
    CLI sends them to the terminal; under pytest basicConfig does nothing (pytest's handlers are
    installed), so without this a stray warning line would go unnoticed.
    """
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            try:
                main(["--home", str(home), *args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        root.removeHandler(handler)
    return Result(code, out.getvalue(), err.getvalue())


def assert_one_error(result: Result, pattern: str | None = None) -> str:
    """Check the error contract and return the `Error:` line.

    Exit 1: stderr is exactly one line starting `Error: `. Exit 2 (bad usage): click's `Usage:`
    and `Try …` lines plus exactly one `Error:` line. Never a traceback. `pattern` (a regex) must
    occur in the `Error:` line.
    """
    assert "Traceback" not in result.err + result.out, result.err
    lines = [line for line in result.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error: ")]
    if result.code == 1:
        assert len(lines) == 1 and len(errors) == 1, result.err
    elif result.code == 2:
        assert len(errors) == 1, result.err
        others = [line for line in lines if line not in errors]
        assert all(line.startswith(("Usage:", "Try ")) for line in others), result.err
    else:
        raise AssertionError(f"exit {result.code}, expected 1 or 2: {result.err or result.out}")
    if pattern is not None:
        assert re.search(pattern, errors[0]), f"{pattern!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(home: str | Path) -> dict[str, Any]:
    """Everything a command could have written: each file under `home` (by content) and every
    row of its database (an SQL dump; None when there is no database file)."""
    home = Path(home)
    files: dict[str, str] = {}
    if home.exists():
        for path in sorted(home.rglob("*")):
            # The database is compared by its rows: its file bytes (and WAL) vary with reads.
            if path.is_file() and not path.name.startswith(DB_FILE):
                files[str(path.relative_to(home))] = hashlib.sha256(path.read_bytes()).hexdigest()
    db = home / DB_FILE
    rows = None
    if db.exists():
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            rows = list(conn.iterdump())
        finally:
            conn.close()
    return {"files": files, "db": rows, "db_exists": db.exists()}


def assert_refused(home: str | Path, *args: str, pattern: str | None = None) -> Result:
    """Run the CLI on bad input: one error line, nothing on stdout, the home exactly as before."""
    before = snapshot(home)
    result = run_cli(home, *args)
    assert_one_error(result, pattern)
    assert result.out == "", result.out
    assert snapshot(home) == before, "the failed command changed the registry"
    return result


def task_names(home: str | Path) -> list[str]:
    result = run_cli(home, "--json", "task", "list")
    assert result.code == 0, result.err
    return [t["name"] for t in json.loads(result.out)]


def base_names(home: str | Path) -> list[str]:
    result = run_cli(home, "--json", "base", "list")
    assert result.code == 0, result.err
    return [b["name"] for b in json.loads(result.out)]


@pytest.fixture(scope="module")
def base_home_template(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("bad-input") / "home"
    result = run_cli(home, "base", "add", "b", "--model", MODEL)
    assert result.code == 0, result.err
    return home


@pytest.fixture
def home(base_home_template, tmp_path) -> Path:
    """A fresh copy of a home holding one base `b` (timm:test_resnet) and no task."""
    copy = tmp_path / "home"
    shutil.copytree(base_home_template, copy)
    return copy


# ------------------------------------------------------------------------ non-finite numbers


@pytest.mark.parametrize(
    ("option", "value", "pattern"),
    [
        ("--lr", "inf", r"lr must be a finite number"),
        ("--lr", "nan", r"lr must be a finite number"),
        ("--lr", "1e400", r"lr must be a finite number"),  # overflows to inf when parsed
        ("--score-lr", "inf", r"score_lr must be a finite number"),
        ("--weight-decay", "inf", r"weight_decay must be a finite number"),
        ("--lam", "inf", r"lam must be a finite number"),
        ("--lam", "nan", r"lam must be a finite number"),
        ("--tau", "nan", r"tau must be a finite number"),
        ("--tau", "inf", r"tau must be a finite number"),
        ("--val-fraction", "nan", r"val_fraction"),
    ],
)
def test_non_finite_numbers_are_refused_before_anything_is_recorded(home, option, value, pattern):
    assert_refused(home, "task", "add", "t", "--base", "b", "--data", "digits", "--epochs", "1",
                   "--method", "taps", option, value, pattern=pattern)
    assert task_names(home) == []


# ------------------------------------------------------------------------ non-finite weights


def weights_with(tmp_path: Path, bad: float, suffix: str) -> tuple[Path, str]:
    """A test_resnet weights file with one `bad` value in one tensor; returns (path, that key)."""
    torch.manual_seed(0)
    state = {k: v.clone().contiguous() for k, v in create_model(MODEL).state_dict().items()}
    key = "layer2.0.conv2.weight"
    state[key].view(-1)[7] = bad
    path = tmp_path / f"bad{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    return path, key


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_with_nan_or_inf_are_not_a_base(home, tmp_path, bad, suffix):
    path, key = weights_with(tmp_path, bad, suffix)
    assert_refused(home, "base", "add", "x", "--model", MODEL, "--weights", str(path),
                   pattern=rf"'{re.escape(key)}' holds non-finite values")
    assert base_names(home) == ["b"]


def test_pretrained_weights_with_nan_are_not_a_base(home, tmp_path, monkeypatch):
    # timm's pretrained weights of test_resnet, already in an (offline) Hugging Face cache.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0" * 40
    repo = tmp_path / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    state = {k: v.clone().contiguous() for k, v in create_model(MODEL).state_dict().items()}
    state["bn1.running_var"][0] = float("nan")
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))

    assert_refused(home, "base", "add", "x", "--model", MODEL, "--pretrained",
                   pattern=r"pretrained weights of timm:test_resnet: tensor 'bn1\.running_var'")
    assert base_names(home) == ["b"]


# ------------------------------------------------------------------------ undecodable images


def test_truncated_png_is_refused_before_training(home, image_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    broken = sorted((data / "train").rglob("*.png"))[5]
    content = broken.read_bytes()
    broken.write_bytes(content[: len(content) // 2])  # the PNG header is intact

    result = assert_refused(home, "task", "add", "t", "--base", "b", "--data",
                            f"imagefolder:{data}", "--epochs", "1",
                            pattern=r"cannot read image")
    assert str(broken) in result.err
    assert task_names(home) == []


# ------------------------------------------------------------------------ the helpers themselves


def test_helpers_see_every_write_and_every_stderr_line(home, monkeypatch):
    """`snapshot` notices a new row and a new file; `run_cli` captures logged warnings too."""
    before = snapshot(home)
    result = run_cli(home, "base", "add", "y", "--model", MODEL)
    assert result.code == 0 and "base y" in result.out, result.err
    after = snapshot(home)
    assert after["db"] != before["db"]
    assert len(after["files"]) == len(before["files"]) + 1  # the new base's artifact
    with pytest.raises(AssertionError):
        assert_one_error(result)

    def warn_then_fail(argv):  # stands in for a command whose library code logs a warning
        logging.getLogger("taps_cl.some_module").warning("something odd")
        print("Error: boom", file=sys.stderr)
        sys.exit(1)

    monkeypatch.setattr(cli_module, "_run", warn_then_fail)
    noisy = run_cli(home, "base", "list")
    assert noisy.code == 1 and "something odd" in noisy.err and "Error: boom" in noisy.err
    with pytest.raises(AssertionError):
        assert_one_error(noisy)
