"""Recording a trained task: evaluate the rebuilt model, keep its probe batch, write its files and
finish its row, re-checking a bounded sample of earlier tasks. `task add`, `group train` and the
scale benchmark all record through here.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

import taps_cl.serialization as serialization
from registry import AlreadyExists, NotFound, Registry, RunLost
from registry.entities import BaseModel, EarlierCell, LayerEntry, SharedPin, Task
from taps_cl.data import specs as data
from taps_cl.errors import TapsError
from taps_cl.methods.base import Dependency, Method
from taps_cl.models.compose import task_model
from taps_cl.tasks.probes import PROBE_SIZE, probe_indices
from taps_cl.tasks.rebuilding import TaskModels
from taps_cl.tasks.requests import RECHECK_SAMPLE
from taps_cl.tasks.verification import RECORD_KEY, ProbeCheck, Verifier, sha256_of, task_record
from taps_cl.training import evaluate
from taps_cl.training.device import resolve_device

log = logging.getLogger(__name__)

MERGE_ATOL = 1e-5  # restored vs trained model on the probe batch, when stored tensors are exact


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


class Recorder:
    """Records trained task models in one registry: the second half of every add."""

    def __init__(self, registry: Registry, models: TaskModels) -> None:
        self.registry = registry
        self.models = models

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
