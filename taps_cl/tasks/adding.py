"""One `task add` run: check the request, train on the frozen base, store, record, re-check.

The run is recorded (status ``training``, a run token, host, pid and a heartbeat) only once
everything that can be rejected has been checked, and it is finished by its token, never by its
name: a run whose row was removed cannot write into someone else's task. The task gets its
position when it finishes, in the same transaction as its column of the accuracy matrix, so
concurrent adds land in the order they became ready and every column is complete.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Optional

import torch
from torch import nn

from registry import NotFound, Registry, RegistryError, RunLost
from registry.entities import BaseModel, SharedPin, Task
from taps_cl.data import specs as data
from taps_cl.errors import TapsError, first_line
from taps_cl.methods.base import Dependency, Method, Plan
from taps_cl.models import backbones
from taps_cl.models.backbones import example_input
from taps_cl.tasks.planning import planning, task_signature
from taps_cl.tasks.rebuilding import TaskModels
from taps_cl.tasks.recording import Recorder, TaskAddResult
from taps_cl.tasks.requests import TaskRequest, check_input_batch, configured_method
from taps_cl.tasks.runs import Heartbeat, interrupt_after, signals_deferred
from taps_cl.tasks.verification import sha256_of
from taps_cl.training.device import resolve_device
from taps_cl.training.distributed import active_group
from taps_cl.training.fit import TrainConfig, fit

log = logging.getLogger(__name__)


class TaskAdder:
    """Runs `task add` against one registry."""

    def __init__(self, registry: Registry, models: TaskModels) -> None:
        self.registry = registry
        self.models = models
        self.recorder = Recorder(registry, models)

    def add(self, request: TaskRequest, train_cfg: TrainConfig,
            progress: bool = False) -> Optional[TaskAddResult]:
        """Train and record the task; a failure or interrupt leaves the registry as it was.

        In a torchrun group (taps_cl.training.distributed.joined) every rank trains; the others
        return None and only rank 0 writes and returns the result.
        """
        reg = self.registry
        group = active_group()  # several processes under torchrun: only rank 0 writes
        base = reg.get_base(request.base)
        # One input batch must fit (at the base's own size when no --img-size was given).
        check_input_batch(train_cfg.batch_size,
                          request.img_size or int(base.data_config["input_size"][-1]))
        if group.is_main:  # the other ranks would find rank 0's own new row
            self.recorder.check_name_free(request.name)
        options = request.method_options or {}
        learner = configured_method(request.method, options, train_cfg.epochs)
        resolve_device(train_cfg.device)  # an unavailable device fails before any work
        spec = data.DataSpec.parse(request.data_spec, classes=request.classes)
        task_data = data.load_task_data(
            spec, base.data_config, img_size=request.img_size,
            val_fraction=request.val_fraction, seed=train_cfg.seed,
            max_train=request.max_train, max_test=request.max_test,
        )
        head = frozenset(base.head_keys)
        resolved = [self._dependency(name, base, learner) for name in learner.dependencies()]
        dependencies = [dep for dep, _ in resolved]
        pins = [(dep.name, sha) for dep, sha in resolved]  # the artifacts it is trained against
        # Worker ranks need the signature only where it chooses the model (`uses_signature`).
        signature = (task_signature(self.models, base, task_data, request.img_size, request.name)
                     if group.is_main or learner.uses_signature else None)
        plan = learner.plan(planning(reg, base, request.name, options, signature))
        learner = plan.method
        dependencies += [read.dependency for read in plan.reads]
        torch.manual_seed(train_cfg.seed)  # the new head's and any factor's initialisation
        model = backbones.build_task_model(
            backbones.ModelSpec.parse(base.model_spec), self.models.base_state(base),
            len(task_data.class_names), head,
        )
        if not learner.mergeable:  # composed: attach modules, place the dependencies' tensors
            learner.attach(model, head, dependencies,
                           example_input(base.data_config, request.img_size))
            placed = {k: v for dep in dependencies
                      for k, v in learner.dependency_state(dep).items()}
            model.load_state_dict({**model.state_dict(), **placed}, strict=True)
        model = learner.prepare(model, head)  # may refuse (e.g. a budget below norms + head)
        dataset_json = dict(
            spec.to_json(), img_size=request.img_size, max_train=request.max_train,
            max_test=request.max_test, val_fraction=request.val_fraction,
        )
        if not group.is_main:  # a worker rank trains its shard; rank 0 records and stores
            return self._train_and_store(None, base, learner, model, train_cfg, task_data,
                                         dependencies, pins, progress, request.recheck, plan,
                                         signature)
        started, signalled = signals_deferred(  # a signal inside would leave the row behind
            reg.begin_task,
            request.name, base=base.name, method=learner.name,
            method_config=learner.config_dict(), train_config=dict(vars(train_cfg)),
            dataset_spec=dataset_json, class_names=task_data.class_names,
            run_host=socket.gethostname(), run_pid=os.getpid(),
        )
        token = started.run_token
        assert token is not None
        heartbeat = Heartbeat(reg, token)
        try:
            interrupt_after(signalled)  # Ctrl-C or SIGTERM came while the row was being written
            with heartbeat:
                return self._train_and_store(started, base, learner, model, train_cfg,
                                             task_data, dependencies, pins, progress,
                                             request.recheck, plan, signature)
        except KeyboardInterrupt as exc:
            if heartbeat.lost:
                raise RunLost(f"task {request.name!r} was removed while this run was training; "
                              "nothing was recorded") from exc
            self._discard(request.name, token)
            raise
        except RunLost:  # its row is gone or taken over: nothing of this run to discard
            raise
        except BaseException:
            self._discard(request.name, token)
            raise

    def _discard(self, name: str, token: str) -> None:
        """After a failure or an interrupt: remove the run's row, unless its finish committed.

        Warns only where the row is not simply gone (kept, or left behind). Never raises a
        registry error (the caller's error matters more): a row it cannot remove (database
        unreachable) stays in status ``training`` for `taps-cl task remove` once this run ended.
        """
        try:
            # A second Ctrl-C, or torchrun's SIGTERM after a peer failed, must not stop this.
            (task, removed), _ = signals_deferred(self._settle, name, token)
        except RegistryError as exc:
            log.warning("task %s did not finish and its row could not be removed (%s); "
                        "`taps-cl task remove %s` removes it once this run has ended",
                        name, first_line(exc), name)
            return
        if task is not None and task.status == "ready":
            # The interrupt came after the finishing transaction committed: the task is whole.
            log.warning("task %s was recorded (position %s) before the run stopped; it stays",
                        name, task.position)
        elif removed:  # what the caller's error (or "Aborted.") implies: said only with -v
            log.info("task %s did not finish; its row was removed", name)

    def _settle(self, name: str, token: str) -> tuple[Optional[Task], bool]:
        """The run's task if it is still there, and whether its (unfinished) row was removed."""
        try:
            task = self.registry.get_task_by_token(token)
        except NotFound:
            return None, False
        if task.status == "ready":
            return task, False
        self.registry.discard_task(name, run_token=token)
        return task, True

    def _dependency(
        self, name: str, base: BaseModel, learner: Method
    ) -> tuple[Dependency, str]:
        """An earlier task the new one reads: it must be ready, on the same base, of a method
        the new one can read; refused with one line before anything is trained."""
        try:
            task = self.registry.get_task(name)
        except NotFound:
            raise TapsError(f"{learner.name}: there is no task {name!r} to read") from None
        if task.status != "ready":
            raise TapsError(f"{learner.name}: task {name!r} is {task.status}, not ready")
        if task.base != base.name:
            raise TapsError(f"{learner.name}: task {name!r} is on base {task.base!r}, "
                            f"not {base.name!r}")
        learner.check_dependency(name, task.method)
        assert task.artifact is not None
        return (Dependency(task.name, task.method, task.method_config,
                           self.models.task_tensors(task)), task.artifact.sha256)

    def _train_and_store(
        self, started: Optional[Task], base: BaseModel, learner: Method, model: nn.Module,
        train_cfg: TrainConfig, task_data: data.TaskData, dependencies: list[Dependency],
        pins: list[tuple[str, str]], progress: bool, recheck: int, plan: Plan,
        signature: Optional[tuple[torch.Tensor, bytes]] = None,
    ) -> Optional[TaskAddResult]:
        t0 = time.perf_counter()
        group = active_group()
        fitted = fit(model, learner, task_data.train, task_data.val, train_cfg, progress=progress,
                     group=group)
        group.agree()  # every rank finished training: only then does rank 0 store the task
        if started is None:  # a worker rank: rank 0 stores the weights all ranks share
            return None
        seconds = time.perf_counter() - t0
        shared = [SharedPin(read.sha256, read.kind) for read in plan.reads]
        for write in learner.shared_outputs(model, base.sha256):
            shared.append(SharedPin(sha256_of(write.blob), write.kind, write.blob,
                                    write.num_params))
            dependencies = [*dependencies, write.dependency]
        return self.recorder.record_trained(
            started, base, learner, model, task_data, dependencies, pins, train_seconds=seconds,
            device=train_cfg.device, seed=train_cfg.seed, history=fitted.history,
            best_val_accuracy=fitted.best_val_accuracy, recheck=recheck, shared=shared,
            signature_blob=signature[1] if signature else None)
