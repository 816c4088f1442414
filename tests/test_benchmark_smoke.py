"""Smoke test of examples/benchmark.py: --quick runs every method and prints the full table."""

from __future__ import annotations

import re

import pytest

from tests.conftest import load_example

pytest.importorskip("peft")


def _table(report: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    columns = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:  # the main table only (the similarity table comes later)
        if not line.startswith("| "):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return columns, rows


def test_quick_benchmark_prints_every_method(tmp_path, capsys, one_thread):
    bench = load_example("benchmark")
    out = tmp_path / "bench.md"
    home = tmp_path / "home"
    # "all": the progressive rows too (by default they are left out of the 90-minute run).
    assert bench.main(["--quick", "--methods", "all", "--home", str(home), "--out", str(out)]) == 0
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
        "progressive (group train, auto groups)", "progressive (incremental, group auto)",
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

    # Progressive rows: a total that counts the shared bands once beside the tasks' own files;
    # the similarity matrix of the tasks; issue 11's targets, each met or missed with numbers.
    group = "progressive (group train, auto groups)"
    incremental = "progressive (incremental, group auto)"
    for label in (group, incremental):
        assert ratio(label, "total params (base + 2 tasks)") > 1 + 2 * ratio(
            label, "task params (mean)"), label  # + the shared artifacts
    assert re.search(r"cosine of their gradient signatures .*seed 0\):\n\n"
                     r"\| \| digits \| letters \|\n\|---\|---:\|---:\|\n"
                     r"\| digits \| 1\.00 \| -?\d\.\d\d \|\n\| letters \| -?\d\.\d\d \| 1\.00 \|",
                     report), report
    assert "(incremental, group auto), seed 0 (its stored signatures, `Manager.similarity`): " \
        "the same matrix" in report
    assert re.search(r"  - seed 0: groups \{.+\}.*; shared artifacts [\d.]+k \(0\.\d{3}× base\): "
                     r"shared band", report)
    issue11 = report[report.index("Targets (issue 11)"):]
    for label in (group, incremental):
        assert re.search(re.escape(label) + r": task-specific stored parameters ≤ 0\.7× "
                         r"independent adapters' at mean accuracy ≥ theirs − 0\.5 pt: (met|MISSED)"
                         r" — task-specific total .+ accuracy \d+\.\d ± \d+\.\d; adapter row "
                         r".+ accuracy \d+\.\d ± \d+\.\d: size \d\.\d\d×", issue11), label
    assert "- similarity ranks related tasks first: cos(letters, lowercase) above " in issue11
    assert "not measured (needs a progressive row and the tasks letters, lowercase" in issue11
    # Joining never rewrites: a real check (2 seeds, 1 earlier task at the second add) that holds.
    assert re.search(r"joining leaves every earlier task's artifact byte-identical and its probe "
                     r"logits unchanged: met — .+ 2/2 earlier tasks' artifacts and pinned shared "
                     r"bands re-read byte-identical .+ `Manager.verify` at the end: 4/4 checks ok",
                     issue11), issue11

    # The product path: a kept --home holds one base per Manager row and seed, every task ready.
    from taps_cl.manager import Manager

    with Manager(home) as manager:
        # linear, TAPS: 1 seed; FT, compact, budget, adapter, the progressive rows: 2; fusion adds
        # tasks to adapter's. Stage 1 of the progressive rows ran in throw-away registries.
        assert len(manager.list_bases()) == 14
        tasks = manager.list_tasks()
        assert len(tasks) == 30 and {t.status for t in tasks} == {"ready"}
        for base in ("bench-progressive-s1", "bench-progressive-group-s1"):
            mine = [t for t in tasks if t.base == base]
            assert [t.name for t in mine] == [f"{base}-digits", f"{base}-letters"]
            assert {t.method for t in mine} == {"progressive"}
            assert all("progressive_shared" in {p.kind for p in t.depends_on} for t in mine)
            budget = manager.budget(base)  # each shared band once, its readers listed
            assert budget.shared and all(len(u.tasks) >= 1 for u in budget.shared)
            assert budget.total_params == budget.base_params + sum(
                t.task_params for t in budget.tasks) + sum(u.num_params for u in budget.shared)
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
    assert minutes <= 90 and "OVER" not in printed  # the defaults fit the issue's 90 minutes
    assert bench.main(["--plan", "--max-train", "3000"]) == 0
    assert "OVER" in capsys.readouterr().out
    # Three seeds for adapter and fusion too would not fit: hence --adapter-seeds 1 by default.
    assert bench.main(["--plan", "--adapter-seeds", "3"]) == 0
    out = capsys.readouterr().out
    assert "2 rows × 1 seed + 10 rows × 3 seeds = 32 row runs" in out and "OVER" in out
    # The run that decides issue 11: TAPS, adapters and both progressive rows, 3 seeds each but
    # TAPS; it is meant to take at most 40 minutes by the plan.
    assert bench.main(["--plan", "--methods", "taps,adapter,progressive,progressive-group"]) == 0
    out = capsys.readouterr().out
    assert "plan: 4 rows (taps, adapter, progressive-group, progressive)" in out
    assert "1 rows × 1 seed + 3 rows × 3 seeds = 10 row runs × 4 tasks" in out
    assert int(re.search(r"total ≈ (\d+) min", out).group(1)) <= 40


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


def test_methods_progressive_brings_the_adapter_row_with_its_seeds(capsys):
    bench = load_example("benchmark")
    assert bench.main(["--plan"]) == 0  # the default run leaves the progressive rows out
    assert "progressive" not in capsys.readouterr().out.split("\n")[0]
    assert bench.main(["--plan", "--methods", "progressive", "--progressive-seeds", "4,5"]) == 0
    printed = capsys.readouterr().out
    assert "plan: 2 rows (adapter, progressive)" in printed
    assert "2 rows × 2 seeds = 4 row runs × 4 tasks" in printed  # the adapter row: 2 seeds too
    assert "progressive rows: stage 1 runs the row whole through the Manager" in printed
    # With fusion, it fuses the adapter row's tasks: the first --adapter-seeds of those seeds.
    assert bench.main(["--plan", "--methods", "fusion,progressive-group"]) == 0
    printed = capsys.readouterr().out
    assert "plan: 3 rows (adapter, fusion, progressive-group)" in printed
    assert "1 rows × 1 seed + 2 rows × 3 seeds = 7 row runs" in printed
    with pytest.raises(SystemExit):
        bench.main(["--plan", "--methods", "progressive-group", "--progressive-groups", "5"])
    assert "--progressive-groups must be between 1 and the number of tasks (4)" in \
        capsys.readouterr().err


def test_progressive_targets_are_computed_from_the_runs():
    """Issue 11's target lines turn on the numbers: size and accuracy against the adapter row,
    the letters' similarity ranking, and the incremental row's join checks."""
    bench = load_example("benchmark")
    base = 1000
    names = ["fashion", "letters", "lowercase"]
    related = (names, [[1.0, 0.1, 0.2], [0.1, 1.0, 0.7], [0.2, 0.7, 1.0]])
    unrelated = (names, [[1.0, 0.8, 0.2], [0.8, 1.0, 0.7], [0.2, 0.7, 1.0]])

    def row(kind, accs, specific, similarity=None, unchanged=True):
        method = "adapter" if kind == "adapter" else "progressive"
        runs = [bench.Run(seed, acc={"a": acc, "b": acc}, task_params={"a": 20, "b": 20},
                          total_params=base + specific, shared_params=specific - 40,
                          similarity=similarity, opened={"a": True, "b": False},
                          unchanged=[("a", unchanged)], probes=[True],
                          verified=[("a", True, 0.0), ("b", True, 0.0)])
                for seed, acc in enumerate(accs)]
        return bench.Row(bench.RowSpec(kind, kind, kind, method), 1e-3, {}, runs)

    adapter = row("adapter", [0.80, 0.82], 100)
    small = row("progressive-group", [0.81, 0.81], 60, related)  # 0.60×, +0.0 pt
    big = row("progressive", [0.81, 0.81], 80, related)  # 0.80×
    lines = bench.progressive_targets([adapter, small, big], base)
    assert lines[1].startswith("- progressive-group: task-specific stored parameters ≤ 0.7× ")
    assert "size 0.60× (met), accuracy +0.0 pt (met)" in lines[1] and ": met — " in lines[1]
    assert "size 0.80× (MISSED)" in lines[2] and ": MISSED — " in lines[2]
    assert "accuracy 81.0 ± 1.4" in lines[1]  # the adapter row's mean ± its spread
    assert "cos(letters, lowercase) above" in lines[3] and ": met — 2/2 seeds" in lines[3]
    assert "joining leaves every earlier task's artifact byte-identical" in lines[4]
    assert ": met — " in lines[4] and "2/2 earlier tasks' artifacts" in lines[4]
    assert "2 of 2 later adds joined an existing group" in lines[4]

    far = row("progressive-group", [0.70, 0.72], 60, unrelated)  # −10 pt, letters ~ fashion
    changed = row("progressive", [0.81, 0.81], 60, related, unchanged=False)
    lines = bench.progressive_targets([adapter, far, changed], base)
    assert "accuracy -10.0 pt (MISSED)" in lines[1] and ": MISSED — " in lines[1]
    assert ": MISSED — 0/2 seeds; seed 0: 0.70 vs 0.80 / 0.20" in lines[3]
    assert ": MISSED — " in lines[4] and "0/2 earlier tasks' artifacts" in lines[4]
