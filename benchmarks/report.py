"""The benchmark's report: the markdown table, the notes, the targets, and the JSON result.

`report` assembles what is printed (and written with --out): a header on the protocol, one table
row per method row (accuracy per task and mean, seeds, the chosen rate, stored parameters and
bytes per task and for base + all tasks, time as a ratio to fine-tuning), the rows that diverged,
the learning-rate selection, the training-length table (--long-epochs), notes, and the targets
each met or missed with its numbers. `result` holds the same figures as numbers, for --json-out,
with every run's per-seed point of the frontier plot (benchmarks/frontier.py draws them).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
from typing import Any

import torch

from benchmarks.frontier import points
from benchmarks.length import Length, length_json, length_table
from benchmarks.progressive import groups_text
from benchmarks.progressive_targets import similarity_runs
from benchmarks.protocol import (
    Bench,
    TaskDef,
    fmt_acc,
    fmt_bytes,
    fmt_lr,
    fmt_params,
    plural,
)
from benchmarks.rows import (
    DEFAULT,
    PROGRESSIVE_GROUP,
    PROGRESSIVE_KINDS,
    Row,
    Run,
    epoch_ratio,
    measured,
    policy_of,
)
from benchmarks.targets import Target, lines
from taps_cl.methods.catalog import load_builtin, stored_method
from taps_cl.methods.progressive.method import ProgressiveConfig


def render(rows: list[Row], tasks: list[TaskDef], base_params: int, header: list[str],
           notes: list[str]) -> str:
    """The markdown report: header lines, the table (rows with a run), notes."""
    rows = measured(rows)
    ft = next((r for r in rows if r.kind == "finetune"), None)
    n = len(tasks)
    cols = [t.name for t in tasks] + [
        "mean", "seeds", "lr", "task params (mean)", "task bytes (mean)",
        f"total params (base + {n} tasks)", f"total bytes (base + {n} tasks)",
        "time/epoch vs FT", "step vs FT (interleaved)", "img/s"]
    lines = [*header, "", "| method | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        accs = [fmt_acc(r.task_acc(t.name)) for t in tasks]
        accs.append(fmt_acc([run.mean_acc for run in r.runs], bold=True))
        sizes = [str(len(r.runs)), fmt_lr(r.lr),
                 f"{fmt_params(r.task_params)} ({r.task_params / base_params:.3f}×)",
                 fmt_bytes(r.task_bytes),
                 f"{fmt_params(r.total_params)} ({r.total_params / base_params:.2f}×)",
                 fmt_bytes(r.total_bytes)]
        if ft is not None:
            step = (f"{r.step_seconds / ft.step_seconds:.2f}×"
                    if r.step_seconds and ft.step_seconds else "–")
            speed = [f"{epoch_ratio(r, ft):.2f}×", step]
        else:
            speed = ["–", "–"]
        first = r.runs[0]  # its own tasks only: not fusion's reused first task
        speeds = [v for t, v in first.images_per_s.items() if t not in first.reused]
        speed.append(f"{statistics.median(speeds):.0f}")
        lines.append(f"| {r.label} | " + " | ".join(accs + sizes + speed) + " |")
    return "\n".join(lines + [""] + notes) + "\n"


def _factor_rate(scale: float) -> str:
    return "the grid rate (factor_lr = lr)" if scale == 1 else f"factor_lr = {scale:g} × lr"


def lr_lines(rows: list[Row], args: argparse.Namespace) -> list[str]:
    """Stage 1 per row: validation accuracy at each grid rate and the chosen rate."""
    grid = ", ".join(map(fmt_lr, args.lr_values))
    if len(args.lr_values) == 1:
        return [f"Learning rate: one value given ({grid}), no selection; every row trains at it."]
    out = [f"Learning rates (stage 1): grid {{{grid}}} for every row; each row's rate is the one "
           "with the best validation accuracy (mean over tasks; ties to the smaller rate), each "
           f"task's training set subsampled to {args.select_train} images (class-stratified), "
           f"seed {args.seed_values[0]}, {plural(args.epochs, 'epoch')}. Compact TAPS factors "
           f"train at {_factor_rate(args.factor_lr_scale)}; TAPS scores keep score_lr."]
    for r in rows:
        scores = " · ".join(
            f"{fmt_lr(lr)} {'diverged' if s is None else f'{100 * s:.1f}'}"
            for lr, s in r.val_by_lr.items())
        chosen = ("diverged at every rate: not run in stage 2" if r.lr is None
                  else f"chosen lr {fmt_lr(r.lr)}")
        out.append(f"- {r.label}: val {scores} → {chosen}")
    return out


def failure_lines(rows: list[Row]) -> list[str]:
    """The rows without a complete run and the seeds that failed, with the first error lines."""
    out = []
    for r in rows:
        if r.lr is None:
            why = "; ".join(f"{fmt_lr(lr)}: {e}" for lr, e in r.stage1_errors.items())
            out.append(f"- {r.label}: diverged at every rate of the grid in stage 1, so no "
                       f"figures ({why})")
        for f in r.failures:
            out.append(f"- {r.label}: seed {f['seed']} failed on {f['task']} at lr "
                       f"{fmt_lr(f['lr'])} ({f['error']}); "
                       + ("no seed completed, so no figures" if not r.runs
                          else "left out of its means"))
    return ["Rows or seeds without figures (training failed, most likely a non-finite loss):",
            *out] if out else []


def composed_notes(rows: list[Row], bench: Bench) -> list[str]:
    """Notes on the adapter and fusion rows (if chosen): options and what the sizes count."""
    out = []
    rows = measured(rows)
    adapter = next((r for r in rows if r.kind == "adapter"), None)
    fusion = next((r for r in rows if r.kind == "fusion"), None)
    if adapter is not None:
        cfg = adapter.runs[0].config
        out.append(f"- adapter: a bottleneck adapter on every block's output (reduction "
                   f"{cfg.get('reduction')}, {cfg.get('activation')}; "
                   f"{adapter.runs[0].active[bench.tasks[0].name]} blocks), norms and head per "
                   "task; task params/bytes = its artifact.")
    if fusion is not None:
        cfg = fusion.runs[0].config
        first = bench.tasks[0].name
        out.append(f"- fusion: task {first} is the adapter row's task {first} (same registry, "
                   "base and seed: its accuracy, size and time are that task's, reused, not "
                   "trained again); every later task fuses the adapter row's adapters of all "
                   f"earlier tasks (own adapter {cfg.get('own_adapter')}, reduction "
                   f"{cfg.get('reduction')}, key reduction {cfg.get('key_reduction')}, value reg "
                   f"{cfg.get('value_reg')}). Task params/bytes (mean) = the fusion tasks' own "
                   "artifacts only (fusion layers, own adapter, norms, head; the fused adapters "
                   "are their tasks' artifacts); total = base + the row's tasks + every adapter "
                   "they read, each artifact once (the registry's pins), i.e. here base + "
                   f"{plural(len(bench.tasks) - 1, 'fusion task')} + "
                   f"{plural(len(bench.tasks) - 1, 'adapter')}. Its stage-1 score, time/epoch "
                   "and img/s are over the fusion tasks.")
    return out


def progressive_notes(rows: list[Row], bench: Bench) -> list[str]:
    """Notes on the progressive rows (if chosen): bands, groups, sizes, the similarity matrix."""
    prog = [r for r in measured(rows) if r.kind in PROGRESSIVE_KINDS]
    if not prog:
        return []
    cfg = prog[0].runs[0].config
    out = [f"- progressive (docs/architecture.md, progressive adaptation): a bottleneck adapter "
           f"(reduction {cfg.get('reduction')}, {cfg.get('activation')}) on every block, the "
           f"blocks in three bands — the first {cfg.get('shared_fraction'):g} of them shared by "
           f"every task of the row's base, the last {cfg.get('task_fraction'):g} (at least one "
           "block) task-specific with their norm layers and the head, the blocks between shared "
           "within a similarity group; shared and group bands (adapters and the norm layers of "
           "their blocks) are stored once each as shared artifacts that the members pin. Each "
           "progressive row registers the base under a name of its own, so the rows share "
           "nothing. Task params/bytes (mean) = each task's own artifact; total = base + own "
           "artifacts + the shared artifacts, each once (`Manager.budget` of the row's base). "
           "Stage 1 ran each row whole through the Manager in a throw-away registry per rate "
           "(training sets cut to --select-train), scored on the full validation split. The "
           "interleaved step times a step of a base's first progressive task (all three bands "
           "train); later incremental tasks train less."]
    for r in prog:
        if r.kind == PROGRESSIVE_GROUP:
            k = bench.args.progressive_groups
            out.append(f"- {r.label}: the {len(bench.tasks)} tasks trained as one `group train` "
                       "run (each step one batch of every task, the mean of their losses; the "
                       "epoch with the best mean validation accuracy kept), grouped by "
                       + ("average-linkage clustering of their signatures' cosine matrix "
                          "(automatic: merge while the average similarity ≥ 0.5)" if k is None
                          else f"clustering into {plural(k, 'group')} (--progressive-groups)")
                       + ". Its time/epoch and img/s give each task an equal share of the joint "
                       "epoch.")
        else:
            # The threshold the tasks were added with, as the registry recorded it.
            threshold = r.runs[0].config.get("join_threshold", ProgressiveConfig.join_threshold)
            out.append(f"- {r.label}: tasks added one at a time with `--group auto`: the first "
                       "trains all three bands (opening the shared band and its group); a later "
                       "task reads the shared band frozen and joins the group whose members' "
                       f"signatures it matches best when the mean cosine ≥ {threshold:g} "
                       "(training its task band only), else opens a group of its own (training "
                       "its group and task bands). After every add it re-reads each earlier "
                       "task's artifact and pinned shared bands; `Manager.verify` checks the "
                       "base at the end.")
        for run in r.runs:
            opened = ""
            if run.opened:
                joined = [t for t, o in run.opened.items() if not o]
                opened = (f"; joined an existing group: {', '.join(joined)}" if joined
                          else "; every task opened a group of its own")
            out.append(f"  - seed {run.seed}: groups {groups_text(run)}{opened}; shared "
                       f"artifacts {fmt_params(run.shared_params)} "
                       f"({run.shared_params / bench.base_params:.3f}× base): "
                       + "; ".join(f"{'/'.join(b.kinds)} band {fmt_params(b.params)} read by "
                                   f"{', '.join(b.tasks)}" for b in run.shared))
    return out


def similarity_table(rows: list[Row]) -> list[str]:
    """The cosine-similarity matrix of the tasks' gradient signatures (first seed), markdown."""
    runs = similarity_runs(rows)
    if not runs:
        return []
    row, run = runs[0]
    assert run.similarity is not None
    names, matrix = run.similarity
    out = [f"Similarity of the benchmark tasks: cosine of their gradient signatures "
           f"(taps_cl.analysis.similarity; {row.label}, seed {run.seed}):", "",
           "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    out += [f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |"
            for name, values in zip(names, matrix, strict=True)]
    for other, u in similarity_runs(rows, every=True):
        if u.seed == run.seed and u is not run:  # same seed, same data: same signatures
            same = "the same matrix" if u.similarity == run.similarity else "a DIFFERENT matrix"
            out += ["", f"{other.label}, seed {u.seed} (its stored signatures, "
                        f"`Manager.similarity`): {same}."]
    return out


