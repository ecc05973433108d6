"""The FastAPI app of ``hierarchy serve``: classify, health, readiness, pipeline, metrics, the upload page."""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from hierarchy import __version__
from hierarchy.serve.limits import ASGIApp, Gate, GuardMiddleware, Receive, Scope, Send, TooLarge
from hierarchy.serve.service import Service, Upload

log = logging.getLogger("hierarchy.serve")

STATIC = Path(__file__).parent / "static"
CLASSIFY = "/v1/classify"
API_KEY_HEADER = "X-API-Key"


def create_app(service: Service, api_key: str | None = None, load_on_startup: bool = True) -> FastAPI:
    """The app for ``service``. With ``load_on_startup`` the pipeline loads in a thread when the app
    starts (``/ready`` says 503 until it is warm); otherwise call ``service.load()`` yourself."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if load_on_startup:
            threading.Thread(target=_load_quietly, args=(service,), name="hierarchy-load", daemon=True).start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, service.close)

    app = FastAPI(title="hierarchy", version=__version__, lifespan=lifespan,
                  description="Hierarchical image classification: each image is routed through a cascade of "
                  "classifier stages; every answer says where it stopped and why. Not a diagnosis.")
    guard = _key_check(api_key)
    _add_routes(app, service, guard)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    gate = Gate(service.limits.max_queue)
    service.metrics.in_flight.set_function(lambda: gate.held)
    app.add_middleware(GuardMiddleware, limits=service.limits, gate=gate, paths=frozenset({CLASSIFY}),
                       on_busy=service.metrics.busy.inc)
    app.add_middleware(CountRequests, service=service)
    return app


def _load_quietly(service: Service) -> None:
    try:
        service.load()
    except Exception:  # noqa: BLE001 - kept in service.error, shown by /ready
        pass


def _key_check(api_key: str | None) -> Any:
    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get(API_KEY_HEADER) or request.headers.get("authorization", "").removeprefix("Bearer ")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(401, f"missing or wrong API key (send it as {API_KEY_HEADER} or Authorization: Bearer)",
                                headers={"WWW-Authenticate": "Bearer"})
    return Depends(check)


def _add_routes(app: FastAPI, service: Service, guard: Any) -> None:
    limits = service.limits

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/health", summary="the process is alive")
    async def health() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/ready", summary="the pipeline is loaded and warmed up (503 before)")
    async def ready() -> JSONResponse:
        if service.ready:
            return JSONResponse({"ready": True, "pipeline": service.pipeline.name})
        return JSONResponse({"ready": False, "error": service.error}, status_code=503)

    @app.get("/v1/pipeline", dependencies=[guard], summary="stages, labels, thresholds, OOD settings, weights, versions")
    async def pipeline() -> dict[str, Any]:
        _require_ready(service)
        return service.info

    @app.get("/metrics", dependencies=[guard], include_in_schema=False)
    async def metrics() -> Response:
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    @app.post(CLASSIFY, dependencies=[guard], summary="classify uploaded images",
              description="One record per file, in order: the records of `hierarchy run --format json` (status ok, "
              "abstained, rejected or error with a typed error, and the trace along the route). With explain=true "
              "each record also has a class-activation map per visited stage.")
    async def classify(files: list[UploadFile] = File(..., description="image files"),
                       explain: bool = Query(False, description="add a class-activation map per visited stage")
                       ) -> list[dict[str, Any]]:
        _require_ready(service)
        if len(files) > limits.max_files:
            raise TooLarge(f"{len(files)} files in one request, more than --max-files={limits.max_files}")
        start = time.perf_counter()
        uploads = [await _read(f, i, limits.max_upload_bytes) for i, f in enumerate(files)]
        try:
            records = await asyncio.wait_for(service.classify(uploads, explain), limits.timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"no answer within the request timeout of {limits.timeout_s:g} s") from None
        service.metrics.latency.observe(time.perf_counter() - start)
        return records


def _require_ready(service: Service) -> None:
    if not service.ready:
        detail = f"pipeline failed to load: {service.error}" if service.error else "pipeline is still loading"
        raise HTTPException(503, detail, headers={"Retry-After": "5"})


async def _read(f: UploadFile, index: int, max_bytes: int) -> Upload:
    name = Path(f.filename or "").name or f"upload-{index + 1}"
    size = f.size if f.size is not None else 0
    if size > max_bytes:
        return Upload(name, None, size)  # refused unread
    data = await f.read(max_bytes + 1)
    return Upload(name, None, len(data)) if len(data) > max_bytes else Upload(name, data, len(data))


class CountRequests:
    """Pure ASGI: every HTTP response counted by path and status code (also the guard's 413/503)."""

    def __init__(self, app: ASGIApp, service: Service):
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 500}

        async def watch(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self.service.metrics.request(scope["path"], status["code"])
