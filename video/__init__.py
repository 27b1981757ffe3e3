"""Video clips: probe, plan and decode frames in display orientation (PyAV / FFmpeg)."""

from video.decode import (
    Frame,
    InvalidSampling,
    InvalidVideo,
    Plan,
    Sampling,
    VideoError,
    VideoInfo,
    VideoLimits,
    VideoTooLong,
    frames,
    plan,
    probe,
)

__all__ = [
    "Frame",
    "InvalidSampling",
    "InvalidVideo",
    "Plan",
    "Sampling",
    "VideoError",
    "VideoInfo",
    "VideoLimits",
    "VideoTooLong",
    "frames",
    "plan",
    "probe",
]
