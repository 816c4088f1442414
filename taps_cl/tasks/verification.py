"""Proof that tasks are what the registry says: hashes, sizes, recorded rows and probe logits.

Every finished task carries a *record* — the facts its rows hold (method, options, classes, layer
set, sizes, its own test accuracy) — inside the metadata of its content-addressed task artifact,
and its probe artifact names the task artifact's sha256. Verification recomputes what it can from
the files (hashes, byte and parameter counts, probe logits from the rebuilt model) and compares
every other recorded fact with the record, so an edited row is caught as surely as an edited file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Protocol

import torch
from torch import nn

import taps_cl.serialization as serialization
from registry import RegistryError
from registry.errors import StoreUnreachable
from registry.entities import BaseModel, Evaluation, LayerEntry, Task, TaskDependency
from taps_cl.analysis.reports import ProbeCheck
from taps_cl.errors import TapsError, first_line
from taps_cl.tasks.probes import PROBE_ATOL, PROBE_RTOL, logit_scale, probe_drift

log = logging.getLogger(__name__)

RECORD_KEY = "record"  # metadata key of the task record in the task artifact
ACCURACY_ATOL = 1e-9  # recorded accuracies are copied, never recomputed: they must match exactly


def task_record(
    *, name: str, base_sha256: str, method: str, method_config: dict[str, Any],
    train_config: dict[str, Any], dataset_spec: dict[str, Any], class_names: Sequence[str],
    layers: Sequence[LayerEntry], head_params: int, num_params: int, test_accuracy: float,
    test_loss: float, test_samples: int, depends_on: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """The facts a task's rows hold, as stored in its artifact's metadata."""
    return {
        "task": name,
        "base_sha256": base_sha256,
        "method": method,
        "method_config": method_config,
        "train_config": train_config,
        "dataset_spec": dataset_spec,
        "class_names": list(class_names),
        "layers": [_layer(layer) for layer in layers],
        "head_params": head_params,
        "num_params": num_params,
        "test": {"accuracy": test_accuracy, "loss": test_loss, "num_samples": test_samples},
        "depends_on": [list(pin) for pin in depends_on],
    }


def sha256_of(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def _layer(layer: LayerEntry) -> list[Any]:
    return [layer.name, layer.kind, layer.score, bool(layer.active), layer.base_params,
            layer.task_params]


def _same(a: Any, b: Any) -> bool:
    # Through JSON both ways, so tuples/lists and int/float spellings compare as stored.
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def record_mismatches(
    record: dict[str, Any], task: Task, base: BaseModel, evaluations: Iterable[Evaluation]
) -> list[str]:
    """Which of the task's recorded rows disagree with the record stored in its artifact."""
    wrong = []
    expected = {
        "task": task.name,
        "base_sha256": base.sha256,
        "method": task.method,
        "method_config": task.method_config,
        "train_config": task.train_config,
        "dataset_spec": task.dataset_spec,
        "class_names": list(task.class_names),
        "layers": [_layer(layer) for layer in task.layers],
        "head_params": task.head_params,
        "num_params": task.task_params,
        "depends_on": [[pin.task, pin.sha256] for pin in task.depends_on],
    }
    for key, value in expected.items():
        if not _same(record.get(key), value):
            wrong.append({"layers": "layers (task_layers rows)",
                          "depends_on": "dependencies (task_dependencies rows)"}.get(key, key))
    if task.num_classes != len(task.class_names):
        wrong.append("num_classes")
    recorded_acc = (record.get("test") or {}).get("accuracy")
    measured = [e for e in evaluations if e.task == task.name and e.kind == "measured"]
    own = [e for e in measured if e.after_task == task.name]
    if not own or any(e.accuracy is None or abs(e.accuracy - recorded_acc) > ACCURACY_ATOL
                      for e in own):
        wrong.append("test accuracy (its evaluation row)")
    # A carried ("probe") cell copies an accuracy measured earlier: it can hold no other value.
    known = {recorded_acc} | {e.accuracy for e in measured}
    for e in evaluations:
        if e.task == task.name and e.kind == "probe" and e.accuracy not in known:
            wrong.append(f"carried accuracy after {e.after_task}")
    return wrong


