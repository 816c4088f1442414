"""The pages' charts as inline SVG, drawn from the report dataclasses (no script, no download).

Every chart is a function of one report (taps_cl.analysis.reports) returning markup; each
drawn cell or bar carries its figure in a `<title>` (shown on hover) and in data attributes, so
a test reads back exactly what was drawn. Accuracy cells are marked as `report accuracy` marks
them: `*` probe-checked, `~` derived, `!` changed (the CLI's CHANGED).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Optional
from urllib.parse import quote

from markupsafe import Markup, escape

from registry.entities import LayerEntry
from taps_cl.analysis.reports import AccuracyReport, BudgetReport, LayerMap, SimilarityReport
from taps_cl.serving.ui.lineage import Lineage

# The CLI's marks of how an accuracy cell is known (taps_cl/cli/render.py, accuracy_text).
CELL_MARKS = {"measured": "", "probe": "*", "derived": "~", "changed": "!"}
# viridis at five stops: accuracy 0 → 1.
_SEQUENTIAL = ((0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)),
               (0.75, (94, 201, 98)), (1.0, (253, 231, 37)))
# blue → white → red: cosine −1 → 1.
_DIVERGING = ((0.0, (33, 102, 172)), (0.5, (247, 247, 247)), (1.0, (178, 24, 43)))
_GROUP_COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02",
                  "#a6761d", "#666666")


def task_url(name: str) -> str:
    return f"/tasks/{quote(name, safe='')}"


def colour(value: float, stops: Sequence[tuple[float, tuple[int, int, int]]]) -> str:
    """`value` in [0, 1] as an interpolated hex colour of `stops`."""
    value = min(1.0, max(0.0, value))
    for (x0, c0), (x1, c1) in zip(stops, stops[1:]):
        if value <= x1:
            t = 0.0 if x1 == x0 else (value - x0) / (x1 - x0)
            return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(c0, c1))
    return "#" + "".join(f"{c:02x}" for c in stops[-1][1])


def _ink(fill: str) -> str:
    """Black or white text, whichever reads on `fill`."""
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def _svg(width: float, height: float, body: Iterable[str], label: str, cls: str) -> Markup:
    return Markup(
        f'<svg class="chart {cls}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="{escape(label)}" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}">' + "".join(body) + "</svg>")


def _short(name: str, most: int = 22) -> str:
    return name if len(name) <= most else name[:most - 1] + "…"


def _cell_size(n: int, room: int = 560, least: int = 6, most: int = 34) -> int:
    return max(least, min(most, room // max(n, 1)))


def _labels(names: Sequence[str], left: float, top: float, cell: int,
            links: bool = True) -> list[str]:
    """Row labels to the left of a grid and column labels above it (rotated)."""
    parts = []
    size = min(12, max(7, cell - 2))
    for i, name in enumerate(names):
        text = (f'<text x="{left - 6}" y="{top + i * cell + cell / 2 + size / 3:.1f}" '
                f'text-anchor="end" font-size="{size}">{escape(_short(name))}</text>')
        parts.append(f'<a href="{escape(task_url(name))}">{text}</a>' if links else text)
        x = left + i * cell + cell / 2 + size / 3
        parts.append(f'<text x="{x:.1f}" y="{top - 6}" font-size="{size}" '
                     f'transform="rotate(-60 {x:.1f} {top - 6})">{escape(_short(name))}</text>')
    return parts


# --------------------------------------------------------------------- budget
def budget_chart(rep: BudgetReport, most: int = 40) -> Markup:
    """Totals (stored, N fine-tunes, N linear probes) and each task's stored numbers.

    With more than `most` tasks the largest `most` are drawn (the table lists them all)."""
    bar_left, bar_room, row = 230, 430, 22
    shared = sum(u.num_params for u in rep.shared)
    stored_tasks = rep.total_params - rep.base_params - shared
    totals = [("stored: base + tasks", rep.total_params,
               [(rep.base_params, "#9e9e9e", "base"), (stored_tasks, "#1f77b4", "tasks"),
                (shared, "#ff7f0e", "shared bands")]),
              (f"{len(rep.tasks)} fine-tuned models", rep.finetune_total_params,
               [(rep.finetune_total_params, "#d62728", "fine-tunes")]),
              (f"base + {len(rep.tasks)} linear probes", rep.linear_total_params,
               [(rep.linear_total_params, "#8c564b", "linear probes")])]
    top = max(t[1] for t in totals) or 1
    parts = ['<text x="0" y="14" font-weight="bold" font-size="13">Parameters stored</text>']
    y = 26
    for label, total, pieces in totals:
        parts.append(f'<text x="{bar_left - 8}" y="{y + 15}" text-anchor="end" '
                     f'font-size="12">{escape(label)}</text>')
        x = float(bar_left)
        for value, fill, what in pieces:
            width = bar_room * value / top
            if width > 0:
                parts.append(f'<rect x="{x:.1f}" y="{y}" width="{width:.1f}" height="{row - 4}" '
                             f'fill="{fill}"><title>{escape(what)}: {value:,}</title></rect>')
            x += width
        ratio = "" if not rep.base_params else f" ({total / rep.base_params:.2f}× base)"
        parts.append(f'<text class="total" x="{x + 6:.1f}" y="{y + 15}" font-size="12" '
                     f'data-params="{total}">{total:,}{ratio}</text>')
        y += row + 4
    rows = sorted(rep.tasks, key=lambda r: -r.task_params)[:most] if len(rep.tasks) > most \
        else list(rep.tasks)
    if rows:
        y += 14
        heading = "Each task's own numbers" + (
            f" (the {most} largest of {len(rep.tasks):,})" if len(rep.tasks) > most else "")
        parts.append(f'<text x="0" y="{y}" font-weight="bold" font-size="13">'
                     f'{escape(heading)}</text>')
        y += 10
        largest = max(r.task_params for r in rows) or 1
        for r in rows:
            width = bar_room * r.task_params / largest
            ratio = "-" if r.ratio_to_base is None else f"{r.ratio_to_base:.4f}× base"
            parts.append(f'<a href="{escape(task_url(r.name))}"><text x="{bar_left - 8}" '
                         f'y="{y + 13}" text-anchor="end" font-size="12">'
                         f'{escape(_short(r.name, 30))}</text></a>')
            parts.append(f'<rect class="task-bar" data-task="{escape(r.name)}" '
                         f'data-params="{r.task_params}" x="{bar_left}" y="{y}" '
                         f'width="{max(width, 1):.1f}" height="{row - 6}" fill="#1f77b4">'
                         f'<title>{escape(r.name)}: {r.task_params:,} numbers, {r.bytes:,} bytes'
                         f'</title></rect>')
            parts.append(f'<text x="{bar_left + width + 6:.1f}" y="{y + 13}" font-size="11">'
                         f'{r.task_params:,} ({ratio})</text>')
            y += row - 2
    return _svg(bar_left + bar_room + 190, y + 8, parts, "budget", "budget")


# ------------------------------------------------------------------- accuracy
def accuracy_heatmap(rep: AccuracyReport) -> Markup:
    """R[i][j] as coloured cells; marks as the CLI's (`*` probe, `~` derived, `!` changed)."""
    names = list(rep.tasks)
    n = len(names)
    cell = _cell_size(n)
    left, top = 170, 130
    parts = _labels(names, left, top, cell)
    for i, (row, kinds) in enumerate(zip(rep.matrix, rep.cells)):
        for j, (value, kind) in enumerate(zip(row, kinds)):
            if kind is None:
                continue
            x, y = left + j * cell, top + i * cell
            fill = "#ffffff" if value is None else colour(value, _SEQUENTIAL)
            shown = "-" if value is None else f"{100 * value:.2f}%"
            stroke = ' stroke="#d62728" stroke-width="2"' if kind == "changed" else ""
            parts.append(
                f'<rect class="cell" data-task="{escape(names[i])}" '
                f'data-after="{escape(names[j])}" data-kind="{kind}" '
                f'data-value="{"" if value is None else repr(value)}" x="{x}" y="{y}" '
                f'width="{cell - 1}" height="{cell - 1}" fill="{fill}"{stroke}>'
                f'<title>{escape(names[i])} after {escape(names[j])}: {shown} ({kind})</title>'
                f'</rect>')
            if kind == "derived":
                parts.append(f'<rect x="{x}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                             f'fill="url(#derived)" pointer-events="none"/>')
            mark = CELL_MARKS.get(kind, "")
            if cell >= 30 and value is not None:
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                             f'text-anchor="middle" font-size="10" fill="{_ink(fill)}" '
                             f'pointer-events="none">{100 * value:.0f}{mark}</text>')
            elif mark and cell >= 12:
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                             f'text-anchor="middle" font-size="{min(10, cell - 2)}" '
                             f'fill="{_ink(fill)}" pointer-events="none">{mark}</text>')
    defs = ('<defs><pattern id="derived" width="6" height="6" patternUnits="userSpaceOnUse" '
            'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" '
            'stroke="#ffffff" stroke-opacity="0.45" stroke-width="2"/></pattern></defs>')
    return _svg(left + n * cell + 20, top + n * cell + 10, [defs, *parts], "accuracy matrix",
                "accuracy")


