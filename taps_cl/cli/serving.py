"""`taps-cl serve`: every ready task of a registry behind one HTTP server (docs/serving.md)."""

from __future__ import annotations

import math
from typing import Optional

import click

from taps_cl.cli.render import Context, pass_ctx
from taps_cl.errors import TapsError


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (the loopback interface unless you choose another).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--base", default=None, help="Serve only this base's tasks (default: every base).")
@click.option("--task", "tasks", default=None,
              help="Serve only these tasks, comma-separated (no new tasks are picked up).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or mps.")
@click.option("--batch-window-ms", type=click.FloatRange(0, 10_000), default=5.0,
              show_default=True,
              help="Wait this long after a request for others to run in the same batch.")
@click.option("--max-batch", type=click.IntRange(1), default=64, show_default=True,
              help="Images in one batch at most (and in one request).")
@click.option("--max-body-mb", type=click.FloatRange(0, min_open=True), default=8.0,
              show_default=True, help="Larger request bodies are refused with 413.")
@click.option("--poll-seconds", type=click.FloatRange(0), default=5.0, show_default=True,
              help="How often to look for new ready tasks (0: never).")
@click.option("--no-ui", is_flag=True, help="Serve only the /v2 endpoints, not the pages.")
@click.option("--plan", "plan_only", is_flag=True,
              help="Print the segment plan of the served tasks and exit.")
@pass_ctx
def serve_cmd(c: Context, host: str, port: int, base: Optional[str], tasks: Optional[str],
              device: str, batch_window_ms: float, max_batch: int, max_body_mb: float,
              poll_seconds: float, no_ui: bool, plan_only: bool) -> None:
    """Serve the registry's tasks over HTTP (Open Inference Protocol, /v2); read-only."""
    for flag, value in (("--batch-window-ms", batch_window_ms), ("--max-body-mb", max_body_mb),
                        ("--poll-seconds", poll_seconds)):
        if not math.isfinite(value):  # NaN and inf pass click's range checks
            raise TapsError(f"{flag} must be a finite number, got {value}")
    names = tuple(dict.fromkeys(t.strip() for t in tasks.split(",") if t.strip())) \
        if tasks else None
    if tasks is not None and not names:
        raise click.BadParameter("name at least one task", param_hint="--task")
    m = c.manager
    if plan_only:
        from taps_cl.cli.render import plan_text

        plan = m.serving(tasks=list(names) if names else None, base=base, device=device).plan()
        c.emit(plan.to_json(), lambda: plan_text(plan))
        return
    _check_selection(c, base, names)
    try:
        import uvicorn
    except ImportError:
        raise TapsError("taps-cl serve needs uvicorn: pip install 'taps-cl[serve]'") from None
    from taps_cl.serving.app import AppConfig, create_app

    config = AppConfig(
        home=str(m.home), db_url=m.db_url, artifacts_url=m.artifacts_url, inference=True,
        ui=not no_ui, base=base, tasks=names, device=device, batch_window_ms=batch_window_ms,
        max_batch=max_batch, max_body_bytes=int(max_body_mb * 2**20), poll_seconds=poll_seconds)
    app = create_app(config)
    m.close()  # the server opens its own, one per thread
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    except KeyboardInterrupt:  # uvicorn has shut down cleanly and passes the signal on
        pass


def _check_selection(c: Context, base: Optional[str], names: Optional[tuple[str, ...]]) -> None:
    """Refuse at once, in one line, what the server could never serve: an unknown base, or a
    named task that is unknown, not ready or of another base."""
    m = c.manager
    if base is not None:
        m.get_base(base)
    else:
        m.list_bases()  # fails with "no registry" where there is none
    for name in names or ():
        task = m.get_task(name)
        if task.status != "ready":
            raise TapsError(f"task {name!r} is {task.status}, not ready")
        if base is not None and task.base != base:
            raise TapsError(f"task {name!r} belongs to base {task.base!r}, not {base!r}")
