"""The one FastAPI application behind `taps-cl serve` and `taps-cl ui`.

`serve` mounts the inference endpoints (`taps_cl.serving.http`) and the pages; `ui` only the
pages (`taps_cl.serving.ui.routes`); what they share is in `state.py`. Neither writes to the registry. FastAPI, uvicorn and Jinja2
come with the optional extra `[serve]`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from taps_cl.errors import TapsError

try:
    from fastapi import FastAPI
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise TapsError("the web app needs FastAPI: pip install 'taps-cl[serve]'") from exc

from taps_cl.serving.state import AppConfig, AppState

__all__ = ["AppConfig", "AppState", "create_app"]


def create_app(config: AppConfig) -> FastAPI:
    """The application for `config`: pages and/or inference endpoints on one registry."""
    state = AppState(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Handlers added with FastAPI's older `on_event` run too: a lifespan replaces the one
        # that would have run them.
        for start in [*state.startup, *app.router.on_startup]:
            await _call(start)
        try:
            yield
        finally:
            for stop in [*reversed(state.shutdown), *app.router.on_shutdown]:
                await _call(stop)
            state.close()

    app = FastAPI(title="taps-cl", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.taps = state
    if config.ui:
        from taps_cl.serving.ui.routes import install_ui

        install_ui(app, state)
    if config.inference:
        from taps_cl.serving.http import install_inference

        install_inference(app, state)
    return app


async def _call(handler: Callable[[], Any]) -> None:
    result = handler()
    if inspect.isawaitable(result):
        await result
