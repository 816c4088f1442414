"""The multi-task model: many tasks of a registry served from one copy of what they share.

Each task is loaded through the restore path (`TaskModels.restored`: hash-checked files, the
model rebuilt and refused unless it reproduces the task's probe logits), then:

* its low-rank deltas go back to factors on the base layer (`lowrank.keep_factors`);
* its model is cut into stages (`taps_cl/models/stages.py`) and checked again: its stages must
  reproduce the task's stored probe logits within the registry's restore tolerance
  (`taps_cl/tasks/probes.py`), else it runs whole, else it is refused;
* its parameters and buffers are replaced by the pool's tensors of equal content
  (`identity.TensorPool`): the base's weights, shared progressive bands, fused adapters and
  everything else equal between tasks are held once;
* each stage gets a key (`identity.KeyCache`), its MACs and what it changes from the base.

A forward pass runs the tree of segments (`tree.py`): a stage runs once for all images whose
tasks compute the same there, splitting only where tasks differ. `plan()` describes that tree
(`plan.py`). The model is for inference only, on the device it was built for.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, Union

import torch
from PIL import Image
from torch import Tensor, nn

from taps_cl.data import specs as data
from taps_cl.errors import TapsError
from taps_cl.methods.layers import NORM_TYPES
from taps_cl.models.backbones import example_input
from taps_cl.models.stages import Decomposition, Runner, decompose, whole
from taps_cl.serving import tree
from taps_cl.serving.identity import KeyCache, TensorPool, differing, digest
from taps_cl.serving.lowrank import LowRankDelta, keep_factors
from taps_cl.serving.plan import GroupFacts, SegmentPlan, count_macs, make_plan
from taps_cl.tasks.probes import PROBE_ATOL, PROBE_RTOL, logit_scale
from taps_cl.training.device import resolve_device

if TYPE_CHECKING:
    from registry.entities import BaseModel, Task
    from taps_cl.tasks.rebuilding import TaskModels


class Manager(Protocol):
    """What the multi-task model reads of a `taps_cl.Manager` (named as a protocol so that this
    module, which the Manager itself calls, does not import it)."""

    @property
    def models(self) -> TaskModels: ...

    def list_bases(self) -> list[BaseModel]: ...

    def get_base(self, name: str) -> BaseModel: ...

    def get_task(self, name: str) -> Task: ...

    def list_tasks(self, base: Optional[str] = None) -> list[Task]: ...

log = logging.getLogger(__name__)


class UnknownTask(TapsError):
    """A task the multi-task model does not serve."""

    def __init__(self, name: str) -> None:
        super().__init__(f"task {name!r} is not served here")
        self.name = name


@dataclass(frozen=True)
class ServedTask:
    """What a served task is: its identity, classes and the input its preprocessing gives."""

    name: str
    base: str
    method: str
    position: int
    classes: list[str]
    input_size: tuple[int, int, int]  # (C, H, W) of the task's eval preprocessing
    sha256: str  # the task's own artifact

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "method": self.method,
                "position": self.position, "classes": list(self.classes),
                "input_size": list(self.input_size), "sha256": self.sha256}


@dataclass(frozen=True)
class _Entry:
    """One loaded task: its model (tensors pooled) and what the tree needs of each stage."""

    served: ServedTask
    model: nn.Module
    data_config: dict[str, Any]
    img_size: Optional[int]
    transform: data.Preprocess  # the task's eval preprocessing
    decomposition: Decomposition
    runners: tuple[Runner, ...]
    keys: tuple[str, ...]
    macs: tuple[int, ...]
    differs: tuple[tuple[str, ...], ...]

    @property
    def group(self) -> tuple[str, str]:
        return (self.served.base, self.decomposition.family)

    @property
    def preprocessing(self) -> str:
        return json.dumps([self.data_config, self.img_size], sort_keys=True, default=str)


@dataclass(frozen=True)
class _Group:
    base: str
    family: str
    stages: tuple[str, ...]
    tasks: frozenset[str]
    roots: tuple[tree.Segment, ...]


@dataclass(frozen=True)
class _State:
    """What a forward pass reads; replaced whole when tasks are added, never changed."""

    entries: dict[str, _Entry]
    groups: tuple[_Group, ...]
    runners: dict[str, tuple[Runner, ...]]


class MultiTaskModel(nn.Module):
    """Serves many tasks of a registry at once (see the module docstring)."""

    def __init__(self, device: Union[str, torch.device] = "cpu") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.task_models = nn.ModuleDict()  # every loaded task's model (tensors pooled)
        self._pool = TensorPool(self.device)
        self._state = _State({}, (), {})
        self._lock = threading.Lock()
        self._base_digests: dict[str, dict[str, str]] = {}  # base sha256 → digest by state key
        super().train(False)

    # ------------------------------------------------------------------- what it serves
    @property
    def tasks(self) -> dict[str, ServedTask]:
        """The served tasks, in registry order (base, then position)."""
        return {name: e.served for name, e in self._state.entries.items()}

    def preprocess(self, task: str, image: Union[Image.Image, Tensor]) -> Tensor:
        """A PIL image (or uint8 C×H×W tensor) as task `task`'s eval preprocessing gives it."""
        return self._entry(task).transform(image)

    def load_image(self, task: str, path: str) -> Tensor:
        """An image file preprocessed for `task` exactly as `taps-cl predict` does it."""
        entry = self._entry(task)
        return data.load_image(path, entry.data_config, entry.img_size)

    def same_preprocessing(self, tasks: Iterable[str]) -> list[list[str]]:
        """`tasks` grouped by preprocessing: one preprocessed image serves a whole group."""
        groups: dict[str, list[str]] = {}
        for name in tasks:
            groups.setdefault(self._entry(name).preprocessing, []).append(name)
        return list(groups.values())

    def _entry(self, task: str) -> _Entry:
        entry = self._state.entries.get(task)
        if entry is None:
            raise UnknownTask(task)
        return entry

    # ------------------------------------------------------------------------ inference
    def forward(self, images: Tensor, tasks: Sequence[Sequence[str]]) -> list[dict[str, Tensor]]:
        """Per image, the logits (1-D, on the CPU, float32) of each task it names.

        `images` (N×C×H×W) must have the input size of every task they name.
        """
        state = self._state
        if images.dim() != 4 or len(tasks) != images.shape[0]:
            raise TapsError(f"expected N×C×H×W images and N task lists, got images of shape "
                            f"{tuple(images.shape)} and {len(tasks)} task lists")
        wants = [frozenset(names) for names in tasks]
        size = tuple(images.shape[1:])
        for names in wants:
            for name in names:
                entry = state.entries.get(name)
                if entry is None:
                    raise UnknownTask(name)
                if entry.served.input_size != size:
                    raise TapsError(f"task {name!r} takes {_size(entry.served.input_size)} "
                                    f"images, got {_size(size)}")
        images = images.to(self.device, torch.float32)
        found: dict[tuple[int, str], Tensor] = {}
        with torch.no_grad():
            for group in state.groups:
                rows = [i for i, w in enumerate(wants) if w & group.tasks]
                if not rows:
                    continue
                x = images if len(rows) == len(wants) else images[rows]
                found.update(tree.run(group.roots, state.runners, x, rows, wants))
        return [{name: found[(i, name)] for name in dict.fromkeys(names)}
                for i, names in enumerate(tasks)]

    def run(self, images: Sequence[Union[Image.Image, Tensor]],
            tasks: Sequence[Sequence[str]]) -> list[dict[str, Tensor]]:
        """`forward` on images not yet preprocessed: each is preprocessed once per distinct
        preprocessing among its tasks, and images with the same preprocessing run together."""
        if len(images) != len(tasks):
            raise TapsError(f"got {len(images)} images and {len(tasks)} task lists")
        batches: dict[str, tuple[list[Tensor], list[list[str]], list[int]]] = {}
        for i, (image, names) in enumerate(zip(images, tasks)):
            for group in self.same_preprocessing(dict.fromkeys(names)):
                key = self._entry(group[0]).preprocessing
                pixels, lists, rows = batches.setdefault(key, ([], [], []))
                pixels.append(self.preprocess(group[0], image))
                lists.append(group)
                rows.append(i)
        out: list[dict[str, Tensor]] = [{} for _ in images]
        for pixels, lists, rows in batches.values():
            for row, logits in zip(rows, self.forward(torch.stack(pixels), lists)):
                out[row].update(logits)
        return [{name: out[i][name] for name in dict.fromkeys(names)}
                for i, names in enumerate(tasks)]

    def plan(self) -> SegmentPlan:
        """The tree of segments, with each one's tasks and share of the work."""
        state = self._state
        return make_plan([GroupFacts(
            g.base, g.family, g.stages, g.roots,
            {t: state.entries[t].macs for t in state.entries if t in g.tasks},
            {t: state.entries[t].differs for t in state.entries if t in g.tasks})
            for g in state.groups])

    def footprint(self) -> dict[str, int]:
        """Tensors, numbers and bytes held (parameters and buffers, each storage once)."""
        return footprint_of([self])

    def train(self, mode: bool = True) -> MultiTaskModel:
        """Eval mode only: the tasks share tensors, and training would change them all."""
        if mode:
            raise TapsError("the multi-task model is for inference only")
        return super().train(False)

    def _apply(self, fn: Any, recurse: bool = True) -> MultiTaskModel:
        # .to()/.cuda()/.half() would copy each shared buffer once per task that holds it.
        raise TapsError("the multi-task model stays on the device it was built for: build it "
                        "there (Manager.serving(device=…))")

    # ------------------------------------------------------------------------- loading
    def add_tasks(self, manager: Manager, names: Sequence[str]) -> list[str]:
        """Load further ready tasks (checked as `restore` checks them, and again on this
        model's forward); returns those added. All or nothing: a task that fails its check
        raises, and none of `names` is added."""
        with self._lock:
            state = self._state
            wanted = [n for n in dict.fromkeys(names) if n not in state.entries]
            if not wanted:
                return []
            entries = dict(state.entries)
            try:
                for name in wanted:
                    entries[name] = self._load(manager, name)
            except BaseException:  # forget what the tasks loaded so far brought into the pool
                self._pool.prune(e.model for e in state.entries.values())
                raise
            order = {b.name: i for i, b in enumerate(manager.list_bases())}
            ranked = sorted(entries.values(), key=lambda e: (
                order.get(e.served.base, len(order)), e.served.base, e.served.position))
            entries = {e.served.name: e for e in ranked}
            for name in wanted:
                self.task_models[f"t{len(self.task_models)}"] = entries[name].model
            self._state = _State(entries, _groups(entries),
                                 {n: e.runners for n, e in entries.items()})
            self._pool.prune(e.model for e in entries.values())
        return wanted

    def _load(self, manager: Manager, name: str) -> _Entry:
        models = manager.models
        restored = models.restored(name)
        task, model = restored.task, restored.model
        base = manager.get_base(task.base)
        base_state = models.base_state(base)
        replaced = keep_factors(model, restored.tensors, base_state)
        model.eval().requires_grad_(False)
        img_size = task.dataset_spec.get("img_size")
        probe = restored.probe
        example = (probe["inputs"][:2] if probe["inputs"].numel()
                   else example_input(base.data_config, img_size))
        decomposition = decompose(model, example)
        runners = tuple(s.bind(model) for s in decomposition.stages)
        if not _reproduces(runners, probe) and decomposition.staged:
            log.warning("task %s: its stages do not reproduce its probe logits; it runs whole",
                        name)
            decomposition = whole()
            runners = tuple(s.bind(model) for s in decomposition.stages)
        if not _reproduces(runners, probe):
            raise TapsError(f"task {name!r} does not reproduce its probe logits in the "
                            "multi-task model; not serving it")
        base_digests = self._base_digests.get(base.sha256)
        if base_digests is None:
            base_digests = {k: digest(v) for k, v in base_state.items()}
            self._base_digests[base.sha256] = base_digests
        self._pool.seed({base_digests[k]: v for k, v in base_state.items()})
        macs = tuple(count_macs(model, runners, example))
        self._pool.adopt(model)
        keys, differs = _describe(model, decomposition, self._pool, base_digests,
                                  frozenset(base.head_keys))
        log.debug("task %s: %d stages (%s), %d layers kept as factors", name,
                  len(runners), decomposition.family, len(replaced))
        channels, size = 3, int(img_size or base.data_config["input_size"][-1])
        assert task.artifact is not None and task.position is not None
        served = ServedTask(task.name, task.base, task.method, task.position,
                            list(task.class_names), (channels, size, size), task.artifact.sha256)
        return _Entry(served, model, dict(base.data_config), img_size,
                      data.build_transform(base.data_config, img_size), decomposition, runners,
                      keys, macs, differs)


