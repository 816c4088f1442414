"""The command-line contract: JSON shapes, one-line errors, exit codes, nothing half-written."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from taps_cl.cli.app import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, pattern: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and re.search(pattern, lines[0]), err
    assert "Traceback" not in err


@pytest.fixture
def home(tmp_path):
    return str(tmp_path / "home")


def test_base_add_and_list_json(capsys, home):
    code, out, _ = run(capsys, "--home", home, "base", "add", "b", "--model", "timm:test_resnet")
    assert code == 0 and "b" in out
    code, out, _ = run(capsys, "--home", home, "--json", "base", "list")
    assert code == 0
    (row,) = json.loads(out)
    assert row["name"] == "b" and row["model"] == "timm:test_resnet"
    assert isinstance(row["num_params"], int) and row["num_params"] > 0
    assert re.fullmatch(r"[0-9a-f]{64}", row["sha256"])
    code, out, _ = run(capsys, "--home", home, "--json", "base", "show", "b")
    shown = json.loads(out)
    assert shown["data_config"]["input_size"][0] == 3 and shown["total_params"] > shown["num_params"]


def test_base_errors_leave_registry_as_it_was(capsys, home, tmp_path):
    assert run(capsys, "--home", home, "base", "add", "b", "--model", "timm:test_resnet")[0] == 0
    bad_weights = tmp_path / "other.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(bad_weights))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    cases = [
        (("base", "add", "x", "--model", "timm:no_such_model_xyz"), "unknown timm model"),
        (("base", "add", "b", "--model", "timm:test_resnet"), "already exists"),
        (("base", "add", "x", "--model", "nohub:resnet"), "timm:|torchvision:|source"),
        (("base", "add", "x", "--model", "timm:test_resnet", "--weights", str(tmp_path / "missing.pth")), "missing|not found|No such|does not exist"),
        (("base", "add", "x", "--model", "timm:test_resnet", "--weights", str(bad_weights)), "missing|unexpected"),
        (("base", "add", "x", "--model", "timm:test_resnet", "--weights", str(garbage)), "garbage.pth"),
        (("base", "show", "nope"), "no base model named 'nope'"),
        (("task", "add", "t", "--base", "nope", "--data", "digits"), "no base model named 'nope'"),
    ]
    for args, pattern in cases:
        code, out, err = run(capsys, "--home", home, *args)
        assert code == 1, (args, out, err)
        assert_one_line_error(err, pattern)
    code, out, _ = run(capsys, "--home", home, "--json", "base", "list")
    assert [b["name"] for b in json.loads(out)] == ["b"]
    code, out, _ = run(capsys, "--home", home, "--json", "task", "list")
    assert json.loads(out) == []


def test_usage_error_exits_2(capsys, home):
    code, _, err = run(capsys, "--home", home, "base", "add", "x")
    assert code == 2 and "--model" in err
    code, _, err = run(capsys, "--home", home, "task", "add", "t", "--base", "b", "--data", "digits",
                       "--epochs", "0")
    assert code == 2


def test_old_database_refused_then_upgraded(capsys, home):
    from registry import db

    assert run(capsys, "--home", home, "base", "add", "b", "--model", "timm:test_resnet")[0] == 0
    engine = db.make_engine(db.sqlite_url(f"{home}/registry.db"))
    db.downgrade(engine, "0001")
    engine.dispose()
    code, _, err = run(capsys, "--home", home, "base", "list")
    assert code == 1
    assert_one_line_error(err, r"taps-cl db upgrade")
    code, out, _ = run(capsys, "--home", home, "--json", "db", "current")
    assert json.loads(out)["up_to_date"] is False
    code, out, _ = run(capsys, "--home", home, "--json", "db", "upgrade")
    assert code == 0 and json.loads(out)["backup"]
    code, out, _ = run(capsys, "--home", home, "--json", "base", "list")
    assert code == 0 and json.loads(out)[0]["name"] == "b"


def test_foreign_database_and_db_url(capsys, tmp_path):
    foreign = tmp_path / "foreign.db"
    import sqlite3

    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE t (x)")
    code, _, err = run(capsys, "--home", str(tmp_path / "h"), "--db", f"sqlite:///{foreign}", "base", "list")
    assert code == 1
    assert_one_line_error(err, "not a taps-cl registry")
    url = f"sqlite:///{tmp_path / 'team.db'}"
    code, _, _ = run(capsys, "--home", str(tmp_path / "h"), "--db", url, "base", "add", "b",
                     "--model", "timm:test_resnet")
    assert code == 0 and (tmp_path / "team.db").exists()


def test_console_script_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "taps_cl", "--home", str(tmp_path), "base", "add", "x",
         "--model", "timm:definitely_not_a_model"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr, "unknown timm model")