def clipping_note(rows: list[Row]) -> str:
    """Which rows clip their gradients: those whose method does by default for its recorded
    options (`Method.train_defaults`, which every stage of the benchmark applies)."""
    clips: dict[float, list[str]] = {}
    for r in rows:
        if not r.runs or r.method not in load_builtin():  # PEFT's rows: never clipped
            continue
        clip = stored_method(r.method, r.runs[0].config).train_defaults().get("clip_grad")
        if clip and r.method not in clips.get(clip, []):
            clips.setdefault(clip, []).append(r.method)
    if not clips:
        return "no gradient clipping"
    parts = [f"{' and '.join(names)} rows (norm {clip:g})" for clip, names in clips.items()]
    return "no gradient clipping but in the " + "; the ".join(parts) + ", their methods' default"


def seed_note(rows: list[Row], args: argparse.Namespace) -> str:
    """Which seeds the adapter, fusion and progressive rows used, for the header."""
    if any(r.kind in PROGRESSIVE_KINDS for r in rows):
        seeds = ", ".join(map(str, args.progressive_seed_values))
        return (f"(progressive rows and the adapter row beside them: seeds {seeds}, "
                f"--progressive-seeds; fusion: the first {args.adapter_seeds} of them, "
                "--adapter-seeds)")
    if not any(r.kind in ("adapter", "fusion") for r in rows):
        return ""  # no such row (a default row of adapters runs every seed, as any seeded row)
    return f"(adapter and fusion rows: the first {args.adapter_seeds}, --adapter-seeds)"


