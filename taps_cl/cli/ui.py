"""`taps-cl ui`: the read-only web overview of the registry (taps_cl.serving.ui), on uvicorn."""

from __future__ import annotations

import socket

import click

from taps_cl.cli.render import Context, pass_ctx, say
from taps_cl.errors import TapsError


@click.command("ui")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (the default answers this machine only).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="Port to listen on (0: any free one).")
@pass_ctx
def ui_cmd(c: Context, host: str, port: int) -> None:
    """Serve pages of the registry's bases, tasks, budget, accuracy and lineage (read-only)."""
    c.manager.list_bases()  # no registry here: one `Error:` line now, not a failing page later
    try:
        import uvicorn

        from taps_cl.serving.app import AppConfig, create_app
    except ImportError as exc:
        raise TapsError(f"the web overview needs {exc.name}: pip install 'taps-cl[serve]'") \
            from None
    m = c.manager
    app = create_app(AppConfig(home=str(m.home), db_url=m.db_url, artifacts_url=m.artifacts_url,
                               inference=False, ui=True))
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    say(f"taps-cl ui: http://{shown}:{bound}/ (read-only; Ctrl-C stops)")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    server.run(sockets=[sock])


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; TapsError (one line) where that cannot be had."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as exc:
        raise TapsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock
