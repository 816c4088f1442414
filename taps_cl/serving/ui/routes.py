"""The pages of the web overview and their JSON views, mounted on the app by `install_ui`.

Pages (each also answers `?format=json` with the document of the CLI command named):

    /                          bases                          `base list --json`
    /bases/B                   one base, its task table       `task list --base B --json`
                               (q, method, status, group,     (the page's rows; in sequence
                               sort, order, page, per_page)   order: `--limit N --offset K`)
    /bases/B/budget            budget chart                   `report budget --base B --json`
    /bases/B/accuracy          heatmap or summary (summary)   `report accuracy --base B --json`
                                                              (`--summary` with summary=1)
    /bases/B/layers            tasks × layers                 `report layers --base B --json`
    /bases/B/similarity        heatmap and groups             `report similarity --base B --json`
    /bases/B/lineage           who reads whom                 `report budget --base B --json`
    /bases/B/try  (GET, POST)  upload an image                task → `predict TASK IMAGE --json`
    /tasks/T                   one task                       `task show T --json`
    /tasks/T/verify  (POST)    verify this task               `report accuracy --verify --task T
                                                              --json` (summary as above)

`/api/…` gives the same documents under the CLI's own names (`/api/bases`, `/api/bases/B`,
`/api/tasks?base=B&limit=N&offset=K`, `/api/tasks/T`, `/api/reports/KIND?base=B`). Nothing here
writes to the registry. Unknown bases and tasks answer 404, bad parameters 400, unusable uploads
400/413/415, each with a one-line message (a page, or `{"error": …}` for JSON).
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional
from urllib.parse import quote, urlencode

from fastapi import APIRouter, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from registry import NotFound, RegistryError
from taps_cl.analysis import documents
from taps_cl.errors import TapsError, first_line
from taps_cl.serving.state import AppState
from taps_cl.serving.ui import charts, tryit
from taps_cl.serving.ui import views as v
from taps_cl.serving.ui.cache import ReportCache
from taps_cl.serving.ui.table import BadQuery, TableQuery, flag, whole

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
MAX_FIELDS = 2 * v.CHECKBOXES + 8  # form fields of one try-it upload at most


def install_ui(app: FastAPI, state: AppState) -> None:
    """Mount the pages, their JSON views and the static files on `app`."""
    cache: ReportCache = state.extra.setdefault("ui_cache", ReportCache())
    verifications: dict[str, v.Verification] = state.extra.setdefault("ui_verifications", {})
    templates = _templates()
    router = APIRouter()

    def reader(call: Callable[[v.Reader], Any]) -> Any:
        with state.manager() as m:
            return call(v.Reader(m, cache))

    def show(request: Request, template: str, view: v.View, status: int = 200) -> Response:
        if _format(request) == "json":
            return _json(view.document())
        return templates.TemplateResponse(request, template, view.context, status_code=status)

    @router.get("/")
    @_answers(templates)
    def registry_page(request: Request) -> Response:
        return show(request, "registry.html", reader(lambda r: v.registry_view(r, verifications)))

    @router.get("/bases/{base}")
    @_answers(templates)
    def base_page(request: Request, base: str) -> Response:
        query = TableQuery.parse(request.query_params)
        _format(request)
        return show(request, "base.html", reader(lambda r: v.base_view(r, base, query)))

    @router.get("/bases/{base}/budget")
    @_answers(templates)
    def budget_page(request: Request, base: str) -> Response:
        return show(request, "budget.html", reader(lambda r: v.budget_view(r, base)))

    @router.get("/bases/{base}/accuracy")
    @_answers(templates)
    def accuracy_page(request: Request, base: str) -> Response:
        summary = _summary(request)
        view = reader(lambda r: v.accuracy_view(r, base, summary))
        if _format(request) == "html":
            v.heatmap_allowed(view.context["n"], view.context["summary"])
        return show(request, "accuracy.html", view)

    @router.get("/bases/{base}/layers")
    @_answers(templates)
    def layers_page(request: Request, base: str) -> Response:
        return show(request, "layers.html", reader(lambda r: v.layers_view(r, base)))

    @router.get("/bases/{base}/similarity")
    @_answers(templates)
    def similarity_page(request: Request, base: str) -> Response:
        return show(request, "similarity.html", reader(lambda r: v.similarity_view(r, base)))

    @router.get("/bases/{base}/lineage")
    @_answers(templates)
    def lineage_page(request: Request, base: str) -> Response:
        return show(request, "lineage.html", reader(lambda r: v.lineage_view(r, base)))

    @router.get("/bases/{base}/try")
    @_answers(templates)
    def try_page(request: Request, base: str) -> Response:
        if _format(request) == "json":
            raise BadQuery("try-it has a JSON view for its results only: POST an image")
        return show(request, "try.html", reader(lambda r: v.try_view(r, base)))

    @router.post("/bases/{base}/try")
    @_answers(templates)
    async def try_upload(request: Request, base: str) -> Response:
        fmt = _format(request)
        limit = state.config.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise tryit.too_large(int(declared), limit)
        form = await request.form(max_files=1, max_fields=MAX_FIELDS)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise tryit.BadUpload("no image was uploaded: choose an image file (PNG, JPEG, …)")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise tryit.too_large(len(data), limit)
        top_k = whole(form, "top", tryit.TOP_K, 1, 20)  # type: ignore[arg-type]
        asked = [str(x) for x in form.getlist("task")]
        asked += [n.strip() for x in form.getlist("tasks") for n in str(x).split(",")]
        filename = upload.filename or "upload"
        kind = tryit.image_format(data)

        def run(r: v.Reader) -> v.View:
            r.m.get_base(base)  # 404 before anything else
            names = tryit.chosen_tasks(r.m.registry.list_task_names(base), asked, v.TRY_TASKS)
            results = tryit.predict_tasks(r.m, names, data, kind, top_k, state.config.device)
            return v.try_view(r, base, names, results, filename)

        view = await run_in_threadpool(reader, run)
        if fmt == "json":
            return _json(view.document())
        return templates.TemplateResponse(request, "try.html", view.context)

    @router.get("/tasks/{task}")
    @_answers(templates)
    def task_page(request: Request, task: str) -> Response:
        return show(request, "task.html", reader(lambda r: v.task_view(r, task)))

    @router.post("/tasks/{task}/verify")
    @_answers(templates)
    def verify_page(request: Request, task: str) -> Response:
        summary = _summary(request)

        def run(r: v.Reader) -> v.View:
            outcome = v.verify_task(r.m, task)
            verifications[outcome.base] = outcome
            return v.task_view(r, task, outcome)

        view = reader(run)
        outcome = view.context["verification"]
        if _format(request) == "json":
            rep = outcome.report
            short = len(rep.tasks) > v.HEATMAP_TASKS if summary is None else summary
            return _json(rep.to_json(matrix=not short))
        return templates.TemplateResponse(request, "task.html", view.context)

    _install_api(router, reader)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="ui-static")
    _install_not_found(app, templates)

    def warm() -> None:
        # The registry page's reports of every base, computed once before anyone asks.
        threading.Thread(target=_warm_up, args=(reader, verifications), daemon=True,
                         name="taps-cl-ui-warm-up").start()

    state.startup.append(warm)


def _install_api(router: APIRouter, reader: Callable[[Callable[[v.Reader], Any]], Any]) -> None:
    """`/api/…`: the CLI's documents under its command names, for scripts."""

    @router.get("/api/bases")
    @_answers(None)
    def api_bases(request: Request) -> Response:
        return _json(reader(lambda r: documents.base_list_json(r.m.list_bases())))

    @router.get("/api/bases/{base}")
    @_answers(None)
    def api_base(request: Request, base: str) -> Response:
        return _json(reader(lambda r: documents.base_json(r.m.get_base(base))))

    @router.get("/api/tasks")
    @_answers(None)
    def api_tasks(request: Request) -> Response:
        params = request.query_params
        base = params.get("base") or None
        limit = whole(params, "limit", -1, 0)
        offset = whole(params, "offset", 0, 0)
        return _json(reader(lambda r: [documents.summary_json(t) for t in r.m.task_summaries(
            base, limit=None if limit < 0 else limit, offset=offset)]))

    @router.get("/api/tasks/{task}")
    @_answers(None)
    def api_task(request: Request, task: str) -> Response:
        def document(r: v.Reader) -> Any:
            t = r.m.get_task(task)
            return v.task_document(r.m, t, r.m.get_base(t.base))

        return _json(reader(document))

    @router.get("/api/reports/{kind}")
    @_answers(None)
    def api_report(request: Request, kind: str) -> Response:
        base = request.query_params.get("base") or None
        summary = flag(request.query_params, "summary", False)
        builders: dict[str, Callable[[Any], Any]] = {
            "budget": lambda m: m.budget(base).to_json(),
            "accuracy": lambda m: m.accuracy(base).to_json(matrix=not summary),
            "layers": lambda m: m.layer_map(base).to_json(),
            "similarity": lambda m: m.similarity(base).to_json(),
        }
        if kind not in builders:
            raise NotFound(f"no report {kind!r} (reports: {', '.join(builders)})")
        return _json(reader(lambda r: builders[kind](r.m)))


