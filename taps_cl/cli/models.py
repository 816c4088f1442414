"""`taps-cl restore` and `taps-cl predict`: a task's model as a file, or its predictions."""

from __future__ import annotations

from collections.abc import Iterator

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
@click.argument("name")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top", type=click.IntRange(1), default=3, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:N or mps.")
@pass_ctx
def predict_cmd(c: Context, name: str, images: tuple[str, ...], top: int, device: str) -> None:
    """Top classes with probabilities for each IMAGE."""
    preds = c.manager.predict(name, list(images), top_k=top, device=device)
    data = [{"image": img, "top": [{"class": k, "probability": p} for k, p in pred]}
            for img, pred in zip(images, preds)]

    def text() -> Iterator[str]:
        for img, pred in zip(images, preds):
            yield f"{img}: " + ", ".join(f"{k} {100 * p:.1f}%" for k, p in pred)

    c.emit(data, text)
