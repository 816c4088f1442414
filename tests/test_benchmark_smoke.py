"""Smoke tests of benchmarks/benchmark.py: --quick runs every row and writes every figure to its
JSON result (--json-out), --plan counts the runs and their time, and the targets turn on the
numbers of the runs. The assertions read numbers and structure, not the report's prose."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import benchmark as bench
from benchmarks.protocol import fmt_lr
from benchmarks.rows import Row, RowSpec, Run
from benchmarks.targets import lines, progressive_targets

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    "linear probe", "fine-tune", "TAPS λ=1 full deltas", "compact TAPS r=2 λ=1",
    "compact TAPS r=2 budget 0.1", "LoRA r=8 (PEFT)", "LoRA r=16 (PEFT)",
    "LoRA r=4 matched (PEFT)", "adapter", "fusion (own adapter)",
    "progressive (group train, auto groups)", "progressive (incremental, group auto)",
]
GRID = [1e-3, 1e-2]  # --quick's learning-rate grid


def _table(report: str) -> tuple[list[str], dict[str, list[str]]]:
    """The report's main markdown table: its columns and each row's cells by row name."""
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


def _fraction(value: object) -> bool:
    return isinstance(value, float) and 0.0 <= value <= 1.0


def test_quick_benchmark_runs_every_row(tmp_path, capsys, one_thread):
    out, result, home = tmp_path / "bench.md", tmp_path / "bench.json", tmp_path / "home"
    # "all": the progressive rows too (by default they are left out of the 90-minute run).
    argv = ["--quick", "--methods", "all", "--home", str(home), "--out", str(out)]
    assert bench.main([*argv, "--plan"]) == 0
    planned = capsys.readouterr().out
    assert not home.exists()  # --plan trains nothing
    assert bench.main([*argv, "--json-out", str(result)]) == 0
    printed = capsys.readouterr().out
    report = out.read_text()
    assert printed.startswith(planned) and report in printed  # the plan, then the report
    doc = json.loads(result.read_text())

    base = doc["base_params"]
    assert base > 0 and doc["base_bytes"] > 0
    assert [t["name"] for t in doc["tasks"]] == ["digits", "letters"]
    assert all(t[k] > 0 for t in doc["tasks"] for k in ("train", "val", "test", "classes"))
    assert doc["protocol"]["lr_grid"] == GRID and doc["protocol"]["seeds"] == [0, 1]
    rows = {r["label"]: r for r in doc["rows"]}
    assert list(rows) == ROWS
    assert sorted(doc["plan"]["rows"]) == sorted(r["key"] for r in doc["rows"])
    single = {"linear probe", "TAPS λ=1 full deltas"}
    for label, row in rows.items():
        seeds = [0] if label in single else [0, 1]
        assert row["seeds"] == seeds and [r["seed"] for r in row["runs"]] == seeds, label
        assert set(row["accuracy"]) == {"digits", "letters"}, label
        for accs in row["accuracy"].values():
            assert len(accs) == len(seeds) and all(map(_fraction, accs)), (label, accs)
        for i, run in enumerate(row["runs"]):  # a seed's mean is the mean over its tasks
            assert math.isclose(row["mean_accuracy"][i], statistics.fmean(run["acc"].values()))
        # Stage 1: every rate of the grid scored on validation; the best chosen (ties: smaller).
        assert [v["lr"] for v in row["val_by_lr"]] == GRID, label
        valid = {v["lr"]: v["val"] for v in row["val_by_lr"] if v["val"] is not None}
        assert all(map(_fraction, valid.values())), label
        assert row["lr"] == max(valid, key=lambda lr: (valid[lr], -lr)), label
        assert row["task_params"] > 0 and row["task_bytes"] > 0, label
        assert row["total_params"] > base and row["total_bytes"] > 0, label
        assert row["epoch_vs_ft"] > 0 and row["step_vs_ft"] > 0 and row["images_per_s"] > 0
    assert rows["fine-tune"]["epoch_vs_ft"] == 1.0
    # fine-tune stores one whole model per task; the linear probe only heads; the budget row fits.
    assert rows["fine-tune"]["total_params"] / base > 1.9
    assert rows["linear probe"]["total_params"] / base < 1.2
    assert rows["compact TAPS r=2 budget 0.1"]["task_params"] / base <= 0.1
    # The matched LoRA row: rank 4 (not one of --lora-ranks 8,16, so a row of its own).
    assert doc["matched"]["rank"] == 4 and doc["matched"]["twin"] is None
    assert doc["matched"]["compact_row"] == "compact TAPS r=2 λ=1"
    assert rows["LoRA r=4 matched (PEFT)"]["options"]["rank"] == 4
    checks = doc["probe_checks"]
    assert checks["total"] > 0 and checks["ok"] == checks["total"]
    for row in (r for r in rows.values() if r["method"] == "taps"):  # active layers, first seed
        for task, active in row["runs"][0]["active"].items():
            k, total = map(int, active.split("/"))
            assert 0 <= k <= total and len(row["runs"][0]["active_names"][task]) == k

    # The printed table shows the same rows and numbers.
    columns, table = _table(report)
    col = {name: i - 1 for i, name in enumerate(columns)}  # index into a row's cells
    assert columns[1:4] == ["digits", "letters", "mean"] and list(table) == ROWS
    for label, cells in table.items():
        row = rows[label]
        assert len(cells) == len(columns) - 1, label
        for task in ("digits", "letters"):
            mean = 100 * statistics.fmean(row["accuracy"][task])
            assert cells[col[task]].startswith(f"{mean:.1f}"), (label, task)
        mean = 100 * statistics.fmean(row["mean_accuracy"])
        assert cells[col["mean"]].startswith(f"**{mean:.1f}"), label
        assert cells[col["seeds"]] == str(len(row["seeds"])), label
        assert cells[col["lr"]] == fmt_lr(row["lr"]), label

    # Fusion: task 1 is the adapter row's task (same result); its total = base + its own fusion
    # task + the adapter it fuses (the adapter row's task 1), each counted once.
    fusion, adapter = rows["fusion (own adapter)"], rows["adapter"]
    assert fusion["accuracy"]["digits"] == adapter["accuracy"]["digits"]
    assert all(run["reused"] == ["digits"] for run in fusion["runs"])
    expected = 1 + (fusion["task_params"] + adapter["task_params"]) / base
    assert abs(fusion["total_params"] / base - expected) < 0.02, expected

    # The targets: each computed, one report line each.
    targets = doc["targets"]
    for group in ("compact", "composed", "progressive"):
        texts = [t["text"] for t in targets if t["group"] == group]
        assert "\n".join(texts) in report, group
    compact = [t for t in targets if t["group"] == "compact"]
    assert [t["key"] for t in compact] == ["task-size", "sequence", *["over-lora"] * 3,
                                           *["step"] * 3, "budget"]
    assert all(isinstance(t["met"], bool) for t in compact)
    assert [t["row"] for t in compact if t["key"] == "over-lora"] == ROWS[5:8]
    budget = compact[-1]
    assert budget["met"] is True and budget["numbers"]["largest"] <= 0.1
    assert (budget["numbers"]["tasks"], budget["numbers"]["seeds"]) == (4, 2)
    composed = {t["key"]: t for t in targets if t["group"] == "composed"}
    assert set(composed) == {"adapter-size", "fusion-size"}
    assert composed["adapter-size"]["met"] == (composed["adapter-size"]["numbers"]["mean"] <= 0.06)
    assert composed["adapter-size"]["numbers"]["tasks"] == 4
    assert composed["fusion-size"]["met"] == (composed["fusion-size"]["numbers"]["mean"] <= 0.05)
    assert composed["fusion-size"]["numbers"]["tasks"] == 2  # of 2 fusion tasks

    # Progressive rows: a total that counts the shared bands once beside the tasks' own files;
    # the tasks' similarity matrix; their targets, each met or missed with numbers.
    group, incremental = rows[ROWS[10]], rows[ROWS[11]]
    for row in (group, incremental):
        assert row["total_params"] > base + 2 * row["task_params"], row["label"]
        for run in row["runs"]:
            assert set(run["groups"]) == {"digits", "letters"} and run["shared_params"] > 0
            assert run["shared_params"] / base < 1
            assert any("shared" in band["kinds"] for band in run["shared"])
    similarity = group["runs"][0]["similarity"]
    assert similarity["tasks"] == ["digits", "letters"]
    matrix = similarity["matrix"]
    assert [round(matrix[i][i], 2) for i in range(2)] == [1.0, 1.0]
    assert matrix[0][1] == pytest.approx(matrix[1][0]) and -1 <= matrix[0][1] <= 1
    assert incremental["runs"][0]["similarity"] == similarity  # its stored signatures: the same
    progressive = [t for t in targets if t["group"] == "progressive"]
    assert [(t["key"], t["row"]) for t in progressive] == [
        ("progressive-size", ROWS[10]), ("progressive-size", ROWS[11]), ("similarity", None),
        ("join", ROWS[11])]
    for target in progressive[:2]:
        numbers = target["numbers"]
        assert numbers["size_ratio"] == pytest.approx(
            numbers["specific"] / numbers["adapter_specific"])
        assert target["met"] == (numbers["size_met"] and numbers["accuracy_met"])
    assert progressive[2]["met"] is None  # needs the tasks letters, lowercase and fashion
    # Joining never rewrites: a real check (2 seeds, 1 earlier task at the second add) that holds.
    join = progressive[3]
    assert join["met"] is True
    assert (join["numbers"]["unchanged"], join["numbers"]["rechecked"]) == (2, 2)
    assert (join["numbers"]["verify_ok"], join["numbers"]["verify"]) == (4, 4)

    # The product path: a kept --home holds one base per Manager row and seed, every task ready.
    from taps_cl.manager import Manager

    with Manager(home) as manager:
        # linear, TAPS: 1 seed; FT, compact, budget, adapter, the progressive rows: 2; fusion adds
        # tasks to adapter's. Stage 1 of the progressive rows ran in throw-away registries.
        assert len(manager.list_bases()) == 14
        tasks = manager.list_tasks()
        assert len(tasks) == 30 and {t.status for t in tasks} == {"ready"}
        for name in ("bench-progressive-s1", "bench-progressive-group-s1"):
            mine = [t for t in tasks if t.base == name]
            assert [t.name for t in mine] == [f"{name}-digits", f"{name}-letters"]
            assert {t.method for t in mine} == {"progressive"}
            assert all("progressive_shared" in {p.kind for p in t.depends_on} for t in mine)
            budget = manager.budget(name)  # each shared band once, its readers listed
            assert budget.shared and all(len(u.tasks) >= 1 for u in budget.shared)
            assert budget.total_params == budget.base_params + sum(
                t.task_params for t in budget.tasks) + sum(u.num_params for u in budget.shared)
        fusion_tasks = [t for t in tasks if t.method == "fusion"]
        assert [t.name for t in fusion_tasks] == ["bench-fusion-s0-letters",
                                                  "bench-fusion-s1-letters"]
        assert [[p.task for p in t.depends_on] for t in fusion_tasks] == [
            ["bench-adapter-s0-digits"], ["bench-adapter-s1-digits"]]


def _plan(tmp_path: Path, *argv: str) -> dict:
    """The plan --plan computes for these options, from its JSON."""
    path = tmp_path / "plan.json"
    assert bench.main(["--plan", *argv, "--json-out", str(path)]) == 0
    return json.loads(path.read_text())["plan"]


def _seeds(plan: dict) -> dict[int, int]:
    return {s["seeds"]: s["rows"] for s in plan["seeds"]}


def test_plan_counts_runs_and_estimate_without_training(tmp_path):
    plan = _plan(tmp_path)
    # 12 rows × 3 rates × 4 tasks, the fusion row 3 (its first task is the adapter row's).
    assert (len(plan["rows"]), plan["rates"], len(plan["tasks"])) == (12, 3, 4)
    assert plan["stage1_runs"] == 141 and plan["images"]["select_train"] == 350
    assert _seeds(plan) == {1: 4, 3: 8} and plan["row_runs"] == 28
    assert plan["stage2_runs"] == 111 and plan["images"]["max_train"] == 800
    assert plan["total_s"] / 60 <= 90 and plan["over"] is False  # the defaults fit 90 minutes
    assert plan["total_s"] == pytest.approx(plan["stage1_s"] + plan["stage2_s"] + plan["timing_s"])
    assert _plan(tmp_path, "--max-train", "3000")["over"] is True
    # Three seeds for adapter and fusion too would not fit: hence --adapter-seeds 1 by default.
    plan = _plan(tmp_path, "--adapter-seeds", "3")
    assert _seeds(plan) == {1: 2, 3: 10} and plan["row_runs"] == 32 and plan["over"] is True
    # The progressive comparison: TAPS, adapters and both progressive rows, 3 seeds each but
    # TAPS; it is meant to take at most 40 minutes by the plan.
    plan = _plan(tmp_path, "--methods", "taps,adapter,progressive,progressive-group")
    assert plan["rows"] == ["taps", "adapter", "progressive-group", "progressive"]
    assert _seeds(plan) == {1: 1, 3: 3} and plan["row_runs"] == 10
    assert plan["total_s"] / 60 <= 40


def test_methods_fusion_brings_the_adapter_row(tmp_path):
    plan = _plan(tmp_path, "--methods", "fusion")
    assert plan["rows"] == ["adapter", "fusion"]
    assert _seeds(plan) == {1: 2} and plan["row_runs"] == 2
    assert plan["stage2_runs"] == 7  # adapter 4 + fusion 3 per seed
    with pytest.raises(SystemExit) as refused:  # fusion needs an earlier task to fuse
        bench.main(["--plan", "--methods", "fusion", "--tasks", "digits"])
    assert refused.value.code == 2
    assert bench.main(["--plan", "--methods", "adapter", "--tasks", "digits"]) == 0
    rows = _plan(tmp_path, "--tasks", "digits")["rows"]  # by default it is left out
    assert "adapter" in rows and "fusion" not in rows


def test_methods_progressive_brings_the_adapter_row_with_its_seeds(tmp_path):
    rows = _plan(tmp_path)["rows"]  # the default run leaves the progressive rows out
    assert "progressive" not in rows and "progressive-group" not in rows
    plan = _plan(tmp_path, "--methods", "progressive", "--progressive-seeds", "4,5")
    assert plan["rows"] == ["adapter", "progressive"]
    assert [r["seeds"] for r in plan["per_row"]] == [[4, 5], [4, 5]]  # the adapter row's too
    assert _seeds(plan) == {2: 2} and plan["row_runs"] == 4
    # A progressive row's stage 1 runs it whole through the Manager: a base per rate, each task's
    # signature and a restore scored on validation, so it costs more than the adapter row's.
    adapter, progressive = plan["per_row"]
    assert progressive["stage1_s"] > adapter["stage1_s"]
    assert progressive["stage2_s"] > adapter["stage2_s"]  # a signature per task, a base per seed
    # With fusion, it fuses the adapter row's tasks: the first --adapter-seeds of those seeds.
    plan = _plan(tmp_path, "--methods", "fusion,progressive-group")
    assert plan["rows"] == ["adapter", "fusion", "progressive-group"]
    assert [r["seeds"] for r in plan["per_row"]] == [[0, 1, 2], [0], [0, 1, 2]]
    assert _seeds(plan) == {1: 1, 3: 2} and plan["row_runs"] == 7
    with pytest.raises(SystemExit) as refused:  # at most one group per task
        bench.main(["--plan", "--methods", "progressive-group", "--progressive-groups", "5"])
    assert refused.value.code == 2
    assert bench.main(["--plan", "--methods", "progressive-group",
                       "--progressive-groups", "4"]) == 0


def test_progressive_targets_are_computed_from_the_runs():
    """The progressive targets turn on the numbers: size and accuracy against the adapter row,
    the letters' similarity ranking, and the incremental row's join checks."""
    base = 1000
    names = ["fashion", "letters", "lowercase"]
    related = (names, [[1.0, 0.1, 0.2], [0.1, 1.0, 0.7], [0.2, 0.7, 1.0]])
    unrelated = (names, [[1.0, 0.8, 0.2], [0.8, 1.0, 0.7], [0.2, 0.7, 1.0]])

    def row(kind, accs, specific, similarity=None, unchanged=True):
        method = "adapter" if kind == "adapter" else "progressive"
        runs = [Run(seed, acc={"a": acc, "b": acc}, task_params={"a": 20, "b": 20},
                    total_params=base + specific, shared_params=specific - 40,
                    similarity=similarity, opened={"a": True, "b": False},
                    unchanged=[("a", unchanged)], probes=[True],
                    verified=[("a", True, 0.0), ("b", True, 0.0)])
                for seed, acc in enumerate(accs)]
        return Row(RowSpec(kind, kind, kind, method), 1e-3, {}, runs)

    adapter = row("adapter", [0.80, 0.82], 100)
    small = row("progressive-group", [0.81, 0.81], 60, related)  # 0.60×, +0.0 pt
    big = row("progressive", [0.81, 0.81], 80, related)  # 0.80×
    targets = progressive_targets([adapter, small, big], base)
    assert lines("progressive", targets)[1:] == [t.text for t in targets]
    fits, too_big, similar, join = targets
    assert (fits.key, fits.row, too_big.row) == ("progressive-size", "progressive-group",
                                                 "progressive")
    assert fits.met is True and fits.numbers["size_ratio"] == pytest.approx(0.6)
    assert fits.numbers["size_met"] is True and fits.numbers["accuracy_met"] is True
    assert fits.numbers["gap_pt"] == pytest.approx(0.0, abs=1e-9)
    # The adapter row's mean ± its spread over seeds.
    assert fits.numbers["adapter_accuracy"] == pytest.approx(81.0)
    assert fits.numbers["adapter_std"] == pytest.approx(math.sqrt(2))
    assert too_big.numbers["size_ratio"] == pytest.approx(0.8)
    assert too_big.numbers["size_met"] is False and too_big.met is False
    assert similar.key == "similarity" and similar.met is True
    assert (similar.numbers["held"], similar.numbers["seeds"]) == (2, 2)
    assert join.key == "join" and join.met is True
    assert (join.numbers["unchanged"], join.numbers["rechecked"]) == (2, 2)
    assert (join.numbers["joins"], join.numbers["later_adds"]) == (2, 2)

    far = row("progressive-group", [0.70, 0.72], 60, unrelated)  # −10 pt, letters ~ fashion
    changed = row("progressive", [0.81, 0.81], 60, related, unchanged=False)
    fits, _, similar, join = progressive_targets([adapter, far, changed], base)
    assert fits.numbers["gap_pt"] == pytest.approx(-10.0)
    assert fits.numbers["accuracy_met"] is False and fits.met is False
    assert similar.met is False and similar.numbers["held"] == 0
    assert similar.numbers["per_seed"][0] == {"seed": 0, "related": 0.7,
                                              "letters_fashion": 0.8, "lowercase_fashion": 0.2}
    assert join.met is False and (join.numbers["unchanged"], join.numbers["rechecked"]) == (0, 2)


def test_runs_as_a_file_from_the_repository_root(tmp_path):
    """`python benchmarks/benchmark.py` finds its sibling modules (benchmarks/ is not installed)."""
    path = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--plan", "--json-out",
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(path.read_text())["plan"]["stage1_runs"] == 141
