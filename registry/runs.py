"""Liveness of `task add` runs: a heartbeat in the task's row, and the pid when on this host."""

from __future__ import annotations

import os
import socket
from datetime import datetime, timezone
from typing import Optional

from registry.entities import Task

# How often a live run refreshes its heartbeat (Registry.heartbeat_task).
HEARTBEAT_INTERVAL_SECONDS = 10
# A heartbeat older than this means the run is gone (several missed beats, not one slow one).
HEARTBEAT_STALE_SECONDS = 60


def this_host() -> str:
    """This machine's hostname, as recorded in ``tasks.run_host``."""
    return socket.gethostname()


def pid_exists(pid: int) -> bool:
    """Whether a process with this id exists on this machine."""
    if pid <= 0:  # 0 and negative ids address process groups, not a process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        return True
    except OSError:
        return False
    return True


def heartbeat_age(task: Task, now: Optional[datetime] = None) -> Optional[float]:
    """Seconds since the run's last heartbeat; None when it never beat."""
    if task.heartbeat_at is None:
        return None
    now = _utc(now or datetime.now(timezone.utc))
    return (now - _utc(task.heartbeat_at)).total_seconds()


def run_is_alive(task: Task, now: Optional[datetime] = None) -> bool:
    """Whether the run that began ``task`` may still be training it.

    Alive = status ``training``, a heartbeat younger than HEARTBEAT_STALE_SECONDS and, when the
    run is on this host, its pid exists: a run killed here (kill -9) is dead at once even with
    a fresh heartbeat. A run on another host is judged by its heartbeat alone.
    """
    if task.status != "training":
        return False
    age = heartbeat_age(task, now)
    if age is None or age >= HEARTBEAT_STALE_SECONDS:
        return False
    if task.run_host == this_host() and task.run_pid is not None:
        return pid_exists(task.run_pid)
    return True


def _utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes; the registry records UTC.
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment


__all__ = [
    "HEARTBEAT_INTERVAL_SECONDS",
    "HEARTBEAT_STALE_SECONDS",
    "heartbeat_age",
    "pid_exists",
    "run_is_alive",
    "this_host",
]
