"""Budget table, accuracy matrix (with Avalanche-style metrics), layer map, task similarity.

Each report is a frozen dataclass computed from registry entities (no I/O here); `to_json()` gives
the document `taps-cl … --json` prints, whose keys may be added to but never renamed. The plots
of these reports are in `taps_cl.analysis.plots`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any, Optional

from registry.entities import BaseModel, Evaluation, SharedUse, Task, TaskSummary

# An unchanged model on the same data makes the same predictions: its accuracy, a ratio of
# counts, is then the same float. Anything beyond rounding noise is a contradiction.
CONSISTENCY_ATOL = 1e-9


# ----------------------------------------------------------------------- budget
@dataclass(frozen=True)
class ProbeCheck:
    """One task (or base) checked against its files (taps_cl.tasks.verification): recorded facts
    and probe logits."""

    task: str
    max_drift: Optional[float]  # None when the task could not be rebuilt at all
    ok: bool
    error: Optional[str] = None


@dataclass(frozen=True)
class BudgetRow:
    """One ready task's stored size."""

    name: str
    method: str
    task_params: int  # numbers in the task's artifact (deltas, norms, head …)
    head_params: int  # of which the classifier head
    active_layers: int  # layers whose task-specific weights are stored
    total_layers: int  # adaptable layers of the base
    bytes: int  # size of the task's artifact file
    ratio_to_base: Optional[float]  # task_params / base parameters (None for an empty base)
    budget: Optional[float]  # the fraction of the base the task was given (--budget), if any
    budget_used: Optional[float]  # task_params / base parameters, for tasks given a budget
    sha256: Optional[str]  # the artifact's content hash: equal hashes are stored (and counted) once
    depends_on: tuple[str, ...] = ()  # earlier tasks it reads (fusion): counted in their own rows

    def to_json(self) -> dict[str, Any]:
        # Field by field, not dataclasses.asdict (a deep copy): 10,000 rows in milliseconds.
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**row, "depends_on": list(self.depends_on)}


@dataclass(frozen=True)
class BudgetReport:
    """Base + Σ task-specific numbers of one base's ready tasks, against N fine-tunes / probes."""

    base_name: str
    base_model: str  # the base's model spec, e.g. timm:tf_efficientnet_lite0
    base_params: int  # backbone without its classifier: the unit of every ratio
    base_bytes: int  # size of the base's weights file
    tasks: tuple[BudgetRow, ...]  # in sequence order
    total_params: int  # base + each distinct task artifact once
    total_bytes: int  # base weights file + each distinct task artifact file once
    ratio_to_base: Optional[float]  # total_params / base_params
    finetune_total_params: int  # one whole model (backbone + head) per task
    linear_total_params: int  # one shared frozen backbone and a head per task
    # Shared artifacts (progressive bands), each counted once in the totals, with their readers.
    shared: tuple[SharedUse, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "base": {"name": self.base_name, "model": self.base_model,
                     "num_params": self.base_params, "bytes": self.base_bytes},
            "tasks": [row.to_json() for row in self.tasks],
            "shared": [{"sha256": u.sha256, "num_params": u.num_params, "bytes": u.bytes,
                        "kinds": list(u.kinds), "tasks": list(u.tasks)} for u in self.shared],
            "total_params": self.total_params,
            "total_bytes": self.total_bytes,
            "ratio_to_base": self.ratio_to_base,
            "finetune_total_params": self.finetune_total_params,
            "linear_total_params": self.linear_total_params,
        }


