"""`task add --nproc N`: the same command run as N processes under torchrun."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from taps_cl.errors import TapsError


def launch(nproc: int, device: str, batch_size: int, args: Sequence[str]) -> Optional[Any]:
    """Run the `task add` of command line `args` as `nproc` processes under torchrun and return
    the finished run (its output for the caller to show); None for --nproc 1, which trains in
    this process. TapsError when the run failed, after the caller has shown its output."""
    from taps_cl.training import distributed

    distributed.check_launch(nproc, device, batch_size)
    if nproc == 1:
        return None
    if not any(arg == "--nproc" or arg.startswith("--nproc=") for arg in args):
        raise TapsError("--nproc needs the command line it came on: run it through `taps-cl`, "
                        "`python -m taps_cl` or taps_cl.cli.main")
    return distributed.launch(nproc, ["-m", "taps_cl",
                                      *distributed.without_option(args, "--nproc")])
