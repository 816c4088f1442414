"""`taps-cl restore` and `taps-cl predict`: a task's model as a file, or its predictions."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import click

from taps_cl.cli.render import (
    Context,
    line,
    pass_ctx,
)


@click.command("restore")
@click.argument("name")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Output .safetensors file: the plain model's state dict, or a composed "
                   "model's tensors for taps_cl.load_file.")
@pass_ctx
def restore_cmd(c: Context, name: str, out: str) -> None:
    """Write task NAME's model to a file, and say how to load it.

    A mergeable method's task folds into a plain timm/torchvision state dict; a composed one
    (modules attached to the backbone: adapter, fusion, progressive) keeps keys no plain model
    has, and is loaded back with taps_cl.load_file.
    """
    path = c.manager.restore_to_file(name, out)
    t = c.manager.get_task(name)
    base = c.manager.get_base(t.base)
    plain = c.manager.restores_plain(name)
    load_with = _constructor(base.model_spec) if plain else "taps_cl.load_file"
    data = {"name": name, "out": str(path), "model": base.model_spec,
            "num_classes": t.num_classes, "load_with": load_with}
    if plain:
        how = (f"load it into {load_with}('{base.architecture}', num_classes={t.num_classes}) "
               "with load_state_dict(strict=True)")
    else:
        how = (f"load it with {load_with}({str(path)!r}) (a {t.method} model: modules attached "
               f"to {base.architecture}, not a plain state dict)")
    c.emit(data, lambda: line(f"wrote {path}: {how}"))


def _constructor(model_spec: str) -> str:
    return "torchvision.models.get_model" if model_spec.startswith("torchvision:") else \
        "timm.create_model"


@click.command("predict")
@click.argument("args", nargs=-1, required=True, metavar="[NAME] IMAGE...")
@click.option("--task", "tasks", metavar="A,B,…",
              help="Run these tasks on every image in one shared pass (instead of NAME).")
@click.option("--all", "all_tasks", is_flag=True,
              help="Run every ready task of the base on every image in one shared pass.")
@click.option("--base", help="With --all: the base whose tasks run (needed if there are several).")
@click.option("--top", type=click.IntRange(1), default=3, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:N or mps.")
@pass_ctx
def predict_cmd(c: Context, args: tuple[str, ...], tasks: Optional[str], all_tasks: bool,
                base: Optional[str], top: int, device: str) -> None:
    """Top classes with probabilities for each IMAGE: of task NAME, or of several tasks at once
    (--task A,B or --all), the layers they share run once per image."""
    many = tasks is not None or all_tasks
    if tasks is not None and all_tasks:
        raise click.UsageError("give --task or --all, not both")
    if base is not None and not all_tasks:
        raise click.UsageError("--base goes with --all")
    name, images = (None, args) if many else (args[0], args[1:])
    if not images:
        raise click.UsageError("give at least one IMAGE")
    for image in images:
        if Path(image).is_dir():
            raise click.BadParameter(f"{image!r} is a directory", param_hint="IMAGE")
    if not many:
        preds = c.manager.predict(name, list(images), top_k=top, device=device)
        data = [{"image": img, "top": _top(pred)} for img, pred in zip(images, preds)]

        def text() -> Iterator[str]:
            for img, pred in zip(images, preds):
                yield f"{img}: " + _classes(pred)

        c.emit(data, text)
        return
    from taps_cl.serving.predicting import predict_many

    names = None if all_tasks else [n.strip() for n in tasks.split(",") if n.strip()]
    if names is not None and not names:
        raise click.UsageError("--task needs at least one task name")
    found = predict_many(c.manager, list(images), names, base, top_k=top, device=device)
    rows = [{"image": img, "tasks": [{"task": t, "top": _top(p)} for t, p in by_task.items()]}
            for img, by_task in zip(images, found)]

    def many_text() -> Iterator[str]:
        for img, by_task in zip(images, found):
            yield f"{img}:"
            for task, pred in by_task.items():
                yield f"  {task}: " + _classes(pred)

    c.emit(rows, many_text)


def _top(pred: list[tuple[str, float]]) -> list[dict[str, object]]:
    return [{"class": k, "probability": p} for k, p in pred]


def _classes(pred: list[tuple[str, float]]) -> str:
    return ", ".join(f"{k} {100 * p:.1f}%" for k, p in pred)
