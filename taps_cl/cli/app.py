"""The `taps-cl` command line; the only module that prints."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from dataclasses import asdict
from typing import Any, Callable, Optional

import click

from registry import RegistryError, db
from registry.binding import recorded_url
from registry.entities import BaseModel, Task, TaskSummary
from taps_cl.analysis import plots, reports
from taps_cl.errors import TapsError, first_line
from taps_cl.manager import Manager

log = logging.getLogger("taps_cl")

# Set by the group callback so that main() knows whether to show tracebacks.
_STATE = {"debug": False}
# The arguments main() runs, which `task add --nproc N` hands on to the processes it starts.
_ARGS: list[str] = []

# Rows a human table shows when no --limit is given (--json always lists every row).
TABLE_ROWS = 50
# Beyond this many tasks `report accuracy` prints a summary instead of the N × N matrix.
SUMMARY_ABOVE = 20


class Context:
    """What every command gets: the manager and the output mode."""

    def __init__(self, home: Optional[str], db_url: Optional[str], as_json: bool,
                 artifacts_url: Optional[str] = None) -> None:
        self.manager = Manager(home, db_url, artifacts_url)
        self.json = as_json

    def emit(self, data: Any, text: Callable[[], None]) -> None:
        """One JSON document on stdout with --json, else the human rendering."""
        if self.json:
            # allow_nan=False: the document must parse with any JSON reader (jq, JavaScript).
            # Indented on a terminal; compact into a pipe or file, where Python's C encoder
            # writes the 10,000 rows of a large registry several times faster.
            indent = 2 if sys.stdout.isatty() else None
            click.echo(json.dumps(data, indent=indent, default=str, allow_nan=False))
        else:
            text()


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="TAPS_CL_HOME", type=click.Path(file_okay=False),
              help="Directory with registry.db and artifacts/ (default ./.taps-cl).")
@click.option("--db", "db_url", envvar="TAPS_CL_DB", help="SQLAlchemy database URL.")
@click.option("--artifacts", "artifacts_url", envvar="TAPS_CL_ARTIFACTS",
              help="Artifact store: a path or fsspec URL (file://, s3://…); "
                   "default: the store the registry recorded, else HOME/artifacts.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Show progress logs.")
@click.version_option(package_name="taps-cl")
@click.pass_context
def cli(ctx: click.Context, home: Optional[str], db_url: Optional[str],
        artifacts_url: Optional[str], as_json: bool, debug: bool, verbose: bool) -> None:
    """taps-cl: add tasks to one frozen backbone, query budgets and accuracy, restore models."""
    _STATE["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = Context(home, db_url, as_json, artifacts_url)
    ctx.call_on_close(ctx.obj.manager.close)


def _progress() -> bool:
    return sys.stderr.isatty()


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    click.echo("  ".join("-" * w for w in widths))
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _more(count: int, hint: str) -> None:
    """The line under a table that was cut: how many rows are not shown, and how to see them."""
    if count > 0:
        click.echo(f"… {count:,} more ({hint})")


# ------------------------------------------------------------------------ db
@cli.group("db")
def db_group() -> None:
    """Database schema: current revision and upgrades."""


def _engine(c: Context, create: bool):  # type: ignore[no-untyped-def]
    m = c.manager
    return db.make_engine(m.db_url or db.sqlite_url(m.home / "registry.db"), create=create)


@db_group.command("current")
@pass_ctx
def db_current(c: Context) -> None:
    """Show the database's schema revision and the newest one."""
    engine = _engine(c, create=False)
    try:
        current, head = db.current_revision(engine), db.head_revision()
        store = recorded_url(engine)
    finally:
        engine.dispose()
    c.emit({"current": current, "head": head, "up_to_date": current == head, "artifacts": store},
           lambda: click.echo(f"current: {current or '(none)'}  head: {head}"
                              + ("" if current == head else "  → run `taps-cl db upgrade`")
                              + (f"\nartifacts: {store}" if store else "")))


@db_group.command("upgrade")
@pass_ctx
def db_upgrade(c: Context) -> None:
    """Upgrade the schema to the newest revision (a SQLite file is copied aside first)."""
    engine = _engine(c, create=True)
    try:
        before, after, backup = db.upgrade(engine)
    finally:
        engine.dispose()
    c.emit({"from": before, "to": after, "backup": str(backup) if backup else None},
           lambda: click.echo(f"upgraded {before or '(empty)'} → {after}"
                              + (f"; backup at {backup}" if backup else "")))


# ---------------------------------------------------------------------- base
@cli.group("base")
def base_group() -> None:
    """Register and inspect frozen base models."""


