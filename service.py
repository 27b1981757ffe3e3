"""The Bento: a public gateway (no GPU) in front of the SAM 3 model service (one GPU, adaptive batching).

Edge --X-API-Key--> Gateway: validate, row->processing, R2 download --> Sam3Model.segment (batched)
                    Gateway: mask PNG -> R2, row->completed | failed, JSON response
With "async": true the gateway answers 202 once the job is recorded, and its job runner (jobs/) does the rest.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import sqlite3
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path as FilePath
from typing import Annotated

import bentoml
import psutil
from fastapi import Depends, Path, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from backend import redaction
from backend.api_models import (
    BatchPredictRequest,
    BatchPredictResponse,
    ErrorResponse,
    JobAccepted,
    PredictRequest,
    PredictResponse,
    TaskOptions,
    TaskStatus,
    VideoPredictRequest,
    VisualPredictRequest,
)
from backend.auth import API_KEY_SCHEME, DOCS_ASSETS_PREFIX, ApiKeyMiddleware
from backend.concurrency import ConcurrencyLimit
from backend.disconnect import until_disconnected
from backend.errors import ApiError, error_response, for_video, validation_error_code
from backend.model_client import ModelClient
from backend.paths import ControlCharacterPaths
from backend.pipeline import Limits, PredictPipeline
from backend.settings import get_settings
from backend.video_pipeline import VideoPipeline, VideoSettings
from backend.wiring import build_jobs, build_store, build_task_store, check_auth, check_exposure, listening_hosts
from jobs import Pipelines, accepted_body, status_body
from video import VideoLimits

log = logging.getLogger("sam3.service")
settings = get_settings()
redaction.install(settings.secrets())
API_KEY = check_auth(settings)
# The model service answers `status` in milliseconds. A call that waits longer has reached no worker that serves:
# one killed and being restarted, or hung (BentoML's shared socket accepts the connection and nobody reads it).
MODEL_STATUS_TIMEOUT_S = 5.0

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 422, 429, 500, 502, 503, 504)}
PREDICT_RESPONSES = {
    **ERRORS,
    202: {"model": JobAccepted, "description": 'Accepted ("async": true): the job is recorded and runs'},
    429: {
        "model": ErrorResponse,
        "description": "queue_full: MAX_QUEUED_JOBS async jobs are waiting; model_busy: the model's queue is full; "
        "too_many_requests: MAX_CONCURRENCY requests are in flight",
        "headers": {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}},
    },
}
VIDEO_RESPONSES = {
    **{status: {"model": ErrorResponse} for status in (400, 401, 404, 422, 502, 504)},
    202: {"model": JobAccepted, "description": "Accepted: the job is recorded and runs (video tasks are async only)"},
    429: PREDICT_RESPONSES[429],
}
VISUAL_RESPONSES = {
    **PREDICT_RESPONSES,
    501: {"model": ErrorResponse, "description": "visual_prompts_unavailable: the loaded weights have no tracker"},
}
KEYED = [Security(API_KEY_SCHEME)]  # documents X-API-Key on an operation (ApiKeyMiddleware enforces it)
# FastAPIOffline: Swagger UI from the installed fastapi-offline package's files, no CDN (works offline).
api = FastAPIOffline(
    title="SAM 3 inference backend",
    version="1.0.0",
    description="Segment every instance of a concept. The contract is docs/api-contract.md.",
    docs_url="/api/v1/docs",
    static_url=DOCS_ASSETS_PREFIX,
    swagger_ui_oauth2_redirect_url="/api/v1/docs/oauth2-redirect",
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
    if exc.status_code == 400:  # FastAPI could not read the body as JSON (e.g. bytes that are not UTF-8)
        return error_response(400, "invalid_json", "the request body is not valid JSON (UTF-8 expected)")
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
    # A clip streams its frames through one call for up to VIDEO_TIMEOUT_S; an image item's MODEL_TIMEOUT_S is kept
    # by its deadline here and by the gateway's client (backend/model_client.py).
    traffic={"timeout": max(settings.model_timeout_s, settings.video_timeout_s)},
    # BentoML's internal client recycles connections in use (bentoml#5540): never recycle them.
    runner_connection={"max_requests": 10**9, "max_age": 10.0**9},
)
class Sam3Model:
    """Owns the GPU. Loads SAM 3 in the background: /livez answers at once, /readyz says 503 until loaded."""

    def __init__(self) -> None:
        # imported here, in the model service's processes only: it brings torch and transformers (~700 MB, ~3 s),
        # which the gateway's workers never load (sam3_runner's package docstring)
        from backend.segmenter import Segmenter

        self.segmenter = Segmenter(settings, worker_index=bentoml.server_context.worker_index or 1)

    def __is_ready__(self) -> bool:
        return self.segmenter.ready

    @bentoml.api(
        batchable=True, batch_dim=0, max_batch_size=settings.max_batch_size, max_latency_ms=settings.max_latency_ms
    )
    def segment(self, items: list[dict]) -> list[dict]:
        return self.segmenter.segment(items)

    # The APIs below are async on purpose: BentoML runs sync APIs one at a time on the thread that also runs the
    # batches (its `threads` limiter, 1), so a sync API would wait for the running batch to end.
    @bentoml.api
    async def segment_sliced(self, item: dict) -> dict:
        """A heavy item alone, beside the batches: its device work interleaves with theirs (backend/segmenter.py)."""
        return await asyncio.to_thread(self.segmenter.segment_sliced, item)

    @bentoml.api
    async def track_video(self, clip: FilePath, request: dict) -> AsyncGenerator[str, None]:
        """One clip's frames as JSON lines, as they are tracked (backend/video_worker.py). The clip file is
        uploaded by the gateway's call. A client that goes away does not stop this generator (BentoML 1.4.40
        keeps it running): the gateway's `cancel` and the request's deadline do, at the next frame."""
        messages = self.segmenter.track_video(clip, request)
        try:
            while (message := await asyncio.to_thread(next, messages, None)) is not None:
                yield json.dumps(message, separators=(",", ":")) + "\n"
        finally:
            await asyncio.to_thread(messages.close)

    @bentoml.api
    async def renew(self, request_ids: list[str]) -> None:
        self.segmenter.renew(request_ids)

    @bentoml.api
    async def cancel(self, request_ids: list[str]) -> None:
        self.segmenter.cancel(request_ids)

    @bentoml.api
    async def status(self) -> dict:
        return self.segmenter.status()


@bentoml.service(
    name="sam3-gateway",
    workers=settings.gateway_workers,
    traffic={"timeout": settings.request_timeout_s},  # MAX_CONCURRENCY: backend/concurrency.py
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
        _refuse_open_dev_server()
        self.pipeline = PredictPipeline(
            store=build_store(settings),
            tasks=build_task_store(settings),
            model=ModelClient(
                self.model.to_async,
                settings.model_timeout_s,
                retry_after_s=settings.retry_after_s,
                renew_every_s=settings.video_lease_s / 3,
            ),
            limits=Limits(
                settings.max_image_bytes,
                settings.max_image_pixels,
                settings.max_request_megapixels,
                settings.heavy_request_megapixels,
                settings.task_retention_s,
            ),
        )
        self.video = VideoPipeline(
            self.pipeline.store,
            self.pipeline.tasks,
            self.pipeline.model,
            VideoSettings(
                max_bytes=settings.max_video_bytes,
                limits=VideoLimits(settings.max_video_seconds, settings.max_video_frames, settings.max_video_pixels),
                fps_cap=settings.video_max_fps,
                timeout_s=settings.video_timeout_s,
                row_progress_every_s=settings.video_progress_interval_s,
            ),
        )
        self.jobs, self.runner = build_jobs(settings, Pipelines(self.pipeline, self.video), ready=self.model_ready)

    @bentoml.on_startup
    async def _start_jobs(self) -> None:
        try:
            await self.runner.start()
        except (OSError, sqlite3.Error) as exc:  # JOB_STORE_PATH cannot be opened: say so and stop, never crash-loop
            _stop_the_server(RuntimeError(f"the job store JOB_STORE_PATH={settings.job_store_path} fails: {exc}"))
        self.runner.stop_claiming_on_signals()
        # What this worker holds by now (the imports, ~530k objects) lives as long as it does: out of the cyclic
        # collector's sight, a full collection no longer stops every request for 0.3-0.45 s (one such pause per
        # ~1,000 async submissions on the 2-core dev box set the 202's p99; bench/async_submit.py).
        gc.freeze()

    @bentoml.on_shutdown
    async def _stop_jobs(self) -> None:
        """BentoML runs this in the lifespan shutdown, once uvicorn has answered the open HTTP requests."""
        await self.runner.stop()
        await self.pipeline.tasks.close()

    async def answer(self, kind: str, body: TaskOptions, request: Request, run: Callable[[TaskOptions], Awaitable]):
        """An image task: with "async": true its 202, else `run`'s answer (stopped if the client goes away)."""
        if body.run_async:
            return await self.submit(kind, body)
        return await until_disconnected(request, run(body))

    async def submit(self, kind: str, body: TaskOptions | VideoPredictRequest) -> JSONResponse:
        """An async task: 202 once its job is recorded (jobs/queue.py)."""
        job = await self.jobs.submit(kind, body)
        return JSONResponse(accepted_body(job), status_code=202)

    async def model_ready(self) -> bool:
        return bool((await self.model_status()).get("model_loaded"))

    async def model_status(self) -> dict:
        try:
            return await asyncio.wait_for(self.model.to_async.status(), MODEL_STATUS_TIMEOUT_S)
        except Exception as exc:  # the model service is down, restarting or not answering
            log.warning("model status unavailable: %s", type(exc).__name__)
            return {"state": "unavailable", "model_loaded": False, "gpu_available": False}


