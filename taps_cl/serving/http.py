"""The inference endpoints of `taps-cl serve`, after the Open Inference Protocol (KServe V2).

Routes (request and response shapes in docs/serving.md):

    GET  /v2                        server metadata
    GET  /v2/health/live            200 while the process answers
    GET  /v2/health/ready           200 once the served tasks are loaded, else 503
    GET  /v2/models                 the tasks served
    GET  /v2/models/{task}          a task's metadata (V2 fields plus classes, input size, …)
    GET  /v2/models/{task}/ready    200, or 404 for a task not served
    POST /v2/models/{task}/infer    images → that task's logits and top classes
    POST /v2/infer                  images, each with its tasks → per image and task

Every request is answered from memory: the registry is read only by the watcher thread
(`taps_cl.serving.watch`). Images are decoded before they are queued (`images`), then run in
mixed batches on one worker thread (`batching`). Anything refused is a 4xx with a JSON body
`{"error": "…"}`; an unexpected failure is a 500 with the same shape, its traceback only in the
server's log.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

import torch
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from taps_cl.errors import TapsError, first_line
from taps_cl.serving import images as codec
from taps_cl.serving.batching import Batcher
from taps_cl.serving.images import Decoded, Limits, RequestError
from taps_cl.serving.watch import Served, Watcher

if TYPE_CHECKING:
    from taps_cl.serving.state import AppState
    from taps_cl.serving.multitask import ServedTask

log = logging.getLogger(__name__)

PREFIX = "/v2"
# A body over the limit is still read (and dropped) up to this much more, so that the client,
# which is still sending, receives its 413 instead of a reset connection.
DRAIN_BYTES = 64 * 2**20
JSON_TYPES = ("application/json",)
FORM_TYPES = ("multipart/form-data",)


class Inference:
    """The served models, the batcher that runs them and the watcher that keeps them current."""

    def __init__(self, state: AppState) -> None:
        cfg = state.config
        self.state = state
        self.served = Served(cfg.device)
        self.batcher = Batcher(self.served.run, window_s=cfg.batch_window_ms / 1000,
                               max_batch=cfg.max_batch)
        self.watcher = Watcher(state, self.served)
        self.limits = Limits(max_images=cfg.max_batch)

    def start(self) -> None:
        self.batcher.start()
        self.watcher.start()

    def stop(self) -> None:
        self.watcher.stop()
        self.batcher.stop()

    @property
    def ready(self) -> bool:
        return self.watcher.ready.is_set()

    def require_ready(self) -> None:
        if not self.ready:
            raise RequestError("the server is still loading its tasks; try again shortly", 503)

    def task(self, name: str) -> ServedTask:
        """A served task, or a 404 that says why it is not served."""
        found = self.served.tasks.get(name)
        if found is not None:
            return found
        why = self.served.unavailable.get(name)
        raise RequestError(f"task {name!r} is not served: {why}" if why else
                           f"task {name!r} is not served here (GET {PREFIX}/models lists "
                           "them)", 404)

    async def run(self, decoded: Decoded, tasks: list[list[str]]) -> list[dict[str, Any]]:
        """The images through their tasks, in the next mixed batch."""
        try:
            return await asyncio.wrap_future(self.batcher.submit(decoded.images, tasks))
        except TapsError as exc:  # what the model refuses about this request's input
            from taps_cl.serving.multitask import UnknownTask

            status = 404 if isinstance(exc, UnknownTask) else 422
            raise RequestError(first_line(exc), status) from None


def install_inference(app: FastAPI, state: AppState) -> None:
    """Mount the /v2 routes on `app`; the model loads when the app starts (its lifespan)."""
    engine = Inference(state)
    state.extra["inference"] = engine
    state.startup.append(engine.start)
    state.shutdown.append(engine.stop)
    cfg = state.config
    router = APIRouter(prefix=PREFIX)

    @router.get("")
    async def server_metadata() -> dict[str, Any]:
        from importlib.metadata import PackageNotFoundError, version

        try:
            ours = version("taps-cl")
        except PackageNotFoundError:  # run from a source tree that was not installed
            ours = "unknown"
        return {"name": "taps-cl", "version": ours,
                "extensions": ["model_list", "multi_task_infer", "multipart"],
                "ready": engine.ready, "tasks": len(engine.served.tasks),
                "unavailable": dict(engine.served.unavailable)}

    @router.get("/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @router.get("/health/ready")
    async def ready() -> JSONResponse:
        body: dict[str, Any] = {"ready": engine.ready}
        if engine.watcher.error:
            body["error"] = engine.watcher.error
        return JSONResponse(body, status_code=200 if engine.ready else 503)

    @router.get("/models")
    async def models() -> dict[str, Any]:
        engine.require_ready()
        return {"models": [{"name": t.name, "base": t.base, "method": t.method,
                            "position": t.position, "num_classes": len(t.classes),
                            "sha256": t.sha256}
                           for t in engine.served.tasks.values()]}

    @router.get("/models/{task}")
    async def model_metadata(task: str) -> dict[str, Any]:
        engine.require_ready()
        return metadata(engine.task(task))

    @router.get("/models/{task}/ready")
    async def model_ready(task: str) -> dict[str, Any]:
        engine.require_ready()
        return {"name": engine.task(task).name, "ready": True}

    @router.post("/models/{task}/infer")
    async def infer(task: str, request: Request) -> JSONResponse:
        body = await read_body(request, cfg.max_body_bytes)
        engine.require_ready()
        served = engine.task(task)
        decoded = await decode(request, body, engine.limits, multi=False)
        results = await engine.run(decoded, [[task]] * len(decoded.images))
        return JSONResponse(await run_in_threadpool(task_response, served, results, decoded))

    @router.post("/infer")
    async def infer_many(request: Request) -> JSONResponse:
        body = await read_body(request, cfg.max_body_bytes)
        engine.require_ready()
        decoded = await decode(request, body, engine.limits, multi=True)
        assert decoded.tasks is not None
        served = {name: engine.task(name) for names in decoded.tasks for name in names}
        results = await engine.run(decoded, decoded.tasks)
        return JSONResponse(await run_in_threadpool(multi_response, served, results, decoded))

    app.include_router(router)
    _install_errors(app)


# ---------------------------------------------------------------------- requests
async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, at most `limit` bytes (413 beyond; see DRAIN_BYTES)."""
    declared = request.headers.get("content-length", "")
    too_large = RequestError(f"the request body is over {limit:,} bytes (the server's "
                             "--max-body-mb)", 413)
    if declared.isdigit() and int(declared) > limit + DRAIN_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + DRAIN_BYTES:
                break
            if size <= limit:
                chunks.append(chunk)
    except ClientDisconnect:
        raise RequestError("the client went away before sending the whole body") from None
    if size > limit:
        raise too_large
    return b"".join(chunks)


