"""One clip, in the model service: decode the planned frames one by one (video/), feed each to a tracking session
(sam3_runner: concept prompts or one object's visual prompt), and hand each frame's objects on as soon as SAM 3
has settled them. The session's device work runs on the engine's device thread one frame at a time, so image
batches queued meanwhile run between two frames of a clip.

Messages (dicts; the model service sends them as JSON lines):
  {"type": "frame", "frame_index", "time_s", "objects": [{"object_id", "label", "score", "box", "area", "rle"}]}
  {"type": "end", "model_ms"}                       after the last frame
  {"type": "error", "code", "message"}              instead of anything further
Before every frame the request is checked: cancelled by the gateway, or past its deadline, it stops there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from backend.protocol import object_of
from sam3_runner import Sam3Engine
from sam3_runner.video_types import FrameResult
from video import InvalidVideo, Sampling, frames

log = logging.getLogger(__name__)

VIDEO_UNAVAILABLE = (
    "the loaded weights are SAM 3's detector alone (no tracker), which cannot track through a video; video needs "
    "weights with the tracker: facebook/sam3, a directory saved from Sam3VideoModel, or Meta's full sam3.pt"
)


def track_clip(engine: Sam3Engine, clip: Path, request: dict, abandoned: Callable[[], str | None]) -> Iterator[dict]:
    """`request`: {"sampling": video.Sampling's fields (the gateway's plan), "frames_total": int, "prompts": [str],
    "threshold": float | None, "visual": {"frame_index", and backend/protocol.py's object_fields} | absent}.
    `abandoned()`: why nobody wants the result any more (backend/cancellation.py), or None."""
    if engine.loaded.video is None:
        yield _error("video_unavailable", VIDEO_UNAVAILABLE)
        return
    sampling = Sampling(**request["sampling"])
    visual = request.get("visual")
    if visual is None:
        session = engine.track_concepts(request["prompts"], request.get("threshold"), request.get("frames_total"))
    else:
        session = engine.track_object(visual["frame_index"], *object_of(visual))
    times: dict[int, float] = {}  # frames given to the session whose results are still held back
    given = 0
    model_s = 0.0
    try:
        for frame in frames(clip, sampling):
            if reason := abandoned():
                yield _error(reason, f"{reason}: the clip was stopped at frame {frame.index}")
                return
            times[frame.index] = frame.time_s
            given += 1
            started = time.perf_counter()
            settled = session.add_frame(frame.image)
            model_s += time.perf_counter() - started
            yield from _messages(settled, times)
        started = time.perf_counter()
        settled = session.finish()
        model_s += time.perf_counter() - started
        yield from _messages(settled, times)
    except InvalidVideo as exc:
        yield _error("invalid_video", str(exc))
        return
    except Exception as exc:  # the model can raise anything: this clip's failure, the service goes on
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.exception("tracking a clip failed")
        yield _error("inference_failed", f"inference failed ({type(exc).__name__})")
        return
    if given == 0:
        yield _error(
            "invalid_option",
            f"no frame of the clip lies in the span asked for (start_s {sampling.start_s:g} s, end_s "
            f"{sampling.end_s:g} s): widen it",
        )
        return
    if visual is not None and visual["frame_index"] >= given:
        yield _error(
            "invalid_option",
            f"frame_index {visual['frame_index']} is past the clip's last processed frame ({given - 1})",
        )
        return
    yield {"type": "end", "model_ms": round(model_s * 1000, 3)}


def _messages(settled: list[FrameResult], times: dict[int, float]) -> Iterator[dict]:
    for result in settled:
        yield {
            "type": "frame",
            "frame_index": result.frame_index,
            "time_s": round(times.pop(result.frame_index), 6),
            "objects": [
                {
                    "object_id": item.object_id,
                    "label": item.label,
                    "score": item.score,
                    "box": list(item.box),
                    "area": item.area,
                    "rle": item.rle,
                }
                for item in result.objects
            ],
        }


def _error(code: str, message: str) -> dict:
    return {"type": "error", "code": code, "message": message}