def _base_json(b: BaseModel) -> dict[str, Any]:
    return {"name": b.name, "model": b.model_spec, "architecture": b.architecture,
            "num_params": b.num_params, "total_params": b.total_params, "sha256": b.sha256,
            "bytes": b.weights.bytes, "data_config": b.data_config,
            "created_at": b.created_at.isoformat()}


@base_group.command("add")
@click.argument("name")
@click.option("--model", required=True, help="timm:NAME or torchvision:NAME.")
@click.option("--weights", type=click.Path(dir_okay=False),
              help="Weights file (.safetensors, or .pth/.pt loaded with weights_only=True).")
@click.option("--pretrained", is_flag=True, help="Download the library's pretrained weights.")
@pass_ctx
def base_add(c: Context, name: str, model: str, weights: Optional[str], pretrained: bool) -> None:
    """Register NAME: build the model, load weights, store them once."""
    if weights and pretrained:
        raise click.UsageError("give either --weights or --pretrained, not both")
    b = c.manager.add_base(name, model, weights=weights, pretrained=pretrained)
    c.emit(_base_json(b), lambda: click.echo(
        f"base {b.name}: {b.model_spec}, {b.num_params:,} parameters without the head, "
        f"sha256 {b.sha256[:12]}…"))


@base_group.command("list")
@pass_ctx
def base_list(c: Context) -> None:
    """List base models."""
    bases = c.manager.list_bases()
    c.emit([{"name": b.name, "model": b.model_spec, "num_params": b.num_params,
             "sha256": b.sha256} for b in bases],
           lambda: _table(["name", "model", "params", "sha256"],
                          [[b.name, b.model_spec, b.num_params, b.sha256[:16]] for b in bases]))


@base_group.command("show")
@click.argument("name")
@pass_ctx
def base_show(c: Context, name: str) -> None:
    """Show one base model."""
    data = _base_json(c.manager.get_base(name))
    c.emit(data, lambda: [click.echo(f"{k}: {v}") for k, v in data.items()])


# ---------------------------------------------------------------------- task
@cli.group("task")
def task_group() -> None:
    """Add, list, show and evaluate tasks."""


def _task_json(t: Task, accuracy: Optional[float]) -> dict[str, Any]:
    return {"name": t.name, "base": t.base, "method": t.method, "position": t.position,
            "status": t.status, "num_classes": t.num_classes, "task_params": t.task_params,
            "active_layers": t.active_layers, "total_layers": t.total_layers,
            "test_accuracy": accuracy}


def _options(*options: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """One decorator applying several click options (in the order given, for --help)."""
    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f
    return apply


# Training options shared by `task add` and `group train`.
_fit_options = _options(
    click.option("--epochs", type=click.IntRange(1), default=3, show_default=True),
    click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True),
    click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3,
                 show_default=True),
    click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw",
                 show_default=True),
    click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True),
)
_data_options = _options(
    click.option("--img-size", type=click.IntRange(8), help="Input size (default: the base's)."),
    click.option("--seed", type=int, default=0, show_default=True),
    click.option("--max-train", type=click.IntRange(1), help="Subsample each training set."),
    click.option("--max-test", type=click.IntRange(1), help="Subsample each test set."),
    click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                 default=0.1, show_default=True),
    click.option("--device", default="auto", show_default=True,
                 help="Where training runs: auto, cpu, cuda, cuda:N or mps (checks run on the "
                      "CPU)."),
)


@task_group.command("add")
@click.argument("name")
@click.option("--base", required=True, help="Name of a registered base model.")
@click.option("--data", "data_spec", required=True,
              help="imagefolder:PATH | idx:DIR | digits | torchvision:NAME[:ROOT].")
@click.option("--classes", help="Class subset, e.g. 0,1,2 or names.")
@click.option("--method", default="taps", show_default=True,
              help="taps | finetune | linear | adapter | fusion | progressive.")
@_fit_options
@click.option("--lam", type=click.FloatRange(0), help="TAPS sparsity weight λ.")
@click.option("--tau", type=float, help="TAPS gate threshold τ.")
@click.option("--score-lr", type=click.FloatRange(0, min_open=True),
              help="TAPS learning rate of the gate scores.")
@click.option("--warmup-epochs", type=click.IntRange(0), help="TAPS epochs before the penalty.")
@click.option("--penalty", type=click.Choice(["layers", "params"]),
              help="TAPS penalty weights: 1/L per layer, or by the numbers a layer would store.")
@click.option("--rank", type=click.IntRange(0),
              help="TAPS low-rank deltas ΔW = B·A of this rank on large layers (0 = full deltas).")
@click.option("--factor-min-params", type=click.IntRange(0),
              help="TAPS: factorise only layers with at least this many weights.")
@click.option("--factor-lr", type=click.FloatRange(0, min_open=True),
              help="TAPS learning rate of the factors (default 5 × --lr).")
