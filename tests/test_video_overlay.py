"""renderers/video_overlay.py: a tracked clip's MP4 preview, read back with PyAV as a player would."""

from __future__ import annotations

import struct
import tracemalloc
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
import supervision as sv
from pycocotools import mask as mask_utils

from renderers import render_video_overlay
from renderers.instances import decode
from renderers.overlay import Overlay

HEIGHT, WIDTH = 120, 160
GREY = 128


def rle_of(mask: np.ndarray) -> dict:
    """What the model service sends: pycocotools' compressed RLE with a str `counts`."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def square_object(object_id: int, x: int, y: int, side: int, height=HEIGHT, width=WIDTH, label="cat") -> dict:
    mask = np.zeros((height, width), dtype=bool)
    mask[y : y + side, x : x + side] = True
    box = [x, y, min(width, x + side), min(height, y + side)]
    return {
        "object_id": object_id,
        "label": label,
        "score": 0.9,
        "box": box,
        "area": int(mask.sum()),
        "rle": rle_of(mask),
    }


def grey(height=HEIGHT, width=WIDTH) -> np.ndarray:
    return np.full((height, width, 3), GREY, dtype=np.uint8)


def decoded(path) -> tuple[av.video.stream.VideoStream, list[np.ndarray], list[float]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(frame.to_ndarray(format="rgb24"), float(frame.time)) for frame in container.decode(stream)]
    return stream, [pixels for pixels, _ in frames], [time for _, time in frames]


def palette_tint(object_id: int) -> np.ndarray:
    """What MaskAnnotator makes of grey under the object's colour (opacity 0.5), RGB."""
    return (np.array(sv.ColorPalette.DEFAULT.by_idx(object_id).as_rgb()) + GREY) / 2


def test_the_preview_is_an_h264_mp4_with_every_frame_at_its_time(tmp_path):
    fps = 30000 / 1001
    clip = [(grey(), [square_object(3, 10 + 2 * k, 30, 40)]) for k in range(24)]
    info = render_video_overlay(iter(clip), fps, tmp_path / "preview.mp4")
    stream, frames, times = decoded(tmp_path / "preview.mp4")
    assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
    assert (stream.codec_context.colorspace, stream.codec_context.color_range) == (1, 1)  # tagged BT.709, TV range
    assert stream.average_rate == Fraction(30000, 1001)
    assert (info.width, info.height, info.frames) == (WIDTH, HEIGHT, 24) and info.fps == pytest.approx(fps)
    assert len(frames) == 24 and all(pixels.shape == (HEIGHT, WIDTH, 3) for pixels in frames)
    assert times == pytest.approx([k / fps for k in range(24)], abs=1e-3)


def test_the_index_comes_first_so_a_phone_plays_before_the_download_ends(tmp_path):
    render_video_overlay([(grey(), [square_object(0, 10, 10, 30)])] * 3, 10.0, tmp_path / "preview.mp4")
    data = (tmp_path / "preview.mp4").read_bytes()
    boxes, offset = [], 0
    while offset < len(data):
        size, kind = struct.unpack(">I4s", data[offset : offset + 8])
        boxes.append(kind.decode())
        offset += size
    assert boxes.index("moov") < boxes.index("mdat")


@pytest.mark.parametrize(
    ("size", "preview"),
    [((1920, 1080), (1024, 576)), ((1080, 1920), (576, 1024)), ((65, 49), (66, 50)), ((3000, 7), (1024, 2))],
)
def test_the_preview_is_at_most_1024_pixels_on_its_long_side_with_even_sides(tmp_path, size, preview):
    width, height = size
    clip = [(grey(height, width), [square_object(1, width // 4, height // 4, max(1, height // 2), height, width)])]
    info = render_video_overlay(clip * 2, 25.0, tmp_path / "preview.mp4")
    stream, frames, _ = decoded(tmp_path / "preview.mp4")
    assert (info.width, info.height) == preview == (stream.width, stream.height)
    assert len(frames) == 2 and frames[0].shape == (preview[1], preview[0], 3)


def test_each_object_keeps_the_colour_of_its_id_on_every_frame(tmp_path):
    """Objects come and go and are listed in any order: the colour follows object_id (the default palette's colour
    at that index), never the place in the frame's list."""
    clip = []
    for k in range(12):
        first, second = square_object(7, 10 + k, 20, 40), square_object(2, 100, 60 - k, 40)
        objects = [first, second] if k % 2 else [second, first]
        clip.append((grey(), objects if k != 5 else [second]))  # object 7 absent on frame 5
    render_video_overlay(clip, 12.0, tmp_path / "preview.mp4")
    _, frames, _ = decoded(tmp_path / "preview.mp4")
    for k, pixels in enumerate(frames):
        inside_second = pixels[70 - k : 90 - k, 110:130].mean(axis=(0, 1))
        assert np.abs(inside_second - palette_tint(2)).max() < 12
        inside_first = pixels[40:55, 25 + k : 40 + k].mean(axis=(0, 1))
        expected = np.full(3, GREY) if k == 5 else palette_tint(7)
        assert np.abs(inside_first - expected).max() < 12
    assert np.abs(palette_tint(7) - palette_tint(2)).max() > 40
    assert np.abs(frames[3][:, 60:90].astype(int) - GREY).max() < 12  # between the objects: the frame untouched


def test_a_frame_looks_like_the_image_overlay_of_that_frame(tmp_path):
    """Same annotators as the photo preview (mask, outline, box, caption "#id label"), colour by object_id."""
    pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    pixels = cv2.GaussianBlur(pixels, (15, 15), 5)  # a smooth scene, as cameras give: H.264 keeps it close
    objects = [square_object(4, 20, 30, 50, label="dog"), square_object(9, 90, 50, 45, label="ball")]
    render_video_overlay([(pixels, objects)], 1.0, tmp_path / "preview.mp4")
    _, frames, _ = decoded(tmp_path / "preview.mp4")
    overlay = Overlay(pixels)
    for drawn in objects:
        overlay.add(decode(drawn["rle"]), drawn["box"], f"#{drawn['object_id']} {drawn['label']}", drawn["object_id"])
    expected = cv2.cvtColor(overlay.draw(), cv2.COLOR_BGR2RGB).astype(int)
    # H.264 costs ~3.5 levels on average here; without the captions the frame is 8.6 away, coloured by place 31
    assert np.abs(frames[0].astype(int) - expected).mean() < 5


def test_frames_are_drawn_and_encoded_one_at_a_time(tmp_path):
    """The clip is never held: Python memory at its peak is the same for a clip 6 times longer."""

    def clip(count):
        for k in range(count):
            yield grey(240, 320), [square_object(1, 10 + k, 20, 60, 240, 320)]

    peaks = []
    for count in (10, 60):
        tracemalloc.start()
        render_video_overlay(clip(count), 30.0, tmp_path / f"preview{count}.mp4")
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < peaks[0] + 240 * 320 * 3  # less than one more frame


def test_bad_input_is_refused_with_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        render_video_overlay([], 30.0, tmp_path / "preview.mp4")
    with pytest.raises(ValueError, match="fps"):
        render_video_overlay([(grey(), [])], 0.0, tmp_path / "preview.mp4")
    with pytest.raises(ValueError, match=r"frame 1: .*\(120, 160, 3\).*\(60, 80, 3\)"):
        render_video_overlay([(grey(), []), (grey(60, 80), [])], 30.0, tmp_path / "preview.mp4")
