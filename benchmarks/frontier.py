"""The benchmark's plots: accuracy per stored byte (the frontier), and storage as tasks are added.

`<prefix>-frontier.png`: mean accuracy over the tasks (y) against stored bytes per task (x, log
scale) — one small point per row and seed, the row's mean larger and labelled; the PEFT LoRA ranks
of one norm policy joined by a line. A task's bytes are its own artifact plus the shared bands its
row's tasks read, divided among them (progressive); a fine-tuned task is a whole model.
`<prefix>-growth.png`: bytes stored for base + every task so far against the number of tasks,
per row (mean over seeds; fine-tune: N whole models, no shared base).

The benchmark draws both next to --out (`bench.md` → `bench-frontier.png`, `bench-growth.png`;
next to --json-out without --out) from the figures its JSON result holds, so they can be redrawn
without training:

    python benchmarks/frontier.py --from-json bench.json                  # bench-frontier.png …
    python benchmarks/frontier.py --from-json bench.json --out-prefix docs/bench

Several results of the same protocol (model, image size, tasks in order, data sizes, epochs,
batch, weight decay, grid) draw together: `--from-json a.json b.json`. Every row of the second result is
labelled "(run 2)", and so on, so that no point hides which run it came from; the PEFT LoRA line
of a policy joins the ranks of every run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Marker per norm policy (a row's own, or its method's default as recorded).
MARKERS = {"task": "o", "affine": "s", "base": "^", "split": "D"}


def points(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One frontier point per row and seed, from the JSON result's rows."""
    return [{"row": row["label"], "key": row["key"], "family": row.get("family", row["key"]),
             "kind": row["kind"], "method": row["method"], "norms": row.get("norms"),
             "policy": row.get("policy") or row.get("norms") or "task",
             "seed": run["seed"], "params_per_task": run["params_per_task"],
             "bytes_per_task": run["bytes_per_task"], "accuracy": run["mean_accuracy"],
             "cumulative_bytes": run["cumulative_bytes"]}
            for row in rows for run in row["runs"]]


# What two results must share to be drawn together (`merged`): the same measurement protocol.
SAME_PROTOCOL = ("max_train", "max_test", "select_train", "epochs", "batch_size", "weight_decay",
                 "lr_grid")


