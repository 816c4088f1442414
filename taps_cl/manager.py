"""Where the learner meets the registry: add bases and tasks, restore, predict, verify."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from registry import AlreadyExists, NotFound, Registry, RegistryError
from registry.entities import BaseModel, EarlierCell, LayerEntry, Task
from taps_cl import backbones, data, evaluate, serialization
from taps_cl.errors import MethodError, TapsError, first_line
from taps_cl.methods import get_method, merge_state
from taps_cl.train import TrainConfig, fit

log = logging.getLogger(__name__)

PROBE_SIZE = 32  # test inputs kept per task to prove later additions did not change it
PROBE_ATOL = 1e-5  # largest logit drift still counted as "unchanged"
MERGE_ATOL = 1e-5  # restored (deltas folded in) vs training-time model, on the probe batch


def default_home() -> Path:
    """``$TAPS_CL_HOME`` or ``./.taps-cl``."""
    return Path(os.environ.get("TAPS_CL_HOME") or ".taps-cl")


@dataclass(frozen=True)
class ProbeCheck:
    """One task's probe logits recomputed from its stored artifacts."""

    task: str
    max_drift: Optional[float]  # None when the task could not be recomputed at all
    ok: bool
    error: Optional[str] = None


@dataclass(frozen=True)
class TaskAddResult:
    task: Task
    test_accuracy: float
    best_val_accuracy: float
    history: list[dict[str, Any]]
    probe_checks: list[ProbeCheck]
    merge_error: float  # max |restored − training-time| logit on the probe batch