async def _current_gateway() -> Gateway:
    """The gateway instance of this worker, for the routes. A coroutine on purpose: FastAPI runs a plain-function
    dependency on a worker thread for every request (BentoML's own injection of a route method's `self` is one),
    a thread hop that was ~10 % of an async submission's CPU at 32 concurrent submitters (bench/async_submit.py)."""
    return bentoml.get_current_service()


CurrentGateway = Annotated[Gateway, Depends(_current_gateway)]


# exclude_unset: an instance without `rle` (include_rle: false) answers without the key, not "rle": null
@api.post(
    "/api/v1/predict",
    response_model=PredictResponse,
    response_model_exclude_unset=True,
    responses=PREDICT_RESPONSES,
    dependencies=KEYED,
)
async def predict(body: PredictRequest, request: Request, gateway: CurrentGateway):
    return await gateway.answer("predict", body, request, gateway.pipeline.predict)


@api.post(
    "/api/v1/predict/batch",
    response_model=BatchPredictResponse,
    response_model_exclude_unset=True,
    responses=PREDICT_RESPONSES,
    dependencies=KEYED,
)
async def predict_batch(body: BatchPredictRequest, request: Request, gateway: CurrentGateway):
    return await gateway.answer("predict_batch", body, request, gateway.pipeline.predict_batch)


