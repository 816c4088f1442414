"""`group train`: several new tasks trained together, grouped by gradient similarity.

The tasks' signatures (taps_cl.analysis.similarity) are compared and clustered (`--groups K`, or by
the similarity threshold); the method plans the rest (`Method.plan_group`: its configuration of
each task and one model per task, sharing modules). `fit_tied`, the one training loop, trains them
together; then the shared artifacts the models trained are stored once each, and every member is
recorded through the same path as `task add` (`Recorder.record_trained`). All or nothing: a
failure leaves none of the new tasks behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Optional

from registry import NotFound, Registry, RunLost
from registry.entities import BaseModel, SharedPin, Task
from taps_cl.analysis import similarity
from taps_cl.data import specs as data
from taps_cl.errors import TapsError, first_line
from taps_cl.methods.base import GroupPlan, GroupPlanning
from taps_cl.models import backbones
from taps_cl.models.backbones import example_input
from taps_cl.tasks.planning import planning, task_signature
from taps_cl.tasks.rebuilding import TaskModels
from taps_cl.tasks.recording import Recorder, TaskAddResult
from taps_cl.tasks.requests import GroupRequest, check_input_batch, configured_method
from taps_cl.tasks.runs import Heartbeat, interrupt_after, signals_deferred
from taps_cl.tasks.verification import sha256_of
from taps_cl.training.device import resolve_device
from taps_cl.training.fit import FitResult, Member, TrainConfig, fit_tied

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupResult:
    """The recorded members, the similarity matrix of the new tasks and their groups."""

    results: list[TaskAddResult]
    tasks: list[str]
    matrix: list[list[float]]
    groups: dict[str, list[str]]  # group name → member task names


class GroupTrainer:
    """Runs `group train` against one registry."""

    def __init__(self, registry: Registry, models: TaskModels) -> None:
        self.registry = registry
        self.models = models
        self.recorder = Recorder(registry, models)

    def train(self, request: GroupRequest, train_cfg: TrainConfig,
              progress: bool = False) -> GroupResult:
        """Train the tasks jointly and record each; a failure leaves none of them behind
        (members recorded before a failure in the recording are deleted again)."""
        reg = self.registry
        base = reg.get_base(request.base)
        names = [name for name, _ in request.tasks]
        # One task has nothing to share a group with: `task add` trains it (with `--group new`
        # it opens a group of its own), and its run records exactly what a lone member would.
        if len(names) < 2:
            raise TapsError("group train needs at least two tasks; use task add for one")
        if len(set(names)) != len(names):
            raise TapsError(f"group train: task names repeat ({', '.join(names)})")
        for name in names:
            self.recorder.check_name_free(name)
        check_input_batch(train_cfg.batch_size,
                          request.img_size or int(base.data_config["input_size"][-1]))
        options = dict(request.method_options or {})
        learner = configured_method(request.method, options, train_cfg.epochs)
        resolve_device(train_cfg.device)
        if request.groups is not None and not 1 <= request.groups <= len(names):
            raise TapsError(f"--groups must be between 1 and the number of tasks ({len(names)}), "
                            f"got {request.groups}")
        datas = [data.load_task_data(
            data.DataSpec.parse(spec), base.data_config, img_size=request.img_size,
            val_fraction=request.val_fraction, seed=train_cfg.seed,
            max_train=request.max_train, max_test=request.max_test) for _, spec in request.tasks]
        signatures = [task_signature(self.models, base, d, request.img_size, name)
                      for (name, _), d in zip(request.tasks, datas)]
        if any(sig is None for sig in signatures):
            raise TapsError("group train: every task needs at least two classes (its "
                            "signature is the gradient of its loss)")
        matrix = similarity.cosine_matrix([sig[0] for sig in signatures if sig is not None])
        head = frozenset(base.head_keys)
        spec = backbones.ModelSpec.parse(base.model_spec)
        plan = learner.plan_group(GroupPlanning(
            planning=planning(reg, base, names[0], options, None), names=names,
            matrix=matrix.tolist(), labels=list(similarity.cluster(matrix, request.groups)),
            class_counts=[len(d.class_names) for d in datas], head=head,
            build=lambda classes: backbones.build_task_model(
                spec, self.models.base_state(base), classes, head),
            example=example_input(base.data_config, request.img_size), seed=train_cfg.seed))

        started: list[Task] = []
        heartbeats: list[Heartbeat] = []
        try:
            for method, (name, task_spec), d in zip(plan.methods, request.tasks, datas):
                # Signals held while a row is written: one that came just after the commit
                # would otherwise leave a row this run does not know it began.
                begun, signalled = signals_deferred(
                    reg.begin_task,
                    name, base=base.name, method=method.name,
                    method_config=method.config_dict(), train_config=dict(vars(train_cfg)),
                    dataset_spec=dict(data.DataSpec.parse(task_spec).to_json(),
                                      img_size=request.img_size, max_train=request.max_train,
                                      max_test=request.max_test,
                                      val_fraction=request.val_fraction),
                    class_names=d.class_names, run_host=socket.gethostname(), run_pid=os.getpid(),
                )
                started.append(begun)
                interrupt_after(signalled)
            with contextlib.ExitStack() as beats:
                for task in started:
                    assert task.run_token is not None
                    heartbeats.append(beats.enter_context(Heartbeat(reg, task.run_token)))
                t0 = time.perf_counter()
                fitted = fit_tied([Member(model, method, d.train, d.val) for model, method, d
                                   in zip(plan.models, plan.methods, datas)], train_cfg,
                                  progress=progress)
                seconds = time.perf_counter() - t0
                results = self._record(base, started, plan, datas, signatures, fitted, seconds,
                                       train_cfg, request.recheck)
        except BaseException as exc:
            # A second Ctrl-C or SIGTERM must not stop the clean-up halfway.
            signals_deferred(self._discard, started)
            if isinstance(exc, RunLost):  # a member's row is gone: say so, as it did
                raise
            lost = [task.name for task, beat in zip(started, heartbeats) if beat.lost]
            if lost:  # the heartbeat interrupted training: say why, not just "Aborted"
                raise RunLost(f"task(s) {', '.join(lost)} were removed while the group trained; "
                              "its unfinished members were not recorded") from None
            raise
        return GroupResult(results, names, plan.matrix, plan.groups)

    def _discard(self, started: list[Task]) -> None:
        """After a failure or an interrupt: all or nothing, by what the registry now holds.

        When every member's finish committed (the interrupt came after the last one), the group
        is whole and stays. Otherwise members already recorded are deleted again (`_record` does
        so for its own failures; this catches a finish that committed just before an interrupt)
        and the rows of the others are removed. Warns only where rows are not simply gone: kept,
        or left behind (database unreachable) for `taps-cl task remove` / `task delete`.
        """
        reg = self.registry
        now: dict[str, Optional[Task]] = {}
        left: list[str] = []
        for task in started:
            assert task.run_token is not None
            try:
                now[task.name] = reg.get_task_by_token(task.run_token)
            except NotFound:
                now[task.name] = None
            except Exception as exc:  # noqa: BLE001 — the original error matters more
                log.debug("cannot look up %s: %s", task.name, exc)
                left.append(task.name)
        ready = [name for name, task in now.items() if task is not None and task.status == "ready"]
        if started and len(ready) == len(started):
            log.warning("group train was recorded (%s) before the run stopped; it stays",
                        ", ".join(ready))
            return
        for name, task in now.items():
            if task is None:
                continue
            try:
                if task.status == "ready":
                    reg.delete_task(name)
                else:
                    assert task.run_token is not None
                    reg.discard_task(name, run_token=task.run_token)
            except Exception as exc:  # noqa: BLE001 — the original error matters more
                log.debug("cannot remove %s: %s", name, exc)
                left.append(name)
        if left:
            log.warning("group train did not finish; %s could not be removed: `taps-cl task "
                        "remove NAME` (unfinished) or `task delete NAME` (ready) removes each "
                        "once this run has ended", ", ".join(left))

    def _record(self, base: BaseModel, started: list[Task], plan: GroupPlan,
                datas: list[data.TaskData], signatures: list[Any], fitted: list[FitResult],
                seconds: float, train_cfg: TrainConfig, recheck: int) -> list[TaskAddResult]:
        """Store each shared artifact once and record every member pinning what it reads."""
        written: dict[str, Any] = {}  # one SharedWrite per artifact, the first member's
        results: list[TaskAddResult] = []
        try:
            for task, method, model, d, sig, fit in zip(started, plan.methods, plan.models,
                                                        datas, signatures, fitted):
                pins = [SharedPin(read.sha256, read.kind) for read in plan.reads]
                deps = [read.dependency for read in plan.reads]
                for write in method.shared_outputs(model, base.sha256):
                    sha = sha256_of(write.blob)
                    write = written.setdefault(sha, write)
                    pins.append(SharedPin(sha, write.kind, write.blob, write.num_params))
                    deps.append(write.dependency)
                results.append(self.recorder.record_trained(
                    task, base, method, model, d, deps, [],
                    train_seconds=seconds / len(started), device=train_cfg.device,
                    seed=train_cfg.seed, history=fit.history,
                    best_val_accuracy=fit.best_val_accuracy, recheck=recheck, shared=pins,
                    signature_blob=sig[1] if sig is not None else None))
        except BaseException:
            # All or nothing: members recorded before the failure go again (with their files
            # that nothing else reads), so a failed group train leaves no partial group. Signals
            # are held meanwhile: a second Ctrl-C must not leave half a member's files behind.
            signals_deferred(self._delete_recorded, results)
            raise
        return results

    def _delete_recorded(self, results: list[TaskAddResult]) -> None:
        for result in reversed(results):
            try:
                self.registry.delete_task(result.task.name)
            except Exception as exc:  # noqa: BLE001 — the original error matters more
                log.warning("could not remove member %s of the failed group train: %s",
                            result.task.name, first_line(exc))