def matched_note(matched: dict[str, Any] | None) -> str:
    """The note on the parameter-matched LoRA row (`matched`: what `_run` chose, or None)."""
    if matched is None:
        return ("no parameter-matched LoRA row (not selected, or no default or compact TAPS "
                "row to match)")
    note = (f"matched rank {matched['rank']}: its analytic task size "
            f"({fmt_params(matched['expected_params'])}) is the nearest to "
            f"{matched['target_row']}'s mean stored size "
            f"({fmt_params(matched['target_params'])})")
    if matched["twin"] is not None:
        note += f"; that is the {matched['twin']} row, so it is not run twice"
    return note


def method_notes(rows: list[Row], bench: Bench) -> list[str]:
    """Notes on the default row, the library's lora rows and the norm policies (if chosen)."""
    out = []
    default = next((r for r in rows if r.kind == DEFAULT), None)
    if default is not None and default.runs:
        out.append(f"- default: `taps-cl task add` with no method options — method "
                   f"'{default.method}', its config as the registry recorded it: "
                   + _config(default.runs[0].config) + "; learning rate from the grid like "
                   "every row.")
    lib = next((r for r in measured(rows) if r.kind == "lib-lora"), None)
    if lib is not None:
        out.append("- lora: the library's method 'lora' (plain low-rank deltas on the adaptable "
                   "layers, no gates) through the Manager like the TAPS rows; config as "
                   "recorded: " + _config(lib.runs[0].config) + ".")
    policies = sorted({r.spec.norms for r in rows if r.spec.norms is not None})
    if policies:
        out.append(f"- norms=P: the row's method with the norm policy P ({', '.join(policies)}; "
                   "taps_cl.methods.norms): task = statistics and affine per task, affine = the "
                   "base's running statistics (norm layers in eval mode while training) with "
                   "affine parameters trained and stored, base = norm layers untouched and not "
                   "stored, split = the base's statistics in the first norm_split of the layers. "
                   "The PEFT rows apply the same policy (benchmarks/peft_lora.py). Rows without "
                   "'norms=' use their method's default.")
    return out