@api.post(
    "/api/v1/predict/visual",
    response_model=PredictResponse,
    response_model_exclude_unset=True,
    responses=VISUAL_RESPONSES,
    dependencies=KEYED,
)
async def predict_visual(body: VisualPredictRequest, request: Request, gateway: CurrentGateway):
    """One object: tap it (points), box it, or refine an earlier visual task (docs: concept or visual prompt)."""
    return await gateway.answer("predict_visual", body, request, gateway.pipeline.predict_visual)


@api.post(
    "/api/v1/predict/video",
    response_model=JobAccepted,
    status_code=202,
    responses=VIDEO_RESPONSES,
    dependencies=KEYED,
)
async def predict_video(body: VideoPredictRequest, gateway: CurrentGateway):
    """Track every instance of 1-8 concepts (or one object from taps / a box) through a clip in the bucket.
    Always async: 202 now; the result in the task status, the row and R2 (docs: Video)."""
    try:
        return await gateway.submit("predict_video", body)
    except ApiError as error:
        raise for_video(error) from None


@api.get("/api/v1/tasks/{task_id}", response_model=TaskStatus, responses=ERRORS, dependencies=KEYED)
async def task_status(
    gateway: CurrentGateway, task_id: str = Path(description="The task_id an async request was sent with")
):
    try:
        task_id = str(uuid.UUID(task_id))
    except ValueError:
        raise ApiError(422, "invalid_task_id", "task_id must be a UUID") from None
    job = await gateway.jobs.store.get(task_id)
    if job is None:
        raise ApiError(404, "task_not_found", f"no async task {task_id} on this server (or it expired)")
    return JSONResponse(status_body(job))


