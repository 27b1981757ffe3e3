"""What a video tracking session gives back per frame (sam3_runner/video.py for concept prompts,
sam3_runner/video_objects.py for a visual prompt), shared by both and by the model service that sends it on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TrackedObject:
    """One object on one frame.

    object_id: stable over the whole clip (SAM 3's obj_id; the same physical object keeps it from frame to frame).
    label: the noun phrase that found it (concept prompts) or "object" (a visual prompt).
    score: concept prompts: the object's detection score (presence x query probability, Meta's `obj_id_to_score`);
        visual prompt: the tracker's object score (sigmoid of its object-score logit) on this frame.
    box: xyxy in pixels of the frame as given to the session (display orientation), the mask's bounding box
        COCO's way (x2 = last column + 1).
    area: mask pixels.
    rle: COCO compressed RLE {"size": [h, w], "counts": str} of the mask at the frame's size.
    """

    object_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    area: int
    rle: dict


@dataclass(frozen=True)
class FrameResult:
    """frame_index: 0-based position of the frame in the sequence given to the session (add_frame's order)."""

    frame_index: int
    objects: list[TrackedObject]


class TrackingSession(Protocol):
    """One clip's tracking state. Frames go in one at a time, in order; results come out in frame order, possibly
    a few frames late (SAM 3 holds back its first `hotstart_delay` frames to drop spurious new objects), and every
    frame given gets exactly one FrameResult by the time `finish` returns. Memory stays bounded whatever the clip's
    length: the session keeps only what the model will read again."""

    def add_frame(self, frame: np.ndarray) -> list[FrameResult]:
        """frame: uint8 RGB [H, W, 3], display orientation, the same size for every frame of the clip. Returns the
        frames whose results are final (maybe none)."""

    def finish(self) -> list[FrameResult]:
        """No more frames: the results still held back."""