def budget(base: BaseModel, tasks: Sequence[Task | TaskSummary],
           shared: Sequence[SharedUse] = ()) -> BudgetReport:
    """The budget of `base`'s ready tasks (others are skipped: they store nothing final yet).

    `shared` are the shared artifacts the tasks pin (`Registry.list_shared`), counted once.

    `tasks` may be full Task entities or the TaskSummary rows `Registry.task_summaries` reads
    without loading layer rows (what `Manager.budget` passes, so 10,000 tasks stay cheap).
    """
    summaries = [t if isinstance(t, TaskSummary) else TaskSummary.of(t) for t in tasks]
    ready = [t for t in summaries if t.status == "ready" and t.sha256 is not None]
    per_base = (lambda n: n / base.num_params) if base.num_params else (lambda n: None)
    rows = []
    for t in ready:
        given = t.method_config.get("budget")
        rows.append(BudgetRow(
            name=t.name, method=t.method, task_params=t.task_params,
            head_params=t.head_params or 0, active_layers=t.active_layers,
            total_layers=t.total_layers, bytes=t.bytes,
            ratio_to_base=per_base(t.task_params),
            budget=None if given is None else float(given),
            budget_used=None if given is None else per_base(t.task_params),
            sha256=t.sha256, depends_on=t.depends_on,
        ))
    # Content addressing: two tasks with byte-identical artifacts share one file.
    distinct = {t.sha256: (t.task_params, t.bytes) for t in ready}
    distinct.update({u.sha256: (u.num_params, u.bytes) for u in shared})
    total = base.num_params + sum(params for params, _ in distinct.values())
    return BudgetReport(
        base_name=base.name, base_model=base.model_spec, base_params=base.num_params,
        base_bytes=base.weights.bytes, tasks=tuple(rows), total_params=total,
        total_bytes=base.weights.bytes + sum(nbytes for _, nbytes in distinct.values()),
        ratio_to_base=per_base(total),
        finetune_total_params=sum(base.num_params + r.head_params for r in rows),
        linear_total_params=base.num_params + sum(r.head_params for r in rows),
        shared=tuple(shared),
    )


