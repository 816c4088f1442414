"""Smoke test of examples/benchmark.py: --quick runs every method and prints the full table."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

BENCHMARK = Path(__file__).resolve().parents[1] / "examples" / "benchmark.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("taps_cl_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def one_thread():
    # A second busy process on 2 cores makes 2 OpenMP threads spin-wait for seconds per step;
    # one thread keeps this test fast whatever else runs.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_benchmark_prints_every_method(tmp_path, capsys, one_thread):
    bench = _load_benchmark()
    out = tmp_path / "bench.md"
    home = tmp_path / "home"
    assert bench.main(["--quick", "--home", str(home), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out.read_text()
    assert report in printed

    header = next(line for line in report.splitlines() if line.startswith("| method |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[1:5] == ["digits", "letters", "lowercase", "mean"]
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    labels = list(rows)
    assert labels[:4] == ["linear probe", "fine-tune", "TAPS λ=1", "TAPS λ=3"]
    assert len(labels) == 5 and re.fullmatch(r"LoRA r=\d+ \(PEFT\)", labels[4])
    for label, cells in rows.items():
        assert len(cells) == len(columns) - 1, label
        accs = [float(c.strip("*")) for c in cells[:4]]
        assert all(0.0 <= a <= 100.0 for a in accs), (label, accs)
        assert re.fullmatch(r"\d+\.\d\d× \(.+\)", cells[5]), (label, cells[5])  # total × base
        assert re.fullmatch(r"\d+\.\d\d×", cells[6]), (label, cells[6])  # time/epoch vs FT
        assert float(cells[8]) > 0  # images per second
    assert rows["fine-tune"][6] == "1.00×"
    # fine-tune stores one whole model per task; the linear probe only heads.
    assert float(rows["fine-tune"][5].split("×")[0]) > 2.9
    assert float(rows["linear probe"][5].split("×")[0]) < 1.2
    assert "probe checks unchanged" in report and "Targets (issue):" in report
    assert "TAPS active layers per task" in report

    # The product path: a kept --home holds one base per Manager row, every task ready.
    from taps_cl.manager import Manager

    with Manager(home) as manager:
        assert len(manager.list_bases()) == 4
        tasks = manager.list_tasks()
        assert len(tasks) == 12 and {t.status for t in tasks} == {"ready"}