def merged(docs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result to draw out of several of the same protocol: the first's model, tasks and base,
    every result's frontier points, those of result k > 1 labelled "(run k)"."""
    first = docs[0]

    def protocol(doc: dict[str, Any]) -> tuple[Any, ...]:
        proto = doc.get("protocol", {})
        return (doc.get("model"), doc.get("img_size"), doc.get("reverse", False),
                [t["name"] for t in doc.get("tasks", [])],
                *(proto.get(key) for key in SAME_PROTOCOL))

    pts = []
    for k, doc in enumerate(docs, 1):
        if protocol(doc) != protocol(first):
            raise ValueError(f"result {k} was measured under another protocol than result 1 "
                             "(model, image size, order, tasks, data sizes, epochs, batch or "
                             "grid differ): not drawn together")
        suffix = "" if k == 1 else f" (run {k})"
        pts += [{**p, "row": p["row"] + suffix}
                for p in (doc.get("frontier") or points(doc["rows"]))]
    return {**first, "frontier": pts, "runs_drawn": len(docs)}


def plot_paths(prefix: Path) -> tuple[Path, Path]:
    """Where the two plots of `prefix` go: <prefix>-frontier.png and <prefix>-growth.png."""
    return (prefix.with_name(f"{prefix.name}-frontier.png"),
            prefix.with_name(f"{prefix.name}-growth.png"))


def _by_row(pts: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {}
    for p in pts:
        rows.setdefault(p["row"], []).append(p)
    return rows


def draw(doc: dict[str, Any], prefix: Path) -> tuple[Path, Path]:
    """Write both plots of a benchmark result `doc` (its JSON document); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = doc.get("frontier") or points(doc["rows"])
    if not pts:
        raise SystemExit("no row with a run in the result: nothing to plot")
    rows = _by_row(pts)
    kinds = list(dict.fromkeys(p["kind"] for p in pts))
    cmap = plt.get_cmap("tab10" if len(kinds) <= 10 else "tab20")
    color = {k: cmap(i % cmap.N) for i, k in enumerate(kinds)}
    tasks = ", ".join(t["name"] for t in doc.get("tasks", []))
    epochs = doc.get("protocol", {}).get("epochs")
    where = f"{doc.get('model', '')}, {tasks}" + (f", {epochs} epochs" if epochs else "")
    if doc.get("runs_drawn", 1) > 1:
        where += f", {doc['runs_drawn']} runs"
    frontier_png, growth_png = plot_paths(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)

    fig, ax = plt.subplots(figsize=(10, 6.5))
    means: dict[str, tuple[float, float]] = {}
    for label, seeds in rows.items():
        first = seeds[0]
        c, m = color[first["kind"]], MARKERS.get(first["policy"], "o")
        xs = [p["bytes_per_task"] for p in seeds]
        ys = [100 * p["accuracy"] for p in seeds]
        ax.scatter(xs, ys, s=14, color=c, marker=m, alpha=0.45, linewidths=0)
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        means[label] = (mx, my)
        ax.scatter([mx], [my], s=70, color=c, marker=m, edgecolors="black", linewidths=0.6,
                   zorder=3)
        ax.annotate(label, (mx, my), xytext=(4, 4), textcoords="offset points", fontsize=7)
    # The PEFT LoRA ranks of each norm policy, joined in order of size.
    for policy in dict.fromkeys(p["policy"] for p in pts if p["method"] == "peft-lora"):
        line = sorted((means[label] for label, seeds in rows.items()
                       if seeds[0]["method"] == "peft-lora" and seeds[0]["policy"] == policy))
        if len(line) > 1:
            ax.plot(*zip(*line), color=color["peft"], linewidth=1, alpha=0.7, zorder=1)
    ax.set_xscale("log")
    ax.set_xlabel("stored bytes per task (own artifact + shared bands per reader; log scale)")
    ax.set_ylabel("mean test accuracy over the tasks (%)")
    ax.set_title(f"Accuracy per stored byte — {where}\n(small: one seed; large: the row's mean; "
                 "marker: norm policy ○ task □ affine △ base ◇ split)", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(frontier_png, dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, seeds in rows.items():
        n = min(len(p["cumulative_bytes"]) for p in seeds)
        first = seeds[0]
        # Before any task: the base alone (fine-tuned tasks are whole models: nothing shared).
        start = 0 if first["kind"] == "finetune" else doc.get("base_bytes", 0)
        totals = [start / 1e6] + [statistics.fmean(p["cumulative_bytes"][k] for p in seeds) / 1e6
                                  for k in range(n)]
        ax.plot(range(n + 1), totals, marker=MARKERS.get(first["policy"], "o"), markersize=3,
                color=color[first["kind"]], linewidth=1, label=label)
    ax.set_xlabel("tasks added")
    ax.set_ylabel("stored: base + every task so far (MB)")
    ax.set_title(f"Storage as tasks are added — {where}", fontsize=9)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.25)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(growth_png, dpi=130)
    plt.close(fig)
    return frontier_png, growth_png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--from-json", type=Path, required=True, nargs="+",
                   help="benchmark results written by benchmarks/benchmark.py --json-out; "
                   "several of the same protocol are drawn together, the rows of the k-th "
                   "labelled (run k)")
    p.add_argument("--out-prefix", type=Path, default=None,
                   help="write <prefix>-frontier.png and <prefix>-growth.png (default: the first "
                   "JSON file's path without its suffix)")
    args = p.parse_args(argv)
    docs = []
    for path in args.from_json:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            p.error(f"cannot read {path}: {exc}")
        if "rows" not in doc:
            p.error(f"{path} holds no benchmark rows (a --plan result?)")
        docs.append(doc)
    try:
        doc = merged(docs) if len(docs) > 1 else docs[0]
    except ValueError as exc:
        p.error(str(exc))
    for out in draw(doc, args.out_prefix or args.from_json[0].with_suffix("")):
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
