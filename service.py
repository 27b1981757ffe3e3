"""The Bento: a public gateway (no GPU) in front of the SAM 3 model service (one GPU, adaptive batching).

Edge --X-API-Key--> Gateway: validate, row->processing, R2 download --> Sam3Model.segment (batched)
                    Gateway: mask PNG -> R2, row->completed | failed, JSON response
With "async": true the gateway answers 202 once the job is recorded, and its job runner (jobs/) does the rest.
"""

from __future__ import annotations

import logging
import uuid

import bentoml
from fastapi import FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from backend import redaction
from backend.api_models import (
    BatchPredictRequest,
    BatchPredictResponse,
    ErrorResponse,
    JobAccepted,
    PredictOptions,
    PredictRequest,
    PredictResponse,
    TaskStatus,
)
from backend.auth import ApiKeyMiddleware
from backend.errors import ApiError, error_response, validation_error_code
from backend.paths import ControlCharacterPaths
from backend.pipeline import Limits, PredictPipeline
from backend.segmenter import Segmenter
from backend.settings import get_settings
from backend.wiring import build_jobs, build_store, build_task_store, check_auth
from jobs import accepted_body, status_body

log = logging.getLogger("sam3.service")
settings = get_settings()
redaction.install(settings.secrets())
API_KEY = check_auth(settings)

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 422, 500, 502, 503, 504)}
PREDICT_RESPONSES = {
    **ERRORS,
    202: {"model": JobAccepted, "description": 'Accepted ("async": true): the job is recorded and runs'},
    429: {
        "model": ErrorResponse,
        "description": "queue_full: MAX_QUEUED_JOBS async jobs are waiting",
        "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    },
}
api = FastAPI(
    title="SAM 3 inference backend",
    version="1.0.0",
    description="Segment every instance of a concept. The contract is docs/api-contract.md.",
    docs_url="/api/v1/docs",
    openapi_url="/api/v1/openapi.json",
    redoc_url=None,
)


@api.exception_handler(RequestValidationError)
async def _validation_failed(request: Request, exc: RequestValidationError):
    status, code, message = validation_error_code(exc.errors())
    return error_response(status, code, message)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return exc.response()


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    codes = {404: "not_found", 405: "method_not_allowed"}
    return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.error("unhandled %s on %s", type(exc).__name__, request.url.path)
    return error_response(500, "internal_error", "the server failed while processing this request")


@bentoml.service(
    name="sam3-model",
    resources={"gpu": settings.model_workers},
    workers=settings.model_workers,
    traffic={"timeout": settings.model_timeout_s},
    # BentoML's internal client recycles connections in use (bentoml#5540): never recycle them.
    runner_connection={"max_requests": 10**9, "max_age": 10.0**9},
)
class Sam3Model:
    """Owns the GPU. Loads SAM 3 in the background: /livez answers at once, /readyz says 503 until loaded."""

    def __init__(self) -> None:
        self.segmenter = Segmenter(settings, worker_index=bentoml.server_context.worker_index or 1)

    def __is_ready__(self) -> bool:
        return self.segmenter.ready

    @bentoml.api(
        batchable=True, batch_dim=0, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms
    )
    def segment(self, items: list[dict]) -> list[dict]:
        return self.segmenter.segment(items)

    @bentoml.api
    def status(self) -> dict:
        return self.segmenter.status()


@bentoml.service(
    name="sam3-gateway",
    workers=settings.gateway_workers,
    traffic={"timeout": settings.request_timeout_s, "max_concurrency": settings.max_concurrency},
    http={
        "cors": {
            "enabled": bool(settings.cors_origins),
            "access_control_allow_origins": settings.cors_origins,
            "access_control_allow_methods": ["GET", "POST", "OPTIONS"],
            "access_control_allow_headers": ["Content-Type", "X-API-Key"],
        }
    },
)
@bentoml.asgi_app(api, path="/")
class Gateway:
    """Public edge: no GPU. Authentication, validation, storage and task rows; inference goes to Sam3Model."""

    model = bentoml.depends(Sam3Model)

    def __init__(self) -> None:
        self.pipeline = PredictPipeline(
            store=build_store(settings),
            tasks=build_task_store(settings),
            segment=self._segment,
            limits=Limits(settings.max_image_bytes, settings.max_image_pixels),
        )
        self.jobs, self.runner = build_jobs(settings, self.pipeline, ready=self._model_ready)

    @bentoml.on_startup
    async def _start_jobs(self) -> None:
        await self.runner.start()
        self.runner.stop_claiming_on_signals()

    @bentoml.on_shutdown
    async def _stop_jobs(self) -> None:
        """BentoML runs this in the lifespan shutdown, once uvicorn has answered the open HTTP requests."""
        await self.runner.stop()

    async def _segment(self, item: dict) -> dict:
        return (await self.model.to_async.segment([item]))[0]

    @api.post("/api/v1/predict", response_model=PredictResponse, responses=PREDICT_RESPONSES)
    async def predict(self, body: PredictRequest):
        if body.run_async:
            return await self._submit("predict", body)
        return await self.pipeline.predict(body)

    @api.post("/api/v1/predict/batch", response_model=BatchPredictResponse, responses=PREDICT_RESPONSES)
    async def predict_batch(self, body: BatchPredictRequest):
        if body.run_async:
            return await self._submit("predict_batch", body)
        return await self.pipeline.predict_batch(body)

    async def _submit(self, kind: str, body: PredictOptions) -> JSONResponse:
        job = await self.jobs.submit(kind, body)
        return JSONResponse(accepted_body(job), status_code=202)

    @api.get("/api/v1/tasks/{task_id}", response_model=TaskStatus, responses=ERRORS)
    async def task_status(self, task_id: str = Path(description="The task_id an async request was sent with")):
        try:
            task_id = str(uuid.UUID(task_id))
        except ValueError:
            raise ApiError(422, "invalid_task_id", "task_id must be a UUID") from None
        job = await self.jobs.store.get(task_id)
        if job is None:
            raise ApiError(404, "task_not_found", f"no async task {task_id} on this server (or it expired)")
        return JSONResponse(status_body(job))

    @api.get("/api/v1/info", responses=ERRORS)
    @api.post("/api/v1/info", responses=ERRORS)
    async def info(self) -> dict:
        status = await self._model_status()
        if not status.get("model_loaded"):
            code = "model_unavailable" if status.get("state") == "failed" else "model_loading"
            raise ApiError(503, code, status.get("error") or "the model is still loading")
        return {
            **status["info"],
            "max_batch_size": settings.max_batch_size,
            "max_latency_ms": settings.max_latency_ms,
            "gpu_available": status["gpu_available"],
            "text_cache": status["text_cache"],
            "batching": status["batching"],
            "acceleration": status["acceleration"],
            "storage": self.pipeline.store.name,
            "task_store": "supabase" if self.pipeline.tasks.enabled else "disabled",
        }

    @api.get("/health")
    async def health(self) -> dict:
        status = await self._model_status()
        return {
            "status": "ok" if status.get("model_loaded") else status.get("state", "unavailable"),
            "model_loaded": bool(status.get("model_loaded")),
            "gpu_available": bool(status.get("gpu_available")),
            "storage": self.pipeline.store.name,
            "task_store": "supabase" if self.pipeline.tasks.enabled else "disabled",
            "auth": "api_key" if API_KEY else "disabled (dev mode)",
        }

    async def _model_ready(self) -> bool:
        return bool((await self._model_status()).get("model_loaded"))

    async def _model_status(self) -> dict:
        try:
            return await self.model.to_async.status()
        except Exception as exc:  # the model service is down or restarting
            log.warning("model status unavailable: %s", type(exc).__name__)
            return {"state": "unavailable", "model_loaded": False, "gpu_available": False}


@api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def _unknown_route(request: Request, path: str):
    """Declared last: BentoML's probes and metrics match before the mounted app, so only paths nobody serves
    (or served with another method) land here and get the contract's error shape, not a plain-text 404."""
    if any(route.matches(request.scope)[0] == Match.PARTIAL for route in api.routes[:-1]):
        raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed on /{path}")
    raise ApiError(404, "not_found", f"no route /{path}")


Gateway.add_asgi_middleware(ApiKeyMiddleware, api_key=API_KEY)
Gateway.add_asgi_middleware(ControlCharacterPaths)
