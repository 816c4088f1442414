"""Verifying a registry: every base and task, the tasks checked in a pool of worker processes.

The parent reads and hashes each base once; the checked tensors reach the workers packed into one
shared-memory buffer per dtype (torch.multiprocessing shares a tensor's storage instead of
copying it through a pipe), and each worker trusts them (`TaskModels.trust_base`) instead of
reading the base again. Workers are started with `spawn`, never forked from a process whose torch
runtime already runs threads, so a script that verifies with workers needs the usual
``if __name__ == "__main__":`` guard. Each worker opens its own registry connection and runs
cpu_count // workers torch threads, so the pool as a whole does not oversubscribe the cores.

A check that raises is a failed check with its one-line reason. A worker that dies (a crash, the
out-of-memory killer) breaks the whole pool: the checks in flight at that moment are re-run one at
a time in fresh pools, so only the check that kills its worker again is reported as failed.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.multiprocessing  # registers the reductions that share tensors between processes
from tqdm import tqdm

from registry import Registry
from registry.entities import BaseModel, Evaluation, Task
from taps_cl.errors import TapsError, first_line
from taps_cl.tasks.rebuilding import TaskModels
from taps_cl.tasks.verification import (
    ProbeCheck,
    Verifier,
    evaluations_by_task,
    safe_check,
)

log = logging.getLogger(__name__)

R = TypeVar("R")
Job = tuple[Task, BaseModel, list[Evaluation]]  # a task, its base, the evaluations about it
# One flat tensor per dtype, and (name, dtype, offset, shape) of every entry of the state dict.
PackedState = tuple[dict[torch.dtype, torch.Tensor], list[tuple[str, torch.dtype, int,
                                                                tuple[int, ...]]]]

DIED = "its worker process died while checking it (a crash, or out of memory)"
# Pools in a row that die before finishing any job: the workers cannot run at all, stop trying.
MAX_FRUITLESS_POOLS = 3

_WORKER: dict[str, Any] = {}  # a worker process's verifier, or why it could not make one


def pack_state(state: dict[str, torch.Tensor]) -> PackedState:
    """`state` as one shared-memory tensor per dtype: a handful of buffers for the workers to
    map instead of one per tensor (each shared buffer costs a file descriptor)."""
    layout = []
    parts: dict[torch.dtype, list[torch.Tensor]] = {}
    ends: dict[torch.dtype, int] = {}
    for name, tensor in state.items():
        start = ends.get(tensor.dtype, 0)
        layout.append((name, tensor.dtype, start, tuple(tensor.shape)))
        ends[tensor.dtype] = start + tensor.numel()
        parts.setdefault(tensor.dtype, []).append(tensor.detach().reshape(-1))
    flats = {dtype: torch.cat(chunks).share_memory_() for dtype, chunks in parts.items()}
    return flats, layout


def unpack_state(packed: PackedState) -> dict[str, torch.Tensor]:
    """The state dict `pack_state` packed, as views into its shared buffers (nothing copied)."""
    flats, layout = packed
    return {name: flats[dtype][start:start + math.prod(shape)].view(shape)
            for name, dtype, start, shape in layout}


def check_tasks(
    jobs: Sequence[Job], models: TaskModels, workers: int,
    on_done: Optional[Callable[[], Any]] = None,
) -> list[ProbeCheck]:
    """Check `jobs` in `workers` processes; the checks in job order.

    Every job's base must have been checked by the caller: its state is taken from `models`
    (cached there by the base check) and handed to the workers as trusted.
    """
    registry = models.registry
    bases = {base.sha256: base for _, base, _ in jobs}
    packed = [(base, pack_state(models.base_state(base))) for base in bases.values()]
    threads = max(1, available_cpus() // workers)
    log.info("checking %d task(s) in %d worker processes, %d torch thread(s) each",
             len(jobs), workers, threads)
    return run_pool(
        jobs, _check, workers=workers,
        failed=lambda job, why: ProbeCheck(job[0].name, None, False, why),
        initializer=_start_worker,
        initargs=(str(registry.home), registry.url, packed, threads, registry.store.url),
        on_done=on_done,
    )


def _start_worker(home: str, db_url: str, bases: list[tuple[BaseModel, PackedState]],
                  threads: int, store_url: Optional[str] = None) -> None:
    torch.set_num_threads(threads)
    child = multiprocessing.parent_process() is not None  # not when a test calls this in-process
    if child:
        # Tearing down an interpreter that loaded torch and timm takes seconds and achieves
        # nothing here (each result was sent when its check ended; streams are flushed before
        # exit), so the worker ends right after closing its registry (last registered runs first).
        atexit.register(os._exit, 0)
    try:
        registry = Registry(home, db_url, create=False, artifacts=store_url)
        if child:
            atexit.register(registry.close)
        models = TaskModels(registry)
        for base, packed in bases:
            models.trust_base(base, unpack_state(packed))
        _WORKER["verifier"] = Verifier(models)
    except Exception as exc:  # every check then fails with this reason instead of a dead pool
        _WORKER["error"] = f"its worker could not open the registry: {first_line(exc)}"


def _check(task: Task, base: BaseModel, evaluations: list[Evaluation]) -> ProbeCheck:
    verifier = _WORKER.get("verifier")
    if verifier is None:
        return ProbeCheck(task.name, None, False, _WORKER.get("error", "its worker did not start"))
    return safe_check(verifier, task, base, evaluations)


def run_pool(
    jobs: Sequence[tuple[Any, ...]], fn: Callable[..., R], *, workers: int,
    failed: Callable[[tuple[Any, ...], str], R],
    initializer: Optional[Callable[..., None]] = None, initargs: tuple[Any, ...] = (),
    on_done: Optional[Callable[[], Any]] = None,
) -> list[R]:
    """`fn(*job)` for every job in `workers` spawned processes; the results in job order.

    `fn` and `initializer` must be importable module-level functions. A job whose worker dies
    (alone, see the module docstring) or whose result cannot come back gives `failed(job, why)`.
    At most `workers` jobs are handed out at a time, so a dead pool names few suspects.
    """
    results: dict[int, R] = {}
    context = torch.multiprocessing.get_context("spawn")

    def finish(i: int, result: R) -> None:
        results[i] = result
        if on_done is not None:
            on_done()

    def run(queue: deque[int], size: int) -> list[int]:
        """Run the queued jobs in a fresh pool of `size`; the jobs in flight if a worker died."""
        with ProcessPoolExecutor(size, mp_context=context, initializer=initializer,
                                 initargs=initargs) as pool:
            flight: dict[Future[R], int] = {}
            while queue or flight:
                while queue and len(flight) < size:
                    i = queue.popleft()
                    flight[pool.submit(fn, *jobs[i])] = i
                done, _ = wait(flight, return_when=FIRST_COMPLETED)
                lost = []
                for future in done:
                    i = flight.pop(future)
                    try:
                        finish(i, future.result())
                    except BrokenProcessPool:
                        lost.append(i)
                    except Exception as exc:  # e.g. a result that could not be sent back
                        finish(i, failed(jobs[i], f"unexpected {type(exc).__name__}: "
                                                  f"{first_line(exc)}"))
                if lost:
                    return sorted(lost + list(flight.values()))
        return []

    pending = deque(range(len(jobs)))
    fruitless = 0
    while pending:
        before = len(results)
        suspects = run(pending, workers)
        if not suspects:
            break
        finished_any = len(results) > before
        log.warning("a worker process died; re-checking %d job(s) one at a time", len(suspects))
        died = 0
        for i in suspects:
            # Alone in a fresh pool: a job that kills its worker again is the one to blame.
            if run(deque([i]), 1):
                finish(i, failed(jobs[i], DIED))
                died += 1
        fruitless = 0 if finished_any or died < len(suspects) else fruitless + 1
        if fruitless >= MAX_FRUITLESS_POOLS:
            for i in pending:
                finish(i, failed(jobs[i], "worker processes die before checking anything"))
            pending.clear()
    return [results[i] for i in range(len(jobs))]


# Automatic worker count: below this many ready tasks, checking in this process is faster than
# starting worker processes (each imports torch and timm before its first check). Measured with
# benchmarks/scale.py --lite0-verify 32 on 2 cores: 14 tasks/s in one process, 5 with the pool.
AUTO_MIN_TASKS = 64


def pool_size(workers: Optional[int], ready: int) -> int:
    """How many worker processes check `ready` tasks (1: in this process, no pool)."""
    if workers is None:
        if ready < AUTO_MIN_TASKS:
            return 1
        workers = available_cpus()
    return max(1, min(workers, ready))


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def verify(
    models: TaskModels, base: Optional[str] = None, tasks: Optional[Sequence[str]] = None, *,
    workers: Optional[int] = None, progress: bool = False,
) -> list[ProbeCheck]:
    """Check every base (or one) and its tasks (or the named ones), in sequence order.

    Each base is read and hashed once. With more than one worker the ready tasks are checked
    in that many processes (`check_tasks`); None picks min(cores, tasks), in this process
    below AUTO_MIN_TASKS tasks. Named tasks limit the check to them and their bases; an
    unknown name is NotFound. `progress` shows a bar on stderr.
    """
    if workers is not None and workers < 1:
        raise TapsError(f"workers must be at least 1, got {workers}")
    reg = models.registry
    verifier = Verifier(models)
    bases = [reg.get_base(base)] if base else reg.list_bases()
    if tasks is None:
        listed = [(b, reg.list_tasks(b.name)) for b in bases]
    else:  # only the named rows are read (a base may hold thousands)
        named = [reg.get_task(name) for name in dict.fromkeys(tasks)]  # NotFound if unknown
        for task in named:
            if base is not None and task.base != base:
                raise TapsError(f"task {task.name!r} belongs to base {task.base!r}, "
                                f"not {base!r}")
        order = {b.name: i for i, b in enumerate(bases)}
        named.sort(key=lambda t: (order[t.base], t.position is None, t.position or 0))
        listed = [(b, its) for b in bases
                  if (its := [t for t in named if t.base == b.name])]
    checks: list[Optional[ProbeCheck]] = []
    jobs: list[tuple[int, Task, BaseModel, list[Evaluation]]] = []
    for b, its in listed:
        error = verifier.check_base(b)
        if error is not None:
            checks.append(ProbeCheck(f"base:{b.name}", None, False, error))
            continue
        about = evaluations_by_task(reg.list_evaluations(
            b.name, tasks=None if tasks is None else [t.name for t in its]))
        for task in its:
            jobs.append((len(checks), task, b, about.get(task.name, [])))
            checks.append(None)
    size = pool_size(workers, sum(1 for job in jobs if job[1].status == "ready"))
    pooled = [job for job in jobs if size > 1 and job[1].status == "ready"]
    bar = tqdm(total=len(jobs), disable=not progress, desc="verify", unit="task",
               dynamic_ncols=True)
    try:
        for slot, task, b, about_task in jobs:
            if size == 1 or task.status != "ready":  # nothing to rebuild: no worker needed
                checks[slot] = safe_check(verifier, task, b, about_task)
                bar.update()
        if pooled:
            found = check_tasks([job[1:] for job in pooled], models, size, on_done=bar.update)
            for job, check in zip(pooled, found, strict=True):
                checks[job[0]] = check
    finally:
        bar.close()
    return [c for c in checks if c is not None]
