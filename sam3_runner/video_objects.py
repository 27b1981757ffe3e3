"""One object tracked through a stream of frames from a visual prompt (SAM's promptable visual segmentation, PVS).

The prompt (clicks and/or one box on frame `frame_index`) initialises the object with the tracker; every later frame
is propagated from the tracker's memory, one frame at a time, as frames arrive. This is transformers' streaming recipe
for `Sam3TrackerVideoModel` (its model card: `Sam3TrackerVideoProcessor.init_video_session()` without a video, then
per frame `processor(images=frame)`, `add_inputs_to_inference_session(..., original_size=...)` on the prompt frame,
`model(inference_session, frame=pixel_values)`, `processor.post_process_masks([pred_masks], original_sizes)`), run on
the weights already loaded:
- vision features from the detector's ViT trunk through the tracker's own neck, as `Sam3VideoModel` gives them to its
  tracker (`get_vision_features_for_tracker`: neck levels 4x, 2x, 1x, the mask decoder's conv_s0 / conv_s1 on the
  first two); a standalone `Sam3TrackerVideoModel` loaded from the same checkpoint computes the same features (its
  `vision_encoder` is the detector's trunk + `tracker_neck`, transformers' `sam3_tracker` key renaming);
- frames preprocessed by the loaded processor's image processor (`Sam3ImageProcessor`, the one the tracker's
  processor holds), on the model's device, in its dtype;
- points and box corners scaled to the model's square input by `Sam3TrackerVideoProcessor` (x * size / width,
  y * size / height); a box becomes two corner points of labels 2 and 3 ahead of the clicks (labels 1 on the object,
  0 not);
- the mask logits resized to the frame's size (bilinear, align_corners=False) and cut at 0 by the processor's
  `post_process_masks`; the object's score is the sigmoid of the tracker's object-score logit on that frame.

Frames before `frame_index` are not run through the model: they get empty results. The model sees the prompt frame as
its frame 0 (transformers' streaming refuses a frame before an object has inputs); the tracker only reads frame
differences, so this changes nothing.

Memory stays flat over the clip: after each frame the session keeps only what the tracker reads again
(Sam3TrackerVideoModel._gather_memory_frame_outputs, _get_object_pointers): the prompt frame's output (the one
conditioning frame) and the outputs of the last max(num_maskmem, max_object_pointers_in_encoder) - 1 frames, each
reduced to its memory features, their positional encoding and the object pointer. The frame's pixels, its cached
vision features, the full-resolution mask logits and the tracked-frame log are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch
from transformers import Sam3TrackerVideoProcessor
from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor
from transformers.models.sam3_tracker_video.modeling_sam3_tracker_video import Sam3TrackerVideoInferenceSession

from sam3_runner.loading import LoadedModel
from sam3_runner.postprocess import mask_boxes
from sam3_runner.rle import encode_rle
from sam3_runner.types import BoxPrompt, PointPrompt
from sam3_runner.video_types import FrameResult, TrackedObject
from sam3_runner.visual import VisualPromptsUnavailable

T = TypeVar("T")

OBJECT_ID = 0
LABEL = "object"
# What the tracker reads again from a frame's stored output: its memory (features and their positional encoding) and
# its object pointer. The rest (the low- and full-resolution mask logits, the object-score logit) is read only on the
# frame itself.
MEMORY_KEYS = ("maskmem_features", "maskmem_pos_enc", "object_pointer")


class ObjectTracker:
    """A TrackingSession (sam3_runner/video_types.py) for one object prompted on one frame: see the module docstring.

    Results are never held back: add_frame returns the frame's own FrameResult, and finish returns nothing."""

    def __init__(
        self,
        loaded: LoadedModel,
        frame_index: int,
        points: Sequence[PointPrompt],
        box: BoxPrompt | None,
        run_on_device: Callable[[Callable[[], T]], T],
    ) -> None:
        if loaded.video is None:
            raise VisualPromptsUnavailable("the loaded weights hold no tracker: a visual prompt cannot be tracked")
        if frame_index < 0:
            raise ValueError(f"frame_index must be >= 0, not {frame_index}")
        if not points and box is None:
            raise ValueError("a visual prompt needs points or a box")
        self._loaded = loaded
        self._video = loaded.video
        self._tracker = loaded.video.tracker_model
        self._frame_index = frame_index
        self._points = tuple(points)
        self._box = box
        self._run_on_device = run_on_device
        image_processor = loaded.processor.image_processor
        self._processor = Sam3TrackerVideoProcessor(
            image_processor=image_processor, video_processor=Sam2VideoVideoProcessor(size=image_processor.size)
        )
        self._session = self._processor.init_video_session(inference_device=loaded.device, dtype=loaded.dtype)
        config = self._tracker.config
        # A frame t reads the non-conditioning outputs of frames t-1 .. t-(window-1) (memories and pointers).
        self._window = max(config.num_maskmem, config.max_object_pointers_in_encoder)
        self._next = 0  # the index of the next frame given
        self._size: tuple[int, int] | None = None

    @property
    def session(self) -> Sam3TrackerVideoInferenceSession:
        """transformers' inference session: the tracker's state (read by tests and benches measuring memory)."""
        return self._session

    def add_frame(self, frame: np.ndarray) -> list[FrameResult]:
        """frame: uint8 RGB [H, W, 3], display orientation, the size of the clip's first frame. Returns [the frame's
        FrameResult]: no object before `frame_index` or on a frame where the object's mask is empty; else object 0,
        label "object". One unit of device work (`run_on_device`) per frame from `frame_index` on. Raises ValueError
        for a frame of another shape or type."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"a frame must be uint8 [H, W, 3], not {frame.dtype} {list(frame.shape)}")
        size = (int(frame.shape[0]), int(frame.shape[1]))
        if self._size is None:
            self._size = size
        elif size != self._size:
            raise ValueError(f"every frame of a clip has one size: {list(self._size)}, then {list(size)}")
        index, self._next = self._next, self._next + 1
        if index < self._frame_index:
            return [FrameResult(index, [])]
        step = index - self._frame_index
        objects = self._run_on_device(lambda: self._track(frame, step))
        return [FrameResult(index, objects)]

    def finish(self) -> list[FrameResult]:
        """Nothing is held back: every frame's result came with it."""
        return []

    def _track(self, frame: np.ndarray, step: int) -> list[TrackedObject]:
        """One frame through the tracker (`step` = frames since the prompt frame, the model's frame index)."""
        with torch.inference_mode():
            session = self._session
            pixel_values = self._preprocess(frame)
            trunk = self._loaded.model.vision_encoder.backbone(pixel_values)
            features, positions = self._video.get_vision_features_for_tracker(trunk)
            session.cache.cache_vision_features(step, {"vision_feats": features, "vision_pos_embeds": positions})
            if step == 0:
                self._add_prompt()
            output = self._tracker(inference_session=session, frame_idx=step, frame=pixel_values[0])
            self._prune(step)
            mask = self._processor.post_process_masks([output.pred_masks], [list(self._size)])[0][0]  # [1, H, W]
            score = output.object_score_logits.float().sigmoid().item()
            return self._objects(mask, score)

    def _preprocess(self, frame: np.ndarray) -> torch.Tensor:
        """[1, 3, S, S] in the model's dtype on its device, as the engine preprocesses an image."""
        batch = self._loaded.processor.image_processor(
            images=[torch.as_tensor(frame).permute(2, 0, 1)], return_tensors="pt", device=self._loaded.device
        )
        return batch["pixel_values"].to(device=self._loaded.device, dtype=self._loaded.dtype)

    def _add_prompt(self) -> None:
        points = labels = boxes = None
        if self._points:
            points = [[[[point.x, point.y] for point in self._points]]]
            labels = [[[1 if point.positive else 0 for point in self._points]]]
        if self._box is not None:
            boxes = [[[self._box.x1, self._box.y1, self._box.x2, self._box.y2]]]
        self._processor.add_inputs_to_inference_session(
            self._session,
            frame_idx=0,
            obj_ids=OBJECT_ID,
            input_points=points,
            input_labels=labels,
            input_boxes=boxes,
            original_size=self._size,
        )

    def _prune(self, step: int) -> None:
        """Drop what no later frame reads (see the module docstring)."""
        session = self._session
        session.processed_frames.pop(step)
        session.cache.clear_all()
        obj_idx = session.obj_id_to_idx(OBJECT_ID)
        session.frames_tracked_per_obj[obj_idx].clear()
        outputs = session.output_dict_per_obj[obj_idx]
        tracked = outputs["non_cond_frame_outputs"]
        for old in [frame for frame in tracked if frame <= step + 1 - self._window]:
            del tracked[old]
        for stored in (*outputs["cond_frame_outputs"].values(), *tracked.values()):
            for key in [key for key in stored if key not in MEMORY_KEYS]:
                del stored[key]

    def _objects(self, mask: torch.Tensor, score: float) -> list[TrackedObject]:
        area = int(mask.sum())
        if area == 0:
            return []
        box = tuple(float(value) for value in mask_boxes(mask)[0].tolist())
        return [TrackedObject(OBJECT_ID, LABEL, score, box, area, encode_rle(mask)[0])]


def track_object(
    loaded: LoadedModel,
    frame_index: int,
    points: Sequence[PointPrompt],
    box: BoxPrompt | None,
    run_on_device: Callable[[Callable[[], T]], T],
) -> ObjectTracker:
    """A tracking session for one object prompted on frame `frame_index` (0-based, in add_frame's order).

    points: clicks in pixels of that frame (x right, y down, display orientation), `positive` on the object or not;
    box: the object's extent, xyxy in the same pixels (its `positive` flag is not read); at least one of the two.
    run_on_device(fn) runs fn (one frame's device work) and returns its result: the engine's device thread, so image
    batches run between frames. Raises VisualPromptsUnavailable for detector-only weights, ValueError for a negative
    frame_index or an empty prompt."""
    return ObjectTracker(loaded, frame_index, points, box, run_on_device)
