"""Concept tracking (SAM 3's PCS on video): every instance of 1-8 noun phrases, tracked through a stream of frames.

transformers' `Sam3VideoModel` (detector + tracker, the same modules the image paths use) runs one frame at a time on
an inference session that holds no video: each frame is preprocessed as `Sam3VideoProcessor` does, added to the
session and propagated with `model(inference_session=s, frame_idx=i)` - the very call `propagate_in_video_iterator`
makes on a whole video, so the hotstart heuristics (objects found in the first `hotstart_delay` frames after their
first appearance that stay unmatched or duplicate another are removed) run as on a whole video. Results are held back
`hotstart_delay` frames as `propagate_in_video_iterator` holds them, and post-processed with
`Sam3VideoProcessor.postprocess_outputs` (masks at the frame's size, hotstart-removed and suppressed objects hidden,
non-overlap per prompt).

Memory stays flat over the clip: after each frame the session keeps only what the model reads again (`_prune`):
the last `max(num_maskmem, max_object_pointers_in_encoder) - 1` tracked frames per object (their memory features for
the last `num_maskmem - 1`, only their object pointer before that), the `max_cond_frame_num` most recent
conditioning frames per object, and the hotstart bookkeeping trimmed to what its thresholds count.

Two choices follow Meta's reference (facebookresearch/sam3, `sam3_tracker_base.py`) where transformers 5.17 differs:
- Conditioning frames (an object's first frame, and the frames where a confident detection re-conditions it, every
  `recondition_every_nth_frame`) beyond the `max_cond_frame_num` most recent are not read as conditioning frames any
  more: Meta takes object pointers from the selected conditioning frames only and reads an unselected one as an
  ordinary memory frame, transformers reads the pointers of every conditioning frame, ever. Such frames are moved to
  the ordinary memory frames, so answers equal transformers' until an object has more than `max_cond_frame_num`
  conditioning frames, and Meta's after.
- The detector gets one padding box with the text (as the image path does, sam3_runner/engine.py): Meta's detector
  always runs its geometry encoder, whose CLS token the trained weights expect; transformers skips it without boxes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch
from transformers import Sam3VideoProcessor
from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor
from transformers.models.sam3_video.modeling_sam3_video import (
    Sam3VideoInferenceSession,
    Sam3VideoModel,
    Sam3VideoSegmentationOutput,
)

from sam3_runner.loading import LoadedModel
from sam3_runner.postprocess import mask_boxes
from sam3_runner.rle import encode_rle
from sam3_runner.types import PADDING_BOX_LABEL
from sam3_runner.video_types import FrameResult, TrackedObject

T = TypeVar("T")
MAX_PROMPTS = 8


class VideoUnavailable(RuntimeError):
    """The loaded weights hold no tracker (a detector-only checkpoint): no video tracking."""


def track_concepts(
    loaded: LoadedModel,
    texts: list[str],
    threshold: float | None = None,
    run_on_device: Callable[[Callable[[], T]], T] | None = None,
    frames_total: int | None = None,
) -> ConceptTracker:
    """A TrackingSession (sam3_runner/video_types.py) finding and tracking every instance of `texts` in one clip.

    texts: 1-8 noun phrases; an object's label is the phrase that found it (SAM 3 keeps detections of different
        phrases apart: they never match, suppress or overlap each other).
    threshold: 0..1, the detection score (presence x query probability) a detection needs to count (SAM 3's
        `score_threshold_detection`: to match a tracked object, or to start one on a frame where none is tracked)
        and to start a new object beside tracked ones (`new_det_thresh`): both are set to it, as integrations of
        Meta's model do. An object's score is its detection score when it started, so every score shown is at least
        the threshold. None: the model's config (0.5 and 0.7 in the released one).
    run_on_device: runs one unit of device work and returns its result (the engine's device thread); each frame is
        one unit, so other work can run between frames. None: run in the calling thread.
    frames_total: the number of frames the clip will give, if known: the tracker attends to at most
        `min(frames_total, max_object_pointers_in_encoder)` past object pointers, as in a whole-video propagation
        (transformers and Meta); None: unknown, the full window (what streaming means in both; the same for clips
        of at least `max_object_pointers_in_encoder` (16) frames).
    Raises ValueError (no texts, more than 8, an empty one, a threshold outside 0..1), VideoUnavailable.
    """
    return ConceptTracker(loaded, texts, threshold, run_on_device, frames_total)


class ConceptTracker:
    """One clip's concept tracking. add_frame / finish as TrackingSession says; results come `hotstart_delay` (15)
    frames late, every frame exactly once. Not thread-safe: one caller feeds one clip."""

    def __init__(
        self,
        loaded: LoadedModel,
        texts: list[str],
        threshold: float | None = None,
        run_on_device: Callable[[Callable[[], T]], T] | None = None,
        frames_total: int | None = None,
    ) -> None:
        if loaded.video is None:
            raise VideoUnavailable("the loaded weights hold no tracker: video tracking needs SAM 3's video model")
        if not 1 <= len(texts) <= MAX_PROMPTS:
            raise ValueError(f"video tracking takes 1 to {MAX_PROMPTS} prompts, not {len(texts)}")
        if any(not text.strip() for text in texts):
            raise ValueError("a prompt is empty")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be within 0..1, not {threshold}")
        self.model: Sam3VideoModel = loaded.video
        self.device, self.dtype = loaded.device, loaded.dtype
        self.threshold = threshold
        self._run_on_device = run_on_device or _call
        self.processor = video_processor(loaded)
        self.session = _StreamingSession(
            frames_total,
            inference_device=self.device,
            inference_state_device=self.device,
            video_storage_device=self.device,
            dtype=self.dtype,
        )
        self.processor.add_text_prompt(self.session, texts)
        self._pending: list[Sam3VideoSegmentationOutput] = []  # model outputs held back for the hotstart
        self._frames = 0
        self._size: tuple[int, int] | None = None

    def add_frame(self, frame: np.ndarray) -> list[FrameResult]:
        """frame: uint8 RGB [H, W, 3], display orientation, the same size for every frame. Returns the results that
        are final now (the frame `hotstart_delay` frames back, once that many have come). Raises ValueError for a
        frame of another shape or type."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"a frame is uint8 [H, W, 3] RGB, not {frame.dtype} {list(frame.shape)}")
        if self._size is None:
            self._size = frame.shape[:2]
            self.session.video_height, self.session.video_width = self._size
        elif frame.shape[:2] != self._size:
            raise ValueError(f"every frame of a clip has one size: {list(self._size)}, then {list(frame.shape[:2])}")
        index = self._frames
        self._frames += 1
        return self._run_on_device(lambda: self._step(frame, index))

    def finish(self) -> list[FrameResult]:
        """No more frames: the results still held back, in frame order."""
        held, self._pending = self._pending, []
        return self._run_on_device(lambda: [self._result(output) for output in held]) if held else []

    def held_bytes(self) -> int:
        """Bytes of the tensors this session holds (its inference session and the outputs held back), each storage
        counted once: what stays flat over a clip."""
        return _tensor_bytes([self.session.__dict__, self._pending])

    def _step(self, frame: np.ndarray, index: int) -> list[FrameResult]:
        with torch.inference_mode():
            pixels = self.processor.video_processor(
                videos=[torch.from_numpy(frame).permute(2, 0, 1)[None]], device=self.device, return_tensors="pt"
            ).pixel_values_videos[0]
            self.session.add_new_frame(pixels, index)
            with self._detection_settings():
                output = self.model(inference_session=self.session, frame_idx=index)
            _prune(self.model, self.session, index)
            return [self._result(held) for held in self._hold_back(output)]

    def _hold_back(self, output: Sam3VideoSegmentationOutput) -> list[Sam3VideoSegmentationOutput]:
        """`propagate_in_video_iterator`'s hotstart buffer: the oldest output once `hotstart_delay` are held."""
        if self.model.hotstart_delay <= 0:
            return [output]
        self._pending.append(output)
        self.session.hotstart_removed_obj_ids.update(output.removed_obj_ids)
        if len(self._pending) < self.model.hotstart_delay:
            return []
        return [self._pending.pop(0)]

    @contextmanager
    def _detection_settings(self) -> Iterator[None]:
        """For one frame (one unit on the device thread, so no other request sees them): this request's detection
        thresholds, and a padding box with the text as Meta's detector always has (see the module's doc)."""
        model = self.model
        saved = (model.new_det_thresh, model.score_threshold_detection)
        if self.threshold is not None:
            model.new_det_thresh = model.score_threshold_detection = self.threshold
        hook = model.detector_model.register_forward_pre_hook(_with_padding_box, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            model.new_det_thresh, model.score_threshold_detection = saved

    def _result(self, output: Sam3VideoSegmentationOutput) -> FrameResult:
        processed = self.processor.postprocess_outputs(self.session, output)
        label = {obj_id: text for text, obj_ids in processed["prompt_to_obj_ids"].items() for obj_id in obj_ids}
        masks = processed["masks"]
        present = masks.flatten(1).any(dim=1)  # the non-overlap rule can empty a mask: the object is absent
        masks = masks[present]
        object_ids = processed["object_ids"][present.cpu()].tolist()
        scores = processed["scores"][present.cpu()].tolist()
        boxes = mask_boxes(masks).tolist()
        areas = masks.flatten(1).sum(dim=1).tolist()
        rles = encode_rle(masks)
        objects = [
            TrackedObject(obj_id, label[obj_id], float(score), tuple(box), int(area), rle)
            for obj_id, score, box, area, rle in zip(object_ids, scores, boxes, areas, rles, strict=True)
        ]
        return FrameResult(output.frame_idx, objects)


def video_processor(loaded: LoadedModel) -> Sam3VideoProcessor:
    """`Sam3VideoProcessor` from the loaded processor's parts, its video processor built as transformers'
    convert_sam3_video_to_hf.py builds the hub's: `Sam2VideoVideoProcessor` (bilinear) at the image processor's
    size, mean and std (1008, 0.5, 0.5 for facebook/sam3)."""
    image_processor = loaded.processor.image_processor
    frames = Sam2VideoVideoProcessor(
        size={"height": image_processor.size["height"], "width": image_processor.size["width"]},
        image_mean=list(image_processor.image_mean),
        image_std=list(image_processor.image_std),
    )
    return Sam3VideoProcessor(
        image_processor=image_processor, video_processor=frames, tokenizer=loaded.processor.tokenizer
    )


class _StreamingSession(Sam3VideoInferenceSession):
    """An inference session fed frame by frame that never holds the clip. `num_frames` is what a whole-video session
    would say: the clip's length, when known (never less than the frames given so far), else unbounded. The tracker
    reads it for its object-pointer window (min(num_frames, max_object_pointers_in_encoder)) and stops gathering
    pointers at frame indices >= num_frames."""

    def __init__(self, frames_total: int | None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._frames_total = frames_total or sys.maxsize
        self._frames_given = 0

    @property
    def num_frames(self) -> int:
        return max(self._frames_total, self._frames_given)

    def add_new_frame(self, pixel_values: torch.Tensor, frame_idx: int | None = None) -> int:
        frame_idx = super().add_new_frame(pixel_values, frame_idx)
        self._frames_given = max(self._frames_given, frame_idx + 1)
        return frame_idx


def _prune(model: Sam3VideoModel, session: Sam3VideoInferenceSession, frame_idx: int) -> None:
    """Drop from the session what no later frame reads (the next one is frame_idx + 1, forward only).

    The tracker (transformers' Sam3TrackerVideoModel, `_gather_memory_frame_outputs` and `_get_object_pointers`)
    reads, for frame g: the memory features of frames g-1 .. g-(num_maskmem-1), the object pointers of frames
    g-1 .. g-(P-1) (P = min(num_frames, max_object_pointers_in_encoder)), and its conditioning frames (selected:
    the max_cond_frame_num closest, i.e. the most recent when tracking forward). Frames, vision features, mask
    inputs and per-frame bookkeeping are read on their own frame only.
    """
    config = model.tracker_model.config
    following = frame_idx + 1
    memory_from = following - (config.num_maskmem - 1)
    pointers = min(session.num_frames, config.max_object_pointers_in_encoder)
    pointers_from = following - max(config.num_maskmem - 1, pointers - 1)
    for outputs in session.output_dict_per_obj.values():
        conditioning, tracked = outputs["cond_frame_outputs"], outputs["non_cond_frame_outputs"]
        for t in sorted(conditioning)[: -config.max_cond_frame_num or None]:
            tracked[t] = conditioning.pop(t)  # Meta reads an unselected conditioning frame as a memory frame
        for t in list(tracked):
            if t < pointers_from:
                del tracked[t]
            elif t < memory_from:
                tracked[t] = {"object_pointer": tracked[t]["object_pointer"]}
        for kept in (*conditioning.values(), *tracked.values()):
            kept.pop("pred_masks", None)  # masks of a past frame: never read again
            kept.pop("high_res_masks", None)
            for key, value in kept.items():
                if value.untyped_storage().nbytes() > value.nbytes:
                    kept[key] = value.clone()  # a slice of all objects' memory would keep theirs alive too
    for inputs in (*session.mask_inputs_per_obj.values(), *session.point_inputs_per_obj.values()):
        inputs.clear()
    for tracked_frames in session.frames_tracked_per_obj.values():
        tracked_frames.clear()
    session.processed_frames.clear()
    session.cache.clear_all()
    session.suppressed_obj_ids.clear()
    session.obj_id_to_tracker_score_frame_wise.clear()
    # The hotstart counts unmatched and duplicate frames only up to its thresholds.
    for frames in session.unmatched_frame_inds.values():
        del frames[: -model.hotstart_unmatch_thresh or None]
    for frames in session.overlap_pair_to_frame_inds.values():
        del frames[: -model.hotstart_dup_thresh or None]


def _with_padding_box(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook on the detector: a text prompt without boxes gets one padding box."""
    if kwargs.get("input_boxes") is None and kwargs.get("text_embeds") is not None:
        vision = kwargs["vision_embeds"]
        batch = vision.last_hidden_state.shape[0]
        device = vision.last_hidden_state.device
        kwargs["input_boxes"] = torch.zeros(batch, 1, 4, device=device, dtype=vision.last_hidden_state.dtype)
        kwargs["input_boxes_labels"] = torch.full((batch, 1), PADDING_BOX_LABEL, device=device, dtype=torch.long)
    return args, kwargs


def _tensor_bytes(roots: list) -> int:
    storages: set[int] = set()
    visited: set[int] = set()
    total = 0
    stack = list(roots)
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            storage = item.untyped_storage()
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif id(item) in visited or isinstance(item, torch.nn.Module):
            continue
        elif isinstance(item, dict):
            visited.add(id(item))
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set)):
            visited.add(id(item))
            stack.extend(item)
        elif hasattr(item, "__dict__"):
            visited.add(id(item))
            stack.append(vars(item))
    return total


def _call(work: Callable[[], T]) -> T:
    return work()
