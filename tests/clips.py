"""Small test clips written with PyAV: moving coloured squares, rotated, variable frame rate, audio-only, truncated.

Every clip shows, on frame ``i``, the upright picture ``frame_image(i, width, height)``: a dark background, a red square
moving right and a blue square moving down (``shape_boxes`` gives their boxes), so a test can compare what it decodes or
tracks with what was drawn. Encoding is lossy (H.264, 4:2:0): compare square centres with a tolerance, not edges.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

BACKGROUND = (20, 20, 20)
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def shape_boxes(index: int, width: int, height: int) -> dict[str, tuple[int, int, int, int]]:
    """The squares' boxes on frame ``index`` as ``(x, y, w, h)`` pixels of the upright picture: red moves right 2 px a
    frame along the top third, blue moves down 1 px a frame along the right third, both wrapping around."""
    side = max(4, min(width, height) // 4)
    red = ((2 * index) % (width - side), height // 3 - side // 2, side, side)
    blue = ((2 * width) // 3 - side // 2, index % (height - side), side, side)
    return {"red": red, "blue": blue}


def frame_image(index: int, width: int, height: int) -> np.ndarray:
    """The upright picture of frame ``index``: uint8 ``[height, width, 3]`` RGB."""
    image = np.empty((height, width, 3), np.uint8)
    image[:] = BACKGROUND
    for name, (x, y, w, h) in shape_boxes(index, width, height).items():
        image[y : y + h, x : x + w] = COLOURS[name]
    return image


def write_clip(
    path: str | Path,
    *,
    width: int = 64,
    height: int = 48,
    fps: int = 10,
    frames: int = 20,
    rotation: int = 0,
    times_s: list[float] | None = None,
    audio: bool = False,
    codec: str = "libx264",
    options: dict[str, str] | None = None,
) -> Path:
    """Write an MP4 (or any container the suffix names) of ``frames`` pictures ``frame_image(i, width, height)``.

    ``rotation``: degrees clockwise (0/90/180/270) a player turns the stored pixels for display, written as the
    stream's display matrix like a phone does: the stored pictures are turned the other way, so the clip *displays*
    as ``width`` x ``height`` upright pictures. ``times_s``: each frame's presentation time in seconds (variable frame
    rate; millisecond precision), default ``i / fps``. ``audio``: add a silent AAC track. ``options``: encoder options
    (default: x264 ``ultrafast``, ``crf`` 12, no B-frames). Dimensions must be even (4:2:0).
    """
    path = Path(path)
    turns = rotation // 90
    with av.open(str(path), "w", options={"movflags": "+faststart"} if path.suffix in (".mp4", ".mov") else {}) as out:
        stream = out.add_stream(codec, rate=fps, options=options or {"preset": "ultrafast", "crf": "12", "bf": "0"})
        stream.width, stream.height = (height, width) if turns % 2 else (width, height)
        stream.pix_fmt = "yuv420p"
        if rotation:
            stream.set_display_rotation(-rotation)  # PyAV's angle is counter-clockwise
        if times_s is not None:
            stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        sound = out.add_stream("aac", rate=16000) if audio else None
        for i in range(frames):
            picture = av.VideoFrame.from_ndarray(np.rot90(frame_image(i, width, height), k=turns), format="rgb24")
            if times_s is not None:
                picture.pts, picture.time_base = round(times_s[i] * 1000), Fraction(1, 1000)
            out.mux(stream.encode(picture))
        out.mux(stream.encode())
        if sound is not None:
            _write_silence(out, sound, seconds=frames / fps if times_s is None else times_s[-1])
    return path


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An MP4 holding one silent AAC track and no video stream."""
    with av.open(str(path), "w") as out:
        _write_silence(out, out.add_stream("aac", rate=16000), seconds)
    return Path(path)


def truncate(source: str | Path, target: str | Path, keep: float = 0.5) -> Path:
    """Copy an MP4 cut inside its media data (``mdat`` box): the header still lists every frame, but the bytes of
    the frames after ``keep`` (fraction of ``mdat``) are missing, like an upload that stopped part way. The source
    must have its header first (``write_clip`` writes ``+faststart`` MP4s)."""
    data = Path(source).read_bytes()
    offset = 0
    while data[offset + 4 : offset + 8] != b"mdat":
        offset += int.from_bytes(data[offset : offset + 4], "big")
    size = int.from_bytes(data[offset : offset + 4], "big")
    Path(target).write_bytes(data[: offset + 8 + int((size - 8) * keep)])
    return Path(target)


def _write_silence(out: av.container.OutputContainer, stream: av.AudioStream, seconds: float) -> None:
    samples = max(1, round(seconds * stream.rate))
    chunk = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="fltp", layout="mono")
    chunk.sample_rate = stream.rate
    out.mux(stream.encode(chunk))
    out.mux(stream.encode())
