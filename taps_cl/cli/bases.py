"""`taps-cl base`: register and inspect frozen base models."""

from __future__ import annotations

from typing import Any, Optional

import click

from registry.entities import BaseModel
from taps_cl.cli.render import (
    Context,
    line,
    pass_ctx,
    table,
)


@click.group("base")
def base_group() -> None:
    """Register and inspect frozen base models."""


def _base_json(b: BaseModel) -> dict[str, Any]:
    return {"name": b.name, "model": b.model_spec, "architecture": b.architecture,
            "num_params": b.num_params, "total_params": b.total_params, "sha256": b.sha256,
            "bytes": b.weights.bytes, "data_config": b.data_config,
            "created_at": b.created_at.isoformat()}


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
    c.emit(_base_json(b), lambda: line(
        f"base {b.name}: {b.model_spec}, {b.num_params:,} parameters without the head, "
        f"sha256 {b.sha256[:12]}…"))


@base_group.command("list")
@pass_ctx
def base_list(c: Context) -> None:
    """List base models."""
    bases = c.manager.list_bases()
    c.emit([{"name": b.name, "model": b.model_spec, "num_params": b.num_params,
             "sha256": b.sha256} for b in bases],
           lambda: table(["name", "model", "params", "sha256"],
                          [[b.name, b.model_spec, b.num_params, b.sha256[:16]] for b in bases]))


@base_group.command("show")
@click.argument("name")
@pass_ctx
def base_show(c: Context, name: str) -> None:
    """Show one base model."""
    data = _base_json(c.manager.get_base(name))
    c.emit(data, lambda: [f"{k}: {v}" for k, v in data.items()])