class TaskSource(Protocol):
    """What a Verifier reads tasks through (`taps_cl.tasks.rebuilding.TaskModels`)."""

    registry: Any

    def model(self, task: Task, base: Optional[BaseModel] = None,
              tensors: Optional[dict[str, torch.Tensor]] = None) -> nn.Module: ...

    def trust_base(self, base: BaseModel, state: dict[str, torch.Tensor]) -> None: ...

    def pin_problem(self, task: Task, pin: TaskDependency,
                    blob: Optional[bytes] = None) -> Optional[str]: ...


class Verifier:
    """Checks bases and tasks of one registry against their files (see the module docstring)."""

    def __init__(self, models: TaskSource) -> None:
        self.models = models
        self.registry = models.registry

    def check_base(self, base: BaseModel) -> Optional[str]:
        """None when the base's weights match their hash, size and recorded number count."""
        problem = store_binding_problem(self.registry)
        if problem is not None:
            return problem
        try:
            blob = self.registry.check_artifact(base.weights)
            state = serialization.from_bytes(blob)
        except StoreUnreachable:  # not a fault of the task: the command fails
            raise
        except (RegistryError, ValueError, RuntimeError) as exc:
            return first_line(exc)
        count = serialization.numel(state)
        if count != base.weights.num_params:
            return (f"weights artifact holds {count:,} numbers, its row says "
                    f"{base.weights.num_params:,}")
        self.models.trust_base(base, state)  # just hashed: its tasks need not read it again
        return None

    def check_task(
        self, task: Task, base: BaseModel, evaluations: Sequence[Evaluation]
    ) -> ProbeCheck:
        """Check one task's files, rows and probe logits; never raises for a bad task."""
        if task.status != "ready":
            if task.artifact is not None or task.probe is not None or any(
                e.task == task.name or e.after_task == task.name for e in evaluations
            ):
                return ProbeCheck(task.name, None, False,
                                  f"status {task.status!r} but it has stored results: "
                                  "its rows were altered")
            return ProbeCheck(task.name, None, True)  # a run in progress: nothing to check yet
        try:
            return self._check_ready(task, base, evaluations)
        except (TapsError, RegistryError, OSError, RuntimeError, ValueError, KeyError) as exc:
            # A corrupt or missing artifact is a failed check, reported with its reason.
            return ProbeCheck(task.name, None, False, first_line(exc))

    def _check_ready(
        self, task: Task, base: BaseModel, evaluations: Sequence[Evaluation]
    ) -> ProbeCheck:
        if task.artifact is None or task.probe is None or task.position is None:
            return ProbeCheck(task.name, None, False, "ready but without artifacts or position")
        problems = []
        blob = self.registry.check_artifact(task.artifact)
        tensors = serialization.from_bytes(blob)
        if serialization.numel(tensors) != task.artifact.num_params:
            problems.append("artifact num_params")
        meta = serialization.metadata_from_bytes(blob)
        record = serialization.json_field(meta, RECORD_KEY)
        if not isinstance(record, dict):
            problems.append("task artifact has no record")
        else:
            problems += [f"{what} differs from the record in its artifact"
                         for what in record_mismatches(record, task, base, evaluations)]
        probe_blob = self.registry.check_artifact(task.probe)
        probe = serialization.from_bytes(probe_blob)
        if serialization.numel(probe) != task.probe.num_params:
            problems.append("probe artifact num_params")
        probe_meta = serialization.metadata_from_bytes(probe_blob)
        if probe_meta.get("task_sha256") != task.artifact.sha256:
            problems.append("probe artifact belongs to another task artifact")
        pinned = self._pin_problems(task)
        problems += pinned
        if task.signature is not None:
            try:
                self.registry.check_artifact(task.signature)
            except StoreUnreachable:  # not a fault of the task: the command fails
                raise
            except RegistryError as exc:
                problems.append(f"signature artifact: {exc}")
        if pinned:  # the model could not be rebuilt as it was trained
            return ProbeCheck(task.name, None, False, "; ".join(problems))
        model = self.models.model(task, base, tensors)
        drift = probe_drift(model, probe)
        if drift > PROBE_ATOL + PROBE_RTOL * logit_scale(probe):
            problems.insert(0, f"probe logits moved by {drift:.3g}")
        if problems:
            return ProbeCheck(task.name, drift, False, "; ".join(problems))
        return ProbeCheck(task.name, drift, True)

    def _pin_problems(self, task: Task) -> list[str]:
        """What is wrong with the task's dependency pins, one line each naming the pin.

        Which artifacts it pins is compared with its task record (`record_mismatches`); here
        each pinned file must be there and intact (an earlier task's pin: that task, ready, with
        the very task artifact pinned), and each pin's `kind` row must mean what the pinned
        artifact is (`TaskSource.pin_problem`): the kind is read from the artifact, not trusted.
        """
        problems = []
        for pin in task.depends_on:
            blob = None
            if pin.task is None:  # a shared artifact: recorded as one, and its file intact
                try:
                    artifact = self.registry.get_artifact(pin.sha256)
                    blob = self.registry.check_artifact(artifact)
                except StoreUnreachable:  # not a fault of the task: the command fails
                    raise
                except RegistryError as exc:
                    problems.append(f"its pinned dependency, shared artifact {pin.sha256[:12]}…, "
                                    f"is gone or changed ({exc})")
                    continue
                if artifact.kind != "shared":
                    problems.append(f"its pinned dependency, shared artifact {pin.sha256[:12]}… "
                                    f"({pin.kind!r}), is a {artifact.kind!r} artifact")
                    continue
            else:
                try:
                    dep = self.registry.get_task(pin.task)
                except StoreUnreachable:  # not a fault of the task: the command fails
                    raise
                except RegistryError:
                    dep = None
                if dep is None or dep.status != "ready" or dep.artifact is None \
                        or dep.artifact.sha256 != pin.sha256:
                    problems.append(f"its pinned dependency {pin.task!r} is gone or changed")
                    continue
            problem = self.models.pin_problem(task, pin, blob)
            if problem is not None:
                problems.append(problem)
        return problems


