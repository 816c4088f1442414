"""Smoke tests of benchmarks/benchmark.py: --quick runs every row (norm-policy variants and the
training-length runs too) and writes every figure to its JSON result (--json-out) and the frontier
plots, a diverging row is reported instead of stopping the run, --plan counts the runs and their
time, and the targets turn on the numbers of the runs. The assertions read numbers and structure,
not the report's prose."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import benchmark as bench
from benchmarks import frontier
from benchmarks.progressive_targets import progressive_targets
from benchmarks.protocol import fmt_lr
from benchmarks.rows import Row, RowSpec, Run, default_method
from benchmarks.targets import frontier_targets, lines, lora_at

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ROW = f"default ({default_method()}, no options)"
ROWS = [
    "linear probe", "fine-tune", "TAPS λ=1 full deltas", DEFAULT_ROW, "compact TAPS r=2 λ=1",
    "compact TAPS r=2 budget 0.1", "lora r=2 norms=task", "lora r=2 norms=affine",
    "LoRA r=8 (PEFT)", "LoRA r=16 (PEFT)", "(matched)", "adapter", "fusion (own adapter)",
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


def test_quick_benchmark_runs_every_row(tmp_path, capsys, one_thread, monkeypatch):
    out, result, home = tmp_path / "bench.md", tmp_path / "bench.json", tmp_path / "home"
    # Every training run outside the Manager (stage 1, PEFT rows): which method, which clipping.
    import benchmarks.training as training

    outside: list[tuple[str, float | None]] = []

    def recording_fit(model, method, train, val, cfg, *args, **kwargs):
        outside.append((method.name, cfg.clip_grad))
        return real_fit(model, method, train, val, cfg, *args, **kwargs)

    real_fit = training.fit
    monkeypatch.setattr(training, "fit", recording_fit)
    # "all": the progressive rows too (by default they are left out); the library's lora with
    # two norm policies; the training-length runs (fine-tune and the default, 2 epochs, letters).
    argv = ["--quick", "--methods", "all", "--norms-policies", "task,affine", "--long-epochs",
            "2", "--home", str(home), "--out", str(out)]
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
    assert [t["name"] for t in doc["tasks"]] == ["digits", "letters"] and not doc["reverse"]
    assert all(t[k] > 0 for t in doc["tasks"] for k in ("train", "val", "test", "classes"))
    assert doc["protocol"]["lr_grid"] == GRID and doc["protocol"]["seeds"] == [0, 1]
    assert doc["protocol"]["norms_policies"] == ["task", "affine"] and doc["failed_rows"] == []
    # The matched PEFT LoRA row: the rank whose size is nearest the default's.
    matched = doc["matched"]
    assert matched["target_row"] == DEFAULT_ROW and matched["twin"] is None
    matched_label = f"LoRA r={matched['rank']} matched (PEFT)"
    expected_rows = [matched_label if r == "(matched)" else r for r in ROWS]
    rows = {r["label"]: r for r in doc["rows"]}
    assert list(rows) == expected_rows
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
            # Storage after each task; after the last, the row's total for that seed.
            assert len(run["cumulative_bytes"]) == 2, label
            assert run["cumulative_bytes"][0] < run["cumulative_bytes"][1] == run["total_bytes"]
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
    assert rows[matched_label]["options"]["rank"] == matched["rank"]
    # The default row is `task add` with no method options, whatever the library's default is.
    assert rows[DEFAULT_ROW]["method"] == default_method() and rows[DEFAULT_ROW]["options"] == {}
    # The library's lora, once per norm policy: "affine" stores no running statistics.
    lora_task, lora_affine = rows["lora r=2 norms=task"], rows["lora r=2 norms=affine"]
    assert (lora_task["method"], lora_task["norms"], lora_affine["norms"]) == (
        "lora", "task", "affine")
    assert all(run["config"]["norms"] == "affine" for run in lora_affine["runs"])
    assert lora_affine["task_params"] < lora_task["task_params"]
    # Affine: that variant, the rows whose method defaults to it (adapter and fusion, as
    # recorded; the default row is adapters) and the PEFT row matched to the default's size,
    # which stores norms as the default does; every other row is the method's default "task".
    affine = {r["label"] for r in doc["rows"] if r["policy"] == "affine"}
    default_norms = rows[DEFAULT_ROW]["runs"][0]["config"]["norms"]
    assert matched["norms"] == default_norms == "affine"
    assert affine == {"lora r=2 norms=affine", matched_label} | {
        r["label"] for r in doc["rows"] if r["method"] in ("adapter", "fusion")}
    assert all(run["config"]["norms"] == "affine" for r in doc["rows"]
               if r["method"] in ("adapter", "fusion") for run in r["runs"])
    checks = doc["probe_checks"]
    assert checks["total"] > 0 and checks["ok"] == checks["total"]
    # Outside the Manager too, adapters and fusion train clipped (their methods' default) and
    # nothing else does.
    assert {"adapter", "fusion"} <= {name for name, _ in outside}
    assert all((clip == 1.0) == (name in ("adapter", "fusion")) for name, clip in outside), outside
    for row in (r for r in rows.values() if r["method"] == "taps"):  # active layers, first seed
        for task, active in row["runs"][0]["active"].items():
            k, total = map(int, active.split("/"))
            assert 0 <= k <= total and len(row["runs"][0]["active_names"][task]) == k

    # The printed table shows the same rows and numbers.
    columns, table = _table(report)
    col = {name: i - 1 for i, name in enumerate(columns)}  # index into a row's cells
    assert columns[1:4] == ["digits", "letters", "mean"] and list(table) == expected_rows
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

    # The frontier: one point per row and seed, drawn next to --out; redrawn from the JSON.
    points = doc["frontier"]
    assert len(points) == sum(len(r["runs"]) for r in doc["rows"])
    for point in points:
        row = rows[point["row"]]
        run = next(r for r in row["runs"] if r["seed"] == point["seed"])
        assert point["accuracy"] == run["mean_accuracy"] and _fraction(point["accuracy"])
        own = [b for t, b in run["task_bytes"].items() if t not in run["reused"]]
        assert point["bytes_per_task"] == pytest.approx(
            (sum(own) + run["shared_bytes"]) / len(own))
    prog = rows["progressive (incremental, group auto)"]
    assert prog["bytes_per_task"] > prog["task_bytes"]  # its shared bands, per reader
    for path in (tmp_path / "bench-frontier.png", tmp_path / "bench-growth.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert frontier.main(["--from-json", str(result), "--out-prefix",
                          str(tmp_path / "again")]) == 0
    assert (tmp_path / "again-frontier.png").stat().st_size > 0
    assert (tmp_path / "again-growth.png").stat().st_size > 0
    # Two results of one protocol draw together, the second's rows labelled; another protocol
    # is refused.
    both = frontier.merged([doc, doc])
    assert len(both["frontier"]) == 2 * len(points) and both["runs_drawn"] == 2
    assert {p["row"] for p in both["frontier"]} == \
        {p["row"] for p in points} | {p["row"] + " (run 2)" for p in points}
    assert frontier.main(["--from-json", str(result), str(result), "--out-prefix",
                          str(tmp_path / "both")]) == 0
    assert (tmp_path / "both-frontier.png").stat().st_size > 0
    other = {**doc, "protocol": {**doc["protocol"], "epochs": doc["protocol"]["epochs"] + 1}}
    with pytest.raises(ValueError, match="another protocol"):
        frontier.merged([doc, other])

    # Training length: fine-tune and the default again at 2 epochs on letters, one seed, beside
    # their standard run's figures of that seed and task.
    length = doc["length"]
    assert (length["epochs"], length["standard_epochs"], length["tasks"]) == (2, 1, ["letters"])
    assert [e["key"] for e in length["rows"]] == ["finetune", "default"]
    for entry in length["rows"]:
        standard = rows[entry["label"]]["runs"][0]
        assert entry["standard"]["acc"] == {"letters": standard["acc"]["letters"]}
        assert _fraction(entry["long"]["acc"]["letters"])
        assert entry["lr"] == rows[entry["label"]]["lr"]
        assert entry["long"]["rank"] in (1, 2) and entry["failures"] == []
    assert "Training length: 2 epochs against 1, on letters" in report

    # The targets: each computed, one report line each.
    targets = doc["targets"]
    for group in ("frontier", "compact", "composed", "progressive", "length"):
        texts = [t["text"] for t in targets if t["group"] == group]
        assert "\n".join(texts) in report, group
    front = [t for t in targets if t["group"] == "frontier"]
    assert [t["key"] for t in front] == ["default", "small", "gates", "gates", "adapter",
                                         "fusion"]
    default_target = front[0]
    gap = 100 * (statistics.fmean(rows[DEFAULT_ROW]["mean_accuracy"])
                 - statistics.fmean(rows[matched_label]["mean_accuracy"]))
    assert default_target["numbers"]["gap_pt"] == pytest.approx(gap)
    assert default_target["numbers"]["lora"] == matched_label
    assert default_target["met"] == (default_target["numbers"]["size_met"]
                                     and default_target["numbers"]["accuracy_met"]
                                     and default_target["numbers"]["no_larger"])
    small = front[1]  # the linear probe is a library setting too
    assert small["met"] is not None and "linear probe" in small["numbers"]["candidates"]
    gates_task, gates_affine = front[2:4]
    assert gates_task["row"] == "lora r=2 norms=task" and isinstance(gates_task["met"], bool)
    assert gates_affine["met"] is None  # no compact TAPS row trained with norms=affine
    assert isinstance(front[4]["met"], bool) and front[4]["row"] == "adapter"
    assert front[5]["met"] is None  # needs the lowercase task
    compact = [t for t in targets if t["group"] == "compact"]
    assert {t["key"] for t in compact} == {"step", "budget"}
    budget = next(t for t in compact if t["key"] == "budget")
    assert budget["met"] is True and budget["numbers"]["largest"] <= 0.1
    assert (budget["numbers"]["tasks"], budget["numbers"]["seeds"]) == (4, 2)
    composed = {t["key"]: t for t in targets if t["group"] == "composed"}
    assert set(composed) == {"adapter-size", "fusion-size"}
    assert composed["adapter-size"]["met"] == (composed["adapter-size"]["numbers"]["mean"] <= 0.06)
    assert composed["adapter-size"]["numbers"]["tasks"] == 4
    assert composed["fusion-size"]["met"] == (composed["fusion-size"]["numbers"]["mean"] <= 0.05)
    assert composed["fusion-size"]["numbers"]["tasks"] == 2  # of 2 fusion tasks
    (place,) = [t for t in targets if t["group"] == "length"]
    numbers = place["numbers"]
    assert place["met"] == (numbers["rank_long"] <= numbers["rank_standard"])

    # Progressive rows: a total that counts the shared bands once beside the tasks' own files;
    # the tasks' similarity matrix; their targets, each met or missed with numbers.
    p_group, incremental = rows[ROWS[13]], rows[ROWS[14]]
    for row in (p_group, incremental):
        assert row["total_params"] > base + 2 * row["task_params"], row["label"]
        for run in row["runs"]:
            assert set(run["groups"]) == {"digits", "letters"} and run["shared_params"] > 0
            assert run["shared_params"] / base < 1
            assert any("shared" in band["kinds"] for band in run["shared"])
    similarity = p_group["runs"][0]["similarity"]
    assert similarity["tasks"] == ["digits", "letters"]
    matrix = similarity["matrix"]
    assert [round(matrix[i][i], 2) for i in range(2)] == [1.0, 1.0]
    assert matrix[0][1] == pytest.approx(matrix[1][0]) and -1 <= matrix[0][1] <= 1
    assert incremental["runs"][0]["similarity"] == similarity  # its stored signatures: the same
    progressive = [t for t in targets if t["group"] == "progressive"]
    assert [(t["key"], t["row"]) for t in progressive] == [
        ("progressive-size", ROWS[13]), ("progressive-size", ROWS[14]), ("similarity", None),
        ("join", ROWS[14])]
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

    # The product path: a kept --home holds one base per Manager row and seed (the long runs'
    # too), every task ready.
    from taps_cl.manager import Manager

    managed = [r for r in doc["rows"] if r["method"] != "peft-lora" and r["kind"] != "fusion"]
    with Manager(home) as manager:
        # Stage 1 of the progressive rows ran in throw-away registries.
        bases = sum(len(r["seeds"]) for r in managed) + len(length["rows"])
        assert len(manager.list_bases()) == bases
        tasks = manager.list_tasks()
        assert len(tasks) == 2 * bases + len(fusion["seeds"]) - len(length["rows"])
        assert {t.status for t in tasks} == {"ready"}
        assert [t.name for t in tasks if t.base == "long-default-s0"] == [
            "long-default-s0-letters"]
        affine = manager.get_task("bench-lib-lora-r2-norms-affine-s0-digits")
        assert (affine.method, affine.method_config["norms"]) == ("lora", "affine")
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


def test_a_diverging_row_is_reported_not_fatal(tmp_path, one_thread):
    """A rate whose loss goes non-finite scores nothing in stage 1; a row that diverges at its
    only rate has no figures, is listed as such, and the run goes on to its end."""
    common = ["--quick", "--tasks", "digits", "--seeds", "0", "--select-train", "32",
              "--max-train", "32", "--step-rounds", "0"]
    path = tmp_path / "select.json"
    assert bench.main([*common, "--methods", "finetune", "--lr-grid", "1e-3,1e30",
                       "--json-out", str(path)]) == 0
    (row,) = json.loads(path.read_text())["rows"]
    assert [v["val"] is None for v in row["val_by_lr"]] == [False, True]
    assert row["lr"] == 1e-3 and row["stage1_errors"][0]["lr"] == 1e30
    path, out = tmp_path / "stage2.json", tmp_path / "stage2.md"
    assert bench.main([*common, "--methods", "finetune,linear", "--lr-grid", "1e30",
                       "--json-out", str(path), "--out", str(out)]) == 0
    doc = json.loads(path.read_text())
    assert [r["label"] for r in doc["failed_rows"]] == ["linear probe", "fine-tune"]
    for failed in doc["failed_rows"]:
        (failure,) = failed["failures"]
        assert (failure["seed"], failure["task"], failure["lr"]) == (0, "digits", 1e30)
    assert doc["rows"] == [] and doc["frontier"] == []
    assert "- fine-tune: seed 0 failed on digits at lr 1e30" in out.read_text()


def _plan(tmp_path: Path, *argv: str) -> dict:
    """The plan --plan computes for these options, from its JSON."""
    path = tmp_path / "plan.json"
    assert bench.main(["--plan", *argv, "--json-out", str(path)]) == 0
    return json.loads(path.read_text())["plan"]


def _seeds(plan: dict) -> dict[int, int]:
    return {s["seeds"]: s["rows"] for s in plan["seeds"]}


def test_plan_counts_runs_and_estimate_without_training(tmp_path):
    plan = _plan(tmp_path)
    # 15 rows × 3 rates × 4 tasks, the fusion row 3 (its first task is the adapter row's): linear,
    # fine-tune, TAPS, the default, compact r=4/8 and budget, lora r=8, PEFT LoRA r=4/8/16/32 and
    # matched, adapter, fusion.
    assert (len(plan["rows"]), plan["rates"], len(plan["tasks"])) == (15, 3, 4)
    assert plan["rows"][3] == "default" and "lib-lora-r8" in plan["rows"]
    assert [k for k in plan["rows"] if k.startswith("lora-")] == [
        "lora-r4", "lora-r8", "lora-r16", "lora-r32", "lora-matched"]
    assert plan["stage1_runs"] == 177 and plan["images"]["select_train"] == 350
    assert _seeds(plan) == {1: 4, 3: 11} and plan["row_runs"] == 37
    assert plan["stage2_runs"] == 147 and plan["images"]["max_train"] == 800
    assert plan["total_s"] / 60 <= 120 and plan["over"] is False  # the defaults fit 120 minutes
    assert plan["total_s"] == pytest.approx(plan["stage1_s"] + plan["stage2_s"] + plan["timing_s"])
    assert plan["long_s"] == 0 and plan["long_rows"] == []
    assert _plan(tmp_path, "--max-train", "3000")["over"] is True
    # Three seeds for adapter and fusion too would not fit: hence --adapter-seeds 1 by default.
    plan = _plan(tmp_path, "--adapter-seeds", "3")
    assert _seeds(plan) == {1: 2, 3: 13} and plan["row_runs"] == 41 and plan["over"] is True
    assert _plan(tmp_path, "--adapter-seeds", "3", "--time-limit", "130")["over"] is False
    # The progressive comparison: TAPS, adapters and both progressive rows, 3 seeds each but
    # TAPS; it is meant to take at most 40 minutes by the plan.
    plan = _plan(tmp_path, "--methods", "taps,adapter,progressive,progressive-group")
    assert plan["rows"] == ["taps", "adapter", "progressive-group", "progressive"]
    assert _seeds(plan) == {1: 1, 3: 3} and plan["row_runs"] == 10
    assert plan["total_s"] / 60 <= 40


def test_plan_of_norm_policies_training_length_and_order(tmp_path):
    """--norms-policies runs the rows --norms-rows names once per policy (adapter and fusion
    together), --long-epochs adds the long runs (bringing their rows), --reverse the order."""
    plan = _plan(tmp_path, "--methods", "finetune,compact-r8,lib-lora,lora-r8,adapter,fusion",
                 "--norms-policies", "task,affine", "--norms-rows", "compact,lib-lora,fusion")
    assert plan["rows"] == [
        "finetune", "compact-r8-norms-task", "compact-r8-norms-affine", "lib-lora-r8-norms-task",
        "lib-lora-r8-norms-affine", "lora-r8", "adapter-norms-task", "adapter-norms-affine",
        "fusion-norms-task", "fusion-norms-affine"]
    # The reduced run: six rows at norms task and affine (PEFT LoRA too: benchmarks/peft_lora.py
    # applies the library's policies), 2 tasks, 3 seeds, fitting 40 minutes by the plan.
    plan = _plan(tmp_path, "--methods", "finetune,lora-r4,lora-r8,lora-r16,lib-lora-r8,compact-r8,"
                 "adapter", "--ranks", "8", "--norms-policies", "task,affine", "--norms-rows",
                 "finetune,lib-lora,compact,adapter,lora", "--tasks", "fashion,lowercase",
                 "--adapter-seeds", "3", "--max-train", "400", "--select-train", "200",
                 "--step-rounds", "0", "--time-limit", "40")
    assert len(plan["rows"]) == 14 and all(k.endswith(("-task", "-affine")) for k in plan["rows"])
    assert _seeds(plan) == {3: 14} and plan["over"] is False and plan["limit_min"] == 40
    # Training length: a named row not among --methods joins the run; its long runs are counted.
    plan = _plan(tmp_path, "--methods", "finetune", "--long-epochs", "10", "--long-methods",
                 "finetune,progressive")
    assert plan["rows"] == ["finetune", "adapter", "progressive"]
    assert plan["long_rows"] == ["finetune", "progressive"] and plan["long_runs"] == 4
    assert plan["long_s"] > 0 and plan["total_s"] == pytest.approx(
        plan["stage1_s"] + plan["stage2_s"] + plan["timing_s"] + plan["long_s"])
    # A norm-policy variant named for the long runs brings its row and is run alone.
    plan = _plan(tmp_path, "--methods", "finetune", "--norms-policies", "task,base",
                 "--long-epochs", "10", "--long-methods", "lib-lora-r8-norms-base")
    assert plan["rows"] == ["finetune", "lib-lora-r8-norms-task", "lib-lora-r8-norms-base"]
    assert plan["long_rows"] == ["lib-lora-r8-norms-base"]
    assert list(_plan(tmp_path, "--reverse")["tasks"]) == [
        "lowercase", "letters", "digits", "fashion"]
    for bad in (["--norms-policies", "stats"], ["--long-epochs", "3", "--long-tasks", "x"]):
        with pytest.raises(SystemExit) as refused:
            bench.main(["--plan", *bad])
        assert refused.value.code == 2
    with pytest.raises(SystemExit, match="--long-methods: unknown nothing"):
        bench.main(["--plan", "--long-epochs", "3", "--long-methods", "nothing"])
    with pytest.raises(SystemExit, match="--norms-rows: unknown nothing"):
        bench.main(["--plan", "--norms-rows", "nothing"])


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


def test_frontier_targets_are_computed_from_the_runs(monkeypatch):
    """The targets of accuracy per stored number turn on the rows' means and sizes: the default
    against its matched PEFT LoRA, the best small library row against fine-tuning, compact TAPS
    against the library's lora at equal size and policy, adapters against PEFT LoRA at their
    size, fusion against its adapters on lowercase. The default row counts as a compact TAPS row
    only while the library's default is compact TAPS (here: first as if it were, then as it is)."""
    import benchmarks.targets as targets_module

    monkeypatch.setattr(targets_module, "default_is_compact", lambda: True)
    base = 1000

    def row(key, kind, method, accs, size, norms=None, reads=None, lowercase=None, options=None):
        runs = []
        for seed, acc in enumerate(accs):
            tasks = {"fashion": acc, "lowercase": acc if lowercase is None else lowercase[seed]}
            runs.append(Run(seed, acc=tasks, task_params={t: size * base for t in tasks},
                            config={} if norms is None else {"norms": norms}))
        label = key if norms is None else f"{key} norms={norms}"
        spec = RowSpec(key if norms is None else f"{key}-norms-{norms}", label, kind, method,
                       options or {}, norms=norms, reads=reads)
        return Row(spec, 1e-2, {}, runs)

    ft = row("finetune", "finetune", "finetune", [0.92, 0.93], 1.0)
    default = row("default", "default", "taps", [0.90, 0.91], 0.10)
    matched = row("lora-matched", "peft", "peft-lora", [0.88, 0.89], 0.101)
    r4 = row("lora-r4", "peft", "peft-lora", [0.80, 0.80], 0.056)
    r8 = row("lora-r8", "peft", "peft-lora", [0.86, 0.86], 0.083)
    small = row("progressive", "progressive", "progressive", [0.91, 0.91], 0.02)
    compact = row("compact-r8", "compact", "taps", [0.88, 0.88], 0.11, norms="task")
    lib = row("lib-lora-r8", "lib-lora", "lora", [0.86, 0.87], 0.12, norms="task")
    lib_base = row("lib-lora-r8", "lib-lora", "lora", [0.5, 0.5], 0.09, norms="base")
    adapter = row("adapter", "adapter", "adapter", [0.79, 0.79], 0.07, reads=None,
                  lowercase=[0.80, 0.80])
    fusion = row("fusion", "fusion", "fusion", [0.78, 0.78], 0.05, reads="adapter",
                 lowercase=[0.82, 0.81])
    rows = [ft, default, compact, lib, lib_base, r4, r8, matched, adapter, fusion, small]
    chosen = {"rank": 13, "target_row": "default", "twin": None}
    targets = frontier_targets(rows, base, chosen)
    assert lines("frontier", targets)[1:] == [t.text for t in targets]
    first, best, gates, gates_base, versus, fused = targets
    # The default: 0.10× ≤ 0.15×, +2.0 pt over its matched LoRA (0.101×): met.
    assert first.met is True and first.numbers["gap_pt"] == pytest.approx(2.0)
    assert first.numbers["lora"] == "lora-matched" and first.numbers["size"] == 0.1
    # ≤ 0.05× per task: progressive and fusion; progressive, 1.5 pt below fine-tuning: met.
    assert best.met is True and best.row == "progressive"
    assert best.numbers["gap_pt"] == pytest.approx(-1.5)
    assert best.numbers["candidates"] == ["fusion", "progressive"]
    # Compact r=8 (0.11×) and the default, compact TAPS too (0.10×), against lora r=8 at norms
    # task (0.12×): the default is the best of them, +4.0 pt, met; the lora at norms base has no
    # compact row of its policy: not measured.
    assert gates.met is True and gates.numbers["gap_pt"] == pytest.approx(4.0)
    assert gates.numbers["best"] == "default"
    assert gates_base.met is None and gates_base.row == "lib-lora-r8 norms=base"
    # The adapter at 0.07× against PEFT LoRA interpolated in log size between r=4 (0.056×, 80.0)
    # and r=8 (0.083×, 86.0).
    w = (math.log(70) - math.log(56)) / (math.log(83) - math.log(56))
    assert versus.numbers["lora_accuracy"] == pytest.approx(100 * (0.80 + w * 0.06))
    assert versus.numbers["lora_side"] == "equal" and versus.met is False
    # Fusion on lowercase: 81.5 against the adapter's 80.0: +1.5 pt, met.
    assert fused.met is True and fused.numbers["gap_pt"] == pytest.approx(1.5)
    # Below the smallest rank, LoRA stores more: the comparison says so.
    acc, how, side = lora_at([r4, r8], 0.03 * base)
    assert (acc, side) == (0.80, "larger") and "stores more" in how
    # Without the default or its matched row, that target is not measured.
    assert frontier_targets([ft, compact, lib], base, None)[0].met is None
    # A default that is not compact TAPS (adapters): compact r=8 alone against lora, +1.5 pt.
    monkeypatch.setattr(targets_module, "default_is_compact", lambda: False)
    gates = frontier_targets(rows, base, chosen)[2]
    assert gates.met is True and gates.numbers["best"] == "compact-r8 norms=task"
    assert gates.numbers["gap_pt"] == pytest.approx(1.5)