@api.get("/api/v1/info", responses=ERRORS, dependencies=KEYED)
@api.post("/api/v1/info", responses=ERRORS, dependencies=KEYED)
async def info(gateway: CurrentGateway) -> dict:
    status = await gateway.model_status()
    if not status.get("model_loaded"):
        code = "model_unavailable" if status.get("state") == "failed" else "model_loading"
        raise ApiError(503, code, status.get("error") or "the model is still loading")
    return {
        **status["info"],
        "max_batch_size": settings.max_batch_size,
        "max_latency_ms": settings.max_latency_ms,
        "gpu_available": status["gpu_available"],
        "text_cache": status["text_cache"],
        "image_cache": status["image_cache"],
        "batching": status["batching"],
        "video_clips": status["video"],
        "acceleration": status["acceleration"],
        "storage": gateway.pipeline.store.name,
        "task_store": "supabase" if gateway.pipeline.tasks.enabled else "disabled",
    }


@api.get("/health")
async def health(gateway: CurrentGateway) -> dict:
    status = await gateway.model_status()
    return {
        "status": "ok" if status.get("model_loaded") else status.get("state", "unavailable"),
        "model_loaded": bool(status.get("model_loaded")),
        "gpu_available": bool(status.get("gpu_available")),
        "storage": gateway.pipeline.store.name,
        "task_store": "supabase" if gateway.pipeline.tasks.enabled else "disabled",
        "auth": "api_key" if API_KEY else "disabled (dev mode)",
    }


def _refuse_open_dev_server() -> None:
    """In a gateway worker: dev mode bound to a non-loopback address stops the whole server."""
    try:
        check_exposure(API_KEY, listening_hosts())
    except RuntimeError as exc:
        _stop_the_server(exc)


def _stop_the_server(error: Exception) -> None:
    """A start that cannot work stops the whole server, not only this worker: a worker that merely failed would be
    restarted by BentoML's supervisor, over and over. Logs the reason and re-raises it."""
    log.critical("%s", error)
    if _started_by_bentoml_serve():
        os.kill(os.getppid(), signal.SIGTERM)
    raise error


def _started_by_bentoml_serve() -> bool:
    """Whether this process is a worker of a `bentoml serve` supervisor (its parent), not a test's plain instance."""
    try:
        parent = psutil.Process(os.getppid()).cmdline()
    except psutil.Error:
        return False
    return "bentoml" in " ".join(parent) and "serve" in parent


@api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def _unknown_route(request: Request, path: str):
    """Declared last: BentoML's probes and metrics match before the mounted app, so only paths nobody serves
    (or served with another method) land here and get the contract's error shape, not a plain-text 404."""
    if any(route.matches(request.scope)[0] == Match.PARTIAL for route in api.routes[:-1]):
        raise ApiError(405, "method_not_allowed", f"{request.method} is not allowed on /{path}")
    raise ApiError(404, "not_found", f"no route /{path}")


Gateway.add_asgi_middleware(ConcurrencyLimit, max_concurrency=settings.max_concurrency)
Gateway.add_asgi_middleware(ApiKeyMiddleware, api_key=API_KEY)
Gateway.add_asgi_middleware(ControlCharacterPaths)