# --------------------------------------------------------------------- accuracy
@dataclass(frozen=True)
class AccuracyReport:
    """The accuracy matrix of one base's ready tasks, its metrics, and whether it is verified.

    `verified` is None unless verification ran; it is True only when every artifact, recorded
    fact and probe checked out, no cell was ever recorded as changed, and no cell contradicts
    its task's recorded accuracy. `problems` says why not, one line per finding.
    """

    tasks: tuple[str, ...]  # rows and columns, in sequence order
    # What is stored, per task (row): (column, accuracy, kind) of each recorded cell in column
    # order, kind "measured", "probe" (re-checked, accuracy carried) or "changed" (probe moved).
    # Cells between records are derived (see `cells`); the dense matrix is built on demand.
    recorded: tuple[tuple[tuple[int, Optional[float], str], ...], ...]
    final: tuple[Optional[float], ...]  # R[i][T], recorded or derived
    final_cells: tuple[Optional[str], ...]  # how each final cell is known (kinds of `cells`)
    average_accuracy: Optional[float]  # mean of the final column (None unless complete)
    forgetting: Optional[float]  # mean over i < T of R[i][i] − R[i][T] (None unless complete)
    bwt: Optional[float]  # backward transfer, −forgetting
    complete: bool  # diagonal recorded for every task (the final column then is known)
    changed: tuple[str, ...]  # "A after B": cells whose probe logits were recorded as moved
    contradictions: tuple[str, ...]  # cells that differ from an unchanged task's own accuracy
    max_logit_drift: float  # largest probe drift recorded (or recomputed, with verification)
    verified: Optional[bool]  # None: not verified; see the class docstring
    checks: tuple[ProbeCheck, ...] = ()  # what verification found, one per base/task
    reevaluate_skipped: tuple[str, ...] = ()  # "task: reason" for tasks not re-measured
    problems: tuple[str, ...] = field(default=())  # "task: what is wrong" lines
    verify_seconds: Optional[float] = None  # wall time of the verification (None: not verified)
    verified_tasks: tuple[str, ...] = ()  # the tasks verification checked, in sequence order
    # Links of the base's hash chain that fail (registry.chain): a task's rows were altered.
    chain_problems: tuple[str, ...] = ()

    @cached_property
    def cells(self) -> tuple[tuple[Optional[str], ...], ...]:
        """How each cell R[i][j] is known: a recorded kind, "derived", or None (j < i).

        A cell no add measured is derived from the last record before it in its row: an add
        writes only its own rows and artifacts are never rewritten, so the task is the same
        model as then. It stays "changed" after a cell recorded as changed.
        """
        return tuple(tuple(kind for _, kind in row) for row in self._dense)

    @cached_property
    def matrix(self) -> tuple[tuple[Optional[float], ...], ...]:
        """R[i][j]: task i's accuracy after task j was added (None before task i)."""
        return tuple(tuple(value for value, _ in row) for row in self._dense)

    @cached_property
    def _dense(self) -> list[list[tuple[Optional[float], Optional[str]]]]:
        return [self.row(i) for i in range(len(self.recorded))]

    def row(self, i: int) -> list[tuple[Optional[float], Optional[str]]]:
        """Row i of the matrix as (value, kind) per column, without building the other rows."""
        n = len(self.tasks)
        records = self.recorded[i]
        row: list[tuple[Optional[float], Optional[str]]] = [(None, None)] * n
        for k, (column, value, kind) in enumerate(records):
            end = records[k + 1][0] if k + 1 < len(records) else n
            row[column] = (value, kind)
            carried = "changed" if kind == "changed" else "derived"
            row[column + 1:end] = [(value, carried)] * (end - column - 1)
        return row

    @property
    def stored_cells(self) -> int:
        """Cells the registry stores for this matrix (the rest are derived)."""
        return sum(len(records) for records in self.recorded)

    @property
    def verify_failures(self) -> tuple[ProbeCheck, ...]:
        return tuple(c for c in self.checks if not c.ok)

    @property
    def verify_tasks_per_s(self) -> Optional[float]:
        """Verification throughput: tasks checked per second of wall time (None: not verified)."""
        if not self.verify_seconds:
            return None
        return len(self.verified_tasks) / self.verify_seconds

    @property
    def reason(self) -> Optional[str]:
        """One line saying why the report is not verified (None when it is, or was not checked)."""
        if self.verified is not False:
            return None
        return "verification failed for " + "; ".join(self.problems)

    def to_json(self, matrix: bool = True) -> dict[str, Any]:
        """The JSON document; without `matrix` it leaves out the dense `matrix` and `cells` (a
        base of 10,000 tasks has 10⁸ of each) and keeps the rest, `final` included."""
        dense = {"matrix": [list(row) for row in self.matrix],
                 "cells": [list(row) for row in self.cells]} if matrix else {}
        return {
            "tasks": list(self.tasks),
            **dense,
            "average_accuracy": self.average_accuracy,
            "forgetting": self.forgetting,
            "bwt": self.bwt,
            "complete": self.complete,
            "changed": list(self.changed),
            "contradictions": list(self.contradictions),
            "max_logit_drift": self.max_logit_drift,
            "verified": self.verified,
            "problems": list(self.problems),
            "reevaluate_skipped": list(self.reevaluate_skipped),
            "verify_failures": [asdict(c) for c in self.verify_failures],
            "verify_seconds": self.verify_seconds,
            "verify_tasks_per_s": self.verify_tasks_per_s,
            "verified_tasks": list(self.verified_tasks),
            "final": list(self.final),
            "final_cells": list(self.final_cells),
            "stored_cells": self.stored_cells,
            "chain_problems": list(self.chain_problems),
        }


