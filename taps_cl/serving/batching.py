"""Dynamic batching: requests that arrive close together run as one mixed batch.

One worker thread runs the model, which is never called from two threads at once. A batch
starts with the oldest waiting request and takes whatever else arrives within `window_s` of it,
up to `max_batch` images (TorchServe's `max_batch_delay` and `batch_size`); a request never
splits across batches. The batch is one `run(images, tasks)` call and each request gets its own
slice of the result. If the mixed call fails, every request in it is run again on its own, so a
request that breaks the model fails alone and the others are answered as if it had not come.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

log = logging.getLogger(__name__)

# run(images, tasks) → per image, one result per task it names (MultiTaskModel.run's contract).
RunFn = Callable[[list[Any], list[list[str]]], list[dict[str, Any]]]


@dataclass
class _Job:
    images: list[Any]
    tasks: list[list[str]]
    future: Future = field(default_factory=Future)


_STOP = object()


@dataclass
class BatchStats:
    """What the worker has run: calls of the model, requests and images, the largest batch."""

    batches: int = 0
    requests: int = 0
    images: int = 0
    largest_requests: int = 0  # most requests that shared one call
    retried: int = 0  # mixed calls that failed and were run request by request


class Batcher:
    """The worker thread and its queue (see the module docstring)."""

    def __init__(self, run: RunFn, *, window_s: float, max_batch: int,
                 name: str = "taps-cl-batcher") -> None:
        if max_batch < 1 or window_s < 0:
            raise ValueError(f"max_batch {max_batch} must be ≥ 1 and window {window_s} ≥ 0")
        self._run = run
        self.window_s = window_s
        self.max_batch = max_batch
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def submit(self, images: Sequence[Any], tasks: Sequence[Sequence[str]]) -> Future:
        """Queue one request; its future resolves to one dict per image (or its error)."""
        if len(images) != len(tasks):
            raise ValueError(f"{len(images)} images but {len(tasks)} task lists")
        job = _Job(list(images), [list(t) for t in tasks])
        self._queue.put(job)
        return job.future

    def stop(self, timeout: Optional[float] = 10.0) -> None:
        """Finish what is queued, then end the worker."""
        if self._started and self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)

    # ---------------------------------------------------------------- worker
    def _loop(self) -> None:
        pending: Any = None
        while True:
            item = pending if pending is not None else self._queue.get()
            pending = None
            if item is _STOP:
                return
            batch, pending = self._gather(item)
            try:
                self._run_batch(batch)
            except BaseException as exc:  # never let the worker die with requests waiting
                log.exception("batch failed outside the model call")
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _gather(self, first: _Job) -> tuple[list[_Job], Any]:
        """`first` and the requests that arrive within the window, up to max_batch images;
        returns them and the item that did not fit (it starts the next round)."""
        batch, size = [first], len(first.images)
        deadline = time.monotonic() + self.window_s
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            try:  # past the deadline, still take what is already queued
                item = self._queue.get(timeout=remaining) if remaining > 0 else \
                    self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP or size + len(item.images) > self.max_batch:
                return batch, item
            batch.append(item)
            size += len(item.images)
        return batch, None

    def _run_batch(self, batch: list[_Job]) -> None:
        jobs = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not jobs:
            return
        images = [image for job in jobs for image in job.images]
        tasks = [t for job in jobs for t in job.tasks]
        s = self.stats
        s.batches += 1
        s.requests += len(jobs)
        s.images += len(images)
        s.largest_requests = max(s.largest_requests, len(jobs))
        try:
            results = self._run(images, tasks)
            if len(results) != len(images):
                raise RuntimeError(f"the model returned {len(results)} results for "
                                   f"{len(images)} images")
        except Exception as exc:
            if len(jobs) == 1:
                jobs[0].future.set_exception(exc)
                return
            s.retried += 1
            log.info("a mixed batch of %d requests failed (%s); running them one by one",
                     len(jobs), exc)
            for job in jobs:
                _settle(job.future, lambda job=job: self._run(job.images, job.tasks))
            return
        start = 0
        for job in jobs:
            job.future.set_result(results[start:start + len(job.images)])
            start += len(job.images)


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    """Resolve a running `future` with fn()'s result or exception."""
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)
