"""One video task, in the gateway (an async job: POST /api/v1/predict/video):

row -> processing; the clip from R2 to a temporary file (streamed, MAX_VIDEO_BYTES); probed and planned here
(invalid_video, video_too_long before any model work); the model service tracks it frame by frame
(backend/video_worker.py) and streams each frame's objects back; they are written to disk as they come, progress
goes to the job store and (at most every VIDEO_PROGRESS_INTERVAL_S) to the row; then the result JSON -> R2
(`masks/USER/TASK.video.json`, the row's mask_url), the MP4 preview if asked (renderers/video_overlay.py,
re-decoding the same frames), and the row -> completed with the summary (no per-frame masks).

A failure marks the row failed with its code, as an image task's does; the model going down (503) leaves the row
processing and the job runner queues the task again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from backend.api_models import VideoPredictRequest
from backend.errors import MODEL_ERROR_STATUS, ApiError, RowNotMarked, for_video
from backend.model_client import ModelClient
from backend.pipeline import failures_recorded, guard
from backend.prompt_bounds import visual_error
from backend.protocol import object_fields, object_prompt
from renderers.video_overlay import render_video_overlay
from storage import ObjectStore
from tasks import TaskResult, TaskStore
from video import InvalidSampling, InvalidVideo, Plan, Sampling, VideoInfo, VideoLimits, VideoTooLong, frames, probe
from video import plan as plan_frames

log = logging.getLogger(__name__)

Progress = Callable[[int, int], Awaitable[None]]  # (frames done, frames total)
JOB_PROGRESS_EVERY_S = 0.5  # the job store's progress (the task status) is written at most this often
WORKDIR_PREFIX = "sam3-video-"  # + the gateway worker's pid: a task's temporary directory (the clip, its frames)


@dataclass(frozen=True)
class VideoSettings:
    max_bytes: int  # MAX_VIDEO_BYTES
    limits: VideoLimits  # MAX_VIDEO_SECONDS / FRAMES / PIXELS
    fps_cap: float  # VIDEO_MAX_FPS
    timeout_s: float  # VIDEO_TIMEOUT_S: the model's deadline for a clip
    row_progress_every_s: float  # VIDEO_PROGRESS_INTERVAL_S


def remove_orphaned_workdirs() -> None:
    """A task's temporary directory is removed when it ends, but not when its gateway worker is killed (kill -9, out
    of memory): each worker removes, as it starts, those whose worker process is gone (they hold whole clips)."""
    for path in Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}*-*"):
        owner = path.name.removeprefix(WORKDIR_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by a gateway worker that is gone", path)


def result_key(user_id: str, task_id: str) -> str:
    return f"masks/{user_id}/{task_id}.video.json"


def overlay_key(user_id: str, task_id: str) -> str:
    return f"masks/{user_id}/{task_id}.overlay.mp4"


class VideoPipeline:
    def __init__(self, store: ObjectStore, tasks: TaskStore, model: ModelClient, settings: VideoSettings) -> None:
        self.store = store
        self.tasks = tasks
        self.model = model
        self.settings = settings
        remove_orphaned_workdirs()

    async def track(self, request: VideoPredictRequest, progress: Progress) -> dict:
        """The task's result body (VideoResponse). Raises the contract's ApiError (RowNotMarked when the row could
        not be marked processing); `progress` is told (frames done, frames total) as frames are tracked."""
        started = time.perf_counter()
        try:
            await guard(self.tasks.mark_processing(request.task_id))
        except ApiError as error:
            raise RowNotMarked(error.status, error.code, error.message) from None
        async with failures_recorded(self.tasks, request.task_id, retries_model_down=True, what="task"):
            with tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-") as workdir:
                body, summary = await self._process(request, Path(workdir), progress, started)
            await guard(self.tasks.mark_completed(request.task_id, summary))
            return body

    async def _process(self, request: VideoPredictRequest, workdir: Path, progress: Progress, started: float):
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        clip = workdir / "clip"
        await self._download(request.video_url, clip)
        timings["download"] = _ms_since(clock)

        clock = time.perf_counter()
        info, plan = await asyncio.to_thread(self._plan, clip, request)
        timings["probe"] = _ms_since(clock)

        clock = time.perf_counter()
        tracks = _Tracks(workdir / "frames.jsonl")
        reporter = _Reporter(self.tasks, request.task_id, progress, self.settings.row_progress_every_s)
        await reporter.report(0, plan.frames_total, force=True)
        model_ms = await self._track(clip, request, plan, tracks, reporter)
        await reporter.report(tracks.count, tracks.count, force=True)
        timings["model"] = _ms_since(clock)

        clock = time.perf_counter()
        outputs = {}
        if "overlay" in request.wanted_outputs:
            overlay = workdir / "overlay.mp4"
            await asyncio.to_thread(render_video_overlay, _frames_with_objects(clip, plan, tracks), plan.fps, overlay)
            timings["render"] = _ms_since(clock)
            stored = await guard(
                asyncio.to_thread(
                    self.store.put_object,
                    overlay_key(request.user_id, request.task_id),
                    overlay.read_bytes(),
                    "video/mp4",
                )
            )
            outputs["overlay_url"] = stored.url

        clock = time.perf_counter()
        key = result_key(request.user_id, request.task_id)
        objects = tracks.objects()
        video = {
            "width": info.width,
            "height": info.height,
            "rotation": info.rotation,
            "fps": round(plan.fps, 6),
            "frames": tracks.count,
            "duration_s": round(info.duration_s, 6),
        }
        head = {
            "task_id": request.task_id,
            "result_url": self.store.url_for(key),
            "result_key": key,
            "video": video,
            "labels": [item["label"] for item in objects],
            "objects": objects,
            "inference_time_ms": round(model_ms, 2),
        }
        body = {
            **head,
            "frames": list(tracks.frames()),
            "timings": timings,  # the stored object's end before its own upload
            **({"outputs": outputs} if outputs else {}),
        }
        document = json.dumps(body, separators=(",", ":")).encode()
        stored = await guard(asyncio.to_thread(self.store.put_object, key, document, "application/json"))
        body["timings"] = {**timings, "upload": _ms_since(clock), "total": _ms_since(started)}
        summary = {key: value for key, value in body.items() if key != "frames"}
        task_result = TaskResult(
            mask_url=stored.url,
            labels=summary["labels"],
            confidence=max((item["score"] for item in objects), default=0.0),
            inference_time_ms=round(model_ms),
            result=summary,
        )
        return body, task_result

    async def _download(self, video_url: str, clip: Path) -> None:
        try:
            key = await guard(asyncio.to_thread(self.store.resolve_image_key, video_url))
            await guard(asyncio.to_thread(self.store.download, key, str(clip), self.settings.max_bytes))
        except ApiError as error:
            raise for_video(error) from None

    def _plan(self, clip: Path, request: VideoPredictRequest):
        sampling = Sampling(
            start_s=request.start_s, end_s=request.end_s, fps=request.fps, max_frames=request.max_frames
        )
        try:
            info = probe(clip)
            plan = plan_frames(info, sampling, self.settings.limits, self.settings.fps_cap)
        except InvalidVideo as exc:
            raise ApiError(400, "invalid_video", str(exc)) from None
        except InvalidSampling as exc:
            raise ApiError(422, "invalid_option", str(exc)) from None
        except VideoTooLong as exc:
            raise ApiError(422, "video_too_long", str(exc)) from None
        if not request.prompts:
            _check_visual_prompt(request, info, plan)
        return info, plan

    async def _track(self, clip: Path, request: VideoPredictRequest, plan: Plan, tracks: _Tracks, reporter) -> float:
        """Streams the model's frames into `tracks`; returns the model's own ms."""
        model_request = {
            "sampling": dataclasses.asdict(plan.sampling),
            "frames_total": plan.frames_total,
            "prompts": request.prompts,
            "threshold": request.threshold,
        }
        if not request.prompts:
            model_request["visual"] = {
                "frame_index": request.frame_index,
                **object_fields(object_prompt(request.points, request.box)),
            }
        async for message in self.model.track_video(clip, model_request, self.settings.timeout_s):
            if message["type"] == "frame":
                await asyncio.to_thread(tracks.add, message)
                await reporter.report(tracks.count, max(plan.frames_total, tracks.count))
            elif message["type"] == "error":
                code = message["code"]
                raise ApiError(MODEL_ERROR_STATUS.get(code, 500), code, message["message"])
            else:
                return float(message["model_ms"])
        raise ApiError(503, "model_unavailable", "the model service is unavailable; retry shortly")


def _check_visual_prompt(request: VideoPredictRequest, info: VideoInfo, plan: Plan) -> None:
    """The taps and box lie on the frame (display orientation), and `frame_index` is one of the frames planned."""
    if failed := visual_error(object_prompt(request.points, request.box), info.width, info.height):
        code, message = failed["error"]["code"], failed["error"]["message"]
        raise ApiError(MODEL_ERROR_STATUS[code], code, message.replace("image", "frame"))
    if request.frame_index >= plan.frames_total:
        raise ApiError(
            422,
            "invalid_option",
            f"frame_index {request.frame_index} is past the last frame to process ({plan.frames_total - 1})",
        )


@dataclass
class _Tracks:
    """The frames' objects as they arrive: each frame appended to a JSON-lines file (never all in memory), and a
    summary per object (label, best score, first and last frame)."""

    path: Path
    count: int = 0
    _objects: dict[int, dict] = field(default_factory=dict)

    def add(self, message: dict) -> None:
        frame = {"frame_index": message["frame_index"], "time_s": message["time_s"], "objects": []}
        for item in message["objects"]:
            frame["objects"].append({key: item[key] for key in ("object_id", "box", "area", "rle")})
            summary = self._objects.setdefault(
                item["object_id"],
                {
                    "object_id": item["object_id"],
                    "label": item["label"],
                    "score": 0.0,
                    "first_frame": message["frame_index"],
                    "last_frame": message["frame_index"],
                },
            )
            summary["score"] = max(summary["score"], round(item["score"], 6))
            summary["last_frame"] = message["frame_index"]
        with self.path.open("a") as handle:
            handle.write(json.dumps(frame, separators=(",", ":")) + "\n")
        self.count += 1

    def objects(self) -> list[dict]:
        return [self._objects[object_id] for object_id in sorted(self._objects)]

    def frames(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with self.path.open() as handle:
            for line in handle:
                yield json.loads(line)


def _frames_with_objects(clip: Path, plan: Plan, tracks: _Tracks) -> Iterator:
    """The clip's frames decoded again (the same ones the model saw), each with its objects and their labels."""
    labels = {item["object_id"]: item["label"] for item in tracks.objects()}
    for decoded, frame in zip(frames(clip, plan.sampling), tracks.frames(), strict=False):
        yield decoded.image, [{**item, "label": labels[item["object_id"]]} for item in frame["objects"]]


class _Reporter:
    """Progress to the job store (at most every JOB_PROGRESS_EVERY_S) and to the row (at most every
    `row_every_s`); a failed row write is logged, never the task's failure."""

    def __init__(self, tasks: TaskStore, task_id: str, progress: Progress, row_every_s: float) -> None:
        self._tasks = tasks
        self._task_id = task_id
        self._progress = progress
        self._row_every_s = row_every_s
        self._job_at = self._row_at = float("-inf")

    async def report(self, done: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._job_at >= JOB_PROGRESS_EVERY_S:
            self._job_at = now
            await self._progress(done, total)
        if force or now - self._row_at >= self._row_every_s:
            self._row_at = now
            try:
                await self._tasks.mark_progress(self._task_id, {"frames_done": done, "frames_total": total})
            except Exception as exc:  # advisory: the task goes on
                log.warning("task %s: the row's progress could not be written (%s)", self._task_id, type(exc).__name__)


def _ms_since(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 3)
