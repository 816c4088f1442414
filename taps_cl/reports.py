"""Budget table, accuracy matrix (with Avalanche-style metrics) and layer map; their plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from registry.entities import BaseModel, Evaluation, Task


def budget(base: BaseModel, tasks: Sequence[Task]) -> dict[str, Any]:
    """Base + Σ task-specific numbers, against N full fine-tunes and N linear probes."""
    rows = [
        {
            "name": t.name,
            "method": t.method,
            "task_params": t.task_params,
            "head_params": t.head_params or 0,
            "active_layers": t.active_layers,
            "total_layers": t.total_layers,
            "bytes": t.artifact.bytes if t.artifact else 0,
            "ratio_to_base": t.task_params / base.num_params if base.num_params else None,
        }
        for t in tasks
    ]
    total = base.num_params + sum(r["task_params"] for r in rows)
    return {
        "base": {"name": base.name, "model": base.model_spec, "num_params": base.num_params},
        "tasks": rows,
        "total_params": total,
        "ratio_to_base": total / base.num_params if base.num_params else None,
        # One whole model per task (backbone + that task's head) …
        "finetune_total_params": sum(base.num_params + r["head_params"] for r in rows),
        # … or one shared frozen backbone and a head per task.
        "linear_total_params": base.num_params + sum(r["head_params"] for r in rows),
    }


def accuracy_matrix(tasks: Sequence[Task], evaluations: Sequence[Evaluation]) -> dict[str, Any]:
    """R[i][j]: task i's accuracy after task j was added; the latest record per cell wins.

    Metrics as Avalanche defines them on the final column T: average accuracy = mean_i R[i][T];
    forgetting = mean over i < T of (R[i][i] − R[i][T]); BWT = mean over i < T of
    (R[i][T] − R[i][i]) (so BWT = −forgetting here). Both are 0.0 for a single task.
    """
    names = [t.name for t in tasks]
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    matrix: list[list[Optional[float]]] = [[None] * n for _ in range(n)]
    kinds: list[list[Optional[str]]] = [[None] * n for _ in range(n)]
    drift = 0.0
    changed: list[str] = []
    for ev in evaluations:
        if ev.task not in index or ev.after_task not in index or ev.split != "test":
            continue
        i, j = index[ev.task], index[ev.after_task]
        # A cell whose probe moved is flagged; its value is a fresh measurement, if any.
        kinds[i][j] = "changed" if ev.probe_ok is False else ev.kind
        matrix[i][j] = ev.accuracy
        if ev.probe_ok is False:
            changed.append(f"{ev.task} after {ev.after_task}")
        if ev.max_logit_drift is not None:
            drift = max(drift, ev.max_logit_drift)
    final = [matrix[i][n - 1] for i in range(n)]
    diagonal = [matrix[i][i] for i in range(n)]
    # Metrics only from a complete final column: a partial average would hide the missing task.
    complete = n > 0 and all(a is not None for a in final + diagonal)
    forgetting = None
    if complete:
        gaps = [diagonal[i] - final[i] for i in range(n - 1)]  # type: ignore[operator]
        forgetting = sum(gaps) / len(gaps) if gaps else 0.0
    return {
        "tasks": names,
        "matrix": matrix,
        "cells": kinds,
        "average_accuracy": sum(final) / n if complete else None,  # type: ignore[arg-type]
        "forgetting": forgetting,
        "bwt": None if forgetting is None else (-forgetting if forgetting else 0.0),
        "complete": complete,
        "changed": changed,
        "max_logit_drift": drift,
        "verified": None,
    }


def layer_map(tasks: Sequence[Task]) -> dict[str, Any]:
    """Which adaptable layers each task turned on (layers in the backbone's order)."""
    layers: list[str] = []
    seen: set[str] = set()
    for task in tasks:
        for layer in task.layers:
            if layer.name not in seen:
                seen.add(layer.name)
                layers.append(layer.name)
    active = []
    for task in tasks:
        on = {layer.name: layer.active for layer in task.layers}
        active.append([on.get(name) for name in layers])
    return {"tasks": [t.name for t in tasks], "methods": [t.method for t in tasks],
            "layers": layers, "active": active}


# ------------------------------------------------------------------------ plots
def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_budget(report: dict[str, Any], path: str | Path) -> Path:
    """Bars per task: task-specific numbers vs a full fine-tune; a line at the base's size."""
    plt = _pyplot()
    tasks = report["tasks"]
    names = [t["name"] for t in tasks]
    base = report["base"]["num_params"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(names) + 2), 4))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [t["task_params"] / 1e6 for t in tasks], width=0.4,
           label="task-specific (stored)")
    ax.bar([x + 0.2 for x in xs], [(base + t["head_params"]) / 1e6 for t in tasks], width=0.4,
           label="full fine-tune", alpha=0.6)
    ax.axhline(base / 1e6, color="black", linestyle="--", linewidth=1, label="shared base")
    ax.set_xticks(list(xs), [f"{n}\n({t['method']})" for n, t in zip(names, tasks)])
    ax.set_ylabel("parameters (millions)")
    ax.set_title(f"{report['base']['name']}: total {report['total_params'] / 1e6:.2f}M "
                 f"= {report['ratio_to_base']:.2f}× base; fine-tuning "
                 f"{report['finetune_total_params'] / 1e6:.2f}M")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy(report: dict[str, Any], path: str | Path) -> Path:
    """Heatmap of the accuracy matrix; probe-verified cells marked with ✓, changed ones with ✗."""
    plt = _pyplot()
    import numpy as np

    names = report["tasks"]
    n = len(names)
    values = np.array([[np.nan if v is None else v for v in row] for row in report["matrix"]],
                      dtype=float).reshape(n, n)
    fig, ax = plt.subplots(figsize=(1.1 * n + 3, 0.9 * n + 2))
    image = ax.imshow(values * 100, vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(n):
            kind = report["cells"][i][j]
            if kind is None:
                continue
            value = "?" if np.isnan(values[i, j]) else f"{values[i, j] * 100:.1f}"
            text = f"changed\n{value}" if kind == "changed" else value
            if kind == "probe":
                text += "\n(probe ✓)"
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if not values[i, j] >= 0.6 else "black")
    ax.set_xticks(range(n), [f"after {t}" for t in names], rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    if report["complete"]:
        ax.set_title(f"accuracy (%): mean {100 * report['average_accuracy']:.1f}, "
                     f"BWT {100 * report['bwt']:+.2f}")
    else:
        ax.set_title("accuracy (%): final column incomplete")
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_layers(report: dict[str, Any], path: str | Path) -> Path:
    """Tasks × layers picture of the active-layer sets (as in the TAPS paper's Figure 3)."""
    plt = _pyplot()
    import numpy as np

    layers, tasks = report["layers"], report["tasks"]
    grid = np.array([[1.0 if a else 0.0 for a in row] for row in report["active"]],
                    dtype=float).reshape(len(tasks), len(layers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(layers) + 2), 0.5 * len(tasks) + 1.8))
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(tasks)), [f"{t} ({m})" for t, m in zip(tasks, report["methods"])])
    step = max(1, len(layers) // 25)
    ax.set_xticks(range(0, len(layers), step), layers[::step], rotation=90, fontsize=6)
    ax.set_xlabel("adaptable layer (input → head)")
    ax.set_title("task-specific layers (green = active)")
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:  # type: ignore[no-untyped-def]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
