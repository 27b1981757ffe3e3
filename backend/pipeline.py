"""One predict request, top to bottom: row -> processing (the image downloading meanwhile), model, upload,
row -> completed. Concept prompts (predict, batch) and visual prompts (predict/visual) take the same path; what
differs between them is in backend/prompt_kinds.py.

Any failure marks the row failed with a readable message and becomes the contract's HTTP error; a row never
stays `processing` after its request has ended, cancellation included. Keys depend only on user and task,
so sending a task again overwrites the same objects and row (idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Protocol

from backend.api_models import (
    BatchPredictRequest,
    BatchPrompt,
    PredictOptions,
    PredictRequest,
    TaskOptions,
    VisualPredictRequest,
)
from backend.cost import refuse_if_too_heavy
from backend.errors import MODEL_DOWN, MODEL_ERROR_STATUS, ApiError, RowNotMarked, to_api_error
from backend.outputs import OutputMaker, model_needs_rle
from backend.prompt_kinds import ConceptPrompts, ObjectPrompt, PromptKind
from backend.protocol import box_prompts, union_of, unpack_mask
from backend.refinement import Refinements
from renderers import mask_png
from sam3_runner import BOX_ONLY_TEXT, Prompt
from storage import ImageObject, ObjectStore
from tasks import TaskResult, TaskStore

log = logging.getLogger(__name__)

CANCELLED = "cancelled: the request ended before a result"


class ModelService(Protocol):
    """The model service as the pipeline sees it (backend/model_client.py over BentoML; in process in tests)."""

    async def segment(self, item: dict, sliced: bool) -> dict:
        """The item's outcome (`ok` or a failure); a failed call raises the contract's ApiError. `sliced`: alone,
        in slices that let the batches run in between (a heavy item), instead of batched with others."""


@dataclass(frozen=True)
class Limits:
    max_image_bytes: int
    max_image_pixels: int
    max_request_megapixels: float  # backend/cost.py
    heavy_request_megapixels: float  # above it, the model service's sliced API
    refine_retention_s: float  # TASK_RETENTION_S: how long a visual task's mask may be refined (refinement.py)


class PredictPipeline:
    def __init__(self, store: ObjectStore, tasks: TaskStore, model: ModelService, limits: Limits) -> None:
        self.store = store
        self.tasks = tasks
        self.model = model
        self.limits = limits
        self.refinements = Refinements(store, limits.refine_retention_s)
        self.outputs = OutputMaker(store, limits.max_image_pixels, guard)

    async def predict(self, request: PredictRequest, retries_model_down: bool = False) -> dict:
        """retries_model_down: the caller runs the task again when the model is down (503 model_loading /
        model_unavailable), so such a failure leaves the row `processing` instead of marking it failed."""
        prompt = self._prompt(request, request.text_prompt, request)
        label = request.text_prompt or BOX_ONLY_TEXT
        keys = [mask_key(request.user_id, request.task_id)]
        kind = ConceptPrompts([prompt], [label], keys)
        body, summary = await self._run(request, kind, retries_model_down)
        return {**body[0], **_outputs(summary["outputs"])}

    async def predict_batch(self, request: BatchPredictRequest, retries_model_down: bool = False) -> dict:
        """retries_model_down: as for `predict`."""
        options = request.prompt_options()
        prompts = [self._prompt(request, own.text, own) for own in options]
        labels = [own.text or BOX_ONLY_TEXT for own in options]
        keys = [mask_key(request.user_id, request.task_id, index) for index in range(len(prompts))]
        kind = ConceptPrompts(prompts, labels, keys, request.nms_iou_threshold)
        results, combined = await self._run(request, kind, retries_model_down)
        return {
            "task_id": request.task_id,
            "mask_url": combined["mask_url"],
            "mask_key": combined["mask_key"],
            "results": results,
            "total_inference_time_ms": combined["inference_time_ms"],
            "timings": combined["timings"],
            "cache": combined["cache"],
            **_outputs(combined["outputs"]),
        }

    async def predict_visual(self, request: VisualPredictRequest, retries_model_down: bool = False) -> dict:
        """One object (points, a box, a refined task): the candidates as instances, best first; the best one's mask
        at mask_url. retries_model_down: as for `predict`."""
        kind = ObjectPrompt(request, mask_key(request.user_id, request.task_id), self.refinements)
        body, summary = await self._run(request, kind, retries_model_down)
        return {**body[0], **_outputs(summary["outputs"])}

    @staticmethod
    def _prompt(request: TaskOptions, text: str | None, options: PredictOptions | BatchPrompt) -> Prompt:
        """`options`: the boxes, thresholds and limit (the request's, or a batch prompt's resolved ones)."""
        return Prompt(
            text=text,
            boxes=box_prompts(options.boxes),
            score_threshold=options.threshold,
            mask_threshold=options.mask_threshold,
            max_instances=options.max_instances,
            include_rle=model_needs_rle(request),
        )

    async def _run(self, request: TaskOptions, kind: PromptKind, retries_model_down: bool):
        """Returns (one response body per result, a summary of the whole task).

        The image download does not depend on the row, so it starts with the row's `processing` update: the two
        round trips (Supabase, R2) overlap instead of adding up. Its outcome is only looked at once the row says
        processing; if the row cannot be marked, the download is dropped and that error is the answer.
        """
        started = time.perf_counter()
        download = asyncio.ensure_future(self._inputs(request, kind))
        try:
            await guard(self.tasks.mark_processing(request.task_id))
        except asyncio.CancelledError as cancelled:  # the update may have landed: the row must not stay processing
            _drop(download)
            await asyncio.shield(record_failure(self.tasks, request.task_id, _cancelled_message(cancelled)))
            raise
        except ApiError as error:  # the row could not be marked (missing, Supabase down): nothing to record
            _drop(download)
            raise RowNotMarked(error.status, error.code, error.message) from None
        except BaseException:
            _drop(download)
            raise
        async with failures_recorded(self.tasks, request.task_id, retries_model_down, "request"):
            image, download_ms = await download
            bodies, summary = await self._process(request, kind, image, download_ms, started)
            await guard(self.tasks.mark_completed(request.task_id, summary["task_result"]))
            return bodies, summary

    async def _inputs(self, request: TaskOptions, kind: PromptKind) -> tuple[ImageObject, float]:
        """The image and the download's ms, with what the prompt kind needs besides it fetched meanwhile, and this
        task's refinement record of an earlier run forgotten (a visual success writes a new one); when several
        fail, the image's error is the answer."""
        forget = self.refinements.forget(request.user_id, request.task_id)
        extra = asyncio.ensure_future(guard(asyncio.gather(kind.fetch(), forget)))
        try:
            downloaded = await self._download(request.image_url)
        except BaseException:
            _drop(extra)
            raise
        await extra
        return downloaded

    async def _download(self, image_url: str) -> tuple[ImageObject, float]:
        clock = time.perf_counter()
        key = await guard(asyncio.to_thread(self.store.resolve_image_key, image_url))
        image = await guard(asyncio.to_thread(self.store.get_image, key, self.limits.max_image_bytes))
        return image, _ms_since(clock)

    async def _process(self, request: TaskOptions, kind: PromptKind, image: ImageObject, download_ms: float, started):
        timings: dict[str, float] = {"download": download_ms}
        cost = kind.cost(image.data)
        refuse_if_too_heavy(cost, self.limits.max_request_megapixels)
        sliced = cost is not None and cost.megapixels > self.limits.heavy_request_megapixels
        item = await kind.item(image.data, self.limits.max_image_pixels, image.identity)
        clock = time.perf_counter()
        outcome = await self._call_model(item, sliced)
        timings["model"] = _ms_since(clock)

        clock = time.perf_counter()
        results, labels, keys = outcome["results"], kind.labels, kind.keys
        combined_key = mask_key(request.user_id, request.task_id)
        combined = results[0] if combined_key in keys else union_of(results)
        uploads = [self._upload(key, result) for key, result in zip(keys, results, strict=True)]
        if combined_key not in keys:
            uploads.append(self._upload(combined_key, combined))
        drawing = self.outputs.make(request, image.data, results, labels, combined, combined_key)
        stored, outputs, _ = await asyncio.gather(asyncio.gather(*uploads), drawing, guard(kind.keep(outcome)))
        urls = {item.key: item.url for item in stored}
        if outputs.render_ms is not None:
            timings["render"] = outputs.render_ms
        timings["upload"] = _ms_since(clock)

        model_timings = results[0]["timings"]
        inference_ms = round(model_timings["total"], 2)
        timings = {**{f"model_{k}": v for k, v in model_timings.items()}, **timings}
        timings["total"] = _ms_since(started)
        polygons = outputs.polygons or [None] * len(results)
        bodies = [
            _body(request, label, result, key, urls[key], inference_ms, timings, prompt_polygons)
            for label, result, key, prompt_polygons in zip(labels, results, keys, polygons, strict=True)
        ]
        instances = [instance for body in bodies for instance in body["instances"]]
        summary = {
            "mask_url": urls[combined_key],
            "mask_key": combined_key,
            "inference_time_ms": inference_ms,
            "timings": timings,
            "cache": results[0]["cache"],
            "outputs": outputs.urls,
            "task_result": TaskResult(
                mask_url=urls[combined_key],
                labels=[instance["label"] for instance in instances],
                confidence=max((instance["score"] for instance in instances), default=0.0),
                inference_time_ms=round(inference_ms),
                result={"results": [_without_rle(body) for body in bodies], **_outputs(outputs.urls)},
            ),
        }
        return bodies, summary

    async def _call_model(self, item: dict, sliced: bool) -> dict:
        outcome = await self.model.segment(item, sliced)
        if not outcome["ok"]:
            code, message = outcome["error"]["code"], outcome["error"]["message"]
            raise ApiError(MODEL_ERROR_STATUS.get(code, 500), code, message)
        return outcome

    async def _upload(self, key: str, result: dict):
        """Unpacking and PNG encoding run off the event loop: 32 full-HD masks took 166 ms of it on the CPU box."""
        png = await asyncio.to_thread(lambda: mask_png(unpack_mask(result)))
        return await guard(asyncio.to_thread(self.store.put_png, key, png))


