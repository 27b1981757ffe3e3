"""The model service's work: load SAM 3 in the background, decode a batch's images in parallel (an image whose
encoding the image cache holds is not decoded), run them through the engine together, and answer per item, so one
bad image or one failed job never fails the batch."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import torch

from backend.cancellation import CANCELLED, MESSAGES, TIMED_OUT, CancelledRequests, Leases, abandoned
from backend.prompt_bounds import box_error, visual_error
from backend.protocol import failure, item_prompts, item_visual, success
from backend.settings import Settings
from backend.video_worker import track_clip
from sam3_runner import (
    Abandoned,
    ImageDecodeError,
    ImageTooLarge,
    Job,
    Sam3Engine,
    WeightsError,
    decode_image,
    decode_threads,
    load_model,
)
from sam3_runner.acceleration import CompileOptions, use_compile_cache
from sam3_runner.image_cache import ImageCache
from sam3_runner.loading import check_weights_reference

log = logging.getLogger(__name__)

CLOCK_MARGIN_S = 10  # a cancel is remembered this much past MODEL_TIMEOUT_S, for clocks a little apart

VISUAL_PROMPTS_UNAVAILABLE = (
    "the loaded weights are SAM 3's detector alone (no tracker), which answers concept prompts only; visual prompts "
    "need weights with the tracker: facebook/sam3, a directory saved from Sam3VideoModel (config `sam3_video`) or "
    "Meta's full sam3.pt (its `tracker.*` keys, under a `sam3_video` config or none)"
)


class Segmenter:
    def __init__(self, settings: Settings, worker_index: int = 1) -> None:
        check_weights_reference(settings.sam3_weights_path, settings.sam3_config)  # a bad path fails the start
        self._settings = settings
        self._device = worker_device(settings.sam3_device, worker_index)
        self._engine: Sam3Engine | None = None
        self._load_error: str | None = None
        self._batches = 0
        self._largest_batch = 0
        self._cancelled = CancelledRequests(settings.model_timeout_s + CLOCK_MARGIN_S)
        self._clip_leases = Leases(settings.video_lease_s)
        self._stopped_early = {CANCELLED: 0, TIMED_OUT: 0}
        self._sliced = 0
        self._counters = threading.Lock()
        self._decoder = ThreadPoolExecutor(decode_threads(), thread_name_prefix="decode")
        self._video_sessions = threading.BoundedSemaphore(settings.video_sessions)
        # clips running now, and since the start: completed, stopped early (cancelled or past their deadline), failed
        self._clips = {"running": 0, "completed": 0, "stopped": 0, "failed": 0}
        self._loader = threading.Thread(target=self._load, name="sam3-load", daemon=True)
        self._loader.start()

    @property
    def ready(self) -> bool:
        return self._engine is not None

    def status(self) -> dict:
        engine = self._engine
        state = "ready" if engine else ("failed" if self._load_error else "loading")
        status = {"state": state, "model_loaded": engine is not None, "gpu_available": torch.cuda.is_available()}
        if self._load_error:
            status["error"] = self._load_error
        status["batching"] = {
            "batches": self._batches,
            "largest_batch": self._largest_batch,
            "cancelled": self._stopped_early[CANCELLED],
            "timed_out": self._stopped_early[TIMED_OUT],
            "sliced": self._sliced,
        }
        status["video"] = {**self._clips, "max_running": self._settings.video_sessions}
        if engine:
            status["info"] = engine.loaded.info()
            status["acceleration"] = {**engine.acceleration, "jpeg_decode": self._settings.sam3_jpeg_decode}
            status["text_cache"] = {
                "size": len(engine.text_cache),
                "hits": engine.text_cache.hits,
                "misses": engine.text_cache.misses,
            }
            status["image_cache"] = engine.image_cache.stats()
        return status

    def segment(self, items: list[dict]) -> list[dict]:
        engine = self._engine
        if engine is None:
            return [self._not_ready()] * len(items)
        self._batches += 1
        self._largest_batch = max(self._largest_batch, len(items))
        prepared = list(self._decoder.map(self._preparing(engine), items))
        outcomes: list[dict | None] = [None] * len(items)
        runnable: list[tuple[int, Job, float]] = []
        for index, (job, decode_ms, error) in enumerate(prepared):
            if error:
                outcomes[index] = error
            else:
                runnable.append((index, job, decode_ms))
        for (index, _, decode_ms), result in zip(runnable, self._run_isolating_failures(engine, runnable), strict=True):
            outcomes[index] = self._outcome(result, decode_ms)
        return outcomes

    def segment_sliced(self, item: dict) -> dict:
        """One heavy item alone, its device work in bounded units between which queued batches run
        (Sam3Engine.run_sliced); called beside the batches, from a thread of its own."""
        engine = self._engine
        if engine is None:
            return self._not_ready()
        with self._counters:
            self._sliced += 1
        job, decode_ms, error = self._preparing(engine)(item)
        if error:
            return error
        try:
            return self._outcome(engine.run_sliced(job), decode_ms)
        except Exception as exc:  # the model can raise anything; it is this item's failure
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.exception("inference failed for a sliced job")
            return failure("inference_failed", f"inference failed ({type(exc).__name__})")

    def track_video(self, clip: Path, request: dict) -> Iterator[dict]:
        """One clip's messages (backend/video_worker.py). At most VIDEO_SESSIONS clips run at once here; another
        waits its turn (its deadline still counts)."""
        engine = self._engine
        if engine is None:
            yield {"type": "error", **self._not_ready()["error"]}
            return
        request_id = request["request_id"]
        self._clip_leases.hold(request_id)  # waiting for a session counts: the gateway renews from the start

        def stop_reason() -> str | None:
            if self._clip_leases.expired(request_id):
                return CANCELLED
            return abandoned(request, self._cancelled)

        with self._video_sessions:
            with self._counters:
                self._clips["running"] += 1
            ended = "failed"
            try:
                for message in track_clip(engine, clip, request, stop_reason):
                    if message["type"] == "end":
                        ended = "completed"
                    elif message["type"] == "error" and message["code"] in (CANCELLED, TIMED_OUT):
                        ended = "stopped"
                    yield message
            except GeneratorExit:  # the stream was closed: its reader (the gateway) went away
                ended = "stopped"
                raise
            finally:
                self._clip_leases.release(request_id)
                with self._counters:
                    self._clips["running"] -= 1
                    self._clips[ended] += 1

    def renew(self, request_ids: list[str]) -> None:
        """The gateway still reads these clips (every VIDEO_LEASE_S / 3); one not renewed stops at its next frame."""
        self._clip_leases.renew(request_ids)

    def cancel(self, request_ids: list[str]) -> None:
        """The gateway gave up on these requests: stop them at their next stage boundary (backend/cancellation.py)."""
        self._cancelled.add(request_ids)

    def _not_ready(self) -> dict:
        if self._load_error:
            return failure("model_unavailable", "the model failed to load; see the server log")
        return failure("model_loading", "the model is still loading; retry shortly")

    def _preparing(self, engine: Sam3Engine):
        """item -> (job, decode ms, failure): decoded where SAM3_JPEG_DECODE says, unless the image cache holds the
        item's image; nothing for an abandoned item, nor for a visual one when the weights hold no tracker."""
        device = engine.device if self._settings.sam3_jpeg_decode == "device" else torch.device("cpu")
        return partial(
            _prepare,
            device=device,
            stop=self._stop_if_abandoned,
            cancelled=self._cancelled,
            cache=engine.image_cache,
            visual_prompts=engine.loaded.visual_prompts,
        )

    def _outcome(self, result, decode_ms: float) -> dict:
        if isinstance(result, dict):
            return result
        if isinstance(result, Abandoned):
            return self._stopped(result.reason)
        return success(result, decode_ms)

    def _stop_if_abandoned(self, item: dict) -> dict | None:
        reason = abandoned(item, self._cancelled)
        return self._stopped(reason) if reason else None

    def _stopped(self, reason: str) -> dict:
        with self._counters:
            self._stopped_early[reason] += 1
        log.info("stopped a request early: %s", reason)
        return failure(reason, MESSAGES[reason])

    def _run_isolating_failures(self, engine: Sam3Engine, runnable: list) -> list:
        """Run all jobs together; on failure (out of memory included) split the batch in halves and retry,
        so only a job that fails on its own gets an error."""
        if not runnable:
            return []
        jobs = [job for _, job, _ in runnable]
        try:
            return engine.run(jobs)
        except Exception as exc:  # the model can raise anything; we contain it to the failing job
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(runnable) == 1:
                log.exception("inference failed for one job")
                return [failure("inference_failed", f"inference failed ({type(exc).__name__})")]
            log.warning("a batch of %d failed (%s); splitting it", len(runnable), type(exc).__name__)
            middle = len(runnable) // 2
            return self._run_isolating_failures(engine, runnable[:middle]) + self._run_isolating_failures(
                engine, runnable[middle:]
            )

    def _load(self) -> None:
        settings = self._settings
        try:
            loaded = load_model(
                settings.sam3_weights_path,
                device=self._device,
                dtype=settings.sam3_dtype,
                hf_token=settings.hf_token.get_secret_value() if settings.hf_token else None,
                config=settings.sam3_config,
            )
            use_compile_cache(settings.sam3_compile_cache_dir)
            self._engine = Sam3Engine(
                loaded,
                settings.text_cache_size,
                settings.max_pairs_per_forward,
                CompileOptions.parse(settings.sam3_compile),
                settings.image_cache_bytes(loaded.device.type),
            )
            # The model and the imports (~500k objects) live as long as this worker: out of the cyclic collector's
            # sight, a full collection no longer stalls every batch for 0.2-0.35 s (the p99 of served predicts on
            # the 2-core box was such a pause).
            gc.freeze()
        except WeightsError as exc:
            self._load_error = str(exc)
            log.error("SAM 3 could not be loaded: %s", exc)
        except Exception as exc:  # anything else while loading must still leave a readable state
            self._load_error = f"{type(exc).__name__}: {exc}"
            log.exception("SAM 3 could not be loaded")


