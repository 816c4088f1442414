"""Smoke test of examples/scale.py: a small run gives every figure, and the registry grows."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import load_example

# The keys (a row per registry size); the script adds more.
KEYS = {"n", "add_overhead_s", "list_s", "budget_s", "accuracy_s", "verify_tasks_per_s",
        "db_bytes"}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and value > 0


def test_small_run_reports_every_figure(tmp_path, capsys, one_thread):
    scale = load_example("scale")
    home = tmp_path / "home"
    assert scale.main(["--sizes", "5,12", "--json", "--repeat", "1", "--home", str(home)]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)  # stdout is one JSON document; progress went to stderr
    assert "synthetic tasks in" in err and "warm-up add" in err
    assert [row["n"] for row in rows] == [5, 12]
    for row in rows:
        assert set(row) >= KEYS, row
        for key in KEYS:
            assert _positive(row[key]), (key, row[key])
        assert row["verify_ok"] is True and row["verify_tasks"] >= 4
        assert len(row["add_overheads_s"]) == 3
        assert row["list_output_bytes"] > 0 and "list_error" not in row
        assert row["list_rows"] == row["budget_rows"] == row["n"]  # every task listed
    small, large = rows
    assert large["db_bytes"] > small["db_bytes"]
    assert large["evaluation_rows"] > small["evaluation_rows"]
    assert (small["synthetic_tasks"], large["synthetic_tasks"]) == (1, 4)

    # The kept home holds exactly what was reported: per size the synthetic tasks, (first) a
    # warm-up add, and three measured real adds; all ready and in order.
    from taps_cl.manager import Manager

    with Manager(home) as m:
        names = [s.name for s in m.task_summaries("scale")]
        assert len(names) == 12 and {s.status for s in m.task_summaries("scale")} == {"ready"}
        kinds = ["real" if name.startswith("scale-real-") else "syn" for name in names]
        assert kinds == ["syn"] + ["real"] * 4 + ["syn"] * 4 + ["real"] * 3
        assert sum(name.startswith("scale-real-") for name in names) == 7
        assert [s.position for s in m.task_summaries("scale")] == list(range(1, 13))

    # Markdown by default: one header row and a row per size.
    assert scale.table(rows).count("\n") == 3 and "| 12 |" in scale.table(rows)


def test_plan_runs_nothing(capsys):
    scale = load_example("scale")
    assert scale.main(["--plan", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "N=10: 6 synthetic tasks + 4 real adds" in out and "N=100: 87 synthetic" in out
    assert "N=1,000" not in out and "total ≈" in out
    assert scale.main(["--plan"]) == 0
    assert "N=10,000: 8,997 synthetic tasks" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        scale.main(["--plan", "--sizes", "100,10"])
