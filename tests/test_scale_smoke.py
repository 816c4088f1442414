"""Smoke test of benchmarks/scale.py: a small run gives every figure, and the registry grows."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import scale

ROOT = Path(__file__).resolve().parents[1]
# The figures of a row per registry size that the table reads; the script adds more.
KEYS = {"n", "add_overhead_s", "list_s", "budget_s", "accuracy_s", "verify_tasks_per_s",
        "db_bytes"}


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and value > 0


def test_small_run_reports_every_figure(tmp_path, capsys, one_thread):
    home = tmp_path / "home"
    assert scale.main(["--sizes", "5,12", "--json", "--repeat", "1", "--home", str(home)]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)  # stdout is one JSON document; progress went to stderr
    assert err.strip()
    assert [row["n"] for row in rows] == [5, 12]
    for row in rows:
        assert set(row) >= KEYS, row
        for key in KEYS:
            assert _positive(row[key]), (key, row[key])
        assert row["verify_ok"] is True and row["verify_tasks"] >= 4
        assert len(row["add_overheads_s"]) == 3
        assert row["list_output_bytes"] > 0 and "list_error" not in row
        assert row["list_rows"] == row["budget_rows"] == row["n"]  # every task listed
        assert row["build_s"] >= 0
    small, large = rows
    assert large["db_bytes"] > small["db_bytes"]
    assert large["evaluation_rows"] > small["evaluation_rows"]
    assert (small["synthetic_tasks"], large["synthetic_tasks"]) == (1, 4)
    # One warm-up add, before the first size's measured adds only.
    assert _positive(small["warm_up_add_s"]) and large["warm_up_add_s"] is None

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


def _plan(capsys, *argv: str) -> dict:
    assert scale.main(["--plan", "--json", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_runs_nothing(capsys):
    plan = _plan(capsys, "--quick")
    assert [s["n"] for s in plan["sizes"]] == [10, 100]  # --quick: no N = 1,000
    ten, hundred = plan["sizes"]
    assert (ten["synthetic_tasks"], ten["real_adds"]) == (6, 4)  # 3 measured adds + a warm-up
    assert (hundred["synthetic_tasks"], hundred["real_adds"]) == (87, 3)
    assert hundred["verify_tasks"] == 7 and ten["cli_reads"] == 3 * scale.REPEAT
    assert plan["total_s"] == pytest.approx(sum(s["seconds"] for s in plan["sizes"]))
    assert plan["total_s"] > 0
    plan = _plan(capsys)
    assert [s["n"] for s in plan["sizes"]] == [10, 100, 1000, 10000]
    assert plan["sizes"][-1]["synthetic_tasks"] == 8997
    # Without --json: a line per size and the total.
    assert scale.main(["--plan", "--quick"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    with pytest.raises(SystemExit) as refused:
        scale.main(["--plan", "--sizes", "100,10"])
    assert refused.value.code == 2


def test_runs_as_a_file_from_the_repository_root():
    """`python benchmarks/scale.py` finds its sibling module (benchmarks/ is not installed)."""
    done = subprocess.run([sys.executable, "benchmarks/scale.py", "--plan", "--quick", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [s["n"] for s in json.loads(done.stdout)["sizes"]] == [10, 100]
