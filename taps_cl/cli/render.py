"""Rendering for the command line: one JSON document with --json, else tables and lines of text.

Nothing is computed here: renderers turn what the Python API returned into lines, and `say`
prints them; no other module of the command line prints."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Optional

import click

from taps_cl.analysis import reports
from taps_cl.analysis.documents import dumps

# Rows a human table shows when no --limit is given (--json always lists every row).
TABLE_ROWS = 50
# Beyond this many tasks `report accuracy` prints a summary instead of the N × N matrix.
SUMMARY_ABOVE = 20


class Context:
    """What every command gets: the manager and the output mode."""

    def __init__(self, manager: Any, as_json: bool, args: Sequence[str] = ()) -> None:
        self.manager = manager  # the taps_cl.manager.Manager every command calls
        self.json = as_json
        self.args = list(args)  # the command line being run

    def emit(self, data: Any, text: Callable[[], Iterable[str]]) -> None:
        """One JSON document on stdout with --json, else the lines `text()` renders."""
        if self.json:
            # allow_nan=False: the document must parse with any JSON reader (jq, JavaScript).
            # Indented on a terminal; compact into a pipe or file, where Python's C encoder
            # writes the 10,000 rows of a large registry several times faster.
            # The compact form is documents.dumps, which the web overview's JSON views share.
            if sys.stdout.isatty():
                click.echo(json.dumps(data, indent=2, default=str, allow_nan=False))
            else:
                click.echo(dumps(data))
        else:
            say(*text())


pass_ctx = click.make_pass_decorator(Context)


def line(text: str) -> list[str]:
    """A rendering of one line."""
    return [text]


def say(*lines: str, err: bool = False) -> None:
    """Print lines (on stderr with `err`): every line the command line prints goes through here."""
    for text in lines:
        click.echo(text, err=err)


def progress() -> bool:
    return sys.stderr.isatty()


def table(headers: list[str], rows: list[list[Any]]) -> Iterator[str]:
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    yield "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    yield "  ".join("-" * w for w in widths)
    for row in cells:
        yield "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def more(count: int, hint: str) -> Iterator[str]:
    """The line under a table that was cut: how many rows are not shown, and how to see them."""
    if count > 0:
        yield f"… {count:,} more ({hint})"


def budget_text(rep: reports.BudgetReport, limit: Optional[int] = None) -> Iterator[str]:
    yield (f"base {rep.base_name} ({rep.base_model}): {rep.base_params:,} parameters, "
               f"{rep.base_bytes:,} bytes")
    if limit is None:
        limit = len(rep.tasks) if len(rep.tasks) <= TABLE_ROWS else TABLE_ROWS
    yield from table(["task", "method", "layers", "params", "bytes", "× base", "budget", "reads"],
           [[t.name, t.method, f"{t.active_layers}/{t.total_layers}", t.task_params, t.bytes,
             ratio(t.ratio_to_base),
             "-" if t.budget is None else f"{t.budget:.3f} (used {ratio(t.budget_used)})",
             ",".join(t.depends_on) or "-"]
            for t in rep.tasks[:limit]])
    yield from more(len(rep.tasks) - limit, "use --limit/--json")
    for use in rep.shared:
        yield (f"shared {use.sha256[:12]}… ({', '.join(use.kinds)}): {use.num_params:,} "
                   f"parameters, {use.bytes:,} bytes, counted once; read by "
                   f"{', '.join(use.tasks)}")
    yield (f"total: {rep.total_params:,} parameters ({rep.total_bytes:,} bytes) = "
               f"{ratio(rep.ratio_to_base)}× base; {len(rep.tasks)} fine-tuned models: "
               f"{rep.finetune_total_params:,}; linear probes: {rep.linear_total_params:,}")


def ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def accuracy_text(rep: reports.AccuracyReport, full: bool = False, limit: int = 10,
                   summary: bool = False) -> Iterator[str]:
    names = list(rep.tasks)
    if not summary and (full or len(names) <= SUMMARY_ABOVE):
        rows = []
        for name, row, kinds in zip(names, rep.matrix, rep.cells):
            rows.append([name] + [
                "-" if k is None else f"CHANGED {pct(v)}" if k == "changed"
                else pct(v) + {"probe": "*", "derived": "~"}.get(k, "")
                for v, k in zip(row, kinds)])
        yield from table(["task \\ after"] + names, rows)
        yield ("* probe-checked when recorded: logits on the stored probe batch unchanged, "
                   "so the accuracy is the measured one")
        if any(k == "derived" for row in rep.cells for k in row):
            yield ("~ derived: not re-checked by that add, which wrote only its own rows; "
                       "the task is the same model as at its last record")
    else:
        yield from accuracy_summary(rep, limit)
    yield (f"average accuracy {pct(rep.average_accuracy)}%, "
               f"forgetting {pct(rep.forgetting)} points, BWT {pct(rep.bwt)} points"
               + ("" if rep.complete else " (final column incomplete)"))
    for cell in rep.changed:
        yield f"WARNING: probe logits changed for {cell}"
    for line in rep.contradictions:
        yield f"WARNING: {line}"
    for line in rep.chain_problems:
        yield f"WARNING: hash chain broken at {line}"
    for line in rep.reevaluate_skipped:
        yield f"not re-evaluated: {line}"
    if rep.verify_seconds is not None:
        rate = rep.verify_tasks_per_s
        yield (f"verify: {len(rep.verified_tasks)} tasks checked in "
                   f"{rep.verify_seconds:.1f} s ({'-' if rate is None else f'{rate:.2f}'} "
                   "tasks/s)")
    # "verified" is printed only for a report whose every check and every number agree.
    if rep.verified:
        yield (f"verified: interference-free — every artifact matches its sha256, every "
                   f"recorded fact its artifact, every task's probe logits are unchanged "
                   f"(max drift {rep.max_logit_drift:.3g}) and every cell agrees with them")
    elif rep.verified is False:
        yield (f"NOT verified: {len(rep.problems)} problem(s); the figures above are not "
                   "confirmed")


def accuracy_summary(rep: reports.AccuracyReport, limit: int) -> Iterator[str]:
    """The matrix of a long sequence in a few lines: counts, and the tasks that lost most."""
    kinds: dict[str, int] = {}
    for kind in rep.final_cells:
        kinds[kind or "none"] = kinds.get(kind or "none", 0) + 1
    how = ", ".join(f"{count:,} {kind}" for kind, count in sorted(kinds.items()))
    yield f"{len(rep.tasks):,} tasks; {rep.stored_cells:,} stored cells; final column: {how}"
    diagonal = {name: next((v for j, v, _ in records if j == i), None)
                for i, (name, records) in enumerate(zip(rep.tasks, rep.recorded))}
    rows = [(name, diagonal[name], final, kind)
            for name, final, kind in zip(rep.tasks, rep.final, rep.final_cells)]
    lost = sorted(rows, key=lambda r: -((r[1] or 0) - (r[2] or 0)))[:limit]
    yield (f"the {len(lost)} task(s) that lost most since they were added "
               "(the full matrix: --full, --json or --plot):")
    yield from table(["task", "when added", "now", "known by"],
           [[name, pct(added), pct(now), kind or "-"] for name, added, now, kind in lost])


def similarity_text(rep: reports.SimilarityReport) -> Iterator[str]:
    if rep.tasks:
        yield from table(["task \\ task", "group"] + list(rep.tasks),
               [[name, group] + [f"{v:.2f}" for v in row]
                for name, group, row in zip(rep.tasks, rep.groups, rep.matrix)])
        yield (f"groups: average linkage on 1 − cosine, merged below distance "
                   f"{rep.threshold:g}")
    else:
        yield f"base {rep.base_name}: no task has a signature"
    if rep.candidate is not None:
        yield (f"candidate {rep.candidate}: "
                   + (", ".join(f"{name} {v:.2f}" for name, v in
                                zip(rep.tasks, rep.candidate_row or ())) or "no task to compare")
                   + (f"; most similar: {rep.closest}" if rep.closest else ""))
    for name, reason in rep.without_signature:
        yield f"left out: {name}: {reason}"


def launched_output(run: Any, debug: bool) -> None:
    """What the processes of `task add --nproc N` printed: rank 0's output, and the others'
    errors where the run failed or with --debug."""
    click.echo(run.stdout, nl=False)
    if run.returncode == 0 or debug:
        for text in run.rank_stderr.values():
            click.echo(text, err=True, nl=False)
    if debug:
        click.echo(run.torchrun_stderr, err=True, nl=False)


def plan_text(plan: Any, names: int = 6) -> Iterator[str]:
    """A multi-task model's segment plan (taps_cl.serving.plan.SegmentPlan) as an indented tree:
    each segment's stages, tasks, share of the work and what it changes from the base."""
    tasks = sum(len(b.tasks) for b in plan.bases)
    yield (f"{tasks} task(s) on {len(plan.bases)} base(s); every task on one image: "
           f"{plan.shared_macs:,} MACs shared vs {plan.separate_macs:,} one task at a time "
           f"({plan.saving:.2f}× less work)")
    for b in plan.bases:
        how = (f"{b.family}, {len(b.stages)} stages" if b.family != "whole"
               else "no stage decomposition: every task runs whole")
        whole = (f"; run whole: {', '.join(b.whole)}"
                 if b.whole and b.family != "whole" else "")
        yield f"base {b.base}: {how}{whole}"

    def listed(items: Sequence[str]) -> str:
        shown = ", ".join(items[:names])
        return shown + (f" +{len(items) - names} more" if len(items) > names else "")

    yield from table(
        ["segment", "stages", "tasks", "share", "of a task", "differs from base"],
        [[f"{'  ' * s.depth}{s.id}", s.first if s.first == s.last else f"{s.first} … {s.last}",
          listed(s.tasks), f"{100 * s.share:.1f}%", f"{100 * s.fraction:.1f}%",
          ", ".join(s.differs) or "nothing (the base's layers)"]
         for s in plan.segments])