def footprint_of(models: Iterable[nn.Module]) -> dict[str, int]:
    """Tensors, numbers and bytes the parameters and buffers of `models` hold, each storage
    once (N restored models count N times; a multi-task model counts shared tensors once)."""
    seen: dict[tuple[str, int], int] = {}
    numbers = 0
    for model in models:
        for module in model.modules():
            for t in [*module._parameters.values(), *module._buffers.values()]:
                if t is None:
                    continue
                storage = t.untyped_storage()
                where = (str(t.device), storage.data_ptr())
                if where not in seen:
                    seen[where] = storage.nbytes()
                    numbers += t.numel()
    return {"tensors": len(seen), "numbers": numbers, "bytes": sum(seen.values())}


def _size(size: Sequence[int]) -> str:
    return "×".join(str(s) for s in size)


def _reproduces(runners: Sequence[Runner], probe: dict[str, Tensor]) -> bool:
    """Whether the stages, run in a row, give the task's stored probe logits (within the
    registry's restore tolerance)."""
    inputs, stored = probe["inputs"], probe["logits"]
    if stored.numel() == 0:
        return True
    with torch.no_grad():
        x = inputs
        for run in runners:
            x = run(x)
    drift = float((x.float().cpu() - stored).abs().max())
    return drift <= PROBE_ATOL + PROBE_RTOL * logit_scale(probe)


