"""A training run's liveness and its signals: the heartbeat that marks a run alive in the
registry, and holding Ctrl-C/SIGTERM back while a row is being written."""

from __future__ import annotations

import _thread
import logging
import signal
import threading
from typing import Any, Callable, TypeVar

from registry import NotFound, Registry
from registry.runs import HEARTBEAT_INTERVAL_SECONDS
from taps_cl.errors import first_line

log = logging.getLogger(__name__)


T = TypeVar("T")


class Heartbeat:
    """Marks a run alive in the registry every few seconds from a daemon thread.

    When the run's row is gone (`task remove --force`), a run in the main thread is interrupted
    at once instead of training on for nothing; `lost` tells the caller why.
    """

    def __init__(self, registry: Registry, run_token: str) -> None:
        self._registry, self._token = registry, run_token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="taps-cl-heartbeat", daemon=True)
        self._interrupt = threading.current_thread() is threading.main_thread()
        self.lost = False

    def __enter__(self) -> Heartbeat:
        self._sigint: Any = None
        if self._interrupt and not callable(signal.getsignal(signal.SIGINT)):
            # interrupt_main() raises KeyboardInterrupt only where SIGINT has a Python handler; a
            # background job (`cmd &` in a script) starts with SIGINT ignored.
            self._sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self._sigint is not None:
            signal.signal(signal.SIGINT, self._sigint)

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(HEARTBEAT_INTERVAL_SECONDS):
            try:
                self._registry.heartbeat_task(self._token)
                self._registry.get_task_by_token(self._token)
            except NotFound:
                self.lost = True
                if self._interrupt and not self._stop.is_set():
                    _thread.interrupt_main()
                return
            except Exception as exc:  # noqa: BLE001 — a missed beat must not end the run
                # A database restarting or a dropped connection: the next beat tries again on
                # a fresh connection (PostgreSQL engines ping pooled ones before use). Said once
                # per outage, not at every beat.
                if not failing:
                    log.warning("heartbeat failed (retrying every %d s): %s",
                                HEARTBEAT_INTERVAL_SECONDS, first_line(exc))
                failing = True
            else:
                if failing:
                    log.info("heartbeat recorded again")
                failing = False


def interrupt_after(signalled: int) -> None:
    """Act on a signal `signals_deferred` held back: unwind as Ctrl-C does (KeyboardInterrupt;
    the command line exits 130). Nothing happens for 0."""
    if signalled:
        raise KeyboardInterrupt(f"signal {signalled}")


def signals_deferred(call: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, int]:
    """`call(*args, **kwargs)` with SIGINT and SIGTERM held back until it returns.

    Returns its result and the signal that arrived meanwhile (0: none), for the caller to act on
    where it can clean up. Outside the main thread (no signal handlers there) it just calls.
    """
    if threading.current_thread() is not threading.main_thread():
        return call(*args, **kwargs), 0
    arrived: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, lambda signum, _frame: arrived.append(signum))
                for sig in held}
    try:
        return call(*args, **kwargs), (arrived[0] if arrived else 0)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