def accuracy_matrix(
    tasks: Sequence[str | Task], evaluations: Sequence[Evaluation], *,
    checks: Optional[Sequence[ProbeCheck]] = None, reevaluate_skipped: Sequence[str] = (),
    chain_problems: Optional[dict[str, str]] = None,
) -> AccuracyReport:
    """R[i][j]: task i's accuracy after task j was added; the latest record per cell wins.

    Only measured cells are stored (each add records its diagonal and the earlier tasks it
    re-checked); every other cell right of the diagonal is derived from the last record before
    it in its row (AccuracyReport.cells). Everything here is computed from the records, without
    the dense matrix, so a base of 10,000 tasks reports in well under a second.

    Metrics as Avalanche defines them on the final column T: average accuracy = mean_i R[i][T];
    forgetting = mean over i < T of (R[i][i] − R[i][T]); BWT = mean over i < T of
    (R[i][T] − R[i][i]) (so BWT = −forgetting here). Both are 0.0 for a single task.

    `checks` (from `Manager.verify`) makes it a verified report. Whether or not they are given,
    a task never recorded as changed (and not failing its check) is the same model on the same
    data, so every cell of its row must equal the accuracy recorded when it was added; a cell
    that does not (a re-measurement on changed data, or an edited row) is a contradiction.
    `chain_problems` (task → reason, from `Registry.chain_problems`) are problems too.
    """
    names = [t if isinstance(t, str) else t.name for t in tasks]
    index = {name: i for i, name in enumerate(names)}
    n = len(names)
    cells: list[dict[int, tuple[Optional[float], str]]] = [{} for _ in range(n)]
    recorded: list[Optional[float]] = [None] * n  # the first measurement on the diagonal
    drift = 0.0
    changed: list[str] = []
    moved_cells: list[tuple[str, str]] = []  # (task, after) of cells recorded as changed
    for ev in evaluations:
        if ev.task not in index or ev.after_task not in index or ev.split != "test":
            continue
        i, j = index[ev.task], index[ev.after_task]
        # A cell whose probe moved is flagged; its value is a fresh measurement, if any.
        cells[i][j] = (ev.accuracy, "changed" if ev.probe_ok is False else ev.kind)
        if i == j and ev.kind == "measured" and recorded[i] is None:
            recorded[i] = ev.accuracy
        if ev.probe_ok is False:
            changed.append(f"{ev.task} after {ev.after_task}")
            moved_cells.append((ev.task, ev.after_task))
        if ev.max_logit_drift is not None:
            drift = max(drift, ev.max_logit_drift)
    rows = tuple(tuple((j, value, kind) for j, (value, kind) in sorted(row.items()))
                 for row in cells)
    final: list[Optional[float]] = []
    final_cells: list[Optional[str]] = []
    for records in rows:
        if not records:
            final.append(None)
            final_cells.append(None)
            continue
        column, value, kind = records[-1]
        final.append(value)
        final_cells.append(kind if column == n - 1 or kind == "changed" else "derived")
    diagonal = [cells[i].get(i, (None, ""))[0] for i in range(n)]
    # Metrics only from a complete final column: a partial average would hide the missing task.
    complete = n > 0 and all(a is not None for a in final + diagonal)
    forgetting = None
    if complete:
        gaps = [diagonal[i] - final[i] for i in range(n - 1)]  # type: ignore[operator]
        forgetting = sum(gaps) / len(gaps) if gaps else 0.0

    failed = {c.task for c in checks or () if not c.ok}
    failed |= {task for task, _ in moved_cells}  # ever recorded as moved
    contradictions = []
    for i, name in enumerate(names):
        own = recorded[i]
        if own is None or name in failed:
            continue  # nothing to compare with, or a model known to have changed
        for j, value, kind in rows[i]:
            if value is None or abs(value - own) <= CONSISTENCY_ATOL:
                continue
            how = "re-measured" if kind == "measured" else "carried"
            contradictions.append(
                f"{name}: {how} accuracy {100 * value:.2f}% after {names[j]} differs from its "
                f"recorded {100 * own:.2f}% although its model is unchanged "
                "(its data changed, or rows were edited)")
            break  # one line per task is enough to say it is wrong

    chain_lines = tuple(f"{name}: {why}" for name, why in (chain_problems or {}).items())
    verified = None
    problems = [f"{c.task}: {_failure(c)}" for c in checks or () if not c.ok]
    problems += [f"{task}: probe logits changed after {after}" for task, after in moved_cells]
    problems += contradictions
    problems += chain_lines
    if checks is not None:
        drift = max((c.max_drift for c in checks if c.max_drift is not None), default=0.0)
        # Interference-free means now (every probe recomputes), in the recorded history, and in
        # every number shown beside it.
        verified = not problems
    return AccuracyReport(
        tasks=tuple(names),
        recorded=rows,
        final=tuple(final),
        final_cells=tuple(final_cells),
        average_accuracy=sum(final) / n if complete else None,  # type: ignore[arg-type]
        forgetting=forgetting,
        bwt=None if forgetting is None else (-forgetting if forgetting else 0.0),
        complete=complete,
        changed=tuple(changed),
        contradictions=tuple(contradictions),
        max_logit_drift=drift,
        verified=verified,
        checks=tuple(checks or ()),
        reevaluate_skipped=tuple(reevaluate_skipped),
        problems=tuple(problems),
        chain_problems=chain_lines,
    )