class Manager:
    """The public Python API of taps-cl; ``cli.py`` is a thin layer over it."""

    def __init__(
        self, home: str | os.PathLike[str] | None = None, db_url: Optional[str] = None
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.db_url = db_url or os.environ.get("TAPS_CL_DB") or None
        self._registry: Optional[Registry] = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.home, self.db_url)
        return self._registry

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- base models
    def add_base(
        self, name: str, model: str, weights: Optional[str] = None, pretrained: bool = False
    ) -> BaseModel:
        """Build the backbone, load its weights and store them once as the frozen base."""
        reg = self.registry
        if _exists(reg.get_base, name):  # fail before building the model
            raise AlreadyExists(f"base model {name!r} already exists")
        spec = backbones.ModelSpec.parse(model)
        net = backbones.create_model(spec, pretrained=pretrained)
        if weights is not None:
            backbones.apply_weights(net, backbones.read_weights(weights))
        head = backbones.head_keys(spec)
        state = net.state_dict()
        blob = serialization.to_bytes(state, {"model": str(spec), "kind": "base"})
        return reg.add_base(
            name,
            model_spec=str(spec),
            architecture=spec.name,
            weights=blob,
            weights_num_params=serialization.numel(state),
            num_params=backbones.count_params(net, exclude=head),
            total_params=backbones.count_params(net),
            data_config=backbones.data_config(net, spec),
            head_keys=sorted(head),
        )

    def list_bases(self) -> list[BaseModel]:
        return self.registry.list_bases()

    def get_base(self, name: str) -> BaseModel:
        return self.registry.get_base(name)

    def _base_state(self, base: BaseModel) -> dict[str, torch.Tensor]:
        return serialization.from_bytes(self.registry.read_artifact(base.weights))

    # -------------------------------------------------------------------- tasks
    def add_task(
        self,
        name: str,
        base: str,
        data_spec: str,
        *,
        method: str = "taps",
        classes: Optional[str] = None,
        epochs: int = 3,
        batch_size: int = 32,
        lr: float = 1e-3,
        optimizer: str = "adamw",
        weight_decay: float = 0.0,
        img_size: Optional[int] = None,
        seed: int = 0,
        max_train: Optional[int] = None,
        max_test: Optional[int] = None,
        val_fraction: float = 0.1,
        method_options: Optional[dict[str, Any]] = None,
        progress: bool = False,
    ) -> TaskAddResult:
        """Train a task on the frozen base, store only what it needs, and re-check earlier tasks.

        Everything that can be rejected (names, method options, data) is checked before the task
        is recorded; a failure or Ctrl-C afterwards removes the task again, so the registry is as
        it was (at most an unreferenced artifact file remains).
        """
        reg = self.registry
        base_entity = reg.get_base(base)
        existing = _exists(reg.get_task, name)  # fail before loading data
        if existing is not None:
            hint = "" if existing.status == "ready" else (
                f" with status {existing.status} (an interrupted run?); "
                f"`taps-cl task remove {name}` discards it"
            )
            raise AlreadyExists(f"task {name!r} already exists{hint}")
        learner = self._method(method, method_options or {}, epochs)
        train_cfg = TrainConfig(
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            optimizer=optimizer,
            weight_decay=weight_decay,
            seed=seed,
        )
        spec = data.DataSpec.parse(data_spec, classes=classes)
        task_data = data.load_task_data(
            spec,
            base_entity.data_config,
            img_size=img_size,
            val_fraction=val_fraction,
            seed=seed,
            max_train=max_train,
            max_test=max_test,
        )
        dataset_json = dict(
            spec.to_json(), img_size=img_size, max_train=max_train, max_test=max_test,
            val_fraction=val_fraction,
        )
        train_json = dict(vars(train_cfg))
        reg.begin_task(
            name,
            base=base,
            method=learner.name,
            method_config=learner.config_dict(),
            train_config=train_json,
            dataset_spec=dataset_json,
            class_names=task_data.class_names,
        )
        try:
            result = self._train_and_store(name, base_entity, learner, train_cfg, task_data, progress)
        except BaseException:
            log.warning("task %s did not finish; removing it from the registry", name)
            reg.discard_task(name)
            raise
        return result

    @staticmethod
    def _method(method: str, options: dict[str, Any], epochs: int):  # type: ignore[no-untyped-def]
        """The configured method; a warm-up that would swallow every epoch is shortened."""
        learner = get_method(method, **options)
        warmup = getattr(learner.config, "warmup_epochs", None)
        if warmup is not None and warmup >= epochs and getattr(learner.config, "lam", 0) > 0:
            if "warmup_epochs" in options:
                raise MethodError(
                    f"--warmup-epochs {warmup} leaves no epoch of the {epochs} for the sparsity "
                    "penalty; use fewer warm-up epochs or more epochs"
                )
            learner = get_method(method, **{**options, "warmup_epochs": epochs - 1})
        return learner

    def _train_and_store(self, name, base_entity, learner, train_cfg, task_data, progress):  # type: ignore[no-untyped-def]
        reg = self.registry
        spec = backbones.ModelSpec.parse(base_entity.model_spec)
        head = frozenset(base_entity.head_keys)
        base_state = self._base_state(base_entity)
        num_classes = len(task_data.class_names)
        torch.manual_seed(train_cfg.seed)  # the new head's initialisation
        model = backbones.build_task_model(spec, base_state, num_classes, head)
        model = learner.prepare(model, head)
        started = time.perf_counter()
        fitted = fit(model, learner, task_data.train, task_data.val, train_cfg, progress=progress)
        seconds = time.perf_counter() - started
        state = learner.extract(model, head)

        plain = self._plain_model(spec, base_state, state.tensors, head, num_classes)
        test = evaluate.evaluate(plain, task_data.test)
        n_probe = min(PROBE_SIZE, len(task_data.test))
        probe_inputs = torch.stack([task_data.test[i][0] for i in range(n_probe)])
        probe_logits = evaluate.logits(plain, probe_inputs)
        merge_error = float((evaluate.logits(model, probe_inputs) - probe_logits).abs().max())
        if merge_error > MERGE_ATOL:
            raise TapsError(
                f"restored model of {name!r} differs from the trained one by {merge_error:.3g}"
            )

        task_meta = {"method": learner.name, "config": learner.config_dict(), "task": name}
        task_blob = serialization.to_bytes(state.tensors, task_meta)
        probe_tensors = {"inputs": probe_inputs, "logits": probe_logits}
        probe_blob = serialization.to_bytes(probe_tensors, {"task": name, "kind": "probe"})
        layers = [
            LayerEntry(r.name, r.kind, r.score, r.active, r.base_params, r.task_params)
            for r in state.layers
        ]
        # Earlier tasks are re-checked before this one is recorded, and both land in one
        # transaction: a task is never "ready" without its column of the accuracy matrix.
        checks, cells = self._probe_earlier_tasks(base_entity.name)
        task = reg.finish_task(
            name,
            task_blob=task_blob,
            task_num_params=state.num_params,
            probe_blob=probe_blob,
            probe_num_params=serialization.numel(probe_tensors),
            layers=layers,
            head_params=sum(int(v.numel()) for k, v in plain.state_dict().items() if k in head),
            train_seconds=seconds,
            test_accuracy=test.accuracy,
            test_loss=test.loss,
            test_samples=test.num_samples,
            earlier=cells,
        )
        log.info("task %s: test accuracy %.4f, %d/%d layers active", name, test.accuracy,
                 task.active_layers, task.total_layers)
        return TaskAddResult(
            task, test.accuracy, fitted.best_val_accuracy, fitted.history, checks, merge_error
        )

    def _probe_earlier_tasks(self, base: str) -> tuple[list[ProbeCheck], list[EarlierCell]]:
        """Probe-check every ready task of ``base``; re-measure on data any whose logits moved."""
        measured = self._latest_measured(base)
        checks, cells = [], []
        for task in self.registry.list_tasks(base, ready_only=True):
            check = self.check_probe(task)
            checks.append(check)
            if check.ok:
                cells.append(EarlierCell(task.name, "probe", measured.get(task.name),
                                         check.max_drift, True))
                continue
            accuracy = None
            try:  # the task changed: its carried accuracy means nothing, so measure it again
                accuracy = self.evaluate_task(task.name).accuracy
            except (TapsError, RegistryError) as exc:
                log.warning("task %s changed and cannot be re-measured: %s", task.name, exc)
            cells.append(EarlierCell(task.name, "measured", accuracy, check.max_drift, False))
        return checks, cells

    def _latest_measured(self, base: str) -> dict[str, float]:
        latest: dict[str, float] = {}
        for ev in self.registry.list_evaluations(base):
            if ev.kind == "measured" and ev.accuracy is not None:
                latest[ev.task] = ev.accuracy
        return latest

    def remove_task(self, name: str) -> None:
        """Discard a task that never finished (a killed run); ready tasks are never removed."""
        self.registry.discard_task(name)

    def list_tasks(self, base: Optional[str] = None) -> list[Task]:
        return self.registry.list_tasks(base)

    def get_task(self, name: str) -> Task:
        return self.registry.get_task(name)

    def test_accuracies(self, base: Optional[str] = None) -> dict[str, float]:
        """Each task's latest measured test accuracy."""
        if base is None:
            out: dict[str, float] = {}
            for b in self.registry.list_bases():
                out.update(self._latest_measured(b.name))
            return out
        return self._latest_measured(base)

    # ------------------------------------------------------------ restore/infer
    def _plain_model(self, spec, base_state, tensors, head, num_classes) -> nn.Module:  # type: ignore[no-untyped-def]
        merged = merge_state(base_state, tensors, head)
        model = backbones.create_model(spec, num_classes=num_classes)
        backbones.apply_weights(model, merged)
        return model.eval()

    def _ready_task(self, name: str) -> Task:
        task = self.registry.get_task(name)
        if task.status != "ready" or task.artifact is None:
            raise TapsError(f"task {name!r} is {task.status}, not ready")
        return task

    def restore(self, name: str) -> nn.Module:
        """The task's model as a plain timm/torchvision module (deltas folded into the weights)."""
        task = self._ready_task(name)
        base = self.registry.get_base(task.base)
        tensors = serialization.from_bytes(self.registry.read_artifact(task.artifact))
        return self._plain_model(
            backbones.ModelSpec.parse(base.model_spec),
            self._base_state(base),
            tensors,
            frozenset(base.head_keys),
            task.num_classes,
        )

    def restore_to_file(self, name: str, out: str | os.PathLike[str]) -> Path:
        """Write the restored model's state dict as safetensors (temp file, fsync, rename)."""
        out_path = Path(out)
        if out_path.suffix != ".safetensors":
            raise TapsError(f"--out must end in .safetensors, got {out_path.name}")
        task = self._ready_task(name)
        base = self.registry.get_base(task.base)
        model = self.restore(name)
        meta = {
            "model": base.model_spec,
            "architecture": base.architecture,
            "num_classes": task.num_classes,
            "class_names": list(task.class_names),
            "task": task.name,
            "data_config": base.data_config,
        }
        blob = serialization.to_bytes(model.state_dict(), meta)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = out_path.with_name(f".{out_path.name}.tmp")
        try:
            with tmp.open("wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, out_path)
        finally:
            tmp.unlink(missing_ok=True)
        return out_path

    def predict(
        self, name: str, images: Sequence[str], top_k: int = 3
    ) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) for each image file."""
        task = self._ready_task(name)
        base = self.registry.get_base(task.base)
        img_size = task.dataset_spec.get("img_size")
        batch = torch.stack([data.load_image(p, base.data_config, img_size) for p in images])
        probs = torch.softmax(evaluate.logits(self.restore(name), batch), dim=1)
        k = min(top_k, task.num_classes)
        values, indices = probs.topk(k, dim=1)
        return [
            [(task.class_names[i], float(v)) for v, i in zip(vals.tolist(), idx.tolist())]
            for vals, idx in zip(values, indices)
        ]

    def evaluate_task(
        self, name: str, data_spec: Optional[str] = None, record: bool = False,
        max_test: Optional[int] = None,
    ) -> evaluate.EvalResult:
        """Test accuracy of the restored task model on its own data or on ``data_spec``."""
        task = self._ready_task(name)
        base = self.registry.get_base(task.base)
        test_set = self._test_set(task, base, data_spec, max_test)
        result = evaluate.evaluate(self.restore(name), test_set)
        if record:
            last = self.registry.list_tasks(task.base, ready_only=True)[-1]
            self.registry.add_evaluation(
                name, after_task=last.name, kind="measured", accuracy=result.accuracy,
                loss=result.loss, num_samples=result.num_samples,
            )
        return result

    def _test_set(self, task: Task, base: BaseModel, data_spec: Optional[str], max_test):  # type: ignore[no-untyped-def]
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

    # ------------------------------------------------------------ verification
    def check_probe(self, task: Task) -> ProbeCheck:
        """Recompute a task's probe logits from its (hash-verified) artifacts."""
        try:
            model = self.restore(task.name)
            assert task.probe is not None
            probe = serialization.from_bytes(self.registry.read_artifact(task.probe))
            drift = (evaluate.logits(model, probe["inputs"]) - probe["logits"]).abs().max()
            max_drift = float(drift) if probe["logits"].numel() else 0.0
        except (TapsError, RegistryError, OSError, RuntimeError, ValueError) as exc:
            # A corrupt or missing artifact is a failed check, reported with its reason.
            return ProbeCheck(task.name, None, False, first_line(exc))
        return ProbeCheck(task.name, max_drift, max_drift <= PROBE_ATOL)

    def verify(self, base: Optional[str] = None) -> list[ProbeCheck]:
        """Re-hash every artifact and recompute every ready task's probe logits."""
        reg = self.registry
        checks = []
        bases = [reg.get_base(base)] if base else reg.list_bases()
        for b in bases:
            try:
                reg.verify_artifact(b.weights)
            except RegistryError as exc:
                checks.append(ProbeCheck(f"base:{b.name}", None, False, first_line(exc)))
                continue
            for task in reg.list_tasks(b.name, ready_only=True):
                checks.append(self.check_probe(task))
        return checks


def _exists(lookup: Callable[[str], Any], name: str) -> Any:
    """The entity ``lookup(name)`` returns, or None when it is not there."""
    try:
        return lookup(name)
    except NotFound:
        return None


def restore(name: str, home: str | os.PathLike[str] | None = None, db_url: Optional[str] = None) -> nn.Module:
    """Restore task ``name`` as a plain timm/torchvision model (the Python API of ``taps-cl restore``)."""
    with Manager(home, db_url) as manager:
        return manager.restore(name)


__all__ = ["Manager", "ProbeCheck", "TaskAddResult", "restore"]
