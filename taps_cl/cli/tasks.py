"""`taps-cl task`: list, show, evaluate, remove and delete tasks (`task add`: cli/adding.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Optional

import click

from taps_cl.analysis.documents import summary_json, task_show_json
from taps_cl.cli.lazy import LazyGroup
from taps_cl.cli.render import (
    TABLE_ROWS,
    Context,
    line,
    more,
    pass_ctx,
    pct,
    table,
)


@click.group("task", cls=LazyGroup, lazy={"add": "taps_cl.cli.adding:task_add"})
def task_group() -> None:
    """Add, list, show and evaluate tasks."""




@task_group.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Remove even a run that still looks alive (its heartbeat is recent).")
@pass_ctx
def task_remove(c: Context, name: str, force: bool) -> None:
    """Discard a task left unfinished by a killed run (ready tasks cannot be removed)."""
    c.manager.remove_task(name, force=force)
    c.emit({"removed": name}, lambda: line(f"removed unfinished task {name}"))


@task_group.command("delete")
@click.argument("name")
@pass_ctx
def task_delete(c: Context, name: str) -> None:
    """Delete a ready task and its artifacts no other row uses (refused while others read it)."""
    removed = c.manager.delete_task(name)
    c.emit({"deleted": name, "artifacts_removed": removed},
           lambda: line(f"deleted task {name} ({len(removed)} artifact file(s) removed)"))


@task_group.command("list")
@click.option("--base", help="Only this base's tasks.")
@click.option("--limit", type=click.IntRange(0),
              help=f"Show at most N tasks (default: all with --json, else {TABLE_ROWS}).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True,
              help="Skip the first N tasks of the sequence.")
@pass_ctx
def task_list(c: Context, base: Optional[str], limit: Optional[int], offset: int) -> None:
    """List tasks in sequence order."""
    if limit is None and not c.json:
        limit = TABLE_ROWS
    summaries = c.manager.task_summaries(base, limit=limit, offset=offset)
    rows = [summary_json(t) for t in summaries]

    def text() -> Iterator[str]:
        yield from table(["#", "name", "base", "method", "status", "classes", "task params",
                          "layers", "test acc %"],
                         [[r["position"], r["name"], r["base"], r["method"], r["status"],
                 r["num_classes"], r["task_params"], f"{r['active_layers']}/{r['total_layers']}",
                 pct(r["test_accuracy"])] for r in rows])
        if limit is not None and len(rows) == limit:  # maybe cut: say how many are left
            yield from more(c.manager.count_tasks(base) - offset - len(rows),
                            "use --limit/--offset/--json")

    c.emit(rows, text)


@task_group.command("show")
@click.argument("name")
@click.option("--all-layers", is_flag=True, help="List inactive layers too.")
@pass_ctx
def task_show(c: Context, name: str, all_layers: bool) -> None:
    """Show a task and its active-layer set."""
    t = c.manager.get_task(name)
    data = task_show_json(t, c.manager.get_base(t.base).num_params,
                          c.manager.test_accuracies(t.base).get(t.name),
                          c.manager.registry.list_dependents(t.name))
    budget = data["budget"]

    def text() -> Iterator[str]:
        yield f"task {t.name}: {t.method} on {t.base} (position {t.position}, {t.status})"
        yield f"  classes ({t.num_classes}): {', '.join(t.class_names)}"
        yield (f"  test accuracy {pct(data['test_accuracy'])}%, "
                   f"{t.task_params:,} task-specific parameters, "
                   f"{t.active_layers}/{t.total_layers} layers active")
        yield f"  config: {json.dumps(t.method_config)}"
        for pin in t.depends_on:
            yield f"  reads: {pin.task} (pinned artifact {pin.sha256[:12]}…, {pin.kind})"
        if data["dependents"]:
            yield f"  read by: {', '.join(data['dependents'])}"
        if budget is not None:
            yield (f"  budget: at most {budget:.3f}× base given, {data['budget_used']:.3f}× "
                       "used")
        shown = [layer for layer in t.layers if all_layers or layer.active]
        yield f"  {'all' if all_layers else 'active'} layers:"
        yield from table(["layer", "kind", "score", "active", "base params", "task params"],
               [[lay.name, lay.kind, lay.score, lay.active, lay.base_params, lay.task_params]
                for lay in shown])

    c.emit(data, text)


@task_group.command("eval")
@click.argument("name")
@click.option("--data", "data_spec", help="Evaluate on another data spec with the same classes.")
@click.option("--max-test", type=click.IntRange(1), help="Subsample the test set.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:N or mps.")
@pass_ctx
def task_eval(c: Context, name: str, data_spec: Optional[str], max_test: Optional[int],
              device: str) -> None:
    """Measure the restored task model's test accuracy."""
    r = c.manager.evaluate_task(name, data_spec, max_test=max_test, device=device)
    c.emit({"name": name, **asdict(r)}, lambda: line(
        f"{name}: accuracy {pct(r.accuracy)}% on {r.num_samples} images (loss {r.loss:.4f})"))
