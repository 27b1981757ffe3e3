"""video/: probing, planning (sampling and limits) and streaming decode of generated clips."""

from __future__ import annotations

import inspect
import math

import numpy as np
import psutil
import pytest
from clips import frame_image, truncate, write_audio_only, write_clip

from video import (
    InvalidSampling,
    InvalidVideo,
    Sampling,
    VideoInfo,
    VideoLimits,
    VideoTooLong,
    frames,
    plan,
    probe,
)

ROOMY = VideoLimits(max_seconds=600, max_frames=10_000, max_pixels=4096 * 4096)


def assert_shows(image: np.ndarray, index: int) -> None:
    """The decoded picture is frame ``index`` of the clip, upright (H.264 4:2:0 blurs only the squares' edges)."""
    expected = frame_image(index, image.shape[1], image.shape[0])
    assert image.dtype == np.uint8
    assert np.abs(image.astype(int) - expected).mean() < 6


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """64x48, 10 fps, 20 frames (2 s), a key frame every 4 frames so seeking lands mid-clip."""
    return write_clip(tmp_path_factory.mktemp("clips") / "clip.mp4", options={"preset": "ultrafast", "g": "4"})


def test_probe_reads_the_stream(clip):
    assert probe(clip) == VideoInfo(width=64, height=48, rotation=0, fps=10.0, frames=20, duration_s=2.0, codec="h264")


@pytest.mark.parametrize("name", ["plain.mp4", "with-audio.mp4", "no-frame-count.mkv"])
def test_every_frame_in_order_with_its_time(tmp_path, name):
    path = write_clip(tmp_path / name, audio=name == "with-audio.mp4")
    assert probe(path).frames == 20
    decoded = list(frames(path, Sampling()))
    assert [f.index for f in decoded] == list(range(20))
    assert [f.time_s for f in decoded] == pytest.approx([i / 10 for i in range(20)])
    for f in decoded:
        assert_shows(f.image, f.index)


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_a_rotated_clip_decodes_upright(tmp_path, rotation):
    """A phone stores the sensor's pixels and a display matrix; we get what a player shows: width x height upright."""
    path = write_clip(tmp_path / "phone.mp4", width=80, height=48, rotation=rotation)
    info = probe(path)
    assert (info.rotation, info.width, info.height) == (rotation, 80, 48)
    decoded = list(frames(path, Sampling()))
    assert len(decoded) == 20
    for f in decoded:
        assert f.image.shape == (48, 80, 3)
        assert f.image.flags.c_contiguous
        assert_shows(f.image, f.index)


def test_fps_samples_a_variable_frame_rate_clip_evenly(tmp_path):
    """Half a second at 10 fps, nothing for half a second, then a second at 30 fps, sampled at 10 fps: one frame
    every 0.1 s, the first one after the gap standing for the ticks inside it, none taken twice."""
    times = [i / 10 for i in range(5)] + [1 + i / 30 for i in range(30)]
    path = write_clip(tmp_path / "vfr.mp4", frames=len(times), times_s=times)
    assert len(list(frames(path, Sampling()))) == 35
    sampled = list(frames(path, Sampling(fps=10)))
    assert [f.time_s for f in sampled] == pytest.approx([i / 10 for i in range(5)] + [1 + i / 10 for i in range(10)])
    for f in sampled:
        assert_shows(f.image, times.index(min(times, key=lambda t: abs(t - f.time_s))))


def test_fps_takes_the_first_frame_at_or_after_each_tick(tmp_path):
    path = write_clip(tmp_path / "30fps.mp4", fps=30, frames=30)
    every_third = list(frames(path, Sampling(fps=10)))
    assert [round(f.time_s * 30) for f in every_third] == list(range(0, 30, 3))
    at_7 = [round(f.time_s * 30) for f in frames(path, Sampling(fps=7))]
    assert at_7 == [math.ceil(k * 30 / 7) for k in range(7)]


def test_start_end_and_max_frames(clip):
    span = list(frames(clip, Sampling(start_s=0.5, end_s=1.2)))
    assert [f.index for f in span] == list(range(7))
    assert [f.time_s for f in span] == pytest.approx([0.5 + i / 10 for i in range(7)])
    for f in span:
        assert_shows(f.image, 5 + f.index)
    assert [f.time_s for f in frames(clip, Sampling(start_s=0.5, max_frames=3))] == pytest.approx([0.5, 0.6, 0.7])
    assert [f.time_s for f in frames(clip, Sampling(start_s=0.25, fps=4))] == pytest.approx(
        [0.3, 0.5, 0.8, 1.0, 1.3, 1.5, 1.8]
    )


