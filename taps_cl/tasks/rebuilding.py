"""Task models rebuilt from stored tensors: restore, export, predict and evaluate.

Every model is rebuilt on the CPU in float32 from hash-checked artifacts; `restore` also re-runs the
task's probe batch, so an artifact that was swapped or altered is refused instead of exported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import taps_cl.serialization as serialization
from registry import NotFound, Registry
from registry.entities import BaseModel, Task, TaskDependency
from taps_cl.data import specs as data
from taps_cl.errors import TapsError
from taps_cl.methods.base import Dependency, Method
from taps_cl.methods.catalog import stored_method
from taps_cl.models.compose import task_model
from taps_cl.models.files import write_atomic
from taps_cl.tasks.probes import PROBE_ATOL, PROBE_RTOL, logit_scale, probe_drift
from taps_cl.training import evaluate
from taps_cl.training.device import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """A restored task model, with the task, its stored tensors and its probe batch."""

    task: Task
    model: nn.Module
    tensors: dict[str, torch.Tensor]
    probe: dict[str, torch.Tensor]


class TaskModels:
    """Loads bases and tasks from a registry; a base's weights are read and hashed once."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._bases: dict[str, dict[str, torch.Tensor]] = {}

    def base_state(self, base: BaseModel) -> dict[str, torch.Tensor]:
        """The base's state dict (hash-checked on first use, then cached by sha256)."""
        state = self._bases.get(base.sha256)
        if state is None:
            state = serialization.from_bytes(self.registry.read_artifact(base.weights))
            self._bases[base.sha256] = state
        return state

    def trust_base(self, base: BaseModel, state: dict[str, torch.Tensor]) -> None:
        """Use `state` as `base`'s weights from now on, without reading or hashing them again.

        Only for a state whose bytes the caller has just checked against `base.sha256` (the
        verifier's base check, or its parent process handing a checked state to its workers).
        """
        self._bases[base.sha256] = state

    def ready_task(self, name: str) -> Task:
        """The task named `name`; TapsError unless it finished training."""
        task = self.registry.get_task(name)
        if task.status != "ready" or task.artifact is None or task.probe is None:
            raise TapsError(f"task {name!r} is {task.status}, not ready")
        return task

    def task_tensors(self, task: Task) -> dict[str, torch.Tensor]:
        assert task.artifact is not None
        return serialization.from_bytes(self.registry.read_artifact(task.artifact))

    def probe(self, task: Task) -> dict[str, torch.Tensor]:
        assert task.probe is not None
        return serialization.from_bytes(self.registry.read_artifact(task.probe))

    def dependencies(self, task: Task) -> list[Dependency]:
        """The earlier tasks and shared artifacts `task` reads, with the tensors it pinned.

        What each one is comes from what its pin points at, never from the pin's `kind` row: an
        earlier task's task artifact, or a shared artifact read as its own bytes say
        (`Method.read_shared`: a progressive band's metadata names its band). A pin whose kind
        disagrees with that (`pin_problem`) is refused: its rows were changed.
        """
        method = stored_method(task.method, task.method_config)
        out = []
        for pin in task.depends_on:
            if pin.task is None:  # a shared artifact (progressive bands), read by its hash
                try:
                    artifact = self.registry.get_artifact(pin.sha256)
                except NotFound:
                    raise TapsError(f"task {task.name!r} reads shared artifact "
                                    f"{pin.sha256[:12]}…, which is not recorded") from None
                dependency = method.read_shared(self.registry.read_artifact(artifact))
                problem = _shared_pin_problem(pin, dependency)
            else:
                dep = self.ready_task(pin.task)
                assert dep.artifact is not None
                if dep.artifact.sha256 != pin.sha256:
                    raise TapsError(f"task {task.name!r} was trained against another artifact "
                                    f"of {pin.task!r} than the one recorded now")
                problem = _task_pin_problem(task, method, pin, dep)
                dependency = Dependency(dep.name, dep.method, dep.method_config,
                                        self.task_tensors(dep))
            if problem is not None:
                raise TapsError(f"task {task.name!r}: {problem}; its task_dependencies rows were "
                                "changed, not rebuilding it (see `taps-cl report accuracy "
                                "--verify`)")
            out.append(dependency)
        return out

    def pin_problem(self, task: Task, pin: TaskDependency,
                    blob: Optional[bytes] = None) -> Optional[str]:
        """Why `pin` does not mean what its `kind` row says, or None when it does.

        A pin on an earlier task must be one the task's options read, on a task earlier in the
        sequence, of the kind the task's method gives such pins (`Method.task_pin_kind`); a pin
        on a shared artifact must have the kind the artifact's own bytes state (`blob`: its
        bytes, already hash-checked; read here when not given). That the pinned artifact is
        the earlier task's current task artifact, or a recorded and intact file, is checked by
        the caller (the verifier) or by `dependencies`.
        """
        method = stored_method(task.method, task.method_config)
        if pin.task is None:
            if blob is None:
                blob = self.registry.read_artifact(self.registry.get_artifact(pin.sha256))
            try:
                dependency = method.read_shared(blob)
            except TapsError as exc:
                return (f"its pin on shared artifact {pin.sha256[:12]}… ({pin.kind!r}) is not "
                        f"one it can read: {exc}")
            return _shared_pin_problem(pin, dependency)
        try:
            dep = self.registry.get_task(pin.task)
        except NotFound:
            return None  # reported by the caller as a dependency that is gone
        return _task_pin_problem(task, method, pin, dep)


    def model(self, task: Task, base: Optional[BaseModel] = None,
              tensors: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
        """The task's model, without checking its probe batch (see `restore`)."""
        base = base or self.registry.get_base(task.base)
        method = stored_method(task.method, task.method_config)
        return task_model(base, self.base_state(base), method,
                          self.task_tensors(task) if tensors is None else tensors,
                          task.num_classes, self.dependencies(task),
                          task.dataset_spec.get("img_size"))

    def restore(self, name: str) -> nn.Module:
        """The task's plain model, refused unless it reproduces the task's stored probe logits."""
        return self.restored(name).model

    def restored(self, name: str) -> Restored:
        """`restore`, with what the model was rebuilt from (for the multi-task model, which
        keeps low-rank factors as factors and re-checks the probe batch on its own forward)."""
        task = self.ready_task(name)
        tensors = self.task_tensors(task)
        model = self.model(task, tensors=tensors)
        probe = self.probe(task)
        drift = probe_drift(model, probe)
        if drift > PROBE_ATOL + PROBE_RTOL * logit_scale(probe):
            raise TapsError(
                f"task {name!r} does not reproduce its probe logits (max drift {drift:.3g}): "
                "its stored files or rows were changed; not restoring "
                "(see `taps-cl report accuracy --verify`)"
            )
        return Restored(task, model, tensors, probe)

    def restore_to_file(self, name: str, out: str | os.PathLike[str]) -> Path:
        """Write the restored model's state dict as safetensors, atomically, to `out`."""
        out_path = Path(out)
        if out_path.suffix != ".safetensors":
            raise TapsError(f"--out must end in .safetensors, got {out_path.name}")
        if out_path.is_dir():
            raise TapsError(f"--out {out_path} is a directory")
        model = self.restore(name)
        task = self.registry.get_task(name)
        base = self.registry.get_base(task.base)
        meta = {
            "model": base.model_spec,
            "architecture": base.architecture,
            "num_classes": task.num_classes,
            "class_names": list(task.class_names),
            "task": task.name,
            "method": task.method,
            "method_config": task.method_config,
            "dependencies": [{"name": d.name, "method": d.method, "config": d.config}
                             for d in self.dependencies(task)],
            "img_size": task.dataset_spec.get("img_size"),
            "data_config": base.data_config,
        }
        write_atomic(out_path, serialization.to_bytes(model.state_dict(), meta))
        return out_path

    def predict(
        self, name: str, images: Sequence[str], top_k: int = 3, device: str = "auto"
    ) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) for each image file."""
        model = self.restore(name).to(resolve_device(device))
        task = self.registry.get_task(name)
        base = self.registry.get_base(task.base)
        img_size = task.dataset_spec.get("img_size")
        batch = torch.stack([data.load_image(p, base.data_config, img_size) for p in images])
        probs = torch.softmax(evaluate.logits(model, batch), dim=1)
        k = min(top_k, task.num_classes)
        values, indices = probs.topk(k, dim=1)
        return [
            [(task.class_names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
            for vals, idx in zip(values, indices)
        ]

    def evaluate(
        self, name: str, data_spec: Optional[str] = None, max_test: Optional[int] = None,
        device: str = "auto", checked: bool = True,
    ) -> evaluate.EvalResult:
        """Test accuracy of the restored task model on its own data or on `data_spec`.

        With `checked=False` a model that no longer reproduces its probe logits is measured
        anyway (to show what a changed task now scores) instead of refused.
        """
        task = self.ready_task(name)
        base = self.registry.get_base(task.base)
        test_set = test_data(task, base, data_spec, max_test)
        model = self.restore(name) if checked else self.model(task, base)
        model = model.to(resolve_device(device))
        return evaluate.evaluate(model, test_set)


def test_data(task: Task, base: BaseModel, data_spec: Optional[str], max_test: Optional[int]):  # type: ignore[no-untyped-def]
    """The task's test split, from its recorded data spec or from another copy `data_spec`."""
    stored = dict(task.dataset_spec)
    if data_spec is None:
        spec = data.DataSpec.from_json(stored)
        max_test = max_test if max_test is not None else stored.get("max_test")
    else:
        # Another copy of the data: keep the task's class subset so labels line up.
        subset = stored.get("classes")
        spec = data.DataSpec.parse(data_spec, classes=",".join(subset) if subset else None)
    task_data = data.load_task_data(
        spec, base.data_config, img_size=stored.get("img_size"),
        val_fraction=stored.get("val_fraction", 0.1),
        seed=int(task.train_config.get("seed", 0)),
        max_train=1, max_test=max_test,
    )
    if list(task_data.class_names) != list(task.class_names):
        raise TapsError(
            f"data classes {task_data.class_names} do not match task {task.name!r}'s "
            f"{list(task.class_names)}"
        )
    return task_data.test


def _shared_pin_problem(pin: TaskDependency, dependency: Dependency) -> Optional[str]:
    if dependency.kind is None or dependency.kind == pin.kind:
        return None
    return (f"its pin on shared artifact {pin.sha256[:12]}… is recorded as {pin.kind!r}, but "
            f"the artifact is a {dependency.kind!r} one by its own metadata")


def _task_pin_problem(task: Task, method: Method, pin: TaskDependency,
                      dep: Task) -> Optional[str]:
    if pin.task not in method.dependencies():
        return (f"its pin on task {pin.task!r} ({pin.kind!r}) names a task its options do not "
                f"read ({', '.join(method.dependencies()) or 'none'})")
    if dep.position is None or task.position is None or dep.position >= task.position:
        return f"its pin on task {pin.task!r} ({pin.kind!r}) is not on an earlier task"
    expected = method.task_pin_kind()
    if pin.kind != expected:
        return (f"its pin on task {pin.task!r} is recorded as {pin.kind!r}, but a pin on an "
                f"earlier task's artifact is {expected!r}")
    return None
