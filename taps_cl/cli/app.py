"""The `taps-cl` command line: the root command, its subcommands, and one line per error."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Optional

import click

from registry import RegistryError
from taps_cl.cli.bases import base_group
from taps_cl.cli.db import db_group
from taps_cl.cli.lazy import LazyGroup
from taps_cl.cli.maintenance import demo_cmd, gc_cmd
from taps_cl.cli.models import predict_cmd, restore_cmd
from taps_cl.cli.render import Context, say
from taps_cl.cli.reports import report_group
from taps_cl.cli.state import STATE
from taps_cl.cli.tasks import task_group
from taps_cl.errors import TapsError, first_line
from taps_cl.manager import Manager

log = logging.getLogger("taps_cl")


@click.group(cls=LazyGroup, lazy={"group": "taps_cl.cli.groups:group_group",
                   "serve": "taps_cl.cli.serving:serve_cmd", "ui": "taps_cl.cli.ui:ui_cmd"},
             context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="TAPS_CL_HOME", type=click.Path(file_okay=False),
              help="Directory with registry.db and artifacts/ (default ./.taps-cl).")
@click.option("--db", "db_url", envvar="TAPS_CL_DB", help="SQLAlchemy database URL.")
@click.option("--artifacts", "artifacts_url", envvar="TAPS_CL_ARTIFACTS",
              help="Artifact store: a path or fsspec URL (file://, s3://…); "
                   "default: the store the registry recorded, else HOME/artifacts.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Show progress logs.")
@click.version_option(package_name="taps-cl")
@click.pass_context
def cli(ctx: click.Context, home: Optional[str], db_url: Optional[str],
        artifacts_url: Optional[str], as_json: bool, debug: bool, verbose: bool) -> None:
    """taps-cl: add tasks to one frozen backbone, query budgets and accuracy, restore models."""
    STATE["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # main() hands over the command line it runs (`task add --nproc` passes it on).
    args = ctx.obj if isinstance(ctx.obj, list) else sys.argv[1:]
    ctx.obj = Context(Manager(home, db_url, artifacts_url), as_json, args)
    ctx.call_on_close(ctx.obj.manager.close)


for command in (db_group, base_group, task_group, report_group, restore_cmd, predict_cmd,
                gc_cmd, demo_cmd):
    cli.add_command(command)


def _interrupt(signum: int, _frame: object) -> None:
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so an unfinished task is removed.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: one `Error: …` line and exit 1 for failures; tracebacks with --debug."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: Optional[list[str]]) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        cli.main(args=args, prog_name="taps-cl", standalone_mode=False, obj=args)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        say("Aborted.", err=True)
        sys.exit(130)
    except (TapsError, RegistryError) as exc:
        if STATE["debug"]:
            raise
        say(f"Error: {first_line(exc)}", err=True)
        sys.exit(1)
    except OSError as exc:  # a file the user named or pointed us to: say which and why
        if STATE["debug"]:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        say(f"Error: cannot use{where}: {exc.strerror or first_line(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug: still one line unless --debug
        if STATE["debug"]:
            raise
        say(f"Error: unexpected {type(exc).__name__}: {first_line(exc)} (run with --debug for "
            "the traceback)", err=True)
        sys.exit(1)
