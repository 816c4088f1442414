"""Command groups whose heavy subcommands are imported only when they run (or show their help).

`task add` and `group train` build their flags from the methods' option declarations, which
imports every method and torch; reading commands (`task list`, `report budget`) must answer
without that second of imports. This is click's documented pattern for lazily loaded commands.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

import click


class LazyGroup(click.Group):
    """A click group with some subcommands named by "module:attribute", imported on first use."""

    def __init__(self, *args: Any, lazy: Optional[dict[str, str]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        if cmd_name in self.lazy:
            module, _, attribute = self.lazy[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
            return command
        return super().get_command(ctx, cmd_name)