@click.option("--budget", type=click.FloatRange(0, min_open=True),
              help="TAPS: store at most this fraction of the base's parameters (norms, head "
                   "included); λ is raised during training until the task fits.")
@click.option("--store-dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="TAPS: precision of the stored deltas/factors.")
@click.option("--store-norms-head-dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="TAPS: precision of the stored norms and head.")
@click.option("--reduction", type=click.IntRange(1),
              help="adapter/fusion: bottleneck width = channels / reduction (default 16).")
@click.option("--fuse", help="fusion: the earlier adapter tasks to fuse, e.g. A,B.")
@click.option("--no-own-adapter", "own_adapter", flag_value=False, default=None,
              help="fusion: fuse only the earlier adapters, train no adapter of its own.")
@click.option("--group",
              help="progressive: auto (join the most similar group or open one; default), new, "
                   "or the name of a group to join.")
@click.option("--join-threshold", type=click.FloatRange(-1, 1),
              help="progressive: mean signature similarity needed to join a group with "
                   "--group auto (default 0.5).")
@click.option("--shared-fraction", type=click.FloatRange(0, 1),
              help="progressive: fraction of the blocks (from the input) shared by all tasks "
                   "(default 0.75; fixed by the base's first progressive task).")
@click.option("--task-fraction", type=click.FloatRange(0, 1),
              help="progressive: fraction of the blocks (from the output) that are "
                   "task-specific (default 0.125; fixed by the base's first progressive task).")
@_data_options
@click.option("--recheck", type=click.IntRange(0),
              help="Earlier tasks whose probes are re-checked (default 8: the latest, any it "
                   "reads, a seeded sample of the rest; `report accuracy --verify` checks all).")
@click.option("--nproc", type=click.IntRange(1),
              help="Train with N processes (default 1): starts torchrun, DistributedDataParallel "
                   "with gloo on the CPU or one GPU per process with --device cuda.")
@pass_ctx
def task_add(c: Context, name: str, base: str, data_spec: str, classes: Optional[str],
             method: str, **given: Any) -> None:
    """Train task NAME on the frozen base and record only what it needs."""
    nproc = given.pop("nproc")
    if nproc is not None and _launched(nproc, given["device"], given["batch_size"]):
        return
    method_keys = ("lam", "tau", "score_lr", "warmup_epochs", "penalty", "rank",
                   "factor_min_params", "factor_lr", "budget", "store_dtype",
                   "store_norms_head_dtype", "reduction", "fuse", "own_adapter",
                   "shared_fraction", "task_fraction")
    options = {k: given.pop(k) for k in method_keys}
    train = given
    result = c.manager.add_task(
        name, base, data_spec, method=method, classes=classes,
        method_options={k: v for k, v in options.items() if v is not None},
        progress=_progress() and not c.json, **train,
    )
    if result is None:  # a worker rank under torchrun: rank 0 reports
        return
    t = result.task
    data = _task_json(t, result.test_accuracy)
    data["best_val_accuracy"] = result.best_val_accuracy
    data["probe_checks"] = [asdict(p) for p in result.probe_checks]
    group = t.method_config.get("group") if t.method == "progressive" else None
    if group is not None:
        data["group"] = group

    def text() -> None:
        kind = t.method if group is None else f"{t.method}, group {group}"
        click.echo(f"task {t.name} ({kind}) on {t.base}, position {t.position}: "
                   f"test accuracy {_pct(result.test_accuracy)}%, "
                   f"{t.active_layers}/{t.total_layers} layers active, "
                   f"{t.task_params:,} task-specific parameters")
        if result.probe_checks:
            click.echo(f"  re-checked {len(result.probe_checks)} earlier task(s) "
                       "(a sample; `report accuracy --verify` checks every one):")
        for p in result.probe_checks:
            state = "unchanged" if p.ok else f"CHANGED ({p.error or 'logits moved'})"
            click.echo(f"  earlier task {p.task}: probe logits {state} "
                       f"(max drift {_fmt(p.max_drift)})")

    c.emit(data, text)


def _launched(nproc: int, device: str, batch_size: int) -> bool:
    """Run this very `task add` as `nproc` processes under torchrun and pass on what rank 0
    printed; False for --nproc 1, which trains in this process."""
    from taps_cl.training import distributed

    distributed.check_launch(nproc, device, batch_size)
    if nproc == 1:
        return False
    if not any(arg == "--nproc" or arg.startswith("--nproc=") for arg in _ARGS):
        raise TapsError("--nproc needs the command line it came on: run it through `taps-cl`, "
                        "`python -m taps_cl` or taps_cl.cli.app.main")
    run = distributed.launch(nproc, ["-m", "taps_cl",
                                     *distributed.without_option(_ARGS, "--nproc")])
    click.echo(run.stdout, nl=False)
    if run.returncode == 0 or _STATE["debug"]:
        for text in run.rank_stderr.values():
            click.echo(text, err=True, nl=False)
    if _STATE["debug"]:
        click.echo(run.torchrun_stderr, err=True, nl=False)
    if run.error is not None:
        raise TapsError(run.error)
    return True


@task_group.command("remove")
@click.argument("name")
@click.option("--force", is_flag=True,
              help="Remove even a run that still looks alive (its heartbeat is recent).")
@pass_ctx
def task_remove(c: Context, name: str, force: bool) -> None:
    """Discard a task left unfinished by a killed run (ready tasks cannot be removed)."""
    c.manager.remove_task(name, force=force)
    c.emit({"removed": name}, lambda: click.echo(f"removed unfinished task {name}"))


@task_group.command("delete")
@click.argument("name")
@pass_ctx
def task_delete(c: Context, name: str) -> None:
    """Delete a ready task and its artifacts no other row uses (refused while others read it)."""
    removed = c.manager.delete_task(name)
    c.emit({"deleted": name, "artifacts_removed": removed},
           lambda: click.echo(f"deleted task {name} ({len(removed)} artifact file(s) removed)"))


def _summary_json(t: TaskSummary) -> dict[str, Any]:
    return {"name": t.name, "base": t.base, "method": t.method, "position": t.position,
            "status": t.status, "num_classes": t.num_classes, "task_params": t.task_params,
            "active_layers": t.active_layers, "total_layers": t.total_layers,
            "test_accuracy": t.test_accuracy}


@task_group.command("list")
@click.option("--base", help="Only this base's tasks.")
@click.option("--limit", type=click.IntRange(0),
              help=f"Show at most N tasks (default: all with --json, else {TABLE_ROWS}).")
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True,
              help="Skip the first N tasks of the sequence.")
@pass_ctx
def task_list(c: Context, base: Optional[str], limit: Optional[int], offset: int) -> None:
    """List tasks in sequence order."""
    if limit is None and not c.json:
        limit = TABLE_ROWS
    summaries = c.manager.task_summaries(base, limit=limit, offset=offset)
    rows = [_summary_json(t) for t in summaries]

    def text() -> None:
        _table(["#", "name", "base", "method", "status", "classes", "task params", "layers",
                "test acc %"],
               [[r["position"], r["name"], r["base"], r["method"], r["status"],
                 r["num_classes"], r["task_params"], f"{r['active_layers']}/{r['total_layers']}",
                 _pct(r["test_accuracy"])] for r in rows])
        if limit is not None and len(rows) == limit:  # maybe cut: say how many are left
            _more(c.manager.count_tasks(base) - offset - len(rows), "use --limit/--offset/--json")

    c.emit(rows, text)


@task_group.command("show")
@click.argument("name")
@click.option("--all-layers", is_flag=True, help="List inactive layers too.")
@pass_ctx
def task_show(c: Context, name: str, all_layers: bool) -> None:
    """Show a task and its active-layer set."""
    t = c.manager.get_task(name)
    base_params = c.manager.get_base(t.base).num_params
    data = _task_json(t, c.manager.test_accuracies(t.base).get(t.name))
    budget = t.method_config.get("budget")
    data.update(budget=budget, budget_used=t.task_params / base_params if base_params else None,
                depends_on=[asdict(pin) for pin in t.depends_on],
                dependents=c.manager.registry.list_dependents(t.name))
    data.update(method_config=t.method_config, train_config=t.train_config,
                dataset=t.dataset_spec, class_names=list(t.class_names),
                train_seconds=t.train_seconds,
                artifact=t.artifact.sha256 if t.artifact else None,
                layers=[asdict(layer) for layer in t.layers])

    def text() -> None:
        click.echo(f"task {t.name}: {t.method} on {t.base} (position {t.position}, {t.status})")
        click.echo(f"  classes ({t.num_classes}): {', '.join(t.class_names)}")
        click.echo(f"  test accuracy {_pct(data['test_accuracy'])}%, "
                   f"{t.task_params:,} task-specific parameters, "
                   f"{t.active_layers}/{t.total_layers} layers active")
        click.echo(f"  config: {json.dumps(t.method_config)}")
        for pin in t.depends_on:
            click.echo(f"  reads: {pin.task} (pinned artifact {pin.sha256[:12]}…, {pin.kind})")
        if data["dependents"]:
            click.echo(f"  read by: {', '.join(data['dependents'])}")
        if budget is not None:
            click.echo(f"  budget: at most {budget:.3f}× base given, {data['budget_used']:.3f}× "
                       "used")
        shown = [layer for layer in t.layers if all_layers or layer.active]
        click.echo(f"  {'all' if all_layers else 'active'} layers:")
        _table(["layer", "kind", "score", "active", "base params", "task params"],
               [[lay.name, lay.kind, lay.score, lay.active, lay.base_params, lay.task_params]
                for lay in shown])

    c.emit(data, text)


@task_group.command("eval")
@click.argument("name")
@click.option("--data", "data_spec", help="Evaluate on another data spec with the same classes.")
@click.option("--max-test", type=click.IntRange(1), help="Subsample the test set.")
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:N or mps.")
@pass_ctx
def task_eval(c: Context, name: str, data_spec: Optional[str], max_test: Optional[int],
              device: str) -> None:
    """Measure the restored task model's test accuracy."""
    r = c.manager.evaluate_task(name, data_spec, max_test=max_test, device=device)
    c.emit({"name": name, **asdict(r)}, lambda: click.echo(
        f"{name}: accuracy {_pct(r.accuracy)}% on {r.num_samples} images (loss {r.loss:.4f})"))


# --------------------------------------------------------------------- group
@cli.group("group")
def group_group() -> None:
    """Train several progressive tasks together, grouped by gradient similarity."""


def _task_spec(_ctx: click.Context, _param: click.Parameter,
               values: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        name, sep, spec = value.partition("=")
        if not sep or not name or not spec:
            raise click.BadParameter(f"{value!r} is not NAME=SPEC")
        pairs.append((name, spec))
    return pairs


@group_group.command("train")
@click.option("--base", required=True, help="Name of a registered base model.")
@click.option("--task", "tasks", multiple=True, required=True, callback=_task_spec,
              help="A new task as NAME=SPEC (data spec as in `task add --data`); repeat.")
@click.option("--groups", type=click.IntRange(1),
              help="Number of similarity groups (default: chosen by a similarity threshold).")
@_fit_options
@click.option("--reduction", type=click.IntRange(1),
              help="Bottleneck width = channels / reduction (default 16).")
@click.option("--shared-fraction", type=click.FloatRange(0, 1),
              help="Fraction of the blocks (from the input) shared by all tasks (default 0.75).")
@click.option("--task-fraction", type=click.FloatRange(0, 1),
              help="Fraction of the blocks (from the output) that are task-specific "
                   "(default 0.125).")
@_data_options
@click.option("--recheck", type=click.IntRange(0),
              help="Earlier tasks whose probes each member's add re-checks (default 8).")
@pass_ctx
def group_train(c: Context, base: str, tasks: list[tuple[str, str]], groups: Optional[int],
                **given: Any) -> None:
    """Train new progressive tasks jointly: shared, group and task-specific adapters."""
    options = {k: given.pop(k) for k in ("reduction", "shared_fraction", "task_fraction")}
    result = c.manager.group_train(
        base, tasks, groups=groups,
        method_options={k: v for k, v in options.items() if v is not None},
        progress=_progress() and not c.json, **given,
    )
    data = {"tasks": [dict(_task_json(r.task, r.test_accuracy),
                           group=r.task.method_config.get("group"),
                           best_val_accuracy=r.best_val_accuracy) for r in result.results],
            "groups": result.groups,
            "similarity": {"tasks": result.tasks, "matrix": result.matrix}}

    def text() -> None:
        for r in result.results:
            t = r.task
            click.echo(f"task {t.name} (progressive, group {t.method_config.get('group')}) on "
                       f"{t.base}, position {t.position}: test accuracy "
                       f"{_pct(r.test_accuracy)}%, {t.task_params:,} task-specific parameters")
        for name, members in result.groups.items():
            click.echo(f"group {name}: {', '.join(members)}")

    c.emit(data, text)


# -------------------------------------------------------------------- report
@cli.group("report")
def report_group() -> None:
    """Parameter budget, accuracy matrix, layer map and task similarity."""


@report_group.command("budget")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a bar chart PNG.")
@click.option("--limit", type=click.IntRange(0),
              help=f"Show at most N task rows in the table (default: all up to {TABLE_ROWS}, "
                   f"else the first {TABLE_ROWS}); totals and --json cover every task.")
@pass_ctx
def report_budget(c: Context, base: Optional[str], plot: Optional[str],
                  limit: Optional[int]) -> None:
    """Base + Σ task-specific parameters and bytes vs N fine-tuned models."""
    rep = c.manager.budget(base)
    if plot:
        plots.plot_budget(rep, plot)
    c.emit(rep.to_json(), lambda: _budget_text(rep, limit))


def _budget_text(rep: reports.BudgetReport, limit: Optional[int] = None) -> None:
    click.echo(f"base {rep.base_name} ({rep.base_model}): {rep.base_params:,} parameters, "
               f"{rep.base_bytes:,} bytes")
    if limit is None:
        limit = len(rep.tasks) if len(rep.tasks) <= TABLE_ROWS else TABLE_ROWS
    _table(["task", "method", "layers", "params", "bytes", "× base", "budget", "reads"],
           [[t.name, t.method, f"{t.active_layers}/{t.total_layers}", t.task_params, t.bytes,
             _ratio(t.ratio_to_base),
             "-" if t.budget is None else f"{t.budget:.3f} (used {_ratio(t.budget_used)})",
             ",".join(t.depends_on) or "-"]
            for t in rep.tasks[:limit]])
    _more(len(rep.tasks) - limit, "use --limit/--json")
    for use in rep.shared:
        click.echo(f"shared {use.sha256[:12]}… ({', '.join(use.kinds)}): {use.num_params:,} "
                   f"parameters, {use.bytes:,} bytes, counted once; read by "
                   f"{', '.join(use.tasks)}")
    click.echo(f"total: {rep.total_params:,} parameters ({rep.total_bytes:,} bytes) = "
               f"{_ratio(rep.ratio_to_base)}× base; {len(rep.tasks)} fine-tuned models: "
               f"{rep.finetune_total_params:,}; linear probes: {rep.linear_total_params:,}")


def _ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


@report_group.command("accuracy")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--verify", is_flag=True,
              help="Re-hash every artifact, check every recorded fact and recompute every "
                   "task's probe logits; exit status 1 unless all hold.")
@click.option("--reevaluate", is_flag=True,
              help="Re-measure every task's test accuracy where its data is reachable.")
@click.option("--workers", type=click.IntRange(1),
              help="Processes that verify tasks in parallel (default: one per core; a few "
                   "tasks are checked in this process).")
@click.option("--task", "tasks", multiple=True, metavar="NAME",
              help="Verify only this task (repeatable; needs --verify).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a heatmap PNG.")
@click.option("--full", is_flag=True,
              help=f"Print the whole matrix even for more than {SUMMARY_ABOVE} tasks.")
@click.option("--limit", type=click.IntRange(1), default=10, show_default=True,
              help="Tasks listed in the summary of a long sequence.")
@click.option("--summary", is_flag=True,
              help="The summary even for a short sequence; with --json, no dense matrix (the "
                   "final column, metrics and counts only).")
@pass_ctx
def report_accuracy(c: Context, base: Optional[str], verify: bool, reevaluate: bool,
                    workers: Optional[int], tasks: tuple[str, ...], plot: Optional[str],
                    full: bool, limit: int, summary: bool) -> None:
    """Accuracy of every task after every later addition; forgetting and BWT."""
    if tasks and not verify:
        raise click.UsageError("--task limits verification: give --verify too")
    if full and summary:
        raise click.UsageError("--full and --summary contradict each other")
    rep = c.manager.accuracy(base, verify=verify, reevaluate=reevaluate, workers=workers,
                             progress=_progress() and not c.json, tasks=list(tasks) or None)
    if plot:
        plots.plot_accuracy(rep, plot)
    # Only --json needs the document: the dense matrix of a long sequence is costly to build.
    c.emit(rep.to_json(matrix=not summary) if c.json else None,
           lambda: _accuracy_text(rep, full, limit, summary))
    if rep.reason:
        raise TapsError(rep.reason)


def _accuracy_text(rep: reports.AccuracyReport, full: bool = False, limit: int = 10,
                   summary: bool = False) -> None:
    names = list(rep.tasks)
    if not summary and (full or len(names) <= SUMMARY_ABOVE):
        rows = []
        for name, row, kinds in zip(names, rep.matrix, rep.cells):
            rows.append([name] + [
                "-" if k is None else f"CHANGED {_pct(v)}" if k == "changed"
                else _pct(v) + {"probe": "*", "derived": "~"}.get(k, "")
                for v, k in zip(row, kinds)])
        _table(["task \\ after"] + names, rows)
        click.echo("* probe-checked when recorded: logits on the stored probe batch unchanged, "
                   "so the accuracy is the measured one")
        if any(k == "derived" for row in rep.cells for k in row):
            click.echo("~ derived: not re-checked by that add, which wrote only its own rows; "
                       "the task is the same model as at its last record")
    else:
        _accuracy_summary(rep, limit)
    click.echo(f"average accuracy {_pct(rep.average_accuracy)}%, "
               f"forgetting {_pct(rep.forgetting)} points, BWT {_pct(rep.bwt)} points"
               + ("" if rep.complete else " (final column incomplete)"))
    for cell in rep.changed:
        click.echo(f"WARNING: probe logits changed for {cell}")
    for line in rep.contradictions:
        click.echo(f"WARNING: {line}")
    for line in rep.chain_problems:
        click.echo(f"WARNING: hash chain broken at {line}")
    for line in rep.reevaluate_skipped:
        click.echo(f"not re-evaluated: {line}")
    if rep.verify_seconds is not None:
        rate = rep.verify_tasks_per_s
        click.echo(f"verify: {len(rep.verified_tasks)} tasks checked in "
                   f"{rep.verify_seconds:.1f} s ({'-' if rate is None else f'{rate:.2f}'} "
                   "tasks/s)")
    # "verified" is printed only for a report whose every check and every number agree.
    if rep.verified:
        click.echo(f"verified: interference-free — every artifact matches its sha256, every "
                   f"recorded fact its artifact, every task's probe logits are unchanged "
                   f"(max drift {rep.max_logit_drift:.3g}) and every cell agrees with them")
    elif rep.verified is False:
        click.echo(f"NOT verified: {len(rep.problems)} problem(s); the figures above are not "
                   "confirmed")


def _accuracy_summary(rep: reports.AccuracyReport, limit: int) -> None:
    """The matrix of a long sequence in a few lines: counts, and the tasks that lost most."""
    kinds: dict[str, int] = {}
    for kind in rep.final_cells:
        kinds[kind or "none"] = kinds.get(kind or "none", 0) + 1
    how = ", ".join(f"{count:,} {kind}" for kind, count in sorted(kinds.items()))
    click.echo(f"{len(rep.tasks):,} tasks; {rep.stored_cells:,} stored cells; final column: {how}")
    diagonal = {name: next((v for j, v, _ in records if j == i), None)
                for i, (name, records) in enumerate(zip(rep.tasks, rep.recorded))}
    rows = [(name, diagonal[name], final, kind)
            for name, final, kind in zip(rep.tasks, rep.final, rep.final_cells)]
    lost = sorted(rows, key=lambda r: -((r[1] or 0) - (r[2] or 0)))[:limit]
    click.echo(f"the {len(lost)} task(s) that lost most since they were added "
               "(the full matrix: --full, --json or --plot):")
    _table(["task", "when added", "now", "known by"],
           [[name, _pct(added), _pct(now), kind or "-"] for name, added, now, kind in lost])


@report_group.command("layers")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a tasks × layers PNG.")
@pass_ctx
def report_layers(c: Context, base: Optional[str], plot: Optional[str]) -> None:
    """Which layers each task turned on."""
    rep = c.manager.layer_map(base)
    if plot:
        plots.plot_layers(rep, plot)
    c.emit(rep.to_json(), lambda: _table(
        ["layer"] + list(rep.tasks),
        [[layer] + ["on" if row[i] else "." for row in rep.active]
         for i, layer in enumerate(rep.layers)]))


@report_group.command("similarity")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--data", "data_spec",
              help="A candidate data set (imagefolder:PATH | idx:DIR | digits | …) to compare "
                   "with the tasks before adding it; nothing is recorded.")
