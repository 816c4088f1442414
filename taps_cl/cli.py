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
from registry.entities import BaseModel, Task
from taps_cl import reports
from taps_cl.errors import TapsError, first_line
from taps_cl.manager import Manager

log = logging.getLogger("taps_cl")

# Set by the group callback so that main() knows whether to show tracebacks.
_STATE = {"debug": False}


class Context:
    """What every command gets: the manager and the output mode."""

    def __init__(self, home: Optional[str], db_url: Optional[str], as_json: bool) -> None:
        self.manager = Manager(home, db_url)
        self.json = as_json

    def emit(self, data: Any, text: Callable[[], None]) -> None:
        """One JSON document on stdout with --json, else the human rendering."""
        if self.json:
            # allow_nan=False: the document must parse with any JSON reader (jq, JavaScript).
            click.echo(json.dumps(data, indent=2, default=str, allow_nan=False))
        else:
            text()


pass_ctx = click.make_pass_decorator(Context)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", envvar="TAPS_CL_HOME", type=click.Path(file_okay=False),
              help="Directory with registry.db and artifacts/ (default ./.taps-cl).")
@click.option("--db", "db_url", envvar="TAPS_CL_DB", help="SQLAlchemy database URL.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option("-v", "--verbose", is_flag=True, help="Show progress logs.")
@click.version_option(package_name="taps-cl")
@click.pass_context
def cli(ctx: click.Context, home: Optional[str], db_url: Optional[str], as_json: bool,
        debug: bool, verbose: bool) -> None:
    """taps-cl: add tasks to one frozen backbone, query budgets and accuracy, restore models."""
    _STATE["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    ctx.obj = Context(home, db_url, as_json)
    ctx.call_on_close(ctx.obj.manager.close)


def _progress(c: Context) -> bool:
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


# ------------------------------------------------------------------------ db
@cli.group("db")
def db_group() -> None:
    """Database schema: current revision and upgrades."""


def _engine(c: Context):  # type: ignore[no-untyped-def]
    m = c.manager
    return db.make_engine(m.db_url or db.sqlite_url(m.home / "registry.db"))


@db_group.command("current")
@pass_ctx
def db_current(c: Context) -> None:
    """Show the database's schema revision and the newest one."""
    engine = _engine(c)
    try:
        current, head = db.current_revision(engine), db.head_revision()
    finally:
        engine.dispose()
    c.emit({"current": current, "head": head, "up_to_date": current == head},
           lambda: click.echo(f"current: {current or '(none)'}  head: {head}"
                              + ("" if current == head else "  → run `taps-cl db upgrade`")))


@db_group.command("upgrade")
@pass_ctx
def db_upgrade(c: Context) -> None:
    """Upgrade the schema to the newest revision (a SQLite file is copied aside first)."""
    engine = _engine(c)
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


@task_group.command("add")
@click.argument("name")
@click.option("--base", required=True, help="Name of a registered base model.")
@click.option("--data", "data_spec", required=True,
              help="imagefolder:PATH | idx:DIR | digits | torchvision:NAME[:ROOT].")
@click.option("--classes", help="Class subset, e.g. 0,1,2 or names.")
@click.option("--method", default="taps", show_default=True, help="taps | finetune | linear.")
@click.option("--epochs", type=click.IntRange(1), default=3, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=1e-3, show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw",
              show_default=True)
@click.option("--weight-decay", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--lam", type=click.FloatRange(0), help="TAPS sparsity weight λ.")
@click.option("--tau", type=float, help="TAPS gate threshold τ.")
@click.option("--score-lr", type=click.FloatRange(0, min_open=True),
              help="TAPS learning rate of the gate scores.")
@click.option("--warmup-epochs", type=click.IntRange(0), help="TAPS epochs before the penalty.")
@click.option("--penalty", type=click.Choice(["layers", "params"]),
              help="TAPS penalty weights: 1/L per layer, or by parameter count.")
@click.option("--img-size", type=click.IntRange(8), help="Input size (default: the base's).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-train", type=click.IntRange(1), help="Subsample the training set.")
@click.option("--max-test", type=click.IntRange(1), help="Subsample the test set.")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.1, show_default=True)
@pass_ctx
def task_add(c: Context, name: str, base: str, data_spec: str, classes: Optional[str],
             method: str, lam: Optional[float], tau: Optional[float], score_lr: Optional[float],
             warmup_epochs: Optional[int], penalty: Optional[str], **train: Any) -> None:
    """Train task NAME on the frozen base and record only what it needs."""
    options = {"lam": lam, "tau": tau, "score_lr": score_lr, "warmup_epochs": warmup_epochs,
               "penalty": penalty}
    result = c.manager.add_task(
        name, base, data_spec, method=method, classes=classes,
        method_options={k: v for k, v in options.items() if v is not None},
        progress=_progress(c) and not c.json, **train,
    )
    t = result.task
    data = _task_json(t, result.test_accuracy)
    data["best_val_accuracy"] = result.best_val_accuracy
    data["probe_checks"] = [asdict(p) for p in result.probe_checks]

    def text() -> None:
        click.echo(f"task {t.name} ({t.method}) on {t.base}, position {t.position}: "
                   f"test accuracy {_pct(result.test_accuracy)}%, "
                   f"{t.active_layers}/{t.total_layers} layers active, "
                   f"{t.task_params:,} task-specific parameters")
        for p in result.probe_checks:
            state = "unchanged" if p.ok else f"CHANGED ({p.error or 'logits moved'})"
            click.echo(f"  earlier task {p.task}: probe logits {state} "
                       f"(max drift {_fmt(p.max_drift)})")

    c.emit(data, text)


@task_group.command("remove")
@click.argument("name")
@pass_ctx
def task_remove(c: Context, name: str) -> None:
    """Discard a task left unfinished by a killed run (ready tasks cannot be removed)."""
    c.manager.remove_task(name)
    c.emit({"removed": name}, lambda: click.echo(f"removed unfinished task {name}"))


@task_group.command("list")
@click.option("--base", help="Only this base's tasks.")
@pass_ctx
def task_list(c: Context, base: Optional[str]) -> None:
    """List tasks in sequence order."""
    tasks = c.manager.list_tasks(base)
    acc = c.manager.test_accuracies(base)
    rows = [_task_json(t, acc.get(t.name)) for t in tasks]
    c.emit(rows, lambda: _table(
        ["#", "name", "base", "method", "status", "classes", "task params", "layers", "test acc %"],
        [[r["position"], r["name"], r["base"], r["method"], r["status"], r["num_classes"],
          r["task_params"], f"{r['active_layers']}/{r['total_layers']}",
          _pct(r["test_accuracy"])] for r in rows]))


@task_group.command("show")
@click.argument("name")
@click.option("--all-layers", is_flag=True, help="List inactive layers too.")
@pass_ctx
def task_show(c: Context, name: str, all_layers: bool) -> None:
    """Show a task and its active-layer set."""
    t = c.manager.get_task(name)
    data = _task_json(t, c.manager.test_accuracies(t.base).get(t.name))
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
        shown = [layer for layer in t.layers if all_layers or layer.active]
        click.echo(f"  {'all' if all_layers else 'active'} layers:")
        _table(["layer", "kind", "score", "active", "base params", "task params"],
               [[lay.name, lay.kind, lay.score, lay.active, lay.base_params, lay.task_params]
                for lay in shown])

    c.emit(data, text)


@task_group.command("eval")
@click.argument("name")
@click.option("--data", "data_spec", help="Evaluate on another data spec with the same classes.")
@click.option("--max-test", type=click.IntRange(1))
@pass_ctx
def task_eval(c: Context, name: str, data_spec: Optional[str], max_test: Optional[int]) -> None:
    """Measure the restored task model's test accuracy."""
    r = c.manager.evaluate_task(name, data_spec, max_test=max_test)
    c.emit({"name": name, **asdict(r)}, lambda: click.echo(
        f"{name}: accuracy {_pct(r.accuracy)}% on {r.num_samples} images (loss {r.loss:.4f})"))


# -------------------------------------------------------------------- report
@cli.group("report")
def report_group() -> None:
    """Parameter budget, accuracy matrix and layer map."""


def _only_base(c: Context, base: Optional[str]) -> BaseModel:
    if base is not None:
        return c.manager.get_base(base)
    bases = c.manager.list_bases()
    if len(bases) != 1:
        names = ", ".join(b.name for b in bases) or "none registered"
        raise TapsError(f"choose a base with --base ({names})")
    return bases[0]


@report_group.command("budget")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a bar chart PNG.")
@pass_ctx
def report_budget(c: Context, base: Optional[str], plot: Optional[str]) -> None:
    """Base + Σ task-specific parameters vs N fine-tuned models."""
    c.emit(*_budget(c, base, plot))


def _budget(c: Context, base: Optional[str], plot: Optional[str] = None):  # type: ignore[no-untyped-def]
    b = _only_base(c, base)
    rep = reports.budget(b, c.manager.registry.list_tasks(b.name, ready_only=True))
    if plot:
        reports.plot_budget(rep, plot)

    def text() -> None:
        click.echo(f"base {b.name} ({b.model_spec}): {b.num_params:,} parameters")
        _table(["task", "method", "layers", "task params", "× base", "bytes"],
               [[t["name"], t["method"], f"{t['active_layers']}/{t['total_layers']}",
                 t["task_params"], f"{t['ratio_to_base']:.3f}", t["bytes"]]
                for t in rep["tasks"]])
        click.echo(f"total: {rep['total_params']:,} = {rep['ratio_to_base']:.3f}× base; "
                   f"{len(rep['tasks'])} fine-tuned models: {rep['finetune_total_params']:,}; "
                   f"linear probes: {rep['linear_total_params']:,}")

    return rep, text


@report_group.command("accuracy")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--verify", is_flag=True,
              help="Re-hash every artifact and recompute every task's probe logits.")
@click.option("--reevaluate", is_flag=True,
              help="Re-measure every task's test accuracy where its data is reachable.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a heatmap PNG.")
@pass_ctx
def report_accuracy(c: Context, base: Optional[str], verify: bool, reevaluate: bool,
                    plot: Optional[str]) -> None:
    """Accuracy of every task after every later addition; forgetting and BWT."""
    rep, text = _accuracy(c, base, verify, reevaluate, plot)
    c.emit(rep, text)
    _raise_if_unverified(rep)


def _accuracy(c: Context, base: Optional[str], verify: bool, reevaluate: bool = False,  # type: ignore[no-untyped-def]
              plot: Optional[str] = None):
    b = _only_base(c, base)
    m = c.manager
    skipped: list[str] = []
    if reevaluate:
        for t in m.registry.list_tasks(b.name, ready_only=True):
            try:
                m.evaluate_task(t.name, record=True)
            except (TapsError, RegistryError) as exc:  # data moved away: keep recorded figures
                skipped.append(f"{t.name}: {exc}")
    tasks = m.registry.list_tasks(b.name, ready_only=True)
    rep = reports.accuracy_matrix(tasks, m.registry.list_evaluations(b.name))
    rep["reevaluate_skipped"] = skipped
    rep["verify_failures"] = []
    if verify:
        checks = m.verify(b.name)
        rep["verify_failures"] = [asdict(p) for p in checks if not p.ok]
        # Interference-free means now (every probe recomputes) and in the recorded history.
        rep["verified"] = not rep["verify_failures"] and not rep["changed"]
        drifts = [p.max_drift for p in checks if p.max_drift is not None]
        rep["max_logit_drift"] = max(drifts, default=0.0)
    if plot:
        reports.plot_accuracy(rep, plot)

    def text() -> None:
        names = rep["tasks"]
        rows = []
        for name, row, kinds in zip(names, rep["matrix"], rep["cells"]):
            rows.append([name] + [
                "-" if k is None else f"CHANGED {_pct(v)}" if k == "changed"
                else _pct(v) + ("*" if k == "probe" else "")
                for v, k in zip(row, kinds)])
        _table(["task \\ after"] + names, rows)
        click.echo("* probe-verified: logits on the stored probe batch unchanged, so the "
                   "accuracy is the measured one")
        click.echo(f"average accuracy {_pct(rep['average_accuracy'])}%, "
                   f"forgetting {_pct(rep['forgetting'])} points, BWT {_pct(rep['bwt'])} points"
                   + ("" if rep["complete"] else " (final column incomplete)"))
        for cell in rep["changed"]:
            click.echo(f"WARNING: probe logits changed for {cell}")
        for line in skipped:
            click.echo(f"not re-evaluated: {line}")
        if rep["verified"]:
            click.echo(f"verified: interference-free — every artifact matches its sha256 and "
                       f"every task's probe logits are unchanged "
                       f"(max drift {rep['max_logit_drift']:.3g})")

    return rep, text


def _raise_if_unverified(rep: dict[str, Any]) -> None:
    if rep["verify_failures"]:
        detail = "; ".join(f"{p['task']}: {p['error'] or 'max drift %.3g' % p['max_drift']}"
                           for p in rep["verify_failures"])
        raise TapsError(f"verification failed for {detail}")
    if rep["verified"] is False:
        raise TapsError("verification failed: probe logits changed for "
                        + ", ".join(rep["changed"]))


@report_group.command("layers")
@click.option("--base", help="Base model (needed when there are several).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write a tasks × layers PNG.")
@pass_ctx
def report_layers(c: Context, base: Optional[str], plot: Optional[str]) -> None:
    """Which layers each task turned on."""
    b = _only_base(c, base)
    rep = reports.layer_map(c.manager.registry.list_tasks(b.name, ready_only=True))
    if plot:
        reports.plot_layers(rep, plot)
    names = rep["tasks"]
    c.emit(rep, lambda: _table(
        ["layer"] + names,
        [[layer] + ["on" if row[i] else "." for row in rep["active"]]
         for i, layer in enumerate(rep["layers"])]))


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
@pass_ctx
def predict_cmd(c: Context, name: str, images: tuple[str, ...], top: int) -> None:
    """Top classes with probabilities for each IMAGE."""
    preds = c.manager.predict(name, list(images), top_k=top)
    data = [{"image": img, "top": [{"class": k, "probability": p} for k, p in pred]}
            for img, pred in zip(images, preds)]

    def text() -> None:
        for img, pred in zip(images, preds):
            click.echo(f"{img}: " + ", ".join(f"{k} {100 * p:.1f}%" for k, p in pred))

    c.emit(data, text)


# ----------------------------------------------------------------------- demo
@cli.command("demo")
@click.option("--quick", is_flag=True, help="A smaller run (for smoke tests).")
@pass_ctx
def demo_cmd(c: Context, quick: bool) -> None:
    """Offline demo: real ImageNet base, three real tasks, budget and verified accuracy."""
    from taps_cl import demo

    # With --json the progress lines go to stderr so stdout stays one JSON document.
    demo.run(c.manager, quick=quick, progress=_progress(c),
             say=(lambda msg: click.echo(msg, err=True)) if c.json else click.echo)
    budget, budget_text = _budget(c, demo.BASE_NAME)
    accuracy, accuracy_text = _accuracy(c, demo.BASE_NAME, verify=True)

    def text() -> None:
        click.echo("")
        budget_text()
        click.echo("")
        accuracy_text()

    c.emit({"budget": budget, "accuracy": accuracy}, text)
    _raise_if_unverified(accuracy)


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
    except Exception as exc:  # a bug: still one line unless --debug
        if _STATE["debug"]:
            raise
        click.echo(f"Error: unexpected {type(exc).__name__}: {first_line(exc)} (run with --debug "
                   f"for the traceback)", err=True)
        sys.exit(1)