async def decode(request: Request, body: bytes, limits: Limits, multi: bool) -> Decoded:
    """A JSON inference request or a multipart form → Decoded (images decoded off the event
    loop, in the thread pool)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in JSON_TYPES:
        def parse() -> Decoded:
            return codec.decode_v2(codec.parse_json(body), limits, multi)

        return await run_in_threadpool(parse)
    if kind in FORM_TYPES:
        files, fields = await _form(request, body, limits)
        return await run_in_threadpool(codec.decode_form, files, fields, limits, multi)
    raise RequestError(f"unsupported content type {kind or 'none'!r}: send application/json "
                       "(an inference request) or multipart/form-data (image files)", 415)


async def _form(request: Request, body: bytes, limits: Limits
                ) -> tuple[list[tuple[str, bytes]], dict[str, list[str]]]:
    """The file parts and the fields of a multipart body already read into memory."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    files: list[tuple[str, bytes]] = []
    fields: dict[str, list[str]] = {}
    async with Request(request.scope, receive).form(max_files=limits.max_images + 1,
                                                     max_fields=64) as form:
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or key, await value.read()))
            else:
                fields.setdefault(key, []).append(value)
    return files, fields


# --------------------------------------------------------------------- responses
def metadata(t: ServedTask) -> dict[str, Any]:
    """A task's V2 model metadata, with what taps-cl knows about it."""
    classes = len(t.classes)
    return {**t.to_json(), "name": t.name, "platform": "pytorch", "num_classes": classes,
            "inputs": [{"name": "images", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, classes]},
                        {"name": "probabilities", "datatype": "FP32", "shape": [-1, -1]},
                        {"name": "classes", "datatype": "BYTES", "shape": [-1, -1]}]}


