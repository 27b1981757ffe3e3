"""A preview of a tracked clip: an H.264 MP4 whose frames are drawn as the image overlay draws a photo
(renderers/overlay.py: supervision's annotators, long side at most 1024 pixels), each object in the colour of its
object_id (supervision's default palette, cycling), the same on every frame, captioned "#<object_id> <label>".

Frames are drawn and handed to the encoder one at a time: the clip is never held in memory (the encoder keeps its
own look-ahead of a few frames). The encoder is libx264, which PyAV's wheels ship (av 18.1.0's also has libx265,
libvpx-vp9, libsvtav1, mpeg4 and the hardware-only h264_nvenc / h264_qsv / h264_v4l2m2m; no libopenh264): H.264 in
yuv420p plays on every phone and browser. Colours are converted with BT.709's matrix to the limited (TV) range and
tagged so (untagged, a player guesses BT.601 or BT.709 from the frame's height). The MP4's index (moov) is written
before the media (`+faststart`), so a player can start before the file has downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import av
import cv2
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

from renderers.instances import decode

ENCODER = "libx264"
# veryfast: about half the CPU of x264's default (medium) for a preview's quality; CRF 23 is x264's default quality.
ENCODER_OPTIONS = {"preset": "veryfast", "crf": "23"}
MAX_FPS_DENOMINATOR = 10_000  # 29.97 fps (30000/1001) is kept exact


@dataclass(frozen=True)
class OverlayInfo:
    """The MP4 written: width x height pixels (even, long side <= 1024), `frames` frames at `fps` frames per second."""

    width: int
    height: int
    frames: int
    fps: float


def render_video_overlay(
    frames: Iterable[tuple[np.ndarray, list[dict]]], fps: float, out_path: str | os.PathLike[str]
) -> OverlayInfo:
    """Draws each frame's objects and encodes the frames, in order, as an H.264 MP4 at `out_path` (overwritten).

    frames: (pixels, objects) per frame; pixels H x W x 3 uint8 RGB, display orientation, the same size on every
        frame; objects: dicts with "object_id" (int), "label" (str), "box" (xyxy in the frame's pixels) and "rle"
        (COCO compressed RLE at the frame's size); other keys ("score", "area") are not read. An object whose mask is
        empty (absent on that frame) is not drawn.
    fps: the rate the frames were sampled at (> 0): frame k is shown at k / fps seconds.

    The frames are scaled as the image overlay scales a photo (long side at most 1024 pixels, aspect kept); an odd
    width or height then gets its last column or row repeated, as yuv420p needs even sides.
    Raises ValueError when fps <= 0, `frames` is empty, or a frame is not uint8 H x W x 3 or not the first's size;
    what `frames` raises propagates (the file is then left incomplete).
    """
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    # supervision (it imports scipy) costs 1.2 s and 59 MiB per process: loaded by the first overlay, not at start
    from renderers.overlay import Overlay

    rate = Fraction(fps).limit_denominator(MAX_FPS_DENOMINATOR)
    shape = None
    with av.open(os.fspath(out_path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream(ENCODER, rate=rate, options=ENCODER_OPTIONS)
        stream.pix_fmt = "yuv420p"
        codec = stream.codec_context
        codec.colorspace, codec.color_range = Colorspace.ITU709, ColorRange.MPEG
        codec.color_primaries, codec.color_trc = ColorPrimaries.BT709, ColorTrc.BT709
        for index, (pixels, objects) in enumerate(frames):
            shape = shape or pixels.shape
            if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.shape != shape:
                raise ValueError(
                    f"frame {index}: expected uint8 H x W x 3 RGB pixels of the first frame's shape {shape}, "
                    f"got {pixels.dtype} {pixels.shape}"
                )
            overlay = Overlay(pixels)
            for drawn in objects:
                caption = f"#{drawn['object_id']} {drawn['label']}"
                overlay.add(decode(drawn["rle"]), list(drawn["box"]), caption, colour=drawn["object_id"])
            scene = overlay.draw()
            height, width = scene.shape[:2]
            scene = cv2.copyMakeBorder(scene, 0, height % 2, 0, width % 2, cv2.BORDER_REPLICATE)
            if index == 0:
                stream.height, stream.width = scene.shape[:2]
            frame = av.VideoFrame.from_ndarray(scene, format="bgr24").reformat(
                format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG
            )
            frame.pts = index
            container.mux(stream.encode(frame))
        if shape is None:
            raise ValueError("no frames to render")
        container.mux(stream.encode(None))
    return OverlayInfo(width=stream.width, height=stream.height, frames=stream.frames, fps=float(rate))