def _describe(model: nn.Module, decomposition: Decomposition, pool: TensorPool,
              base_digests: dict[str, str], head: frozenset[str]
              ) -> tuple[tuple[str, ...], tuple[tuple[str, ...], ...]]:
    """Each stage's key (what it computes) and what it changes from the base's layers."""
    cache = KeyCache(pool)
    root_tensors = [f"{k}={pool.digest_of(v)}" for k, v in
                    [*model._parameters.items(), *model._buffers.items()] if v is not None]
    keys, differs = [], []
    for stage in decomposition.stages:
        parts = [f"{p}:{cache.key(model.get_submodule(p))}" for p in stage.modules]
        parts += [cache.own(model, with_hooks=False)] if stage.head else root_tensors
        keys.append("|".join([stage.name, *parts]))
        inside = {f"{p}.{n}" if p and n else p or n: m for p in stage.modules
                  for n, m in model.get_submodule(p).named_modules()}
        found = {"head"} if stage.head else set()
        factors = [p for p, m in inside.items() if isinstance(m, LowRankDelta)]
        for path, how in differing(inside, base_digests, pool, head).items():
            if any(path == f or path.startswith(f"{f}.") for f in factors):
                found.add("weights")  # a base layer with the task's low-rank factors
                continue
            if how & {"hooked", "new"}:  # modules a composed method attaches
                found.add("attached modules")
            if "changed" in how:
                found.add("norms" if isinstance(inside[path], NORM_TYPES) else "weights")
        differs.append(tuple(sorted(found)))
    return tuple(keys), tuple(differs)