def _warm_up(reader: Callable[[Callable[[v.Reader], Any]], Any],
             verifications: dict[str, v.Verification]) -> None:
    try:
        reader(lambda r: v.registry_view(r, verifications))
    except Exception as exc:  # noqa: BLE001 - the pages will say it when asked
        log.debug("warming the report cache failed: %s", first_line(exc))


# ------------------------------------------------------------------ answers
def _format(request: Request) -> str:
    fmt = request.query_params.get("format", "html")
    if fmt not in ("html", "json"):
        raise BadQuery(f"format must be html or json, got {fmt!r}")
    return fmt


def _summary(request: Request) -> Optional[bool]:
    if not request.query_params.get("summary"):
        return None
    return flag(request.query_params, "summary", False)


def _json(document: Any, status: int = 200) -> Response:
    """The document exactly as `taps-cl --json` prints it into a pipe."""
    return Response(documents.dumps(document) + "\n", status_code=status,
                    media_type="application/json")


def _status(exc: Exception) -> int:
    if isinstance(exc, NotFound):
        return 404
    if isinstance(exc, tryit.BadUpload):
        return exc.status
    if isinstance(exc, TapsError):
        return 400
    if isinstance(exc, HTTPException):
        return exc.status_code
    return 500


def _failure(request: Request, templates: Optional[Jinja2Templates], exc: Exception) -> Response:
    """The answer to a request that failed: the status its error means and a one-line message."""
    status = _status(exc)
    if isinstance(exc, HTTPException):
        message = str(exc.detail)
    elif isinstance(exc, (TapsError, RegistryError)):
        message = first_line(exc)
    else:
        log.exception("the page %s failed", request.url.path)
        message = f"unexpected {type(exc).__name__}: {first_line(exc)}"
    wants_json = templates is None or request.query_params.get("format") == "json"
    if wants_json:
        return _json({"error": message}, status)
    return templates.TemplateResponse(request, "error.html",
                                      {"status": status, "message": message}, status_code=status)


