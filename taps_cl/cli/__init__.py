"""The `taps-cl` command line: `app` (the root command and `main`), one module per command group,
`options` (flags made from the options' declarations) and `render` (formatting what the Python
API returns). Only this package prints."""

from typing import Any


def __getattr__(name: str) -> Any:
    # `taps_cl.cli.main` (what scripts and older console-script wrappers call) is `app.main`.
    if name == "main":
        from taps_cl.cli.app import main

        return main
    raise AttributeError(f"module 'taps_cl.cli' has no attribute {name!r}")