def _top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k softmax probabilities and class indices per row, as `taps-cl predict` ranks."""
    return torch.softmax(logits, dim=1).topk(min(k, logits.shape[1]), dim=1)


def task_response(t: ServedTask, results: list[dict[str, Any]], d: Decoded) -> dict[str, Any]:
    """A V2 inference response for one task: `logits` FP32 [N, C], `probabilities` FP32 [N, K]
    (descending) and `classes` BYTES [N, K] (their names), K = min(top_k, C)."""
    logits = torch.stack([r[t.name] for r in results]).detach().float().cpu()
    probs, index = _top(logits, d.top_k)
    n, k = probs.shape
    tensors = {
        "logits": {"name": "logits", "datatype": "FP32", "shape": list(logits.shape),
                   "data": logits.flatten().tolist()},
        "probabilities": {"name": "probabilities", "datatype": "FP32", "shape": [n, k],
                          "data": probs.flatten().tolist()},
        "classes": {"name": "classes", "datatype": "BYTES", "shape": [n, k],
                    "data": [t.classes[i] for i in index.flatten().tolist()]},
    }
    out: dict[str, Any] = {"model_name": t.name, "outputs": [
        tensors[name] for name in (d.outputs or codec.OUTPUTS)]}
    if d.id is not None:
        out["id"] = d.id
    return out


def multi_response(served: dict[str, ServedTask], results: list[dict[str, Any]], d: Decoded
                   ) -> dict[str, Any]:
    """Per image (in request order), per task it named: `logits` and the `top` classes."""
    assert d.tasks is not None
    images = []
    for names, result in zip(d.tasks, results):
        per_task = {}
        for name in names:
            logits = result[name].detach().float().cpu()[None]
            probs, index = _top(logits, d.top_k)
            classes = served[name].classes
            per_task[name] = {
                "logits": logits[0].tolist(),
                "top": [{"class": classes[i], "probability": p}
                        for p, i in zip(probs[0].tolist(), index[0].tolist())]}
        images.append({"tasks": per_task})
    out: dict[str, Any] = {"model_name": "taps-cl", "results": images}
    if d.id is not None:
        out["id"] = d.id
    return out


# ------------------------------------------------------------------------ errors
def _install_errors(app: FastAPI) -> None:
    """JSON errors under /v2; other paths (the pages) keep the handlers they had."""
    previous_http = app.exception_handlers[StarletteHTTPException]
    previous_500 = app.exception_handlers.get(Exception)

    async def request_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestError)
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    async def http_error(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith(PREFIX):
            return await previous_http(request, exc)
        assert isinstance(exc, StarletteHTTPException)
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def internal_error(request: Request, exc: Exception) -> Response:
        if not request.url.path.startswith(PREFIX):
            if previous_500 is not None:
                return await previous_500(request, exc)
            return PlainTextResponse("Internal Server Error", status_code=500)
        log.error("%s %s failed: %s: %s", request.method, request.url.path,
                  type(exc).__name__, first_line(exc))
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server's "
                                      "log has the details"}, status_code=500)

    app.add_exception_handler(RequestError, request_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