@click.option("--classes", help="Class subset of --data, e.g. 0,1,2 or names.")
@click.option("--img-size", type=click.IntRange(8), help="Input size of --data (default: the base's).")
@click.option("--max-train", type=click.IntRange(1), help="Subsample the training set of --data.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a heatmap PNG.")
@pass_ctx
def report_similarity(c: Context, base: Optional[str], data_spec: Optional[str],
                      classes: Optional[str], img_size: Optional[int], max_train: Optional[int],
                      plot: Optional[str]) -> None:
    """Cosine similarity of the tasks' gradient signatures, and their groups."""
    if data_spec is None and (classes or img_size or max_train):
        raise click.UsageError("--classes, --img-size and --max-train describe --data: give it")
    rep = c.manager.similarity(base, data_spec, classes=classes, img_size=img_size,
                               max_train=max_train)
    if plot:
        plots.plot_similarity(rep, plot)
    c.emit(rep.to_json(), lambda: _similarity_text(rep))


def _similarity_text(rep: reports.SimilarityReport) -> None:
    if rep.tasks:
        _table(["task \\ task", "group"] + list(rep.tasks),
               [[name, group] + [f"{v:.2f}" for v in row]
                for name, group, row in zip(rep.tasks, rep.groups, rep.matrix)])
        click.echo(f"groups: average linkage on 1 − cosine, merged below distance "
                   f"{rep.threshold:g}")
    else:
        click.echo(f"base {rep.base_name}: no task has a signature")
    if rep.candidate is not None:
        click.echo(f"candidate {rep.candidate}: "
                   + (", ".join(f"{name} {v:.2f}" for name, v in
                                zip(rep.tasks, rep.candidate_row or ())) or "no task to compare")
                   + (f"; most similar: {rep.closest}" if rep.closest else ""))
    for name, reason in rep.without_signature:
        click.echo(f"left out: {name}: {reason}")


