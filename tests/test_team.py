"""A team registry takes concurrent writers: four real `taps-cl task add` processes at once.

Runs benchmarks/team.py's repetition once per database (SQLite file, PostgreSQL server started by
tests.servers) while its reader loop runs `task list` and `report budget`.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

TEAM = Path(__file__).resolve().parents[1] / "benchmarks" / "team.py"


def load_team():  # type: ignore[no-untyped-def]
    """benchmarks/team.py as a module (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("taps_cl_benchmark_team", TEAM)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_concurrent_task_adds_all_land_with_readers_running(tmp_path, image_data, db_url, capsys):
    team = load_team()
    argv = ["--db", db_url or "sqlite", "--repeats", "1", "--data", str(image_data),
            "--work", str(tmp_path), "--json"]
    status = team.main(argv)
    document = json.loads(capsys.readouterr().out)
    (result,) = document["rounds"]
    assert result["failures"] == []
    assert result["landed"] == result["writers"] == 4
    assert result["positions"] == [1, 2, 3, 4]  # distinct places in the base's sequence
    assert result["lock_errors"] == 0
    assert result["reads"] >= 2 and result["read_failures"] == 0  # read while writers ran
    assert result["verified"] is True  # `report accuracy --verify` passed on the 4 × 4 matrix
    assert status == 0 and document["total"]["ok"] is True
    # The registry is where it was asked to be: a PostgreSQL run leaves no SQLite file.
    assert (tmp_path / "home" / "registry.db").exists() == (db_url is None)
