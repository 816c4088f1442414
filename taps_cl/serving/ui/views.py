"""What each page shows, gathered from the Manager and the report dataclasses (no HTTP here).

Every figure comes from the values the CLI prints: `Manager.budget`, `accuracy`, `layer_map`,
`similarity`, `task_summaries`, `get_task`, and the JSON documents of taps_cl.analysis.documents.
A view returns the template's context and the page's JSON document (a thunk: only the form
asked for is built). Reports of a whole base are cached per state of the base (cache.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from registry.entities import BaseModel, Task, TaskSummary
from taps_cl.analysis import documents, reports
from taps_cl.errors import TapsError, first_line
from taps_cl.manager import Manager
from taps_cl.serving.ui.cache import ReportCache, Stamp, stamp
from taps_cl.serving.ui.lineage import Lineage, lineage
from taps_cl.serving.ui.table import TableQuery, group_of, table_page

# The base page draws its charts inline up to this many ready tasks; beyond, it links to them.
INLINE_TASKS = 100
# Heatmaps (accuracy, similarity) are drawn up to this many tasks by default ...
HEATMAP_TASKS = 60
# ... and at most this many when asked for (the JSON views have no limit, as the CLI's).
HEATMAP_LIMIT = 200
# `Manager.similarity` reads every ready task's signature: on a page, up to this many tasks.
SIMILARITY_LIMIT = 300
# The layer map reads every ready task's layer rows: on a page, up to this many tasks.
LAYERS_LIMIT = 300
# The final column strip and a task's matrix row show at most this many cells.
STRIP_CELLS = 400


class Reader:
    """One request's reads: the Manager, and the cached reports of each base it touches."""

    def __init__(self, m: Manager, cache: ReportCache) -> None:
        self.m = m
        self.cache = cache
        self._stamps: dict[str, Stamp] = {}

    def stamp(self, base: str) -> Stamp:
        if base not in self._stamps:
            self._stamps[base] = stamp(self.m, base)
        return self._stamps[base]

    def _cached(self, kind: str, base: str, compute: Callable[[], Any]) -> Any:
        return self.cache.get(kind, base, self.stamp(base), compute)

    def summaries(self, base: str) -> list[TaskSummary]:
        """Every task of `base` (ready or training), in sequence order."""
        return self._cached("summaries", base, lambda: self.m.task_summaries(base))  # type: ignore[no-any-return]

    def budget(self, base: str) -> reports.BudgetReport:
        """`Manager.budget(base)`, from the cached summaries (the same rows it reads)."""
        return self._cached("budget", base, lambda: reports.budget(  # type: ignore[no-any-return]
            self.m.get_base(base), self.summaries(base), self.m.registry.list_shared(base)))

    def accuracy(self, base: str) -> reports.AccuracyReport:
        return self._cached("accuracy", base, lambda: self.m.accuracy(base))  # type: ignore[no-any-return]

    def layers(self, base: str) -> reports.LayerMap:
        return self._cached("layers", base, lambda: self.m.layer_map(base))  # type: ignore[no-any-return]

    def similarity(self, base: str) -> reports.SimilarityReport:
        return self._cached("similarity", base, lambda: self.m.similarity(base))  # type: ignore[no-any-return]

    def lineage(self, base: str) -> Lineage:
        return self._cached("lineage", base,  # type: ignore[no-any-return]
                            lambda: lineage(self.budget(base), self.summaries(base)))


@dataclass(frozen=True)
class Verification:
    """A check run from a task page (`report accuracy --verify --task NAME`) and what it found."""

    task: str
    base: str
    report: reports.AccuracyReport
    at: float = field(default_factory=time.time)  # when it finished (seconds since the epoch)

    @property
    def check(self) -> Optional[reports.ProbeCheck]:
        return next((c for c in self.report.checks if c.task == self.task), None)


@dataclass(frozen=True)
class View:
    """A page: its template context and its JSON document (built only when asked for)."""

    context: dict[str, Any]
    document: Callable[[], Any]


# ----------------------------------------------------------------- registry
@dataclass(frozen=True)
class RecordedChecks:
    """What the registry records of the base's checks (no file is read): the re-check of the
    latest add, and the problems its history shows (moved probes, contradictions, chain)."""

    last_task: Optional[str]
    rechecked: tuple[str, ...]  # earlier tasks the latest add re-checked
    changed: tuple[str, ...]  # of those, the ones whose probe logits moved
    problems: tuple[str, ...]  # the unverified report's problems

    @classmethod
    def of(cls, rep: reports.AccuracyReport) -> RecordedChecks:
        n = len(rep.tasks)
        cells = [(name, kind) for name, records in zip(rep.tasks[:-1], rep.recorded)
                 for column, _, kind in records if column == n - 1]
        return cls(rep.tasks[-1] if n else None, tuple(name for name, _ in cells),
                   tuple(name for name, kind in cells if kind == "changed"), rep.problems)