# --------------------------------------------------------- restore / predict
@cli.command("restore")
@click.argument("name")
@click.option("--out", required=True, type=click.Path(dir_okay=False),
              help="Output .safetensors file with the plain model's state dict.")
@pass_ctx
def restore_cmd(c: Context, name: str, out: str) -> None:
    """Write task NAME's model as a plain timm/torchvision state dict."""
    path = c.manager.restore_to_file(name, out)
    t = c.manager.get_task(name)
    base = c.manager.get_base(t.base)
    c.emit({"name": name, "out": str(path), "model": base.model_spec,
            "num_classes": t.num_classes},
           lambda: click.echo(f"wrote {path}: load it into {_constructor(base.model_spec)}"
                              f"('{base.architecture}', num_classes={t.num_classes})"
                              f" with load_state_dict(strict=True)"))


def _constructor(model_spec: str) -> str:
    return "torchvision.models.get_model" if model_spec.startswith("torchvision:") else \
        "timm.create_model"


@cli.command("predict")
@click.argument("name")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top", type=click.IntRange(1), default=3, show_default=True)
@click.option("--device", default="auto", show_default=True,
              help="auto, cpu, cuda, cuda:N or mps.")
@pass_ctx
def predict_cmd(c: Context, name: str, images: tuple[str, ...], top: int, device: str) -> None:
    """Top classes with probabilities for each IMAGE."""
    preds = c.manager.predict(name, list(images), top_k=top, device=device)
    data = [{"image": img, "top": [{"class": k, "probability": p} for k, p in pred]}
            for img, pred in zip(images, preds)]

    def text() -> None:
        for img, pred in zip(images, preds):
            click.echo(f"{img}: " + ", ".join(f"{k} {100 * p:.1f}%" for k, p in pred))

    c.emit(data, text)