def accuracy_strip(names: Sequence[str], values: Sequence[Optional[float]],
                   kinds: Sequence[Optional[str]], most: int = 400) -> Markup:
    """One row of cells (a task's row of the matrix, or the final column) with their marks."""
    shown = list(zip(names, values, kinds))[:most]
    cell = max(4, min(28, 720 // max(len(shown), 1)))
    parts = []
    for j, (name, value, kind) in enumerate(shown):
        fill = "#eeeeee" if value is None else colour(value, _SEQUENTIAL)
        label = "-" if value is None else f"{100 * value:.2f}%"
        parts.append(f'<rect class="cell" data-after="{escape(name)}" data-kind="{kind or ""}" '
                     f'x="{j * cell}" y="0" width="{cell - 1}" height="24" fill="{fill}">'
                     f'<title>{escape(name)}: {label} ({kind or "none"})</title></rect>')
        mark = CELL_MARKS.get(kind or "", "")
        if mark and cell >= 10:
            parts.append(f'<text x="{j * cell + cell / 2:.1f}" y="16" text-anchor="middle" '
                         f'font-size="10" fill="{_ink(fill)}">{mark}</text>')
    return _svg(max(len(shown), 1) * cell, 26, parts, "accuracy row", "strip")


# ----------------------------------------------------------------- similarity
def similarity_heatmap(rep: SimilarityReport) -> Markup:
    """Cosine similarity of the tasks' signatures; the left strip colours each task's group."""
    names = list(rep.tasks)
    n = len(names)
    cell = _cell_size(n)
    left, top = 190, 130
    parts = _labels(names, left, top, cell)
    for i, group in enumerate(rep.groups):
        fill = _GROUP_COLOURS[(group - 1) % len(_GROUP_COLOURS)]
        parts.append(f'<rect class="group" data-task="{escape(names[i])}" data-group="{group}" '
                     f'x="{left + n * cell + 4}" y="{top + i * cell}" width="10" '
                     f'height="{cell - 1}" fill="{fill}"><title>group {group}</title></rect>')
    for i, row in enumerate(rep.matrix):
        for j, value in enumerate(row):
            fill = colour((value + 1) / 2, _DIVERGING)
            x, y = left + j * cell, top + i * cell
            parts.append(f'<rect class="cell" data-task="{escape(names[i])}" '
                         f'data-other="{escape(names[j])}" data-value="{value!r}" x="{x}" '
                         f'y="{y}" width="{cell - 1}" height="{cell - 1}" fill="{fill}">'
                         f'<title>{escape(names[i])} · {escape(names[j])}: {value:.3f}</title>'
                         f'</rect>')
            if cell >= 30:
                parts.append(f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                             f'text-anchor="middle" font-size="9" fill="{_ink(fill)}" '
                             f'pointer-events="none">{value:.2f}</text>')
    return _svg(left + n * cell + 30, top + n * cell + 10, parts, "similarity", "similarity")


# --------------------------------------------------------------------- layers
def layer_map_chart(rep: LayerMap, most: int = 200) -> Markup:
    """Tasks × layers: on, off, or not a layer of the task (the first `most` tasks)."""
    tasks = list(rep.tasks)[:most]
    cols = len(rep.layers)
    cell = max(4, min(16, 720 // max(cols, 1)))
    left, top = 170, 16
    parts = []
    for i, (name, row) in enumerate(zip(tasks, rep.active)):
        y = top + i * (cell + 2)
        parts.append(f'<a href="{escape(task_url(name))}"><text x="{left - 6}" '
                     f'y="{y + cell - 2}" text-anchor="end" font-size="11">'
                     f'{escape(_short(name))}</text></a>')
        for k, on in enumerate(row):
            fill = "#1f77b4" if on else "#dddddd" if on is False else "#ffffff"
            state = "on" if on else "off" if on is False else "none"
            parts.append(f'<rect class="cell" data-task="{escape(name)}" data-state="{state}" '
                         f'x="{left + k * cell}" y="{y}" width="{cell - 1}" height="{cell}" '
                         f'fill="{fill}"><title>{escape(rep.layers[k])}: {state}</title></rect>')
    return _svg(left + cols * cell + 20, top + len(tasks) * (cell + 2) + 8, parts,
                "layer map", "layers")


def layer_strip(layers: Sequence[LayerEntry]) -> Markup:
    """A task's layers in the backbone's order, each as wide as its share of the base's numbers
    (at least 3 px): stored ones filled."""
    room = 760
    total = sum(max(layer.base_params, 0) for layer in layers) or 1
    parts = []
    x = 0.0
    for layer in layers:
        width = max(3.0, room * layer.base_params / total)
        fill = "#1f77b4" if layer.active else "#dddddd"
        whose = "stored" if layer.active else "the base's"
        parts.append(f'<rect class="cell" data-layer="{escape(layer.name)}" '
                     f'data-active="{str(layer.active).lower()}" x="{x:.1f}" y="0" '
                     f'width="{width - 0.5:.1f}" height="22" fill="{fill}"><title>'
                     f'{escape(layer.name)} ({escape(layer.kind)}): '
                     f'{whose}, {layer.task_params:,} of '
                     f'{layer.base_params:,} numbers</title></rect>')
        x += width
    return _svg(max(x, 1), 24, parts, "layers", "strip")


# -------------------------------------------------------------------- lineage
def lineage_graph(graph: Lineage, methods: dict[str, str], most: int = 300) -> Markup:
    """Shared bands (left) feed the tasks that pin them; arcs on the right go from a task to
    each task it reads (fusion pins), arrow at the task read. The first `most` tasks."""
    tasks = list(graph.tasks)[:most]
    row, top = 24, 20
    where = {name: top + i * row for i, name in enumerate(tasks)}
    band_x, band_w, task_x = 10, 200, 330
    parts = ['<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
             'markerHeight="7" orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" '
             'fill="#555"/></marker></defs>']
    next_free = top
    for band in graph.bands:
        ys = [where[name] for name in band.readers if name in where]
        if not ys:
            continue
        y = max(sum(ys) / len(ys), next_free)
        next_free = y + 30
        for ty in ys:
            parts.append(f'<path class="pin" d="M {band_x + band_w} {y + 10:.1f} C '
                         f'{band_x + band_w + 60} {y + 10:.1f}, {task_x - 70} {ty + 6}, '
                         f'{task_x - 6} {ty + 6}" fill="none" stroke="#ff7f0e" '
                         f'stroke-opacity="0.7"/>')
        parts.append(f'<g class="band" data-sha256="{band.sha256}"><rect x="{band_x}" y="{y:.1f}" '
                     f'width="{band_w}" height="20" rx="4" fill="#fff3e0" stroke="#ff7f0e"/>'
                     f'<text x="{band_x + 8}" y="{y + 14:.1f}" font-size="12">'
                     f'{escape(_short(band.label, 28))}</text><title>{escape(band.label)}: '
                     f'{band.sha256[:12]}…, {band.num_params:,} numbers, read by '
                     f'{escape(", ".join(band.readers))}</title></g>')
    arc_x = task_x + 230
    for reader, read in graph.reads:
        if reader not in where or read not in where:
            continue
        y1, y2 = where[reader] + 6, where[read] + 6
        bend = 30 + abs(y1 - y2) / 3
        parts.append(f'<path class="read" data-reader="{escape(reader)}" '
                     f'data-read="{escape(read)}" d="M {arc_x} {y1} C {arc_x + bend:.0f} {y1}, '
                     f'{arc_x + bend:.0f} {y2}, {arc_x + 2} {y2}" fill="none" stroke="#2ca02c" '
                     f'stroke-width="1.5" marker-end="url(#arrow)"/>')
    for name in tasks:
        y = where[name]
        parts.append(f'<a class="task" href="{escape(task_url(name))}"><text x="{task_x}" '
                     f'y="{y + 10}" font-size="12">{escape(_short(name, 24))}</text></a>'
                     f'<text x="{task_x + 170}" y="{y + 10}" font-size="10" fill="#777">'
                     f'{escape(methods.get(name, ""))}</text>')
    height = max(top + len(tasks) * row, next_free) + 10
    width = arc_x + 40 + (max((abs(where[a] - where[b]) for a, b in graph.reads
                               if a in where and b in where), default=0) / 3)
    return _svg(width + 30, height, parts, "lineage", "lineage")
