"""`task add --nproc N`: the same command run as N processes under torchrun."""

from __future__ import annotations

import click

from taps_cl.cli.render import (
    ARGS,
    STATE,
)
from taps_cl.errors import TapsError


def launched(nproc: int, device: str, batch_size: int) -> bool:
    """Run this very `task add` as `nproc` processes under torchrun and pass on what rank 0
    printed; False for --nproc 1, which trains in this process."""
    from taps_cl.training import distributed

    distributed.check_launch(nproc, device, batch_size)
    if nproc == 1:
        return False
    if not any(arg == "--nproc" or arg.startswith("--nproc=") for arg in ARGS):
        raise TapsError("--nproc needs the command line it came on: run it through `taps-cl`, "
                        "`python -m taps_cl` or taps_cl.cli.app.main")
    run = distributed.launch(nproc, ["-m", "taps_cl",
                                     *distributed.without_option(ARGS, "--nproc")])
    click.echo(run.stdout, nl=False)
    if run.returncode == 0 or STATE["debug"]:
        for text in run.rank_stderr.values():
            click.echo(text, err=True, nl=False)
    if STATE["debug"]:
        click.echo(run.torchrun_stderr, err=True, nl=False)
    if run.error is not None:
        raise TapsError(run.error)
    return True