async def guard(awaitable):
    """Storage and task-store failures -> the contract's errors."""
    try:
        return await awaitable
    except Exception as exc:
        error = to_api_error(exc)
        if error is None:
            raise
        raise error from None


@contextlib.asynccontextmanager
async def failures_recorded(tasks: TaskStore, task_id: str, retries_model_down: bool, what: str):
    """A task's work once its row says processing: whatever fails it marks the row failed with its code and
    message, except the model being down (503) when `retries_model_down` (the job runs again, the row stays
    processing); a cancellation is recorded too; anything unexpected becomes 500 internal_error ("... this
    `what`")."""
    try:
        yield
    except ApiError as error:
        if not (retries_model_down and error.code in MODEL_DOWN):
            await record_failure(tasks, task_id, f"{error.code}: {error.message}")
        raise
    except asyncio.CancelledError as cancelled:
        await asyncio.shield(record_failure(tasks, task_id, _cancelled_message(cancelled)))
        raise
    except Exception:
        log.exception("task %s failed unexpectedly", task_id)
        await record_failure(tasks, task_id, "internal_error: the server failed while processing")
        raise ApiError(500, "internal_error", f"the server failed while processing this {what}") from None


async def record_failure(tasks: TaskStore, task_id: str, message: str) -> None:
    """Mark the row failed; when it cannot be written (Supabase down), log it and keep the original error."""
    try:
        await tasks.mark_failed(task_id, message)
    except Exception as exc:
        log.error("task %s: could not mark the row failed (%s)", task_id, type(exc).__name__)


