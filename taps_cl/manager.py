"""The registry object of the Python API: one Manager per registry, which the CLI and scripts
call (`taps_cl.api` opens one: `open_registry`, `restore`).

It holds no algorithm of its own: adding a task is `adding`, rebuilding models is `restoring`,
checking them is `verification`, report data is `reports`. Those modules (and torch) are imported
where they are first used, so reading commands (`task list`, `report budget`, `report accuracy`)
start without importing torch.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from registry import AlreadyExists, Registry, RegistryError
from registry.entities import BaseModel, GarbageFile, Task, TaskSummary
from taps_cl.analysis import reports
from taps_cl.errors import TapsError, first_line

if TYPE_CHECKING:  # these import torch: loaded where first used (see the module docstring)
    from torch import nn

    from taps_cl.serving.multitask import MultiTaskModel
    from taps_cl.tasks.grouping import GroupResult
    from taps_cl.tasks.rebuilding import TaskModels
    from taps_cl.tasks.recording import TaskAddResult
    from taps_cl.tasks.verification import ProbeCheck
    from taps_cl.training import evaluate

log = logging.getLogger(__name__)


def default_home() -> Path:
    """``$TAPS_CL_HOME`` or ``./.taps-cl``."""
    return Path(os.environ.get("TAPS_CL_HOME") or ".taps-cl")


class Manager:
    """The public Python API of taps-cl; ``cli.py`` is a thin layer over it.

    Reading never creates a registry: a command that only reads an empty home fails with
    "no registry" instead of leaving a new database behind.

    ``artifacts_url`` (default ``$TAPS_CL_ARTIFACTS``) names the artifact store, a local path
    or an fsspec URL; without it the registry uses the store it recorded (registry.binding).
    """

    def __init__(
        self,
        home: str | os.PathLike[str] | None = None,
        db_url: Optional[str] = None,
        artifacts_url: Optional[str] = None,
    ) -> None:
        self.home = Path(home) if home is not None else default_home()
        self.db_url = db_url or os.environ.get("TAPS_CL_DB") or None
        self.artifacts_url = artifacts_url or os.environ.get("TAPS_CL_ARTIFACTS") or None
        self._registry: Optional[Registry] = None
        self._models: Optional[TaskModels] = None

    @property
    def registry(self) -> Registry:
        """The registry, opened for reading (NoRegistry where none exists yet)."""
        if self._registry is None:
            self._registry = Registry(
                self.home, self.db_url, create=False, artifacts=self.artifacts_url)
        return self._registry

    def _writable(self) -> Registry:
        """The registry, created at the newest schema revision where none exists yet."""
        if self._registry is None:
            self._registry = Registry(
                self.home, self.db_url, create=True, artifacts=self.artifacts_url)
        return self._registry

    @property
    def models(self) -> TaskModels:
        from taps_cl.tasks.rebuilding import TaskModels

        if self._models is None or self._models.registry is not self.registry:
            self._models = TaskModels(self.registry)
        return self._models

    def close(self) -> None:
        if self._registry is not None:
            self._registry.close()
            self._registry = None
            self._models = None

    def __enter__(self) -> Manager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------- base models
    def add_base(
        self, name: str, model: str, weights: Optional[str] = None, pretrained: bool = False
    ) -> BaseModel:
        """Build the backbone, load its weights and store them once as the frozen base."""
        import taps_cl.serialization as serialization
        from taps_cl.models import backbones
        from taps_cl.models.weights import read_weights

        reg = self._writable()
        if any(b.name == name for b in reg.list_bases()):  # fail before building the model
            raise AlreadyExists(f"base model {name!r} already exists")
        spec = backbones.ModelSpec.parse(model)
        net = backbones.create_model(spec, pretrained=pretrained)
        if weights is not None:
            backbones.apply_weights(net, read_weights(weights))
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

    # -------------------------------------------------------------------- tasks
    def add_task(
        self,
        name: str,
        base: str,
        data_spec: str,
        *,
        method: Optional[str] = None,
        method_options: Optional[dict[str, Any]] = None,
        progress: bool = False,
        **options: Any,
    ) -> Optional[TaskAddResult]:
        """Train a task on the frozen base, store only what it needs, and spot-check earlier tasks.

        `method` is a method's name (None: `tasks.requests.DEFAULT_METHOD`, adapters).
        `options` are the training options (TrainConfig: epochs, batch_size, lr and clip_grad
        (default: the method's, Method.train_defaults), optimizer, weight_decay, seed, device),
        the run options (classes, img_size, max_train, max_test, val_fraction, recheck) and the
        method's own options (its Config's fields, e.g. `lam` or `rank` for TAPS, `group` for
        progressive), by name; `method_options` may hold the latter too. Unknown names are
        refused with the method's options listed.

        `recheck` earlier tasks (default 8: a seeded sample with the latest task and any it
        reads) get their probe logits re-checked; the add cost does not grow with the registry,
        and nothing earlier can change (see `TaskAdder._finish`).

        Everything that can be rejected (names, method options, data, budget) is checked before
        the task is recorded; a failure or Ctrl-C afterwards removes the task again. `device`
        ("auto", "cpu", "cuda[:N]", "mps") is where training runs; the registry's checks run on
        the CPU in float32 whatever it is.

        Under torchrun (`torchrun --nproc-per-node N -m taps_cl task add …`) the N processes
        train together (taps_cl.training.distributed); rank 0 records and returns the result,
        the others return None.
        """
        from taps_cl.tasks.adding import TaskAdder
        from taps_cl.tasks.requests import DEFAULT_METHOD, TaskRequest, split_options
        from taps_cl.training.distributed import joined

        method = method or DEFAULT_METHOD
        train_cfg, run, own = split_options(options, TaskRequest, method, method_options)
        request = TaskRequest(name=name, base=base, data_spec=data_spec, method=method,
                              method_options={**(method_options or {}), **own}, **run)
        with joined(train_cfg.device) as (ranks, rank_device):  # a no-op in a single process
            train_cfg = replace(train_cfg, device=rank_device, processes=ranks.world_size)
            registry = self._writable() if ranks.is_main else self.registry  # workers only read
            return TaskAdder(registry, self.models).add(request, train_cfg,
                                                        progress=progress and ranks.is_main)

    def group_train(
        self,
        base: str,
        tasks: Sequence[tuple[str, str]],
        *,
        groups: Optional[int] = None,
        method: str = "progressive",
        method_options: Optional[dict[str, Any]] = None,
        progress: bool = False,
        **options: Any,
    ) -> GroupResult:
        """Train new tasks (name, data spec) jointly and record each (`group train`).

        Their signatures are clustered into `groups` similarity groups (None: automatically);
        shared and group adapters are stored once, as shared artifacts every member pins.
        `options` as for `add_task` (no class subset).
        """
        from taps_cl.tasks.grouping import GroupTrainer
        from taps_cl.tasks.requests import GroupRequest, split_options
        from taps_cl.training.distributed import under_torchrun

        if under_torchrun():
            raise TapsError("group train runs in one process; under torchrun every rank would "
                            "train and record the group again")
        train_cfg, run, own = split_options(options, GroupRequest, method, method_options)
        request = GroupRequest(base=base, tasks=tuple(tasks), groups=groups, method=method,
                               method_options={**(method_options or {}), **own}, **run)
        return GroupTrainer(self._writable(), self.models).train(request, train_cfg,
                                                                 progress=progress)

    def remove_task(self, name: str, force: bool = False) -> None:
        """Discard a task that never finished (a killed run); a live run only with `force`."""
        self.registry.discard_task(name, force=force)

    def delete_task(self, name: str) -> list[str]:
        """Delete a ready task and the artifacts nothing else uses; refused with dependents.

        Signals wait until it is done, so an interrupted delete leaves the task whole or gone
        with its files; a signal that came meanwhile then interrupts (the task stays deleted)."""
        from taps_cl.tasks.runs import interrupt_after, signals_deferred

        removed, signalled = signals_deferred(self.registry.delete_task, name)
        if signalled:
            log.warning("task %s was deleted (%d artifact file(s) removed) before the interrupt "
                        "took effect", name, len(removed))
        interrupt_after(signalled)
        return removed

    def list_tasks(self, base: Optional[str] = None) -> list[Task]:
        return self.registry.list_tasks(base)

    def task_summaries(
        self, base: Optional[str] = None, *, ready_only: bool = False,
        limit: Optional[int] = None, offset: int = 0,
    ) -> list[TaskSummary]:
        """Tasks in sequence order with their sizes, layer counts and latest measured accuracy.

        Computed by the database (no layer rows loaded): what `task list` shows, fast at
        thousands of tasks; `limit`/`offset` page through the sequence.
        """
        return self.registry.task_summaries(base, ready_only=ready_only, limit=limit,
                                            offset=offset)

    def count_tasks(self, base: Optional[str] = None, ready_only: bool = False) -> int:
        """How many tasks there are (of one base; only ready ones with `ready_only`)."""
        return self.registry.count_tasks(base, ready_only=ready_only)

    def get_task(self, name: str) -> Task:
        return self.registry.get_task(name)

    def test_accuracies(self, base: Optional[str] = None) -> dict[str, float]:
        """Each task's latest measured test accuracy (of `base`, or of every base)."""
        bases = [base] if base is not None else [b.name for b in self.registry.list_bases()]
        # Evaluations come in the order they were recorded: the last one of a task wins.
        return {ev.task: ev.accuracy for name in bases
                for ev in self.registry.list_evaluations(name)
                if ev.kind == "measured" and ev.accuracy is not None}

    # ------------------------------------------------------------ restore/infer
    def restore(self, name: str) -> nn.Module:
        """The task's model as a plain timm/torchvision module (deltas folded into the weights).

        Refused when the rebuilt model does not reproduce the task's stored probe logits.
        """
        return self.models.restore(name)

    def restore_to_file(self, name: str, out: str | os.PathLike[str]) -> Path:
        """Write the restored model's state dict as safetensors (unique temp file, rename)."""
        return self.models.restore_to_file(name, out)

    def restores_plain(self, name: str) -> bool:
        """Whether task `name` restores to a plain model of its base's architecture (its method
        is mergeable) rather than the base with modules attached (`taps_cl.load_file`)."""
        from taps_cl.methods.catalog import stored_method

        task = self.registry.get_task(name)
        return stored_method(task.method, task.method_config).mergeable

    def predict(
        self, name: str, images: Sequence[str], top_k: int = 3, device: str = "auto"
    ) -> list[list[tuple[str, float]]]:
        """Top-k (class name, probability) for each image file."""
        return self.models.predict(name, images, top_k=top_k, device=device)

    def serving(self, tasks: Optional[Sequence[str]] = None, base: Optional[str] = None,
                device: str = "cpu") -> MultiTaskModel:
        """One model serving `tasks` (or `base`'s, or every base's, ready tasks), what they share
        held and computed once (taps_cl.serving.multitask; docs/commands.md, `predict`)."""
        from taps_cl.serving.multitask import build_multitask

        return build_multitask(self, tasks, base, device)

    def evaluate_task(
        self, name: str, data_spec: Optional[str] = None, record: bool = False,
        max_test: Optional[int] = None, device: str = "auto",
    ) -> evaluate.EvalResult:
        """Test accuracy of the restored task model on its own data or on ``data_spec``.

        With `record`, the measurement becomes a cell of the latest column of the matrix.
        """
        result = self.models.evaluate(name, data_spec, max_test=max_test, device=device)
        if record:
            task = self.registry.get_task(name)
            last = self.registry.list_task_names(task.base)[-1]
            self.registry.add_evaluation(
                name, after_task=last, kind="measured", accuracy=result.accuracy,
                loss=result.loss, num_samples=result.num_samples,
            )
        return result

    # ------------------------------------------------------------ verification
    def verify(
        self, base: Optional[str] = None, tasks: Optional[Sequence[str]] = None, *,
        workers: Optional[int] = None, progress: bool = False,
    ) -> list[ProbeCheck]:
        """Check every artifact, recorded fact and probe of a base's (or every, or the named) task.

        `workers` processes check the tasks in parallel (None: automatic, see
        `taps_cl.tasks.verify_pool.verify`); a script that verifies with workers needs an
        ``if __name__ == "__main__":`` guard, as with any spawned process.
        """
        from taps_cl.tasks.verify_pool import verify

        return verify(self.models, base, tasks, workers=workers, progress=progress)

    # ----------------------------------------------------------------- garbage
    def find_garbage(self) -> list[GarbageFile]:
        """Artifact files no row references, and stale temp files of interrupted writes."""
        return self.registry.find_garbage()

    def remove_garbage(self) -> tuple[list[GarbageFile], int]:
        """Remove what `find_garbage` lists (re-checked first); returns (files, bytes freed)."""
        files = self.registry.find_garbage()
        return files, self.registry.remove_garbage(files)

    # ------------------------------------------------------------------ reports
    def only_base(self, base: Optional[str] = None) -> BaseModel:
        """The base named `base`, or the only registered one; TapsError naming the choices."""
        if base is not None:
            return self.registry.get_base(base)
        bases = self.registry.list_bases()
        if len(bases) != 1:
            names = ", ".join(b.name for b in bases) or "none registered"
            raise TapsError(f"choose a base with --base ({names})")
        return bases[0]

    def budget(self, base: Optional[str] = None) -> reports.BudgetReport:
        """Base + Σ stored parameters and bytes of `base`'s ready tasks (None: the only base)."""
        b = self.only_base(base)
        return reports.budget(b, self.registry.task_summaries(b.name, ready_only=True),
                              self.registry.list_shared(b.name))

    def accuracy(
        self, base: Optional[str] = None, *, verify: bool = False, reevaluate: bool = False,
        device: str = "auto", workers: Optional[int] = None, progress: bool = False,
        tasks: Optional[Sequence[str]] = None,
    ) -> reports.AccuracyReport:
        """The accuracy matrix of `base`'s ready tasks, with forgetting and BWT.

        `reevaluate` first re-measures every task whose data is reachable (the others are in
        `reevaluate_skipped`); `verify` runs `verify` (limited to `tasks`, if named), and the
        report is `verified` only if every check holds and no number contradicts them."""
        if tasks is not None and not verify:
            raise TapsError("naming tasks limits verification: verify them too (--verify)")
        b = self.only_base(base)
        skipped: list[str] = []
        if reevaluate:
            for name in self.registry.list_task_names(b.name):
                try:
                    self.evaluate_task(name, record=True, device=device)
                except (TapsError, RegistryError, OSError) as exc:  # data moved away: keep records
                    skipped.append(f"{name}: {first_line(exc)}")
        checks, seconds = None, None
        if verify:
            start = time.perf_counter()
            checks = self.verify(b.name, tasks, workers=workers, progress=progress)
            seconds = time.perf_counter() - start
        report = reports.accuracy_matrix(
            self.registry.list_task_names(b.name),
            self.registry.list_evaluations(b.name),
            checks=checks, reevaluate_skipped=skipped,
            chain_problems=self.registry.chain_problems(b.name),
        )
        if checks is None:
            return report
        return replace(report, verify_seconds=seconds, verified_tasks=tuple(
            c.task for c in checks if not c.task.startswith("base:")))

    def layer_map(self, base: Optional[str] = None) -> reports.LayerMap:
        """Which adaptable layers each of `base`'s ready tasks turned on."""
        b = self.only_base(base)
        return reports.layer_map(self.registry.list_tasks(b.name, ready_only=True))

    # -------------------------------------------------------------------- similarity
    def similarity(
        self, base: Optional[str] = None, data: Optional[str] = None, *,
        classes: Optional[str] = None, img_size: Optional[int] = None,
        max_train: Optional[int] = None, seed: int = 0,
    ) -> reports.SimilarityReport:
        """Cosine similarity of the stored gradient signatures of `base`'s ready tasks.

        Tasks without a signature (added before signatures were recorded) are listed with the
        reason and left out. With `data` (a data spec; `classes`, `img_size`, `max_train` and
        `seed` as for `add_task`), a candidate's signature is computed on the base, on the CPU,
        and compared with every task — nothing is recorded. Signatures made with another recipe
        are refused with one line.
        """
        from taps_cl.tasks.planning import similarity_report

        return similarity_report(self.registry, self.models, self.only_base(base), data,
                                 classes=classes, img_size=img_size, max_train=max_train,
                                 seed=seed)


def __getattr__(name: str) -> Any:
    # ProbeCheck and TaskAddResult stay importable from here without importing torch up front.
    if name == "ProbeCheck":
        from taps_cl.tasks.verification import ProbeCheck

        return ProbeCheck
    if name == "TaskAddResult":
        from taps_cl.tasks.recording import TaskAddResult

        return TaskAddResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Manager", "ProbeCheck", "TaskAddResult"]