def _answers(templates: Optional[Jinja2Templates]) -> Callable[[Callable[..., Any]],
                                                               Callable[..., Any]]:
    """Turn what a page raises into its answer (`_failure`); the app goes on serving."""

    def wrap(page: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(page):
            @functools.wraps(page)
            async def answer_async(request: Request, **kwargs: Any) -> Response:
                try:
                    return await page(request, **kwargs)  # type: ignore[no-any-return]
                except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
                    return _failure(request, templates, exc)
            return answer_async

        @functools.wraps(page)
        def answer(request: Request, **kwargs: Any) -> Response:
            try:
                return page(request, **kwargs)  # type: ignore[no-any-return]
            except Exception as exc:  # noqa: BLE001 - every failure becomes an answer
                return _failure(request, templates, exc)
        return answer

    return wrap


def _install_not_found(app: FastAPI, templates: Jinja2Templates) -> None:
    """Unknown paths get the 404 page in a browser; other clients (and /v2) FastAPI's JSON."""

    async def not_found(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith("/v2") or "text/html" not in \
                request.headers.get("accept", ""):
            return await http_exception_handler(request, exc)
        return _failure(request, templates, exc)

    app.add_exception_handler(HTTPException, not_found)


# ---------------------------------------------------------------- templates
def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=HERE / "templates")
    env = templates.env
    env.filters.update(
        num=lambda x: "-" if x is None else f"{x:,}",
        pct=lambda x: "-" if x is None else f"{100 * x:.2f}",
        ratio=lambda x: "-" if x is None else f"{x:.4f}",
        nbytes=_nbytes,
        when=lambda d: "-" if d is None else d.strftime("%Y-%m-%d %H:%M"),
        clock=lambda t: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)),
        short=lambda s: "-" if not s else f"{s[:12]}…",
        pretty=lambda x: json.dumps(x, indent=2, sort_keys=True, default=str),
        mark=lambda kind: charts.CELL_MARKS.get(kind or "", ""),
    )
    env.globals.update(
        task_url=charts.task_url,
        base_url=lambda name, *rest: "/bases/" + quote(name, safe="") + "".join(
            "/" + part for part in rest),
        qs=lambda params: ("?" + urlencode(params)) if params else "",
        charts=charts,
        views=v,
    )
    return templates


def _nbytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1000
    return f"{n} B"