def _config(config: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in config.items() if not isinstance(v, (list, dict)))


def report(bench: Bench, rows: list[Row], sizes: dict[str, dict[str, int]],
           targets: list[Target], matched: dict[str, Any] | None, *, weights_note: str,
           command: str, wall: float, load_start: str, load_end: str,
           length: Length | None = None) -> str:
    """The whole markdown report of a run: header, table, learning rates, notes, targets."""
    args = bench.args
    everything, rows = rows, measured(rows)
    checks = [ok for r in rows for run in r.runs for ok in run.probes]
    probe = (f"{sum(checks)}/{len(checks)} probe checks unchanged" if checks
             else "no probe checks (single task)")
    seeds = ", ".join(map(str, args.seed_values))
    header = [
        f"## taps-cl benchmark — {bench.spec} at {args.img_size} px, {len(bench.tasks)} tasks",
        "",
        "- task order: " + " → ".join(t.name for t in bench.tasks)
        + (" (--reverse: the default order reversed)" if args.reverse else ""),
        f"- base: {bench.spec}, {bench.base_params:,} parameters without its classifier (= 1.0× "
        f"base); {weights_note}; its weights file {fmt_bytes(bench.base_bytes)} (with the "
        "original classifier)",
        f"- per task: max_train {args.max_train}, max_test {args.max_test} (+ validation = 10% "
        f"of max_train carved from the training pool), epochs {args.epochs}, batch "
        f"{args.batch_size}, AdamW (cosine), weight decay {args.weight_decay:g}, img "
        f"{args.img_size} px — the same for every row; learning rate chosen per row (below); "
        + clipping_note(rows),
        "- actual images (train/val/test, first seed): " + ", ".join(
            f"{t}: {s['train']}/{s['val']}/{s['test']}" for t, s in sizes.items()),
        f"- seeds: a row with k in the seeds column ran with the first k of seeds {seeds} "
        "and, for k > 1, shows mean ± sample standard deviation (n − 1) over the seeds, per task "
        "and for the mean" + (f" {note}" if (note := seed_note(rows, args)) else ""),
        f"- command: `{command}`",
        f"- wall time: {wall / 60:.1f} min (whole script, {torch.get_num_threads()} torch "
        f"threads); 1-min load average {load_start} at start, {load_end} at the end (this run "
        "alone adds about 2: more means other jobs shared the cores and slowed every row)",
    ]
    taps_rows = [r for r in rows if r.method == "taps"]
    taps = taps_rows[0].runs[0].config if taps_rows else {}
    compact_rows = [r for r in rows if r.kind in ("compact", "budget")]
    factored = (f"; compact rows factorise groups=1 layers of ≥ "
                f"{compact_rows[0].runs[0].config['factor_min_params']:,} weights (others keep "
                "full deltas), factors at the row's lr") if compact_rows else ""
    loras = [r for r in rows if r.kind == "peft"]
    lora_layers = loras[0].runs[0].active[bench.tasks[0].name] if loras else "–"
    failed = failure_lines(everything)
    long = ([*length_table(length, bench.base_params), ""] if length is not None else [])
    notes = [
        *([*failed, ""] if failed else []),
        *lr_lines(everything, args),
        "",
        *long,
        "Notes:",
        *[f"- {t.name}: {t.about}, {sizes[t.name]['classes']} classes" for t in bench.tasks],
        "- accuracy: % on each task's test images; linear, fine-tune and TAPS are measured on the "
        "model restored from the registry (merged weights), adapter and fusion on the restored "
        "model with its modules attached; LoRA on the trained PEFT model.",
        "- task params/bytes: what a task stores (TAPS: active-layer deltas or factors + every "
        "norm layer's parameters and statistics + head; LoRA: A/B factors + norms + head, "
        "counted the same way), bytes = its artifact file (LoRA: the same safetensors "
        "serialisation with a shorter metadata record). Totals = base + Σ tasks from "
        "`Manager.budget`; fine-tune: N whole models (N × base + heads, Σ task files), linear: "
        "base + heads.",
        *method_notes(everything, bench),
        *composed_notes(rows, bench),
        *progressive_notes(rows, bench),
        f"- LoRA (peft.inject_adapter_in_model on the timm model) at ranks "
        f"{', '.join(map(str, args.lora_rank_values))}; {matched_note(matched)}. Targets Linear "
        f"and groups=1 Conv2d layers ({lora_layers} adaptable layers): PEFT accepts a grouped "
        "conv only when the rank is a multiple of its groups, so depthwise convs stay frozen. "
        "Rank capped per layer at min(C_in·k², C_out); alpha = "
        f"{'rank (scale 1)' if args.lora_alpha is None else f'{args.lora_alpha:g}'}; no "
        "dropout. Head trains too; norm layers as the row's policy says (default task: "
        "statistics and affine per task, like TAPS).",
        (f"- TAPS: λ {args.lam:g}, penalty '{args.penalty}', τ {taps['tau']:g}, score init "
         f"{taps['score_init']:g}, score lr {taps['score_lr']:g}, warm-up epochs "
         f"{taps['warmup_epochs']} (as the registry recorded it), stored in "
         f"{taps['store_dtype']}{factored}; the budget row raises λ by dual ascent and switches "
         f"off the layers worth least until the task fits. Registry: {probe}.") if taps_rows
        else f"- Registry: {probe}.",
        "- time/epoch: median over tasks of (seconds per epoch ÷ fine-tune's on the same task), "
        "first seed, from fit's history (an epoch includes its validation pass); img/s = "
        "training images × epochs ÷ those seconds (median over tasks). 'step (interleaved)': "
        f"median seconds per training step (batch {args.batch_size}), all rows timed "
        f"round-robin after the runs ({plural(args.step_rounds, 'round')}) so load from other "
        "processes hits them alike.",
        "",
        "TAPS active layers per task (first seed; of the adaptable Conv2d/Linear layers):",
    ]
    for r in taps_rows:
        run = r.runs[0]
        notes.append(f"- {r.label}: " + ", ".join(
            f"{t} {a} ({fmt_params(run.task_params[t])})" for t, a in run.active.items()))
        for t, names in run.active_names.items():
            notes.append(f"  - {t}: {', '.join(names) if names else '(none)'}")
    similar = similarity_table(rows)
    notes += ["", *similar] if similar else []
    notes += ["", *lines("frontier", targets), "", *lines("compact", targets),
              "", *lines("composed", targets), "", *lines("progressive", targets),
              "", *lines("length", targets)]
    return render(rows, bench.tasks, bench.base_params, header, notes)


