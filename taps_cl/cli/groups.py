"""`taps-cl group train`: several new tasks trained together (flags as for `task add`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Optional

import click

import taps_cl.cli.options as options
from taps_cl.analysis.documents import task_json
from taps_cl.cli.render import Context, pass_ctx, pct, progress
from taps_cl.tasks.requests import RunOptions
from taps_cl.training.fit import TrainConfig


@click.group("group")
def group_group() -> None:
    """Train several progressive tasks together, grouped by gradient similarity."""


def _task_spec(_ctx: click.Context, _param: click.Parameter,
               values: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name or not spec:
            raise click.BadParameter(f"{value!r} is not NAME=SPEC")
        pairs.append((name, spec))
    return pairs


@group_group.command("train")
@click.option("--base", required=True, help="Name of a registered base model.")
@click.option("--task", "tasks", multiple=True, required=True, callback=_task_spec,
              help="A new task as NAME=SPEC (data spec as in `task add --data`); repeat.")
@click.option("--groups", type=click.IntRange(1),
              help="Number of similarity groups (default: chosen by a similarity threshold).")
@click.option("--method", default="progressive", show_default=True,
              help="A method that trains tasks together.")
@options.config_options(TrainConfig)
@options.method_options(joint=True)
@options.config_options(RunOptions)
@pass_ctx
def group_train(c: Context, base: str, tasks: list[tuple[str, str]], groups: Optional[int],
                method: str, **given: Any) -> None:
    """Train new progressive tasks jointly: shared, group and task-specific adapters."""
    chosen = options.chosen_options(method, given, joint=True)
    result = c.manager.group_train(base, tasks, groups=groups, method=method,
                                   method_options=chosen,
                                   progress=progress() and not c.json, **given)
    data = {"tasks": [dict(task_json(r.task, r.test_accuracy),
                           group=r.task.method_config.get("group"),
                           best_val_accuracy=r.best_val_accuracy) for r in result.results],
            "groups": result.groups,
            "similarity": {"tasks": result.tasks, "matrix": result.matrix}}

    def text() -> Iterator[str]:
        for r in result.results:
            t = r.task
            yield (f"task {t.name} ({t.method}, group {t.method_config.get('group')}) on "
                       f"{t.base}, position {t.position}: test accuracy "
                       f"{pct(r.test_accuracy)}%, {t.task_params:,} task-specific parameters")
        for name, members in result.groups.items():
            yield f"group {name}: {', '.join(members)}"

    c.emit(data, text)
