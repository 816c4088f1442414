"""`taps-cl report`: parameter budget, accuracy matrix, layer map and task similarity."""

from __future__ import annotations

from typing import Optional

import click

from taps_cl.analysis import plots
from taps_cl.cli.render import (
    SUMMARY_ABOVE,
    TABLE_ROWS,
    Context,
    accuracy_text,
    budget_text,
    pass_ctx,
    progress,
    similarity_text,
    table,
)
from taps_cl.errors import TapsError


@click.group("report")
def report_group() -> None:
    """Parameter budget, accuracy matrix, layer map and task similarity."""


@report_group.command("budget")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a bar chart PNG.")
@click.option("--limit", type=click.IntRange(0),
              help=f"Show at most N task rows in the table (default: all up to {TABLE_ROWS}, "
                   f"else the first {TABLE_ROWS}); totals and --json cover every task.")
@pass_ctx
def report_budget(c: Context, base: Optional[str], plot: Optional[str],
                  limit: Optional[int]) -> None:
    """Base + Σ task-specific parameters and bytes vs N fine-tuned models."""
    rep = c.manager.budget(base)
    if plot:
        plots.plot_budget(rep, plot)
    c.emit(rep.to_json(), lambda: budget_text(rep, limit))


@report_group.command("accuracy")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--verify", is_flag=True,
              help="Re-hash every artifact, check every recorded fact and recompute every "
                   "task's probe logits; exit status 1 unless all hold.")
@click.option("--reevaluate", is_flag=True,
              help="Re-measure every task's test accuracy where its data is reachable.")
@click.option("--workers", type=click.IntRange(1),
              help="Processes that verify tasks in parallel (default: one per core; a few "
                   "tasks are checked in this process).")
@click.option("--task", "tasks", multiple=True, metavar="NAME",
              help="Verify only this task (repeatable; needs --verify).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a heatmap PNG.")
@click.option("--full", is_flag=True,
              help=f"Print the whole matrix even for more than {SUMMARY_ABOVE} tasks.")
@click.option("--limit", type=click.IntRange(1), default=10, show_default=True,
              help="Tasks listed in the summary of a long sequence.")
@click.option("--summary", is_flag=True,
              help="The summary even for a short sequence; with --json, no dense matrix (the "
                   "final column, metrics and counts only).")
@pass_ctx
def report_accuracy(c: Context, base: Optional[str], verify: bool, reevaluate: bool,
                    workers: Optional[int], tasks: tuple[str, ...], plot: Optional[str],
                    full: bool, limit: int, summary: bool) -> None:
    """Accuracy of every task after every later addition; forgetting and BWT."""
    if tasks and not verify:
        raise click.UsageError("--task limits verification: give --verify too")
    if full and summary:
        raise click.UsageError("--full and --summary contradict each other")
    rep = c.manager.accuracy(base, verify=verify, reevaluate=reevaluate, workers=workers,
                             progress=progress() and not c.json, tasks=list(tasks) or None)
    if plot:
        plots.plot_accuracy(rep, plot)
    # Only --json needs the document: the dense matrix of a long sequence is costly to build.
    c.emit(rep.to_json(matrix=not summary) if c.json else None,
           lambda: accuracy_text(rep, full, limit, summary))
    if rep.reason:
        raise TapsError(rep.reason)


@report_group.command("layers")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a tasks × layers PNG.")
@pass_ctx
def report_layers(c: Context, base: Optional[str], plot: Optional[str]) -> None:
    """Which layers each task turned on."""
    rep = c.manager.layer_map(base)
    if plot:
        plots.plot_layers(rep, plot)
    c.emit(rep.to_json(), lambda: table(
        ["layer"] + list(rep.tasks),
        [[layer] + ["on" if row[i] else "." for row in rep.active]
         for i, layer in enumerate(rep.layers)]))


@report_group.command("similarity")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--data", "data_spec",
              help="A candidate data set (imagefolder:PATH | idx:DIR | digits | …) to compare "
                   "with the tasks before adding it; nothing is recorded.")
@click.option("--classes", help="Class subset of --data, e.g. 0,1,2 or names.")
@click.option("--img-size", type=click.IntRange(8),
              help="Input size of --data (default: the base's).")
@click.option("--max-train", type=click.IntRange(1), help="Subsample the training set of --data.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a heatmap PNG.")
@pass_ctx
def report_similarity(c: Context, base: Optional[str], data_spec: Optional[str],
                      classes: Optional[str], img_size: Optional[int], max_train: Optional[int],
                      plot: Optional[str]) -> None:
    """Cosine similarity of the tasks' gradient signatures, and their groups."""
    if data_spec is None and (classes or img_size or max_train):
        raise click.UsageError("--classes, --img-size and --max-train describe --data: give it")
    rep = c.manager.similarity(base, data_spec, classes=classes, img_size=img_size,
                               max_train=max_train)
    if plot:
        plots.plot_similarity(rep, plot)
    c.emit(rep.to_json(), lambda: similarity_text(rep))
