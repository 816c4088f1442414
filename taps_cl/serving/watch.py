"""What a server serves, and keeping it current while it runs.

`Served` holds the multi-task model and the tasks it serves. `Watcher` polls the registry every
`poll_seconds` for ready tasks it does not serve yet and loads them with
`MultiTaskModel.add_tasks`: their files are checked as `restore` checks them, and a task whose
files fail is reported as unavailable and never served. Loading runs on the watcher's thread
while the batcher's worker goes on serving: `add_tasks` builds the model's new state aside and
swaps it in whole (taps_cl/serving/multitask.py), so a batch sees the tasks from before or after
an addition, never half of one. The registry is opened for reading only
(`taps_cl.serving.app.AppState.manager`): a server keeps no state of its own beyond what it
loaded, so several of them can serve one registry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from registry import NotFound, RegistryError
from registry.errors import StoreUnreachable
from taps_cl.errors import TapsError, first_line

if TYPE_CHECKING:
    from taps_cl.manager import Manager
    from taps_cl.serving.state import AppState
    from taps_cl.serving.multitask import MultiTaskModel, ServedTask

log = logging.getLogger(__name__)


class Served:
    """The multi-task model of one server and the tasks it serves.

    `tasks` and `unavailable` are replaced whole when they change, so request threads read a
    consistent snapshot without a lock."""

    def __init__(self, device: str = "cpu") -> None:
        self.device = device
        self.model: Optional[MultiTaskModel] = None
        self.tasks: dict[str, ServedTask] = {}
        self.unavailable: dict[str, str] = {}  # task → why it is not served

    def run(self, images: list[Any], tasks: list[list[str]]) -> list[dict[str, Any]]:
        """Per image, each named task's logits (UnknownTask for a task not served)."""
        from taps_cl.serving.multitask import UnknownTask

        if self.model is None:
            raise UnknownTask(next(n for names in tasks for n in names))
        return self.model.run(images, tasks)

    def add(self, manager: Manager, names: Sequence[str]) -> list[str]:
        """Load ready tasks (files checked); returns those now served.

        A task the registry refuses (files or rows that fail their check, a task deleted
        meanwhile) goes to `unavailable`, the others are still added; an unreachable store or
        database raises, and the next poll tries again."""
        from taps_cl.serving.multitask import MultiTaskModel
        from taps_cl.training.device import resolve_device

        names = list(names)
        if self.model is None:
            self.model = MultiTaskModel(resolve_device(self.device))
        try:
            added = list(self.model.add_tasks(manager, names))
        except (StoreUnreachable, OSError):
            raise
        except (TapsError, RegistryError) as exc:
            if len(names) > 1:  # all or nothing: find which one, and add the others
                return [n for name in names for n in self.add(manager, [name])]
            self.unavailable = {**self.unavailable, names[0]: first_line(exc)}
            log.warning("task %s is not served: %s", names[0], first_line(exc))
            return []
        self.tasks = dict(self.model.tasks)
        return added


class Watcher:
    """The thread that loads the served tasks at start and polls for new ones (see the module
    docstring). `ready` is set once the first poll has completed."""

    def __init__(self, state: AppState, served: Served) -> None:
        self.state = state
        self.served = served
        self.ready = threading.Event()
        self.error: Optional[str] = None  # the last poll's failure, None after a good one
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="taps-cl-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def poll(self) -> list[str]:
        """Load every ready task that should be served and is not; returns the names added."""
        with self.state.manager() as m:
            wanted = self.wanted(m)
            return self.served.add(m, wanted) if wanted else []

    def wanted(self, m: Manager) -> list[str]:
        """The ready tasks to serve that are neither served nor unavailable: the configured
        tasks, else every ready task of the configured base (or of every base)."""
        cfg = self.state.config
        skip = self.served.tasks.keys() | self.served.unavailable.keys()
        if cfg.tasks:
            wanted = []
            for name in cfg.tasks:
                if name in skip:
                    continue
                try:
                    task = m.get_task(name)
                except NotFound:
                    self.served.unavailable = {**self.served.unavailable,
                                               name: f"no task named {name!r}"}
                    continue
                if task.status == "ready":
                    wanted.append(name)
            return wanted
        bases = [cfg.base] if cfg.base else [b.name for b in m.list_bases()]
        return [n for base in bases for n in m.registry.list_task_names(base) if n not in skip]

    def _loop(self) -> None:
        seconds = self.state.config.poll_seconds
        while not self._stop.is_set():
            try:
                added = self.poll()
                self.polls += 1
                if added:
                    log.info("serving %d new task(s): %s", len(added), ", ".join(added))
                self.error = None
                self.ready.set()
            except Exception as exc:  # a registry that is away for a moment: try again
                self.error = first_line(exc)
                log.warning("polling the registry failed: %s", self.error)
            if seconds <= 0 and self.ready.is_set():
                return  # polling switched off: only the first load
            if self._stop.wait(seconds if seconds > 0 else 1.0):
                return