def registry_view(r: Reader, verifications: dict[str, Verification]) -> View:
    bases = r.m.list_bases()
    rows = []
    for b in bases:
        budget = r.budget(b.name)
        rows.append({"base": b, "tasks": r.m.count_tasks(b.name), "ready": len(budget.tasks),
                     "budget": budget, "recorded": RecordedChecks.of(r.accuracy(b.name)),
                     "verified": verifications.get(b.name)})
    return View({"rows": rows}, lambda: documents.base_list_json(bases))


# --------------------------------------------------------------------- base
def base_view(r: Reader, name: str, query: TableQuery) -> View:
    b = r.m.get_base(name)
    total = r.m.count_tasks(name)
    ready = r.m.count_tasks(name, ready_only=True)
    page = table_page(query, total,
                      lambda limit, offset: r.m.task_summaries(name, limit=limit, offset=offset),
                      lambda: r.summaries(name))
    # Each row's × base as the budget report computes it (rows are independent of each other).
    budget_rows = {row.name: row for row in reports.budget(b, page.rows).tasks}
    rows = [{"t": t, "budget": budget_rows.get(t.name), "group": group_of(t)} for t in page.rows]
    context: dict[str, Any] = {"base": b, "total": total, "ready": ready, "page": page,
                               "rows": rows, "inline": ready <= INLINE_TASKS}
    if context["inline"]:
        context.update(charts(r, b))
    return View(context, lambda: [documents.summary_json(t) for t in page.rows])


def charts(r: Reader, b: BaseModel) -> dict[str, Any]:
    """The base page's inline sections for a base of at most INLINE_TASKS ready tasks."""
    acc = r.accuracy(b.name)
    return {"budget": r.budget(b.name), "accuracy": acc,
            "lineage": r.lineage(b.name), "methods": methods(r, b.name),
            **similarity_context(r, b.name), "layers": r.layers(b.name)}


def methods(r: Reader, base: str) -> dict[str, str]:
    return {t.name: t.method for t in r.summaries(base)}


def similarity_context(r: Reader, base: str) -> dict[str, Any]:
    """The similarity report, or why it is not shown; and the groups the tasks were put in."""
    ready = r.m.count_tasks(base, ready_only=True)
    context: dict[str, Any] = {"similarity": None, "similarity_error": None,
                               "groups": r.lineage(base).groups}
    if ready > SIMILARITY_LIMIT:
        context["similarity_error"] = (
            f"{ready:,} ready tasks: the page compares at most {SIMILARITY_LIMIT} "
            f"(`taps-cl report similarity --base {base} --json` compares them all)")
        return context
    try:
        context["similarity"] = r.similarity(base)
    except TapsError as exc:  # e.g. signatures made with another recipe: say so, show the rest
        context["similarity_error"] = first_line(exc)
    return context


# ---------------------------------------------------------- base's report pages
def budget_view(r: Reader, name: str) -> View:
    b = r.m.get_base(name)
    rep = r.budget(name)
    return View({"base": b, "budget": rep, "lineage": r.lineage(name)}, rep.to_json)


def accuracy_view(r: Reader, name: str, summary: Optional[bool]) -> View:
    """The matrix as a heatmap, or (beyond HEATMAP_TASKS, or asked for) its summary."""
    b = r.m.get_base(name)
    rep = r.accuracy(name)
    n = len(rep.tasks)
    summary = n > HEATMAP_TASKS if summary is None else summary
    context = {"base": b, "accuracy": rep, "summary": summary, "n": n,
               "lost": lost_most(rep), "final_names": rep.tasks[:STRIP_CELLS],
               "recorded": RecordedChecks.of(rep), "kinds": final_kinds(rep)}
    return View(context, lambda: rep.to_json(matrix=not summary))


def heatmap_allowed(n: int, summary: bool) -> None:
    """The HTML heatmap's limit (a TapsError, answered 400, beyond it)."""
    if not summary and n > HEATMAP_LIMIT:
        raise TapsError(f"the heatmap draws at most {HEATMAP_LIMIT} tasks and the base has "
                        f"{n:,}: use summary=1, the JSON view, or `taps-cl report accuracy "
                        "--plot`")


