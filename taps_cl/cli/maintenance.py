"""`taps-cl gc` and `taps-cl demo`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict

import click

from taps_cl.cli.render import (
    Context,
    accuracy_text,
    budget_text,
    pass_ctx,
    progress,
    say,
)
from taps_cl.errors import TapsError


@click.command("gc")
@click.option("--yes", is_flag=True, help="Remove the files (default: only list them).")
@pass_ctx
def gc_cmd(c: Context, yes: bool) -> None:
    """List (and with --yes remove) artifact files no row references and stale temp files."""
    if yes:
        files, freed = c.manager.remove_garbage()
    else:
        files, freed = c.manager.find_garbage(), 0
    total = sum(f.bytes for f in files)
    data = {"files": [asdict(f) for f in files], "bytes": total, "removed": yes,
            "bytes_freed": freed}

    def text() -> Iterator[str]:
        for f in files:
            yield f"{f.path}  {f.bytes:,} bytes  ({f.reason})"
        if not files:
            yield "no garbage: every artifact file is referenced"
        elif yes:
            yield f"removed {len(files)} file(s), {freed:,} bytes"
        else:
            yield f"{len(files)} file(s), {total:,} bytes; `taps-cl gc --yes` removes them"

    c.emit(data, text)


# ----------------------------------------------------------------------- demo
@click.command("demo")
@click.option("--quick", is_flag=True, help="A smaller run (for smoke tests).")
@pass_ctx
def demo_cmd(c: Context, quick: bool) -> None:
    """Offline demo: real ImageNet base, three real tasks, budget and verified accuracy."""
    import taps_cl.demo as demo

    # With --json the progress lines go to stderr so stdout stays one JSON document.
    demo.run(c.manager, quick=quick, progress=progress(),
             say=(lambda msg: say(msg, err=True)) if c.json else say)
    budget = c.manager.budget(demo.BASE_NAME)
    accuracy = c.manager.accuracy(demo.BASE_NAME, verify=True)

    def text() -> Iterator[str]:
        yield ""
        yield from budget_text(budget)
        yield ""
        yield from accuracy_text(accuracy)

    c.emit({"budget": budget.to_json(), "accuracy": accuracy.to_json()}, text)
    if accuracy.reason:
        raise TapsError(accuracy.reason)