def _run_json(run: Run) -> dict[str, Any]:
    out = dataclasses.asdict(run)
    out["reused"] = sorted(run.reused)
    if run.similarity is not None:
        out["similarity"] = {"tasks": run.similarity[0], "matrix": run.similarity[1]}
    out["mean_accuracy"] = run.mean_acc
    out["params_per_task"] = run.params_per_task  # the frontier plot's x, in numbers
    out["bytes_per_task"] = run.bytes_per_task  # … and in bytes
    return out


def _spec_json(row: Row) -> dict[str, Any]:
    return {"key": row.spec.key, "family": row.spec.family, "label": row.label,
            "kind": row.kind, "method": row.method, "norms": row.spec.norms,
            "policy": policy_of(row),
            "options": row.spec.options, "lr": row.lr,
            "val_by_lr": [{"lr": lr, "val": score} for lr, score in row.val_by_lr.items()],
            "stage1_errors": [{"lr": lr, "error": e} for lr, e in row.stage1_errors.items()],
            "failures": row.failures}


def _row_json(row: Row, ft: Row | None) -> dict[str, Any]:
    first = row.runs[0]
    speeds = [v for t, v in first.images_per_s.items() if t not in first.reused]
    step = (row.step_seconds / ft.step_seconds
            if ft is not None and row.step_seconds and ft.step_seconds else None)
    return {
        **_spec_json(row),
        "seeds": [run.seed for run in row.runs],
        "accuracy": {task: row.task_acc(task) for task in first.acc},
        "mean_accuracy": [run.mean_acc for run in row.runs],
        "task_params": row.task_params, "task_bytes": row.task_bytes,
        "params_per_task": row.params_per_task, "bytes_per_task": row.bytes_per_task,
        "total_params": row.total_params, "total_bytes": row.total_bytes,
        "epoch_vs_ft": epoch_ratio(row, ft) if ft is not None else None,
        "step_seconds": row.step_seconds, "step_vs_ft": step,
        "images_per_s": statistics.median(speeds),
        "runs": [_run_json(run) for run in row.runs],
    }