def mask_key(user_id: str, task_id: str, index: int | None = None) -> str:
    return f"masks/{user_id}/{task_id}.png" if index is None else f"masks/{user_id}/{task_id}/{index}.png"


def _body(request, label, result, key, url, inference_ms, timings, polygons) -> dict:
    """polygons: per instance, when the request asked for them (else None)."""
    with_rle = "rle" in request.wanted_outputs
    instances = [
        {
            "label": label,
            "score": round(instance["score"], 6),
            "box": instance["box"],
            "area": instance["area"],
            **({"rle": instance["rle"]} if with_rle else {}),
            **({"polygons": polygons[index]} if polygons is not None else {}),
        }
        for index, instance in enumerate(result["instances"])
    ]
    width, height = result["image_size"]
    return {
        "task_id": request.task_id,
        "mask_url": url,
        "mask_key": key,
        "labels": [label] * len(instances),
        "inference_time_ms": inference_ms,
        "confidence": max((instance["score"] for instance in instances), default=0.0),
        "num_instances": len(instances),
        **({"suppressed": result["suppressed"]} if "suppressed" in result else {}),
        "image": {"width": width, "height": height},
        "instances": instances,
        "timings": timings,
        "cache": result["cache"],
    }


def _outputs(urls: dict[str, str]) -> dict:
    """The `outputs` key of a response or row result: only when the request asked for a file."""
    return {"outputs": urls} if urls else {}


def _without_rle(body: dict) -> dict:
    """The row keeps no RLE (the mask PNG has the pixels): the key is dropped, as include_rle: false does."""
    instances = [{key: value for key, value in instance.items() if key != "rle"} for instance in body["instances"]]
    return {**body, "instances": instances}


def _cancelled_message(cancelled: asyncio.CancelledError) -> str:
    """The row's message: the reason the canceller gave (e.g. the client disconnected), when it gave one."""
    return f"cancelled: {cancelled.args[0]}" if cancelled.args and cancelled.args[0] else CANCELLED


def _drop(task: asyncio.Task) -> None:
    """Cancel work whose result no longer matters, and collect its outcome (asyncio logs it if never retrieved)."""
    task.cancel()
    task.add_done_callback(lambda done: done.cancelled() or done.exception())


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