def _groups(entries: dict[str, _Entry]) -> tuple[_Group, ...]:
    """The trees: the tasks of one base with one decomposition, in registry order."""
    members: dict[tuple[str, str], list[str]] = {}
    for name, entry in entries.items():
        members.setdefault(entry.group, []).append(name)
    out = []
    for (base, family), names in members.items():
        stages = tuple(s.name for s in entries[names[0]].decomposition.stages)
        roots = tree.build(names, {n: entries[n].keys for n in names})
        out.append(_Group(base, family, stages, frozenset(names), tuple(roots)))
    return tuple(out)


def build_multitask(manager: Manager, tasks: Optional[Sequence[str]] = None,
                    base: Optional[str] = None, device: str = "cpu") -> MultiTaskModel:
    """A multi-task model of `tasks`, or of every ready task of `base`, or of every base."""
    if tasks is not None:
        names = list(dict.fromkeys(tasks))
        if base is not None:
            others = [n for n in names if manager.get_task(n).base != base]
            if others:
                raise TapsError(f"task(s) {', '.join(others)} are not tasks of base {base!r}")
    else:
        bases = [base] if base is not None else [b.name for b in manager.list_bases()]
        names = [t.name for b in bases for t in manager.list_tasks(b) if t.status == "ready"]
    if not names:
        where = f"base {base!r}" if base is not None else "the registry"
        raise TapsError(f"no ready task to serve in {where}")
    model = MultiTaskModel(resolve_device(device))
    model.add_tasks(manager, names)
    return model