def _failure(check: ProbeCheck) -> str:
    if check.error:
        return check.error
    return "failed" if check.max_drift is None else f"max drift {check.max_drift:.3g}"


# -------------------------------------------------------------------- layer map
@dataclass(frozen=True)
class LayerMap:
    """Which adaptable layers each task turned on."""

    tasks: tuple[str, ...]  # rows, in sequence order
    methods: tuple[str, ...]  # each task's method
    layers: tuple[str, ...]  # columns: every layer any task records, in the backbone's order
    active: tuple[tuple[Optional[bool], ...], ...]  # active[i][k]; None: task i has no such layer

    def to_json(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "methods": list(self.methods),
                "layers": list(self.layers), "active": [list(row) for row in self.active]}


def layer_map(tasks: Sequence[Task]) -> LayerMap:
    """Which adaptable layers each task turned on (layers in the backbone's order)."""
    layers: list[str] = []
    seen: set[str] = set()
    for task in tasks:
        for layer in task.layers:
            if layer.name not in seen:
                seen.add(layer.name)
                layers.append(layer.name)
    active = []
    for task in tasks:
        on = {layer.name: layer.active for layer in task.layers}
        active.append(tuple(on.get(name) for name in layers))
    return LayerMap(tasks=tuple(t.name for t in tasks), methods=tuple(t.method for t in tasks),
                    layers=tuple(layers), active=tuple(active))


# -------------------------------------------------------------------- similarity
@dataclass(frozen=True)
class SimilarityReport:
    """Cosine similarity of the gradient signatures of a base's tasks (taps_cl.analysis.similarity).

    Built by `Manager.similarity`, which reads the stored signatures and, for `--data`, computes
    a candidate's signature without recording anything.
    """

    base_name: str
    tasks: tuple[str, ...]  # ready tasks that have a signature, in sequence order
    matrix: tuple[tuple[float, ...], ...]  # matrix[i][j] = cos(signature_i, signature_j)
    # Automatic grouping of `tasks` (similarity.cluster), numbered by first appearance.
    groups: tuple[int, ...]
    threshold: float  # the distance 1 − cosine below which the grouping merged
    # Ready tasks left out of the matrix and why (e.g. added before signatures were recorded).
    without_signature: tuple[tuple[str, str], ...] = ()
    candidate: Optional[str] = None  # the data spec given with --data
    candidate_row: Optional[tuple[float, ...]] = None  # cos(candidate, task_j) for each task

    @property
    def closest(self) -> Optional[str]:
        """The task most similar to the candidate (None without a candidate or tasks)."""
        if not self.candidate_row:
            return None
        return self.tasks[max(range(len(self.tasks)), key=self.candidate_row.__getitem__)]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"base": self.base_name, "tasks": list(self.tasks),
                               "matrix": [list(row) for row in self.matrix]}
        if self.tasks:
            doc["groups"] = list(self.groups)
            doc["threshold"] = self.threshold
        if self.candidate is not None:
            doc["candidate"] = {"name": self.candidate, "row": list(self.candidate_row or ()),
                                "closest": self.closest}
        doc["without_signature"] = [{"name": name, "reason": reason}
                                    for name, reason in self.without_signature]
        return doc