def store_binding_problem(registry: Any) -> Optional[str]:
    """Why the registry's record of its artifact store is not whole (no record, another store,
    a marker that disagrees: `Registry.check_store_binding`), or None."""
    try:
        registry.check_store_binding()
    except StoreUnreachable:  # not a fault of the task: the command fails
        raise
    except RegistryError as exc:
        return f"artifact store binding: {first_line(exc)}"
    return None


def evaluations_by_task(evaluations: Iterable[Evaluation]) -> dict[str, list[Evaluation]]:
    """Each task's evaluations: its own rows and the cells recorded after it.

    A task's check reads only these, so handing each check its own list keeps a whole-registry
    verification linear in the number of rows instead of tasks × rows.
    """
    about: dict[str, list[Evaluation]] = {}
    for ev in evaluations:
        about.setdefault(ev.task, []).append(ev)
        if ev.after_task != ev.task:
            about.setdefault(ev.after_task, []).append(ev)
    return about


def safe_check(
    verifier: Verifier, task: Task, base: BaseModel, evaluations: Sequence[Evaluation]
) -> ProbeCheck:
    """`verifier.check_task`, with an unexpected error as a failed check instead of a traceback."""
    try:
        return verifier.check_task(task, base, evaluations)
    except StoreUnreachable:  # not a fault of the task: the command fails
        raise
    except Exception as exc:
        log.debug("checking task %r failed unexpectedly", task.name, exc_info=True)
        return ProbeCheck(task.name, None, False,
                          f"unexpected {type(exc).__name__}: {first_line(exc)}")


