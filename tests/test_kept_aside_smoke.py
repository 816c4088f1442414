"""benchmarks/kept_aside.py at a tiny size: its three tasks are written reproducibly and balanced,
and a row trains them through the command line with `task add`'s default method."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from taps_cl.tasks.requests import DEFAULT_METHOD
from tests.test_demo import pytestmark as demo_needs

# The demo's offline data and weights: skipped where they are missing, as the demo's tests are.
pytestmark = demo_needs


def digest(folder) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.png"))}


def test_tasks_are_written_from_the_seed_and_balanced(tmp_path):
    from benchmarks.kept_aside import MAX_DISCS, SHAPES, TASKS, TEST, TRAIN, make_data

    first, again = make_data(tmp_path / "a"), make_data(tmp_path / "b")
    classes = {"rotation": 4, "shapes": len(SHAPES), "counting": MAX_DISCS}
    for task in TASKS:
        files = digest(first[task])
        assert files == digest(again[task]), task  # the same seed writes the same bytes
        for split, count in (("train", TRAIN), ("test", TEST)):
            folders = sorted((first[task] / split).iterdir())
            assert len(folders) == classes[task], (task, split)
            sizes = [len(list(f.glob("*.png"))) for f in folders]
            assert sum(sizes) == count and max(sizes) - min(sizes) <= 1, (task, split, sizes)
    other = make_data(tmp_path / "c", seed=1, tasks=("shapes",))
    assert digest(other["shapes"]) != digest(first["shapes"])


def test_a_row_trains_the_three_tasks_through_the_command_line(tmp_path, capsys):
    from benchmarks.kept_aside import TASKS, main

    work = tmp_path / "runs"
    args = ["--data-dir", str(tmp_path / "data"), "--work", str(work),
            "--methods", DEFAULT_METHOD, "--lr-grid", "3e-3", "--seeds", "1", "--epochs", "1",
            "--max-train", "40", "--max-test", "20"]
    assert main(args) == 0
    out = capsys.readouterr().out
    (home,) = [p for p in work.iterdir() if p.is_dir()]
    result = json.loads((home / "result.json").read_text())
    assert list(result) == list(TASKS)
    assert all(0 <= r["test"] <= 1 and 0 < r["stored"] < 0.1 for r in result.values())
    # The table: the grid's row and the default's row, the same runs (its rate is the grid's).
    rows = [line for line in out.splitlines() if line.startswith(f"| {DEFAULT_METHOD}")]
    assert len(rows) == 2 and rows[0].split("|")[2:] == rows[1].split("|")[2:]
    mean = re.search(r"\*\*([\d.]+)( ± [\d.]+)?\*\*", rows[0])  # one seed: no spread
    expected = 100 * sum(r["test"] for r in result.values()) / len(TASKS)
    assert mean and float(mean.group(1)) == pytest.approx(expected, abs=0.051)
    # A second run reuses the recorded row instead of training again.
    assert main(args) == 0
    assert capsys.readouterr().out.count(" test ") == 0