def test_runs_as_a_file_from_the_repository_root(tmp_path):
    """`python benchmarks/benchmark.py` finds its sibling modules (benchmarks/ is not installed)."""
    path = tmp_path / "plan.json"
    done = subprocess.run([sys.executable, "benchmarks/benchmark.py", "--plan", "--json-out",
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(path.read_text())["plan"]["stage1_runs"] == 177


def test_every_stage_trains_a_row_with_its_method_s_own_options():
    """Stage 1 and the PEFT rows train outside the Manager: their TrainConfig must carry the
    method's own defaults (the adapters' clipping) as the Manager's stage 2 does, the row's rate
    kept."""
    import argparse

    from benchmarks.protocol import Bench
    from taps_cl.methods.catalog import get_method

    args = argparse.Namespace(epochs=3, batch_size=32, weight_decay=0.0)
    b = Bench(args, "timm:test_resnet", frozenset(), {}, 1, 1, Path("w"), {}, [], print)
    adapter = b.train_config(1e-2, 1, get_method("adapter"))
    assert (adapter.lr, adapter.clip_grad, adapter.seed) == (1e-2, 1.0, 1)
    assert b.train_config(3e-3, 0, get_method("fusion", fuse="a")).clip_grad == 1.0
    assert b.train_config(1e-3, 0, get_method("taps")).lr == 1e-3
    assert b.train_config(1e-3, 0, get_method("taps")).clip_grad is None
    assert b.train_config(1e-3, 0).clip_grad is None


def test_the_header_names_the_rows_that_clip():
    """The protocol line says which rows clip their gradients, from each row's method and recorded
    options (`Method.train_defaults`): adapters and fusion clip at 1, TAPS and PEFT's rows not."""
    from benchmarks.report import clipping_note

    def row(key, kind, method, config):
        spec = RowSpec(key, key, kind, method, {})
        return Row(spec, 1e-2, {}, [Run(0, acc={"t": 0.5}, config=config)])

    taps = row("compact-r8", "compact", "taps", {"rank": 8})
    peft = row("lora-r8", "peft", "peft-lora", {"rank": 8})
    adapter = row("adapter", "adapter", "adapter", {"norms": "affine"})
    fusion = row("fusion", "fusion", "fusion", {"fuse": ["a"]})
    assert clipping_note([taps, peft]) == "no gradient clipping"
    assert clipping_note([taps, adapter, peft, fusion, adapter]) == (
        "no gradient clipping but in the adapter and fusion rows (norm 1), their methods' default")
