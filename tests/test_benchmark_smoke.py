"""Smoke test of examples/benchmark.py: --quick runs every method and prints the full table."""

from __future__ import annotations

import re

import pytest

from tests.conftest import load_example

pytest.importorskip("peft")


def _table(report: str) -> tuple[list[str], dict[str, list[str]]]:
    header = next(line for line in report.splitlines() if line.startswith("| method |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in report.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return columns, rows


def test_quick_benchmark_prints_every_method(tmp_path, capsys, one_thread):
    bench = load_example("benchmark")
    out = tmp_path / "bench.md"
    home = tmp_path / "home"
    assert bench.main(["--quick", "--home", str(home), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = out.read_text()
    assert report in printed
    assert "stage 1 (learning rate)" in printed and "stage 2 (full data)" in printed  # the plan

    columns, rows = _table(report)
    col = {name: i - 1 for i, name in enumerate(columns)}  # index into a row's cells
    assert columns[1:4] == ["digits", "letters", "mean"]
    assert "task bytes (mean)" in col and "total bytes (base + 2 tasks)" in col
    assert list(rows) == [
        "linear probe", "fine-tune", "TAPS λ=1 full deltas", "compact TAPS r=2 λ=1",
        "compact TAPS r=2 budget 0.1", "LoRA r=8 (PEFT)", "LoRA r=16 (PEFT)",
        "LoRA r=4 matched (PEFT)", "adapter", "fusion (own adapter)",
    ]
    single = {"linear probe", "TAPS λ=1 full deltas"}
    one, spread = r"\d+\.\d", r"\d+\.\d ± \d+\.\d"
    for label, cells in rows.items():
        assert len(cells) == len(columns) - 1, label
        seeded = label not in single
        assert cells[col["seeds"]] == ("2" if seeded else "1"), label
        for cell in cells[:3]:  # per task and the mean: mean ± sample std over the 2 seeds
            pattern = spread if seeded else one
            assert re.fullmatch(rf"\**{pattern}\**", cell), (label, cell)
            assert 0.0 <= float(cell.strip("*").split(" ± ")[0]) <= 100.0
        assert cells[col["lr"]] in ("1e-3", "1e-2"), (label, cells[col["lr"]])
        assert re.fullmatch(r"[\d.]+ (kB|MB)", cells[col["task bytes (mean)"]]), label
        assert re.fullmatch(r"[\d.]+ (kB|MB)", cells[col["total bytes (base + 2 tasks)"]]), label
        assert re.fullmatch(r".+ \(\d+\.\d\d×\)", cells[col["total params (base + 2 tasks)"]])
        assert re.fullmatch(r"\d+\.\d\d×", cells[col["step vs FT (interleaved)"]]), label
        assert float(cells[col["img/s"]]) > 0
    assert rows["fine-tune"][col["time/epoch vs FT"]] == "1.00×"
    # fine-tune stores one whole model per task; the linear probe only heads; the budget row fits.
    total = col["total params (base + 2 tasks)"]
    assert float(rows["fine-tune"][total].split("(")[1].split("×")[0]) > 1.9
    assert float(rows["linear probe"][total].split("(")[1].split("×")[0]) < 1.2
    task = rows["compact TAPS r=2 budget 0.1"][col["task params (mean)"]]
    assert float(task.split("(")[1].split("×")[0]) <= 0.1

    # Fusion: task 1 is the adapter row's task (same result); its total = base + its own fusion
    # task + the adapter it fuses (the adapter row's task 1), each counted once.
    def ratio(label: str, column: str) -> float:
        return float(rows[label][col[column]].split("(")[1].split("×")[0])

    fusion, adapter = "fusion (own adapter)", "adapter"
    assert rows[fusion][col["digits"]] == rows[adapter][col["digits"]]
    assert rows[fusion][col["seeds"]] == rows[adapter][col["seeds"]] == "2"
    expected = 1 + ratio(fusion, "task params (mean)") + ratio(adapter, "task params (mean)")
    assert abs(ratio(fusion, "total params (base + 2 tasks)") - expected) < 0.02, expected

    # Stage 1: the grid and one chosen-rate line per row.
    assert "grid {1e-3, 1e-2} for every row" in report
    chosen = re.findall(r"^- (.+): val 1e-3 [\d.]+ · 1e-2 [\d.]+ → chosen lr (1e-3|1e-2)$",
                        report, flags=re.M)
    assert [label for label, _ in chosen] == list(rows)
    assert all(rows[label][col["lr"]] == lr for label, lr in chosen)
    assert "matched rank 4" in report
    assert "probe checks unchanged" in report and "TAPS active layers per task" in report

    targets = report[report.index("Targets (issue 9)"):report.index("Targets (issue 10)")]
    for text in ("mean stored task ≤ 0.15× base", "2-task sequence in that setting ≤ 1.6× base",
                 "compact TAPS ≥ LoRA r=8 (PEFT) + 1 pt", "compact TAPS ≥ LoRA r=16 (PEFT) + 1 pt",
                 "compact TAPS ≥ LoRA r=4 matched (PEFT) + 1 pt", "train step ≤ 1.15× fine-tune",
                 "--budget 0.1: every task stores ≤ 0.1× base: met"):
        assert text in targets, text
    assert len(re.findall(r": (met|MISSED) —", targets)) >= 8
    composed = report[report.index("Targets (issue 10)"):]
    assert re.search(r"- an adapter task stores ≤ 0\.06× base \(mean stored\): (met|MISSED) — "
                     r"adapter: mean \d\.\d{4}×", composed), composed
    assert re.search(r"- a fusion task's own tensors ≤ 0\.05× base: (met|MISSED) — fusion "
                     r"\(own adapter\): mean \d\.\d{4}×.* of 2 fusion tasks", composed), composed
    assert "task digits is the adapter row's task digits" in report  # the note on reuse

    # The product path: a kept --home holds one base per Manager row and seed, every task ready.
    from taps_cl.manager import Manager

    with Manager(home) as manager:
        # linear, TAPS: 1 seed; FT, compact, budget, adapter: 2; fusion adds tasks to adapter's.
        assert len(manager.list_bases()) == 10
        tasks = manager.list_tasks()
        assert len(tasks) == 22 and {t.status for t in tasks} == {"ready"}
        fusion = [t for t in tasks if t.method == "fusion"]
        assert [t.name for t in fusion] == ["bench-fusion-s0-letters", "bench-fusion-s1-letters"]
        assert [[p.task for p in t.depends_on] for t in fusion] == [
            ["bench-adapter-s0-digits"], ["bench-adapter-s1-digits"]]


def test_plan_prints_runs_and_estimate_without_training(capsys):
    bench = load_example("benchmark")
    assert bench.main(["--plan"]) == 0
    printed = capsys.readouterr().out
    assert ("12 rows × 3 rates × 4 tasks (the fusion row trains 3: its first task is the "
            "adapter row's) = 141 training runs on ≤ 350 images") in printed
    assert "4 rows × 1 seed + 8 rows × 3 seeds = 28 row runs" in printed
    assert "= 111 training runs on ≤ 800 images" in printed
    minutes = int(re.search(r"total ≈ (\d+) min", printed).group(1))
    assert minutes <= 90 and "OVER" not in printed  # the defaults fit the 90 minutes
    assert bench.main(["--plan", "--max-train", "3000"]) == 0
    assert "OVER" in capsys.readouterr().out
    # Three seeds for adapter and fusion too would not fit: hence --adapter-seeds 1 by default.
    assert bench.main(["--plan", "--adapter-seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 rows × 1 seed + 10 rows × 3 seeds = 32 row runs" in out and "OVER" in out


def test_methods_fusion_brings_the_adapter_row(capsys):
    bench = load_example("benchmark")
    assert bench.main(["--plan", "--methods", "fusion"]) == 0
    printed = capsys.readouterr().out
    assert "plan: 2 rows (adapter, fusion)" in printed
    assert "2 rows × 1 seed = 2 row runs × 4 tasks" in printed
    assert "= 7 training runs" in printed  # adapter 4 + fusion 3 per seed
    with pytest.raises(SystemExit):  # fusion needs an earlier task to fuse
        bench.main(["--plan", "--methods", "fusion", "--tasks", "digits"])
    assert "needs at least 2 tasks" in capsys.readouterr().err.replace("\n", " ")
    assert bench.main(["--plan", "--tasks", "digits"]) == 0  # by default it is left out
    printed = capsys.readouterr().out
    assert "adapter," in printed and "fusion" not in printed