@pytest.mark.parametrize(
    "sampling",
    [Sampling(), Sampling(fps=4), Sampling(start_s=0.5, end_s=1.2), Sampling(fps=3, max_frames=4), Sampling(fps=100)],
)
def test_the_plan_counts_the_frames_that_are_decoded(clip, sampling):
    planned = plan(probe(clip), sampling, ROOMY, fps_cap=30)
    assert planned.frames_total == len(list(frames(clip, planned.sampling)))


def test_the_plan_caps_the_rate_and_takes_every_frame_at_the_clips_own():
    info = VideoInfo(width=1920, height=1080, rotation=0, fps=60.0, frames=600, duration_s=10.0, codec="h264")
    capped = plan(info, Sampling(), ROOMY, fps_cap=15)
    assert (capped.fps, capped.sampling.fps, capped.frames_total) == (15, 15, 150)
    own = plan(info, Sampling(fps=120, end_s=30), ROOMY, fps_cap=120)
    assert (own.fps, own.sampling, own.span_s, own.frames_total) == (60, Sampling(end_s=10.0), 10.0, 600)
    asked = plan(info, Sampling(fps=50), ROOMY, fps_cap=15)  # a rate the request names is not capped
    assert (asked.fps, asked.sampling.fps, asked.frames_total) == (50, 50, 500)


def test_limits_say_which_and_the_numbers():
    info = VideoInfo(width=1920, height=1080, rotation=90, fps=30.0, frames=9000, duration_s=300.0, codec="hevc")
    with pytest.raises(VideoTooLong) as pixels:
        plan(info, Sampling(), VideoLimits(max_seconds=600, max_frames=10_000, max_pixels=1280 * 720), fps_cap=30)
    assert pixels.value.limit == "pixels"
    assert "1920x1080 (2073600 pixels per frame)" in str(pixels.value) and "921600" in str(pixels.value)

    short = VideoLimits(max_seconds=120, max_frames=10_000, max_pixels=1920 * 1080)
    with pytest.raises(VideoTooLong) as seconds:
        plan(info, Sampling(start_s=60), short, fps_cap=30)
    assert seconds.value.limit == "seconds"
    assert "240.0 s long (from 60 s to 300.0 s)" in str(seconds.value) and "limit of 120 s" in str(seconds.value)
    assert plan(info, Sampling(start_s=60, max_frames=3000), short, fps_cap=30).span_s == 100

    few = VideoLimits(max_seconds=600, max_frames=1000, max_pixels=1920 * 1080)
    with pytest.raises(VideoTooLong) as count:
        plan(info, Sampling(end_s=100), few, fps_cap=30)
    assert count.value.limit == "frames"
    assert "3000 frames (100.0 s at 30 frames per second)" in str(count.value) and "1000 frames" in str(count.value)
    assert plan(info, Sampling(end_s=100, fps=10), few, fps_cap=30).frames_total == 1000


def test_bad_sampling_is_refused(clip):
    with pytest.raises(InvalidSampling, match=r"start_s \(2.5 s\) is at or after the end of the video \(2.00 s\)"):
        plan(probe(clip), Sampling(start_s=2.5), ROOMY, fps_cap=30)
    for bad in [{"start_s": -1}, {"start_s": 2, "end_s": 1}, {"fps": 0}, {"max_frames": 0}, {"start_s": math.nan}]:
        with pytest.raises(InvalidSampling):
            Sampling(**bad)


def test_files_that_are_not_videos(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("not a video")
    with pytest.raises(InvalidVideo, match="not a video FFmpeg can read"):
        probe(text)
    with pytest.raises(InvalidVideo, match="not a video FFmpeg can read"):
        next(frames(text, Sampling()))
    with pytest.raises(InvalidVideo, match="no video stream .it holds audio."):
        probe(write_audio_only(tmp_path / "voice.mp4"))


def test_a_truncated_clip_fails_saying_where(clip, tmp_path):
    cut = truncate(clip, tmp_path / "cut.mp4", keep=0.5)
    assert probe(cut).frames == 20  # the header is whole
    decoded = []
    with pytest.raises(InvalidVideo, match=r"damaged or cut short after \d\.\d\d s") as error:
        decoded.extend(frames(cut, Sampling()))
    assert 0 < len(decoded) < 20
    assert f"after {decoded[-1].time_s:.2f} s" in str(error.value)


def test_decoding_streams_frame_by_frame(tmp_path):
    """frames() is a generator and the process does not grow with the clip: keeping the 300 frames of 320x240 RGB
    would take 69 MB."""
    path = write_clip(tmp_path / "long.mp4", width=320, height=240, fps=30, frames=300)
    stream = frames(path, Sampling())
    assert inspect.isgenerator(stream)
    process = psutil.Process()
    count, peak = 0, 0
    for frame in stream:
        count += 1
        if frame.index == 30:  # the decoder's buffers are allocated by now
            settled = process.memory_info().rss
        peak = max(peak, process.memory_info().rss)
    assert count == 300
    assert peak - settled < 20_000_000
