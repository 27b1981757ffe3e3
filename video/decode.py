"""Reading a video clip with PyAV (FFmpeg): probe it, plan which frames to process, decode them one at a time.

Conventions used throughout:
- Times are seconds from the start of the video stream (its first presentation timestamp is 0 s).
- Images are ``np.ndarray`` uint8 ``[H, W, 3]`` RGB in *display orientation*: the stream's display matrix (what phones
  write instead of rotating the pixels, the video counterpart of the EXIF orientation) is applied the way the ffmpeg
  command line applies it by default ("autorotate"). Widths and heights are pixels of that upright image.
- Pixels are the stored ones: a non-square sample aspect ratio (rare outside broadcast) is not resampled.
- Only the rotation in the display matrix is honoured (multiples of 90 degrees; any other angle is rounded to the
  nearest one); mirroring matrices are not applied.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np

# A frame this close before a sampling tick counts as being on it: timestamps are rounded to the stream's time base
# (e.g. 1/15360 s) while a tick of a non-integer rate such as 29.97 fps is not.
_TICK_TOLERANCE_S = 1e-3


class VideoError(Exception):
    """Base of the errors below; ``str(error)`` is a message for the app's user."""


class InvalidVideo(VideoError):
    """Not a video we can decode: unreadable, no video stream, or broken part way (the message says where)."""


class InvalidSampling(VideoError, ValueError):
    """The sampling asked for does not fit the clip or is malformed (e.g. ``start_s`` at or after the clip's end)."""


class VideoTooLong(VideoError):
    """Processing would go over a limit; ``limit`` says which one: ``"seconds"``, ``"frames"`` or ``"pixels"``."""

    def __init__(self, limit: Literal["seconds", "frames", "pixels"], message: str):
        super().__init__(message)
        self.limit = limit


@dataclass(frozen=True, slots=True)
class VideoInfo:
    """What ``probe`` reads from a clip.

    ``width``/``height``: pixels in display orientation (after ``rotation``). ``rotation``: degrees clockwise applied to
    the decoded pixels for display (0, 90, 180 or 270). ``fps``: the stream's average frame rate (frames per second).
    ``frames``: the stream's frame count (the header's, else counted from the packets). ``duration_s``: seconds.
    ``codec``: FFmpeg's decoder name, e.g. ``"h264"``, ``"hevc"``.
    """

    width: int
    height: int
    rotation: int
    fps: float
    frames: int
    duration_s: float
    codec: str


@dataclass(frozen=True, slots=True)
class Sampling:
    """Which frames to decode.

    ``start_s``/``end_s``: the span in seconds, start inclusive, end exclusive (``None``: to the end of the clip).
    ``fps``: sample rate in frames per second: ticks at ``start_s + k / fps``, each taking the first frame at or after
    it and no frame twice (so a variable-frame-rate clip gives evenly spaced samples); ``None`` takes every frame.
    ``max_frames``: stop after this many frames (``None``: no cap).
    Raises ``InvalidSampling`` for a negative start, an end not after the start, a non-positive fps or max_frames.
    """

    start_s: float = 0.0
    end_s: float | None = None
    fps: float | None = None
    max_frames: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise InvalidSampling(f"start_s must be a number of seconds >= 0, got {self.start_s}")
        if self.end_s is not None and not (math.isfinite(self.end_s) and self.end_s > self.start_s):
            raise InvalidSampling(f"end_s ({self.end_s} s) must be after start_s ({self.start_s} s)")
        if self.fps is not None and not (math.isfinite(self.fps) and self.fps > 0):
            raise InvalidSampling(f"fps must be > 0, got {self.fps}")
        if self.max_frames is not None and self.max_frames < 1:
            raise InvalidSampling(f"max_frames must be >= 1, got {self.max_frames}")


@dataclass(frozen=True, slots=True)
class VideoLimits:
    """Upper bounds for one job: ``max_seconds`` of the processed span, ``max_frames`` frames to process,
    ``max_pixels`` per frame (width * height)."""

    max_seconds: float
    max_frames: int
    max_pixels: int