# ------------------------------------------------------------------------- gc
@cli.command("gc")
@click.option("--yes", is_flag=True, help="Remove the files (default: only list them).")
@pass_ctx
def gc_cmd(c: Context, yes: bool) -> None:
    """List (and with --yes remove) artifact files no row references and stale temp files."""
    if yes:
        files, freed = c.manager.remove_garbage()
    else:
        files, freed = c.manager.find_garbage(), 0
    total = sum(f.bytes for f in files)
    data = {"files": [asdict(f) for f in files], "bytes": total, "removed": yes,
            "bytes_freed": freed}

    def text() -> None:
        for f in files:
            click.echo(f"{f.path}  {f.bytes:,} bytes  ({f.reason})")
        if not files:
            click.echo("no garbage: every artifact file is referenced")
        elif yes:
            click.echo(f"removed {len(files)} file(s), {freed:,} bytes")
        else:
            click.echo(f"{len(files)} file(s), {total:,} bytes; `taps-cl gc --yes` removes them")

    c.emit(data, text)


# ----------------------------------------------------------------------- demo
@cli.command("demo")
@click.option("--quick", is_flag=True, help="A smaller run (for smoke tests).")
@pass_ctx
def demo_cmd(c: Context, quick: bool) -> None:
    """Offline demo: real ImageNet base, three real tasks, budget and verified accuracy."""
    from taps_cl import demo

    # With --json the progress lines go to stderr so stdout stays one JSON document.
    demo.run(c.manager, quick=quick, progress=_progress(),
             say=(lambda msg: click.echo(msg, err=True)) if c.json else click.echo)
    budget = c.manager.budget(demo.BASE_NAME)
    accuracy = c.manager.accuracy(demo.BASE_NAME, verify=True)

    def text() -> None:
        click.echo("")
        _budget_text(budget)
        click.echo("")
        _accuracy_text(accuracy)

    c.emit({"budget": budget.to_json(), "accuracy": accuracy.to_json()}, text)
    if accuracy.reason:
        raise TapsError(accuracy.reason)


def _interrupt(signum: int, _frame: object) -> None:
    # SIGTERM (kill, a scheduler's timeout) unwinds like Ctrl-C, so an unfinished task is removed.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: one `Error: …` line and exit 1 for failures; tracebacks with --debug."""
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        _run(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(argv: Optional[list[str]]) -> None:
    _ARGS[:] = sys.argv[1:] if argv is None else argv
    try:
        cli.main(args=argv, prog_name="taps-cl", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except (click.Abort, KeyboardInterrupt):
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except (TapsError, RegistryError) as exc:
        if _STATE["debug"]:
            raise
        click.echo(f"Error: {first_line(exc)}", err=True)
        sys.exit(1)
    except OSError as exc:  # a file the user named or pointed us to: say which and why
        if _STATE["debug"]:
            raise
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"Error: cannot use{where}: {exc.strerror or first_line(exc)}", err=True)
        sys.exit(1)
    except Exception as exc:  # a bug: still one line unless --debug
        if _STATE["debug"]:
            raise
        click.echo(f"Error: unexpected {type(exc).__name__}: {first_line(exc)} (run with --debug "
                   f"for the traceback)", err=True)
        sys.exit(1)
