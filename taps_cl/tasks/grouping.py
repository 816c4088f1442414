"""`group train`: several new progressive tasks trained jointly, grouped by gradient similarity.

The tasks' signatures (taps_cl.analysis.similarity) are clustered into groups (`--groups K`, or
automatically). One model per task is built on the frozen base; their shared-band adapters and
norm layers are the same modules, and so are the group-band ones of the members of a group (a base
that already has a shared band gives it frozen to every member instead). `fit_tied` (the one training
loop) trains them together: every step takes one batch of every task (round robin over their loaders) and descends
the mean of their losses; the tied norm layers keep their running statistics
(`Progressive.set_train_mode`). Afterwards the shared and group bands are stored once each as shared
artifacts, and every member is recorded as an ordinary progressive task pinning them, through the
same path as `task add` (`TaskAdder.record_trained`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from registry import Registry, RunLost
from registry.entities import SharedPin, Task
from taps_cl.analysis import similarity
from taps_cl.data import specs as data
from taps_cl.errors import TapsError
from taps_cl.methods.base import Dependency
from taps_cl.methods.blocks import site_key
from taps_cl.methods.progressive.joining import trained_band
from taps_cl.methods.progressive.method import BANDS, PROGRESSIVE_ATTR, Progressive
from taps_cl.methods.progressive.sharing import PIN_KINDS, new_group_name, sharing_of
from taps_cl.models import backbones
from taps_cl.tasks.adding import (
    RECHECK_SAMPLE,
    Heartbeat,
    TaskAdder,
    TaskAddResult,
    configured_method,
)
from taps_cl.tasks.rebuilding import TaskModels, example_input
from taps_cl.training.device import resolve_device
from taps_cl.training.fit import FitResult, Member, TrainConfig, fit_tied

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupRequest:
    """What `group train` was asked: new tasks (name, data spec) on one base."""

    base: str
    tasks: tuple[tuple[str, str], ...]  # (name, data spec) of each new task
    groups: Optional[int] = None  # number of similarity groups (None: automatic)
    img_size: Optional[int] = None
    max_train: Optional[int] = None
    max_test: Optional[int] = None
    val_fraction: float = 0.1
    method_options: Optional[dict[str, Any]] = None  # progressive options (bands, reduction)
    recheck: int = RECHECK_SAMPLE


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
        self.adder = TaskAdder(registry, models)

    def train(self, request: GroupRequest, train_cfg: TrainConfig,
              progress: bool = False) -> GroupResult:
        """Train the tasks jointly and record each; a failure leaves none of them behind
        (members recorded before a failure in the recording are deleted again)."""
        reg = self.registry
        base = reg.get_base(request.base)
        names = [name for name, _ in request.tasks]
        if len(set(names)) != len(names):
            raise TapsError(f"group train: task names repeat ({', '.join(names)})")
        if not names:
            raise TapsError("group train: give at least one --task NAME=SPEC")
        for name in names:
            self.adder.check_name_free(name)
        options = dict(request.method_options or {})
        configured_method("progressive", options, train_cfg.epochs)  # options checked early
        resolve_device(train_cfg.device)
        if request.groups is not None and not 1 <= request.groups <= len(names):
            raise TapsError(f"--groups must be between 1 and the number of tasks ({len(names)}), "
                            f"got {request.groups}")
        datas = [data.load_task_data(
            data.DataSpec.parse(spec), base.data_config, img_size=request.img_size,
            val_fraction=request.val_fraction, seed=train_cfg.seed,
            max_train=request.max_train, max_test=request.max_test) for _, spec in request.tasks]
        signatures = [self.adder.joining.signature(base, d, request.img_size, name)
                      for (name, _), d in zip(request.tasks, datas)]
        if any(sig is None for sig in signatures):
            raise TapsError("group train: every task needs at least two classes (its "
                            "signature is the gradient of its loss)")
        matrix = similarity.cosine_matrix([sig[0] for sig in signatures if sig is not None])
        labels = similarity.cluster(matrix, request.groups)
        sharing = sharing_of(reg.list_tasks(base.name, ready_only=True, method="progressive",
                                            layers=False))
        groups: dict[str, list[str]] = {}
        group_of = {}
        named: dict[Any, str] = {}  # cluster label → group name (its first member's, if free)
        for name, label in zip(names, labels):
            if label not in named:
                named[label] = new_group_name(name, [*sharing.groups, *named.values()])
            groups.setdefault(named[label], []).append(name)
            group_of[name] = named[label]
        log.info("group train: groups %s", groups)

        frozen_shared: Optional[tuple[Dependency, str]] = None
        if sharing.shared_sha256 is not None:
            options = sharing.band_options(base.name, options)
            frozen_shared = (self.adder.joining.shared_band(sharing.shared_sha256),
                             sharing.shared_sha256)
        trained = ("group", "task") if frozen_shared else BANDS
        learners = [Progressive(dataclasses.replace(
            Progressive.Config(**options), group=group_of[name], train_bands=trained))
            for name in names]
        models = self._tied_models(base, learners, datas, request.img_size, train_cfg.seed,
                                   frozen_shared[0] if frozen_shared else None)

        started: list[Task] = []
        heartbeats: list[Heartbeat] = []
        try:
            for learner, (name, _), d in zip(learners, request.tasks, datas):
                spec = data.DataSpec.parse(dict(request.tasks)[name])
                started.append(reg.begin_task(
                    name, base=base.name, method=learner.name,
                    method_config=learner.config_dict(), train_config=dict(vars(train_cfg)),
                    dataset_spec=dict(spec.to_json(), img_size=request.img_size,
                                      max_train=request.max_train, max_test=request.max_test,
                                      val_fraction=request.val_fraction),
                    class_names=d.class_names, run_host=socket.gethostname(), run_pid=os.getpid(),
                ))
            with contextlib.ExitStack() as beats:
                for task in started:
                    assert task.run_token is not None
                    heartbeats.append(beats.enter_context(Heartbeat(reg, task.run_token)))
                t0 = time.perf_counter()
                fitted = fit_tied([Member(model, learner, d.train, d.val) for model, learner, d
                                   in zip(models, learners, datas)], train_cfg, progress=progress)
                seconds = time.perf_counter() - t0
                results = self._record(base, started, learners, models, datas, signatures,
                                       fitted, frozen_shared, seconds, train_cfg, request.recheck)
        except RunLost:
            raise
        except BaseException:
            for task in started:
                if task.run_token is not None:
                    try:
                        reg.discard_task(task.name, run_token=task.run_token)
                    except Exception as exc:  # noqa: BLE001 — finished ones stay; report others
                        log.debug("not discarding %s: %s", task.name, exc)
            lost = [task.name for task, beat in zip(started, heartbeats) if beat.lost]
            if lost:  # the heartbeat interrupted training: say why, not just "Aborted"
                raise RunLost(f"task(s) {', '.join(lost)} were removed while the group trained; "
                              "its unfinished members were not recorded") from None
            raise
        return GroupResult(results, names, matrix.tolist(), groups)

    def _tied_models(self, base: Any, learners: Sequence[Progressive],
                     datas: Sequence[data.TaskData], img_size: Optional[int], seed: int,
                     frozen_shared: Optional[Dependency]) -> list[nn.Module]:
        """One model per task, the shared band's modules common to all, a group's to its members."""
        head = frozenset(base.head_keys)
        example = example_input(base.data_config, img_size)
        torch.manual_seed(seed)
        models: list[nn.Module] = []
        owners: dict[str, nn.Module] = {}  # band owner per group ("" for the shared band)
        for learner, d in zip(learners, datas):
            model = backbones.build_task_model(
                backbones.ModelSpec.parse(base.model_spec), self.models.base_state(base),
                len(d.class_names), head)
            deps = [frozen_shared] if frozen_shared else []
            shared_owner = owners.get("")
            group_owner = owners.get(learner.config.group)
            given = {}
            if shared_owner is not None or group_owner is not None:
                blocks, _ = learner.bands(shared_owner or group_owner)
                for block, band in blocks.items():
                    owner = {"shared": shared_owner, "group": group_owner}.get(band)
                    if owner is not None:
                        given[site_key(block)] = getattr(owner, PROGRESSIVE_ATTR)[site_key(block)]
            learner.attach(model, head, deps, example, modules=given)
            if frozen_shared is not None:
                placed = learner.dependency_state(frozen_shared)
                model.load_state_dict({**model.state_dict(), **placed}, strict=True)
            _, norms = learner.bands(model)
            for norm, band in norms.items():
                owner = {"shared": shared_owner, "group": group_owner}.get(band)
                if owner is not None:
                    model.set_submodule(norm, owner.get_submodule(norm))
            learner.prepare(model, head)
            owners.setdefault("", model)
            owners.setdefault(learner.config.group, model)
            models.append(model)
        return models

    def _record(self, base: Any, started: list[Task], learners: Sequence[Progressive],
                models: Sequence[nn.Module], datas: Sequence[data.TaskData],
                signatures: Sequence[Optional[tuple[torch.Tensor, bytes]]],
                fitted: list[FitResult],
                frozen_shared: Optional[tuple[Dependency, str]], seconds: float,
                train_cfg: TrainConfig, recheck: int) -> list[TaskAddResult]:
        """Store the shared bands once and record every member pinning them."""
        bands: dict[tuple[str, str], tuple[SharedPin, Dependency]] = {}
        for learner, model in zip(learners, models):
            for band in learner.config.train_bands:
                key = (band, "" if band == "shared" else learner.config.group)
                if band != "task" and key not in bands:
                    bands[key] = trained_band(learner, model, band, base)
        results: list[TaskAddResult] = []
        try:
            for task, learner, model, d, sig, fit in zip(started, learners, models, datas,
                                                         signatures, fitted):
                pins, deps = [], []
                if frozen_shared is not None:
                    pins.append(SharedPin(frozen_shared[1], PIN_KINDS["shared"]))
                    deps.append(frozen_shared[0])
                for key in (("shared", ""), ("group", learner.config.group)):
                    if key in bands:
                        pins.append(bands[key][0])
                        deps.append(bands[key][1])
                results.append(self.adder.record_trained(
                    task, base, learner, model, d, deps, [],
                    train_seconds=seconds / len(started), device=train_cfg.device,
                    seed=train_cfg.seed, history=fit.history,
                    best_val_accuracy=fit.best_val_accuracy, recheck=recheck, shared=pins,
                    signature_blob=sig[1] if sig is not None else None))
        except BaseException:
            # All or nothing: members recorded before the failure go again (with their files
            # that nothing else reads), so a failed group train leaves no partial group.
            for result in reversed(results):
                try:
                    self.registry.delete_task(result.task.name)
                except Exception as exc:  # noqa: BLE001 — the original error matters more
                    log.warning("could not remove member %s of the failed group train: %s",
                                result.task.name, exc)
            raise
        return results