@dataclass(frozen=True, slots=True)
class Plan:
    """What a job will process: ``sampling`` resolved against the clip (``end_s`` set, ``fps`` ``None`` when every
    frame is taken, else the effective sample rate), to pass to ``frames``; ``fps``: frames per second of the output
    (the clip's average rate when every frame is taken); ``span_s``: seconds of the clip processed; ``frames_total``:
    the expected number of frames ``frames`` yields (exact for a constant frame rate, an estimate otherwise)."""

    sampling: Sampling
    fps: float
    span_s: float
    frames_total: int


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame: ``index`` is its 0-based position in the output, ``time_s`` its own presentation time in
    seconds from the stream's start, ``image`` uint8 ``[H, W, 3]`` RGB in display orientation."""

    index: int
    time_s: float
    image: np.ndarray


def probe(path: str | Path) -> VideoInfo:
    """Read a clip's stream header and decode its first frame (which also carries the display matrix).

    Raises ``InvalidVideo`` when the file cannot be opened, has no video stream or no decodable frame.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        first = next(_decoded(container, stream), None)
        if first is None:
            raise InvalidVideo("the video stream has no frame that can be decoded")
        rotation = _rotation(first)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        frames, duration_s = _frames_and_duration(container, stream)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else frames / duration_s
        return VideoInfo(width, height, rotation, fps, frames, duration_s, stream.codec_context.name)


def plan(info: VideoInfo, sampling: Sampling, limits: VideoLimits, fps_cap: float) -> Plan:
    """Resolve ``sampling`` against the clip and check ``limits``.

    The sample rate is ``sampling.fps``, never above the clip's own (average) rate; without it, the clip's own rate
    capped at ``fps_cap``. When it is the clip's rate every frame is taken. Raises ``InvalidSampling`` when
    ``start_s`` is at or after the end of the clip, ``VideoTooLong`` naming the first limit exceeded (pixels per
    frame, then seconds of the processed span, then frames to process) with the numbers.
    """
    if sampling.start_s >= info.duration_s:
        raise InvalidSampling(
            f"start_s ({sampling.start_s} s) is at or after the end of the video ({info.duration_s:.2f} s)"
        )
    end_s = info.duration_s if sampling.end_s is None else min(sampling.end_s, info.duration_s)
    rate = min(sampling.fps, info.fps) if sampling.fps else min(info.fps, fps_cap)
    every_frame = rate >= info.fps
    span_s = end_s - sampling.start_s
    if every_frame and sampling.start_s == 0 and end_s == info.duration_s:
        frames_total = info.frames
    else:
        frames_total = max(1, math.ceil(span_s * rate - _TICK_TOLERANCE_S * rate))
    if sampling.max_frames is not None and sampling.max_frames < frames_total:
        frames_total = sampling.max_frames
        span_s = min(span_s, frames_total / rate)
    resolved = Sampling(sampling.start_s, end_s, None if every_frame else rate, sampling.max_frames)

    pixels = info.width * info.height
    if pixels > limits.max_pixels:
        raise VideoTooLong(
            "pixels",
            f"the video is {info.width}x{info.height} ({pixels} pixels per frame), "
            f"over the limit of {limits.max_pixels} pixels per frame",
        )
    if span_s > limits.max_seconds:
        raise VideoTooLong(
            "seconds",
            f"the part of the video to process is {span_s:.1f} s long (from {sampling.start_s:g} s to "
            f"{sampling.start_s + span_s:.1f} s), over the limit of {limits.max_seconds:g} s: "
            "process less with start_s, end_s or max_frames",
        )
    if frames_total > limits.max_frames:
        raise VideoTooLong(
            "frames",
            f"processing would take {frames_total} frames ({span_s:.1f} s at {rate:.3g} frames per second), "
            f"over the limit of {limits.max_frames} frames: process less with fps, start_s, end_s or max_frames",
        )
    return Plan(resolved, rate, span_s, frames_total)


def frames(path: str | Path, sampling: Sampling) -> Iterator[Frame]:
    """Decode the frames ``sampling`` selects, one at a time (a generator: the clip is never held in memory; it seeks
    to the key frame before ``start_s``). Pass ``plan(...).sampling`` to get the frames the plan counted.

    Raises ``InvalidVideo`` when the file cannot be opened, and when decoding fails part way, saying where.
    """
    with _open(path) as container:
        stream = container.streams.video[0]
        origin = stream.start_time or 0
        if sampling.start_s > 0:
            container.seek(origin + int(sampling.start_s / stream.time_base), stream=stream, backward=True)
        next_tick = 0
        index = 0
        for frame in _decoded(container, stream):
            if frame.pts is None:
                raise InvalidVideo(f"a frame after {index} output frames has no timestamp")
            time_s = float((frame.pts - origin) * stream.time_base)
            offset_s = time_s - sampling.start_s
            if offset_s < -_TICK_TOLERANCE_S:
                continue
            if sampling.end_s is not None and time_s >= sampling.end_s - _TICK_TOLERANCE_S:
                return
            if sampling.fps is not None:
                if offset_s < next_tick / sampling.fps - _TICK_TOLERANCE_S:
                    continue
                next_tick = math.floor((offset_s + _TICK_TOLERANCE_S) * sampling.fps) + 1
            yield Frame(index, time_s, _upright(frame))
            index += 1
            if index == sampling.max_frames:
                return


def _open(path: str | Path) -> av.container.InputContainer:
    try:
        container = av.open(str(path))
    except av.FFmpegError as error:
        raise InvalidVideo(f"the file is not a video FFmpeg can read ({error.strerror})") from error
    if not container.streams.video:
        kinds = sorted({stream.type for stream in container.streams}) or ["nothing"]
        container.close()
        raise InvalidVideo(f"the file has no video stream (it holds {', '.join(kinds)})")
    container.streams.video[0].thread_type = "AUTO"
    return container


def _decoded(container: av.container.InputContainer, stream: av.VideoStream):
    """The stream's frames in presentation order; a damaged packet or a decoder error raises ``InvalidVideo`` naming
    the time of the last good frame (a clip cut short makes the demuxer return a partial packet flagged corrupt)."""
    last_s = 0.0
    try:
        for packet in container.demux(stream):
            if packet.is_corrupt:
                raise InvalidVideo(f"the video is damaged or cut short after {last_s:.2f} s")
            for frame in packet.decode():
                if frame.pts is not None:
                    last_s = float((frame.pts - (stream.start_time or 0)) * stream.time_base)
                yield frame
    except av.FFmpegError as error:
        raise InvalidVideo(f"the video cannot be decoded after {last_s:.2f} s ({error.strerror})") from error


def _frames_and_duration(container: av.container.InputContainer, stream: av.VideoStream) -> tuple[int, float]:
    """The header's frame count and duration; containers without them (e.g. Matroska has no frame count) are counted
    from the packets (demuxed, not decoded)."""
    if stream.duration is not None:
        duration_s = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration_s = container.duration / av.time_base
    else:
        duration_s = 0.0
    if stream.frames and duration_s > 0:
        return stream.frames, duration_s
    container.seek(0, stream=stream, backward=True)
    count, first, end = 0, None, None
    for packet in container.demux(stream):
        if packet.pts is None:
            continue
        count += 1
        first = packet.pts if first is None else min(first, packet.pts)
        end = max(end or packet.pts, packet.pts + (packet.duration or 0))
    if count == 0:
        raise InvalidVideo("the video stream has no frames")
    duration_s = duration_s if duration_s > 0 else float((end - first) * stream.time_base)
    if duration_s <= 0:
        raise InvalidVideo("the video has no duration")
    return count, duration_s


def _rotation(frame: av.VideoFrame) -> int:
    """Degrees clockwise to turn the decoded pixels for display (0/90/180/270). PyAV's ``VideoFrame.rotation`` is the
    display matrix's counter-clockwise angle (FFmpeg's ``av_display_rotation_get``); ffmpeg's autorotate turns the
    picture by its negation (``fftools/ffmpeg_filter.c``), e.g. -90 for a phone's portrait clip ("rotate=90")."""
    return round(-frame.rotation / 90) % 4 * 90


# OpenCV turns a 1080p frame in ~4 ms where numpy's rot90 + copy takes ~30 ms (x86_64, 2 cores)
_TURNS = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}


def _upright(frame: av.VideoFrame) -> np.ndarray:
    image = frame.to_ndarray(format="rgb24")
    rotation = _rotation(frame)
    return cv2.rotate(image, _TURNS[rotation]) if rotation else image