def worker_device(requested: str, worker_index: int) -> str:
    """With SAM3_DEVICE=auto and several visible GPUs, worker N (1-based) takes GPU N-1, so one model service
    with `workers` = GPU count puts one model on each GPU."""
    if requested.lower() != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return requested
    return f"cuda:{(worker_index - 1) % torch.cuda.device_count()}"


def _prepare(
    item: dict, device: torch.device, stop, cancelled, cache: ImageCache, visual_prompts: bool
) -> tuple[Job | None, float, dict | None]:
    """One item's job and decode time, or its failure: whatever goes wrong here is this item's failure alone.
    `stop(item)`: the failure of an item abandoned before its decoding, else None.

    An item whose `image_identity` the image cache holds is not decoded: its job carries the cache entry (which
    stays valid if the cache evicts it before the job runs). Any other item is decoded; the engine still looks its
    identity up again, so an image another batch has encoded meanwhile is not encoded twice."""
    if stopped := stop(item):
        return None, 0.0, stopped
    if item.get("visual") is not None and not visual_prompts:
        return None, 0.0, failure("visual_prompts_unavailable", VISUAL_PROMPTS_UNAVAILABLE)
    started = time.perf_counter()
    identity = item.get("image_identity")
    try:
        encoded = cache.get(identity) if identity else None
        if encoded is None:
            image = decode_image(item["image"], max_pixels=item["max_pixels"], device=device)
            decode_ms = (time.perf_counter() - started) * 1000
            pixels, width, height = image.pixels, image.width, image.height
        else:
            _check_pixels(encoded.width, encoded.height, item["max_pixels"])
            decode_ms, pixels, width, height = 0.0, None, encoded.width, encoded.height
        prompts = item_prompts(item)
        visual = item_visual(item)
        error = box_error(prompts, width, height) if visual is None else visual_error(visual, width, height)
    except ImageTooLarge as exc:
        return None, 0.0, failure("image_too_large", str(exc))
    except ImageDecodeError as exc:
        return None, 0.0, failure("invalid_image", str(exc))
    except Exception as exc:  # a bug, not the user's input: this item answers 500, the rest of the batch runs
        log.exception("preparing one item of a batch failed")
        return None, 0.0, failure("internal_error", f"the request could not be prepared ({type(exc).__name__})")
    if error:
        return None, 0.0, error
    job = Job(
        pixels,
        prompts,
        partial(abandoned, item, cancelled),
        visual=visual,
        image_key=identity,
        encoded=encoded,
        nms_iou_threshold=item.get("nms_iou_threshold"),
    )
    return job, decode_ms, None


def _check_pixels(width: int, height: int, max_pixels: int) -> None:
    """A cached image was decoded under its own request's limit: this request's limit still applies."""
    if width * height > max_pixels:
        raise ImageTooLarge(f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
