"""The segment plan of a multi-task model: which tasks share which stages, at what cost.

Work is counted as multiply-accumulates (MACs) of the convolutions and linear layers a stage runs
on one image of its task's input size (`count_macs`: forward hooks on the task model's own
modules, attached adapters and kept low-rank factors included; attention products, norms and
activations are not counted). A segment's `share` is its part of the work of running every
served task on one image with sharing; `fraction` is its part of one of its tasks' whole forward
pass. `differs` says what the segment's stages change from the base's: "norms" (normalisation
statistics or affine parameters), "weights" (convolution/linear weights, full or low-rank),
"attached modules" (adapters, fusion layers) or "head". A task whose norms are its own from the
first norm layer on shares nothing but the input with the others, and its segment says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from taps_cl.models.stages import Runner
from taps_cl.serving import tree


@dataclass(frozen=True)
class PlanSegment:
    """One segment of the plan (see the module docstring)."""

    id: int
    parent: Optional[int]  # the segment whose output it reads (None: it reads the images)
    depth: int
    base: str
    stages: tuple[str, ...]  # stage names, first to last
    tasks: tuple[str, ...]
    macs: int  # on one image, the segment run once
    share: float  # of `SegmentPlan.shared_macs`
    fraction: float  # of one of its tasks' whole forward pass
    differs: tuple[str, ...]  # what its stages change from the base's (empty: the base's layers)

    @property
    def first(self) -> str:
        return self.stages[0]

    @property
    def last(self) -> str:
        return self.stages[-1]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "parent": self.parent, "depth": self.depth, "base": self.base,
                "first": self.first, "last": self.last, "stages": list(self.stages),
                "tasks": list(self.tasks), "macs": self.macs, "flops": 2 * self.macs,
                "share": self.share, "fraction": self.fraction, "differs": list(self.differs)}


@dataclass(frozen=True)
class BasePlan:
    """How one base's tasks are run: the stages of its architecture, or the whole model."""

    base: str
    family: str  # the stage decomposition used ("whole": the architecture has none)
    stages: tuple[str, ...]
    tasks: tuple[str, ...]
    whole: tuple[str, ...]  # tasks run as whole models (their architecture has no stages)

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "family": self.family, "stages": list(self.stages),
                "tasks": list(self.tasks), "whole": list(self.whole)}


@dataclass(frozen=True)
class SegmentPlan:
    """The tree of segments of a multi-task model, depth first."""

    bases: tuple[BasePlan, ...]
    segments: tuple[PlanSegment, ...]
    shared_macs: int  # every served task on one image, each segment once
    separate_macs: int  # the same, every task's whole forward pass on its own

    @property
    def saving(self) -> float:
        """How many times less work sharing does than running each task on its own."""
        return self.separate_macs / self.shared_macs if self.shared_macs else 1.0

    def to_json(self) -> dict[str, Any]:
        return {"bases": [b.to_json() for b in self.bases],
                "segments": [s.to_json() for s in self.segments],
                "shared_macs": self.shared_macs, "separate_macs": self.separate_macs,
                "shared_flops": 2 * self.shared_macs, "separate_flops": 2 * self.separate_macs,
                "saving": self.saving}


@dataclass(frozen=True)
class GroupFacts:
    """What the plan needs of one tree: tasks of one base run with one stage decomposition."""

    base: str
    family: str
    stages: tuple[str, ...]
    roots: Sequence[tree.Segment]
    macs: Mapping[str, Sequence[int]]  # per task, per stage
    differs: Mapping[str, Sequence[tuple[str, ...]]]  # per task, per stage


def make_plan(groups: Sequence[GroupFacts]) -> SegmentPlan:
    """The plan of the given trees (segment ids in depth-first order, from 1)."""
    rows: list[tuple[GroupFacts, int, Optional[int], tree.Segment, int]] = []
    ids: dict[int, int] = {}
    for group in groups:
        for depth, parent, segment in tree.walk(group.roots):
            ids[id(segment)] = len(ids) + 1
            macs = sum(group.macs[segment.runner][segment.first:segment.last + 1])
            rows.append((group, depth, None if parent is None else ids[id(parent)], segment,
                         macs))
    shared = sum(r[4] for r in rows)
    separate = sum(sum(g.macs[t]) for g in groups for t in g.macs)
    segments = []
    for group, depth, parent, segment, macs in rows:
        whole = sum(group.macs[segment.runner]) or 1
        found = sorted({c for i in range(segment.first, segment.last + 1)
                        for c in group.differs[segment.runner][i]})
        segments.append(PlanSegment(
            id=ids[id(segment)], parent=parent, depth=depth, base=group.base,
            stages=group.stages[segment.first:segment.last + 1], tasks=segment.tasks,
            macs=macs, share=macs / shared if shared else 0.0, fraction=macs / whole,
            differs=tuple(found)))
    by_base: dict[str, list[GroupFacts]] = {}
    for group in groups:
        by_base.setdefault(group.base, []).append(group)
    bases = []
    for name, members in by_base.items():
        main = next((g for g in members if g.family != "whole"), members[0])
        bases.append(BasePlan(name, main.family, main.stages,
                              tuple(t for g in members for t in g.macs),
                              tuple(t for g in members if g.family == "whole" for t in g.macs)))
    return SegmentPlan(tuple(bases), tuple(segments), shared, separate)


def count_macs(model: nn.Module, runners: Sequence[Runner], example: Tensor) -> list[int]:
    """MACs of each stage of `model` on `example` (one image; see the module docstring)."""
    counted = [0]

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if not isinstance(output, Tensor):
            return
        if isinstance(module, nn.Conv2d):
            kernel = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
            counted[0] += output.numel() * kernel
        elif isinstance(module, nn.Linear):
            counted[0] += output.numel() * module.in_features
        extra = getattr(module, "extra_macs", None)
        if callable(extra):
            counted[0] += int(extra(output))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    out = []
    try:
        x = example[:1]
        with torch.no_grad():
            for run in runners:
                counted[0] = 0
                x = run(x)
                out.append(counted[0])
    finally:
        for handle in handles:
            handle.remove()
    return out