def result(bench: Bench, rows: list[Row], sizes: dict[str, dict[str, int]],
           targets: list[Target], matched: dict[str, Any] | None, *, command: str,
           wall: float, length: Length | None = None) -> dict[str, Any]:
    """The run as numbers (--json-out): accuracies are fractions in [0, 1], sizes in numbers
    stored and bytes, `*_vs_ft` ratios to the fine-tune row (None without one). "rows" are the
    rows with at least one run, "failed_rows" those without; each run carries its frontier
    point (params_per_task, bytes_per_task, mean_accuracy) and cumulative_bytes."""
    args = bench.args
    everything, rows = rows, measured(rows)
    ft = next((r for r in rows if r.kind == "finetune"), None)
    checks = [ok for r in rows for run in r.runs for ok in run.probes]
    return {
        "model": bench.spec, "img_size": args.img_size, "command": command, "wall_s": wall,
        "base_params": bench.base_params, "base_bytes": bench.base_bytes,
        "tasks": [{"name": t, **s} for t, s in sizes.items()],
        "reverse": args.reverse,
        "protocol": {"max_train": args.max_train, "max_test": args.max_test,
                     "select_train": args.select_train, "epochs": args.epochs,
                     "batch_size": args.batch_size, "weight_decay": args.weight_decay,
                     "lr_grid": args.lr_values, "seeds": args.seed_values,
                     "adapter_seeds": args.adapter_seeds,
                     "progressive_seeds": args.progressive_seed_values,
                     "norms_policies": args.norms_policy_values},
        "rows": [_row_json(row, ft) for row in rows],
        "failed_rows": [_spec_json(row) for row in everything if not row.runs],
        "matched": matched,
        "probe_checks": {"ok": sum(checks), "total": len(checks)},
        "targets": [dataclasses.asdict(t) for t in targets],
        "length": length_json(length),
        "frontier": points([_row_json(row, ft) for row in rows]),
    }
