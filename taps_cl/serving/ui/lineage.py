"""Who reads whom on a base: the edges of the lineage graph, from the budget report.

A task reads an earlier task's artifact through a pin (AdapterFusion: `depends_on` of its
budget row), or a shared artifact several tasks pin (the shared band and each group band of
progressive adaptation: the report's `shared`, with its readers). Both come from
`Manager.budget` (taps_cl.analysis.reports.BudgetReport), so the graph shows exactly the pins
`report budget --json` lists.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Optional

from registry.entities import TaskSummary
from taps_cl.analysis.reports import BudgetReport
from taps_cl.serving.ui.table import group_of

# How each pin kind is named on the pages (a kind not listed is shown as it is recorded).
PIN_LABELS = {"fusion": "fusion", "progressive_shared": "shared band",
              "progressive_group": "group band"}


@dataclass(frozen=True)
class Band:
    """A shared artifact and the tasks that pin it."""

    sha256: str
    label: str  # "shared band", "group band p-012", …
    kinds: tuple[str, ...]
    readers: tuple[str, ...]  # in sequence order
    num_params: int
    bytes: int


@dataclass(frozen=True)
class Lineage:
    """The tasks that read or are read, and the edges between them and the shared bands."""

    tasks: tuple[str, ...]  # in sequence order
    reads: tuple[tuple[str, str], ...]  # (reader, task read)
    bands: tuple[Band, ...]
    groups: dict[str, tuple[str, ...]]  # group name → its members (tasks pinning its band)

    def reads_of(self, task: str) -> list[str]:
        return [read for reader, read in self.reads if reader == task]

    def readers_of(self, task: str) -> list[str]:
        return [reader for reader, read in self.reads if read == task]


def lineage(budget: BudgetReport, summaries: Sequence[TaskSummary]) -> Lineage:
    """The lineage of a base from its budget report and its tasks' summaries (for group names)."""
    groups_of = {t.name: group_of(t) for t in summaries}
    reads = tuple((row.name, read) for row in budget.tasks for read in row.depends_on)
    bands = []
    groups: dict[str, tuple[str, ...]] = {}
    for use in budget.shared:
        label = " / ".join(PIN_LABELS.get(kind, kind) for kind in use.kinds)
        group = _common(groups_of.get(name) for name in use.tasks)
        if "progressive_group" in use.kinds and group is not None:
            label = f"{label} {group}"
            groups[group] = tuple(use.tasks)
        bands.append(Band(use.sha256, label, tuple(use.kinds), tuple(use.tasks), use.num_params,
                          use.bytes))
    involved = {name for edge in reads for name in edge}
    involved |= {name for band in bands for name in band.readers}
    order = [row.name for row in budget.tasks]
    return Lineage(tuple(name for name in order if name in involved), reads, tuple(bands),
                   groups)


def _common(values: Iterable[Optional[str]]) -> Optional[str]:
    """The one value all of `values` share, or None."""
    seen = set(values)
    return next(iter(seen)) if len(seen) == 1 else None
