"""`taps-cl base`: register and inspect frozen base models."""

from __future__ import annotations

from typing import Optional

import click

from taps_cl.analysis.documents import base_json, base_list_json
from taps_cl.cli.render import (
    Context,
    line,
    pass_ctx,
    table,
)


@click.group("base")
def base_group() -> None:
    """Register and inspect frozen base models."""


@base_group.command("add")
@click.argument("name")
@click.option("--model", required=True, help="timm:NAME or torchvision:NAME.")
@click.option("--weights", type=click.Path(dir_okay=False),
              help="Weights file (.safetensors, or .pth/.pt loaded with weights_only=True).")
@click.option("--pretrained", is_flag=True, help="Download the library's pretrained weights.")
@pass_ctx
def base_add(c: Context, name: str, model: str, weights: Optional[str], pretrained: bool) -> None:
    """Register NAME: build the model, load weights, store them once."""
    if weights and pretrained:
        raise click.UsageError("give either --weights or --pretrained, not both")
    b = c.manager.add_base(name, model, weights=weights, pretrained=pretrained)
    c.emit(base_json(b), lambda: line(
        f"base {b.name}: {b.model_spec}, {b.num_params:,} parameters without the head, "
        f"sha256 {b.sha256[:12]}…"))


@base_group.command("list")
@pass_ctx
def base_list(c: Context) -> None:
    """List base models."""
    bases = c.manager.list_bases()
    c.emit(base_list_json(bases),
           lambda: table(["name", "model", "params", "sha256"],
                          [[b.name, b.model_spec, b.num_params, b.sha256[:16]] for b in bases]))


@base_group.command("show")
@click.argument("name")
@pass_ctx
def base_show(c: Context, name: str) -> None:
    """Show one base model."""
    data = base_json(c.manager.get_base(name))
    c.emit(data, lambda: [f"{k}: {v}" for k, v in data.items()])
