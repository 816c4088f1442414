"""`taps-cl task add`: its flags come from the options' one declaration (cli/options.py)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any, Optional

import click

import taps_cl.cli.options as options
from taps_cl.analysis.documents import task_json
from taps_cl.cli.launch import launch
from taps_cl.cli.render import (
    Context,
    fmt,
    launched_output,
    pass_ctx,
    pct,
    progress,
)
from taps_cl.cli.state import STATE
from taps_cl.errors import TapsError
from taps_cl.tasks.requests import DEFAULT_METHOD, RunOptions
from taps_cl.training.fit import TrainConfig


@click.command("add")
@click.argument("name")
@click.option("--base", required=True, help="Name of a registered base model.")
@click.option("--data", "data_spec", required=True,
              help="imagefolder:PATH | idx:DIR | digits | torchvision:NAME[:ROOT].")
@click.option("--classes", help="Class subset, e.g. 0,1,2 or names.")
@click.option("--method", default=DEFAULT_METHOD, show_default=True,
              help="adapter | taps | lora | finetune | linear | fusion | progressive.")
@options.config_options(TrainConfig)
@options.method_options()
@options.config_options(RunOptions)
@click.option("--nproc", type=click.IntRange(1),
              help="Train with N processes (default 1): starts torchrun, DistributedDataParallel "
                   "with gloo on the CPU or one GPU per process with --device cuda.")
@pass_ctx
def task_add(c: Context, name: str, base: str, data_spec: str, classes: Optional[str],
             method: str, **given: Any) -> None:
    """Train task NAME on the frozen base and record only what it needs."""
    nproc = given.pop("nproc")
    run = None if nproc is None else launch(nproc, given["device"], given["batch_size"], c.args)
    if run is not None:
        launched_output(run, STATE["debug"])
        if run.error is not None:
            raise TapsError(run.error)
        return
    chosen = options.chosen_options(method, given)
    result = c.manager.add_task(name, base, data_spec, method=method, classes=classes,
                                method_options=chosen, progress=progress() and not c.json,
                                **given)
    if result is None:  # a worker rank under torchrun: rank 0 reports
        return
    t = result.task
    data = task_json(t, result.test_accuracy)
    data["best_val_accuracy"] = result.best_val_accuracy
    data["probe_checks"] = [asdict(p) for p in result.probe_checks]
    group = t.method_config.get("group") or None
    if group is not None:
        data["group"] = group

    def text() -> Iterator[str]:
        kind = t.method if group is None else f"{t.method}, group {group}"
        yield (f"task {t.name} ({kind}) on {t.base}, position {t.position}: "
                   f"test accuracy {pct(result.test_accuracy)}%, "
                   f"{t.active_layers}/{t.total_layers} layers active, "
                   f"{t.task_params:,} task-specific parameters")
        if result.probe_checks:
            yield (f"  re-checked {len(result.probe_checks)} earlier task(s) "
                       "(a sample; `report accuracy --verify` checks every one):")
        for p in result.probe_checks:
            state = "unchanged" if p.ok else f"CHANGED ({p.error or 'logits moved'})"
            yield (f"  earlier task {p.task}: probe logits {state} "
                       f"(max drift {fmt(p.max_drift)})")

    c.emit(data, text)
