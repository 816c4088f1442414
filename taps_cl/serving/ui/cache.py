"""Reports the pages share, computed once per state of a base and kept while it lasts.

A base of 10,000 tasks takes a few tenths of a second to summarise (every task's sizes, the
budget, the accuracy records); the registry page, the base page and the task pages all show
parts of that. The cache keeps each report with a *stamp* of its base, read by a few indexed
queries on every request: how many tasks there are, how many are ready, the last ready task
(name, creation time, how many evaluations it has). Every add, delete or removal changes one of
those, and so does a re-evaluation (`report accuracy --reevaluate` records a new cell of the
last task too). What the stamp cannot see (a single earlier task re-measured from Python) is
caught by the time limit `max_age`. The app never writes, so a stale entry is only ever older
than the registry, never wrong about what was there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

from taps_cl.manager import Manager

T = TypeVar("T")
Stamp = tuple[Hashable, ...]


def stamp(m: Manager, base: str) -> Stamp:
    """What changes whenever the tasks or evaluations of `base` change (see the module)."""
    total = m.count_tasks(base)
    ready = m.count_tasks(base, ready_only=True)
    if not ready:
        return (total, ready)
    rows = m.task_summaries(base, ready_only=True, limit=1, offset=ready - 1)
    if not rows:  # deleted since it was counted: a stamp no entry has
        return (total, ready, time.monotonic())
    last = rows[0]
    cells = len(m.registry.list_evaluations(base, tasks=[last.name]))
    return (total, ready, last.name, last.created_at, cells)


class ReportCache:
    """Values per (kind, base), valid while the base's stamp is unchanged and for `max_age` s.

    One lock per key: two requests that need the same report wait for one computation.
    """

    def __init__(self, max_age: float = 300.0) -> None:
        self.max_age = max_age
        self._lock = threading.Lock()
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._values: dict[tuple[str, str], tuple[Stamp, float, Any]] = {}

    def get(self, kind: str, base: str, current: Stamp, compute: Callable[[], T]) -> T:
        """The cached `kind` of `base` if computed at stamp `current`, else `compute()`."""
        key = (kind, base)
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            entry = self._values.get(key)
            if entry is not None and entry[0] == current \
                    and time.monotonic() - entry[1] < self.max_age:
                return entry[2]  # type: ignore[no-any-return]
            value = compute()
            self._values[key] = (current, time.monotonic(), value)
            return value

    def has(self, kind: str, base: str, current: Stamp) -> bool:
        """Whether `kind` of `base` is cached at stamp `current` (showing it costs nothing)."""
        entry = self._values.get((kind, base))
        return entry is not None and entry[0] == current \
            and time.monotonic() - entry[1] < self.max_age
