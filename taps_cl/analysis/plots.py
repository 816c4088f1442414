"""Plots of the reports in `taps_cl.analysis.reports`: PNG files drawn with matplotlib (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from taps_cl.analysis.reports import AccuracyReport, BudgetReport, LayerMap, SimilarityReport
from taps_cl.errors import TapsError

# The accuracy heatmap labels every cell; beyond this many tasks it would be unreadable.
PLOT_MAX_TASKS = 25


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")  # files only; no display here or in CI
    import matplotlib.pyplot as plt

    return plt


def plot_budget(report: BudgetReport, path: str | Path) -> Path:
    """Bars per task: task-specific numbers vs a full fine-tune; a line at the base's size."""
    plt = _pyplot()
    tasks = report.tasks
    base = report.base_params
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(tasks) + 2), 4))
    xs = range(len(tasks))
    ax.bar([x - 0.2 for x in xs], [t.task_params / 1e6 for t in tasks], width=0.4,
           label="task-specific (stored)")
    ax.bar([x + 0.2 for x in xs], [(base + t.head_params) / 1e6 for t in tasks], width=0.4,
           label="full fine-tune", alpha=0.6)
    ax.axhline(base / 1e6, color="black", linestyle="--", linewidth=1, label="shared base")
    ax.set_xticks(list(xs), [f"{t.name}\n({t.method})" for t in tasks])
    ax.set_ylabel("parameters (millions)")
    ratio = "?" if report.ratio_to_base is None else f"{report.ratio_to_base:.2f}"
    ax.set_title(f"{report.base_name}: total {report.total_params / 1e6:.2f}M "
                 f"= {ratio}× base; fine-tuning {report.finetune_total_params / 1e6:.2f}M")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy(report: AccuracyReport, path: str | Path) -> Path:
    """Heatmap of the accuracy matrix; probe-verified cells marked with ✓, changed ones flagged.

    The title says "verified" only for a verified report and "NOT verified" for a failed one.
    """
    plt = _pyplot()
    import numpy as np

    names = report.tasks
    n = len(names)
    if n > PLOT_MAX_TASKS:
        raise TapsError(f"{n} tasks are too many to draw one cell each (at most "
                        f"{PLOT_MAX_TASKS}); `report accuracy --json` has the full matrix")
    values = np.array([[np.nan if v is None else v for v in row] for row in report.matrix],
                      dtype=float).reshape(n, n)
    fig, ax = plt.subplots(figsize=(1.1 * n + 3, 0.9 * n + 2))
    image = ax.imshow(values * 100, vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(n):
            kind = report.cells[i][j]
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
    if report.complete and report.average_accuracy is not None and report.bwt is not None:
        title = (f"accuracy (%): mean {100 * report.average_accuracy:.1f}, "
                 f"BWT {100 * report.bwt:+.2f}")
    else:
        title = "accuracy (%): final column incomplete"
    if report.verified is not None:
        title += " — verified" if report.verified else " — NOT verified"
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def plot_layers(report: LayerMap, path: str | Path) -> Path:
    """Tasks × layers picture of the active-layer sets (as in the TAPS paper's Figure 3)."""
    plt = _pyplot()
    import numpy as np

    layers, tasks = list(report.layers), list(report.tasks)
    grid = np.array([[1.0 if a else 0.0 for a in row] for row in report.active],
                    dtype=float).reshape(len(tasks), len(layers))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.16 * len(layers) + 2), 0.5 * len(tasks) + 1.8))
    ax.imshow(grid, aspect="auto", cmap="Greens", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(tasks)), [f"{t} ({m})" for t, m in zip(tasks, report.methods)])
    step = max(1, len(layers) // 25)
    ax.set_xticks(range(0, len(layers), step), layers[::step], rotation=90, fontsize=6)
    ax.set_xlabel("adaptable layer (input → head)")
    ax.set_title("task-specific layers (green = active)")
    return _save(fig, path)


def plot_similarity(report: SimilarityReport, path: str | Path) -> Path:
    """Heatmap of the tasks' cosine similarities (the candidate, if any, as a last row)."""
    plt = _pyplot()
    import numpy as np

    names = list(report.tasks)
    n = len(names)
    if n == 0:
        raise TapsError("no task has a signature: there is no similarity to draw")
    if n > PLOT_MAX_TASKS:
        raise TapsError(f"{n} tasks are too many to draw one cell each (at most "
                        f"{PLOT_MAX_TASKS}); `report similarity --json` has the full matrix")
    rows = [list(row) for row in report.matrix]
    labels = [f"{name} (g{group})" for name, group in zip(names, report.groups)]
    if report.candidate_row is not None:
        rows.append(list(report.candidate_row))
        labels.append("candidate")
    values = np.array(rows, dtype=float).reshape(len(rows), n)
    fig, ax = plt.subplots(figsize=(1.1 * n + 3.5, 0.9 * len(rows) + 2))
    image = ax.imshow(values, vmin=-1, vmax=1, cmap="coolwarm")
    for i in range(len(rows)):
        for j in range(n):
            ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if abs(values[i, j]) >= 0.6 else "black")
    if report.candidate_row is not None:
        ax.axhline(n - 0.5, color="black", linewidth=2)
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), labels)
    title = f"{report.base_name}: gradient-signature cosine similarity (gN: group)"
    if report.candidate is not None:
        title += f"\ncandidate: {_clip(report.candidate, 60)}"
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def _clip(text: Optional[str], width: int) -> str:
    text = text or ""
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _save(fig, path: str | Path) -> Path:  # type: ignore[no-untyped-def]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