def final_kinds(rep: reports.AccuracyReport) -> dict[str, int]:
    """How the final column is known: count of each kind (as `report accuracy --summary`)."""
    kinds: dict[str, int] = {}
    for kind in rep.final_cells:
        kinds[kind or "none"] = kinds.get(kind or "none", 0) + 1
    return dict(sorted(kinds.items()))


def lost_most(rep: reports.AccuracyReport, limit: int = 10) -> list[dict[str, Any]]:
    """The tasks whose accuracy fell most since they were added (diagonal − final)."""
    rows = []
    for i, (name, records) in enumerate(zip(rep.tasks, rep.recorded)):
        added = next((v for j, v, _ in records if j == i), None)
        rows.append({"task": name, "added": added, "now": rep.final[i],
                     "kind": rep.final_cells[i]})
    rows.sort(key=lambda row: -((row["added"] or 0) - (row["now"] or 0)))
    return rows[:limit]


def layers_view(r: Reader, name: str) -> View:
    b = r.m.get_base(name)
    ready = r.m.count_tasks(name, ready_only=True)
    if ready > LAYERS_LIMIT:
        rep = None  # the JSON view still builds it (as `report layers --json` would)
    else:
        rep = r.layers(name)
    return View({"base": b, "layers": rep, "ready": ready, "limit": LAYERS_LIMIT},
                lambda: (rep or r.layers(name)).to_json())


def similarity_view(r: Reader, name: str) -> View:
    b = r.m.get_base(name)
    context = {"base": b, **similarity_context(r, name)}
    return View(context, lambda: r.similarity(name).to_json())


def lineage_view(r: Reader, name: str) -> View:
    b = r.m.get_base(name)
    rep = r.budget(name)
    return View({"base": b, "lineage": r.lineage(name), "methods": methods(r, name)},
                rep.to_json)


# --------------------------------------------------------------------- task
def task_document(m: Manager, t: Task, b: BaseModel) -> dict[str, Any]:
    """`task show NAME --json` of task `t` on its base `b`."""
    return documents.task_show_json(t, b.num_params, m.test_accuracies(t.base).get(t.name),
                                    m.registry.list_dependents(t.name))


def task_view(r: Reader, name: str, verification: Optional[Verification] = None) -> View:
    m = r.m
    t = m.get_task(name)
    b = m.get_base(t.base)
    doc = task_document(m, t, b)
    pins = []
    for pin in t.depends_on:
        artifact = m.registry.get_artifact(pin.sha256)
        pins.append({"pin": pin, "artifact": artifact})
    shared_with = {use.sha256: [n for n in use.tasks if n != name]
                   for use in m.registry.list_shared(t.base)}
    own = [a for a in (t.artifact, t.probe, t.signature) if a is not None]
    evaluations = m.registry.list_evaluations(t.base, tasks=[name])
    context: dict[str, Any] = {
        "task": t, "base": b, "doc": doc, "artifacts": own, "pins": pins,
        "shared_with": shared_with, "evaluations": evaluations, "verification": verification,
        "row": None}
    if t.status == "ready":
        rep = r.accuracy(t.base)
        if name in rep.tasks:
            i = rep.tasks.index(name)
            cells = rep.row(i)[i:i + STRIP_CELLS]
            context["row"] = {"names": rep.tasks[i:i + STRIP_CELLS],
                              "accs": [v for v, _ in cells], "kinds": [k for _, k in cells],
                              "cut": len(rep.tasks) - i > STRIP_CELLS}
    return View(context, lambda: doc)


def verify_task(m: Manager, name: str) -> Verification:
    """`report accuracy --verify --task NAME`: the task's files, rows and probe logits checked
    (reads only), with the report the CLI prints."""
    t = m.get_task(name)
    return Verification(name, t.base, m.accuracy(t.base, verify=True, tasks=[name]))


# ------------------------------------------------------------------- try it
TRY_TASKS = 32  # tasks one upload may ask for (each restores its model)
CHECKBOXES = 100  # up to this many ready tasks the form offers a checkbox each


def try_view(r: Reader, name: str, chosen: Sequence[str] = (),
             results: Optional[dict[str, list[tuple[str, float]]]] = None,
             image: Optional[str] = None) -> View:
    b = r.m.get_base(name)
    ready = r.m.registry.list_task_names(name)
    context = {"base": b, "ready": ready if len(ready) <= CHECKBOXES else None,
               "ready_count": len(ready), "chosen": set(chosen) or set(ready[:TRY_TASKS]),
               "results": results, "image": image, "limit": TRY_TASKS}
    return View(context, lambda: None if results is None else {
        task: documents.predictions_json([image or ""], [top]) for task, top in results.items()})
