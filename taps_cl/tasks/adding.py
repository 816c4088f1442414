"""One `task add` run: check the request, train on the frozen base, store, record, re-check.

The run is recorded (status ``training``, a run token, host, pid and a heartbeat) only once
everything that can be rejected has been checked, and it is finished by its token, never by its
name: a run whose row was removed cannot write into someone else's task. The task gets its
position when it finishes, in the same transaction as its column of the accuracy matrix, so
concurrent adds land in the order they became ready and every column is complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from registry import AlreadyExists, NotFound, Registry, RunLost
from registry.entities import BaseModel, EarlierCell, LayerEntry, SharedPin, Task
from taps_cl import serialization
from taps_cl.data import specs as data
from taps_cl.errors import TapsError
from taps_cl.methods.base import Dependency, Method, Plan
from taps_cl.methods.catalog import get_method
from taps_cl.methods.options import option
from taps_cl.models import backbones
from taps_cl.models.compose import example_input, task_model
from taps_cl.tasks.planning import planning, task_signature
from taps_cl.tasks.probes import PROBE_SIZE, probe_indices
from taps_cl.tasks.rebuilding import TaskModels
from taps_cl.tasks.runs import Heartbeat, signals_deferred
from taps_cl.tasks.verification import RECORD_KEY, ProbeCheck, Verifier, sha256_of, task_record
from taps_cl.training import evaluate
from taps_cl.training.device import resolve_device
from taps_cl.training.distributed import active_group
from taps_cl.training.fit import TrainConfig, fit

log = logging.getLogger(__name__)

MERGE_ATOL = 1e-5  # restored vs trained model on the probe batch, when stored tensors are exact
RECHECK_SAMPLE = 8  # earlier tasks whose probes an add re-checks (a bounded, seeded sample)


@dataclass(frozen=True)
class TaskAddResult:
    """What `task add` did: the recorded task, its scores and the re-checks of earlier tasks."""

    task: Task
    test_accuracy: float
    best_val_accuracy: Optional[float]
    history: list[dict[str, Any]]
    probe_checks: list[ProbeCheck]
    # Largest |restored − trained| logit on the probe batch, measured on the CPU in float32
    # (0 for exact storage; the rounding error when tensors are stored in 16 bits).
    merge_error: float


@dataclass(frozen=True)
class RunOptions:
    """What a run reads of its data and re-checks; shared by `task add` and `group train`."""

    # Input size (default: the base's).
    img_size: Optional[int] = option(None, "Input size (default: the base's).", minimum=8)
    # Subsample each training set / test set to this many images (class-stratified).
    max_train: Optional[int] = option(None, "Subsample each training set.", minimum=1)
    max_test: Optional[int] = option(None, "Subsample each test set.", minimum=1)
    # Share of the training data held out for validation (model selection), where the data
    # brings no validation split of its own.
    val_fraction: float = option(0.1, "Share of the training data held out for validation.",
                                 minimum=0, maximum=1, open_minimum=True, open_maximum=True)
    # Earlier tasks whose probes the add re-checks (a seeded sample; 0: none). Whatever the
    # number, the add cannot change them; `report accuracy --verify` checks them all.
    recheck: int = option(RECHECK_SAMPLE, "Earlier tasks whose probes are re-checked (default 8: "
                          "the latest, any it reads, a seeded sample of the rest; `report "
                          "accuracy --verify` checks all).", minimum=0)


@dataclass(frozen=True, kw_only=True)
class TaskRequest(RunOptions):
    """Everything `task add` was asked, checked before anything is recorded."""

    name: str
    base: str
    data_spec: str
    method: str = "taps"
    # Class subset of the data, e.g. "0,1,2" or class names.
    classes: Optional[str] = None
    method_options: Optional[dict[str, Any]] = None


# Request fields add_task/group_train take as their own parameters, not as options.
_GIVEN_EXPLICITLY = ("name", "base", "data_spec", "method", "method_options", "tasks", "groups")


def split_options(options: dict[str, Any], request: type) -> tuple[Any, dict[str, Any],
                                                                 dict[str, Any]]:
    """(TrainConfig, run options of `request`, the method's options) out of keyword options."""
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    # The request's own fields that a caller passes by keyword (run options, class subset).
    run_keys = {f.name for f in dataclasses.fields(request)} - set(_GIVEN_EXPLICITLY)
    train = {k: v for k, v in options.items() if k in train_keys and v is not None}
    run = {k: v for k, v in options.items() if k in run_keys and v is not None}
    own = {k: v for k, v in options.items() if k not in train_keys and k not in run_keys}
    return TrainConfig(**train), run, own


def configured_method(method: str, options: dict[str, Any], epochs: int) -> Method:
    """The method `method` with the user's `options`, fitted to a run of `epochs` epochs."""
    return get_method(method, **options).for_epochs(epochs, set(options))


class TaskAdder:
    """Runs `task add` against one registry."""

    def __init__(self, registry: Registry, models: TaskModels) -> None:
        self.registry = registry
        self.models = models

    def add(self, request: TaskRequest, train_cfg: TrainConfig,
            progress: bool = False) -> Optional[TaskAddResult]:
        """Train and record the task; a failure or interrupt leaves the registry as it was.

        In a torchrun group (taps_cl.training.distributed.joined) every rank trains; the others return
        None and only rank 0 writes and returns the result.
        """
        reg = self.registry
        group = active_group()  # several processes under torchrun: only rank 0 writes
        base = reg.get_base(request.base)
        if group.is_main:  # the other ranks would find rank 0's own new row
            self.check_name_free(request.name)
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
            placed = {k: v for dep in dependencies for k, v in learner.dependency_state(dep).items()}
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
            if signalled:  # Ctrl-C or torchrun's SIGTERM came while the row was being written
                raise KeyboardInterrupt(f"signal {signalled}")
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
        log.warning("task %s did not finish; removing its row", name)
        # A second Ctrl-C, or torchrun's SIGTERM after a peer failed, must not stop the removal.
        signals_deferred(self.registry.discard_task, name, run_token=token)

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

    def check_name_free(self, name: str) -> None:
        try:
            existing = self.registry.get_task(name)
        except NotFound:
            return
        hint = "" if existing.status == "ready" else (
            f" with status {existing.status} (a run in progress, or one that was killed); "
            f"`taps-cl task remove {name}` discards a dead run"
        )
        raise AlreadyExists(f"task {name!r} already exists{hint}")

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
        return self.record_trained(started, base, learner, model, task_data, dependencies, pins,
                                  train_seconds=seconds, device=train_cfg.device,
                                  seed=train_cfg.seed, history=fitted.history,
                                  best_val_accuracy=fitted.best_val_accuracy, recheck=recheck,
                                  shared=shared,
                                  signature_blob=signature[1] if signature else None)

    def record_trained(
        self, started: Task, base: BaseModel, learner: Method, model: nn.Module,
        task_data: data.TaskData, dependencies: list[Dependency], pins: list[tuple[str, str]],
        *, train_seconds: float, device: str = "cpu", seed: int = 0,
        history: Optional[list[dict[str, Any]]] = None, best_val_accuracy: Optional[float] = None,
        recheck: int = RECHECK_SAMPLE, shared: Sequence[SharedPin] = (),
        signature_blob: Optional[bytes] = None,
    ) -> TaskAddResult:
        """Store a trained model as the run `started`'s task: the second half of `add`.

        Evaluates it on the test split, records the probe batch, writes the artifacts and
        finishes the task (re-checking a bounded sample of earlier tasks). `dependencies` are
        what the model reads (earlier tasks pinned by `pins`, then the shared artifacts of
        `shared`, in that order). `benchmarks/scale.py` uses it to record synthetic tasks through
        exactly the path a real add takes; `group train` to record each member.
        """
        name = started.name
        head = frozenset(base.head_keys)
        learner.finalize(model)
        # Every number the registry compares is computed on the CPU in float32.
        model = model.cpu().float()
        state = learner.extract(model, head)
        plain = task_model(base, self.models.base_state(base), learner, state.tensors,
                           len(task_data.class_names), dependencies,
                           started.dataset_spec.get("img_size"))
        test = evaluate.evaluate(plain.to(resolve_device(device)), task_data.test)
        plain = plain.cpu()

        indices = probe_indices(task_data.test.labels, PROBE_SIZE, seed)
        probe_inputs = torch.stack([task_data.test[i][0] for i in indices])
        probe_logits = evaluate.logits(plain, probe_inputs)
        trained_logits = evaluate.logits(model, probe_inputs)
        merge_error = float((trained_logits - probe_logits).abs().max())
        if state.exact and merge_error > MERGE_ATOL:
            raise TapsError(
                f"restored model of {name!r} differs from the trained one by {merge_error:.3g}"
            )

        layers = [LayerEntry(r.name, r.kind, r.score, r.active, r.base_params, r.task_params)
                  for r in state.layers]
        head_params = sum(int(v.numel()) for k, v in plain.state_dict().items() if k in head)
        record = task_record(
            name=name, base_sha256=base.sha256, method=started.method,
            method_config=started.method_config, train_config=started.train_config,
            dataset_spec=started.dataset_spec, class_names=started.class_names, layers=layers,
            head_params=head_params, num_params=state.num_params, test_accuracy=test.accuracy,
            test_loss=test.loss, test_samples=test.num_samples,
            depends_on=[*pins, *((None, pin.sha256) for pin in shared)],
        )
        task_blob = serialization.to_bytes(
            state.tensors,
            {"method": learner.name, "config": learner.config_dict(), "task": name,
             RECORD_KEY: record},
        )
        probe_tensors = {"inputs": probe_inputs, "logits": probe_logits,
                         "trained_logits": trained_logits}
        probe_blob = serialization.to_bytes(
            probe_tensors,
            {"task": name, "kind": "probe", "task_sha256": sha256_of(task_blob),
             "restore_error": merge_error, "exact": state.exact},
        )
        checks, task = self._finish(
            started, base, recheck, seed, pins,
            task_blob=task_blob, task_num_params=state.num_params, probe_blob=probe_blob,
            probe_num_params=serialization.numel(probe_tensors), layers=layers,
            head_params=head_params, train_seconds=train_seconds, test_accuracy=test.accuracy,
            test_loss=test.loss, test_samples=test.num_samples,
            dependencies=[(name, sha, learner.name) for name, sha in pins], shared=shared,
            signature_blob=signature_blob,
            signature_num_params=(serialization.numel(serialization.from_bytes(signature_blob))
                                  if signature_blob is not None else 0),
        )
        log.info("task %s: test accuracy %.4f, %d/%d layers active", name, test.accuracy,
                 task.active_layers, task.total_layers)
        return TaskAddResult(task, test.accuracy, best_val_accuracy, history or [], checks,
                             merge_error)

    def _finish(self, started: Task, base: BaseModel, recheck: int, seed: int,
                pins: list[tuple[str, str]], **results: Any) -> tuple[list[ProbeCheck], Task]:
        """Re-check a bounded sample of earlier tasks and record this one with their cells.

        The add cannot change an earlier task (artifacts are content-addressed and never
        rewritten; `finish_task` writes only the new task's rows and links it into the base's
        hash chain), so the re-check is a spot check whose cost does not grow with the registry;
        `report accuracy --verify` re-checks all of them.
        """
        verifier = Verifier(self.models)
        sample = recheck_sample(self.registry.list_task_names(base.name), recheck,
                                f"{seed}:{started.name}", first=[name for name, _ in pins])
        evaluations = self.registry.list_evaluations(base.name, tasks=sample) if sample else []
        checks, cells = [], []
        for name in sample:
            task = self.registry.get_task(name)
            own = [e for e in evaluations if e.task == name]
            check = verifier.check_task(task, base, own)
            checks.append(check)
            cells.append(self._cell(task, check, own))
        assert started.run_token is not None
        try:
            task = self.registry.finish_task(started.run_token, earlier=cells, **results)
        except RunLost as exc:
            raise RunLost(f"task {started.name!r} was removed while this run was training; "
                          "nothing was recorded") from exc
        return checks, task

    def _cell(self, task: Task, check: ProbeCheck, evaluations: list) -> EarlierCell:  # type: ignore[type-arg]
        """The task's cell in the new column: carried when its probe is unchanged, else
        re-measured on its data where that is still reachable."""
        if check.ok:
            measured = [e.accuracy for e in evaluations
                        if e.task == task.name and e.kind == "measured" and e.accuracy is not None]
            return EarlierCell(task.name, "probe", measured[-1] if measured else None,
                               check.max_drift, True)
        accuracy = None
        try:  # the task changed: its carried accuracy means nothing, so measure it again
            accuracy = self.models.evaluate(task.name, checked=False).accuracy
        except Exception as exc:  # noqa: BLE001 — a broken task is reported, not fatal
            log.warning("task %s changed and cannot be re-measured: %s", task.name, exc)
        return EarlierCell(task.name, "measured", accuracy, check.max_drift, False)


def recheck_sample(names: Sequence[str], size: int, seed: str,
                   first: Sequence[str] = ()) -> list[str]:
    """Which of a base's ready tasks (`names`, in sequence order) an add re-checks: at most
    `size`, in sequence order — the tasks it reads (`first`), the latest one, then a draw
    seeded by `seed` from the rest, so every task is spot-checked now and then."""
    if size <= 0 or not names:
        return []
    known = set(names)
    chosen = [name for name in dict.fromkeys([*first, names[-1]]) if name in known][:size]
    taken = set(chosen)
    rest = [name for name in names if name not in taken]
    picks = random.Random(seed).sample(rest, min(size - len(chosen), len(rest)))
    order = {name: i for i, name in enumerate(names)}
    return sorted([*chosen, *picks], key=order.__getitem__)
