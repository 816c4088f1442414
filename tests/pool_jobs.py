"""Jobs for the worker-pool tests, in a module of their own so spawned workers import only this."""

from __future__ import annotations

import os


def job(name: str) -> str:
    """'ok NAME'; the job 'boom' kills its worker process, 'raise' raises."""
    if name == "boom":
        os._exit(3)  # as a segfault or the out-of-memory killer would end it
    if name == "raise":
        raise ValueError(f"cannot check {name}\nsecond line")
    return f"ok {name}"


def failed(job: tuple[str], why: str) -> str:
    return f"failed {job[0]}: {why}"
