"""The tree of segments a multi-task batch runs through, and running it.

Tasks of one base with the same stages (`taps_cl/models/stages.py`) start together at the root.
At each stage they split by what the stage computes for them (its key, `identity.KeyCache`); a
group that already split never joins again, because its inputs differ. A *segment* is a run of
stages over which one group stays together: it runs once, on the concatenation of the images of
all its tasks, with the modules of one of them (all compute the same function), and its output
is split by index between its children. A leaf's output is its tasks' logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from taps_cl.models.stages import Runner


@dataclass
class Segment:
    """Stages `first`…`last` (indices) run once for `tasks`, with the modules of `runner`'s task."""

    first: int
    last: int
    tasks: tuple[str, ...]
    runner: str  # the task whose modules run it (any of `tasks`: they compute the same)
    children: list[Segment] = field(default_factory=list)

    @property
    def task_set(self) -> frozenset[str]:
        return frozenset(self.tasks)


def build(tasks: Sequence[str], keys: Mapping[str, Sequence[str]], start: int = 0) -> list[Segment]:
    """The segments from stage `start` on for `tasks` (in order), given each one's stage keys."""
    if not tasks or start >= len(keys[tasks[0]]):
        return []
    groups: dict[str, list[str]] = {}
    for task in tasks:
        groups.setdefault(keys[task][start], []).append(task)
    out = []
    for members in groups.values():
        last, end = start, len(keys[members[0]])
        while last + 1 < end and len({keys[t][last + 1] for t in members}) == 1:
            last += 1
        segment = Segment(start, last, tuple(members), members[0])
        segment.children = build(members, keys, last + 1)
        out.append(segment)
    return out


def walk(segments: Sequence[Segment], depth: int = 0,
         parent: Segment | None = None) -> list[tuple[int, Segment | None, Segment]]:
    """(depth, parent, segment) of every segment, depth first, parents before children."""
    out: list[tuple[int, Segment | None, Segment]] = []
    for segment in segments:
        out.append((depth, parent, segment))
        out += walk(segment.children, depth + 1, segment)
    return out


def run(roots: Sequence[Segment], runners: Mapping[str, Sequence[Runner]], images: Tensor,
        rows: Sequence[int], wants: Sequence[frozenset[str]]) -> dict[tuple[int, str], Tensor]:
    """Logits (CPU, float32) by (row, task) for every task each row of `images` wants.

    `rows` are the images' indices in the caller's batch (`wants` is indexed by them); only the
    segments some row needs run, each on the rows that need it.
    """
    out: dict[tuple[int, str], Tensor] = {}

    def visit(segment: Segment, x: Tensor, at: list[int]) -> None:
        stages = runners[segment.runner]
        for index in range(segment.first, segment.last + 1):
            x = stages[index](x)
        if not segment.children:
            logits = x.float().cpu()
            for i, row in enumerate(at):
                for task in segment.tasks:
                    if task in wants[row]:
                        out[(row, task)] = logits[i]
            return
        descend(segment.children, x, at)

    def descend(children: Sequence[Segment], x: Tensor, at: list[int]) -> None:
        for child in children:
            names = child.task_set
            picked = [i for i, row in enumerate(at) if wants[row] & names]
            if not picked:
                continue
            if len(picked) == len(at):
                visit(child, x, at)
            else:
                index = torch.tensor(picked, device=x.device)
                visit(child, x.index_select(0, index), [at[i] for i in picked])

    descend(roots, images, list(rows))
    return out
