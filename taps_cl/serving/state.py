"""What the web app's parts share: its configuration, and read-only Managers per thread.

`app.py` builds the application from these; the inference endpoints (`http.py`, `watch.py`) and
the pages (`ui/`) take an `AppState`, so none of them imports the app that mounts them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

from taps_cl.manager import Manager


@dataclass(frozen=True)
class AppConfig:
    """What the app serves and how; the CLI's `serve`/`ui` options fill it."""

    home: Optional[str] = None
    db_url: Optional[str] = None
    artifacts_url: Optional[str] = None
    inference: bool = True  # the /v2 endpoints (taps-cl serve)
    ui: bool = True  # the pages (taps-cl ui, and taps-cl serve)
    base: Optional[str] = None  # serve only this base's tasks (default: every base)
    tasks: Optional[tuple[str, ...]] = None  # serve only these tasks (default: every ready one)
    device: str = "cpu"
    batch_window_ms: float = 5.0  # dynamic batching: wait this long for more requests
    max_batch: int = 64  # images in one mixed batch at most
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413
    poll_seconds: float = 5.0  # how often the registry is polled for new tasks


class AppState:
    """What the routes share: the configuration and read-only Managers, one per thread (a
    registry's SQL session is not shared between threads)."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self._local = threading.local()
        self._all: list[Manager] = []
        self._lock = threading.Lock()
        self.extra: dict[str, Any] = {}  # per-feature state (the inference engine, caches)
        # What the installed features run when the app starts and stops (threads, caches).
        self.startup: list[Callable[[], None]] = []
        self.shutdown: list[Callable[[], None]] = []

    @contextmanager
    def manager(self) -> Iterator[Manager]:
        """This thread's Manager on the configured registry."""
        m = getattr(self._local, "manager", None)
        if m is None:
            m = Manager(self.config.home, self.config.db_url, self.config.artifacts_url)
            self._local.manager = m
            with self._lock:
                self._all.append(m)
        yield m

    def close(self) -> None:
        with self._lock:
            for m in self._all:
                m.close()
            self._all.clear()
