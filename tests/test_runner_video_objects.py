"""One object from a visual prompt tracked through a stream (sam3_runner/video_objects.py): the same answers as
transformers' own Sam3TrackerVideoModel + Sam3TrackerVideoProcessor loaded from the same directory and run with
their streaming recipe, one unit of device work per frame, and a session whose memory does not grow with the clip."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from runner_asserts import decode_rle
from transformers import Sam3ImageProcessor, Sam3TrackerVideoModel, Sam3TrackerVideoProcessor
from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

from sam3_runner import BoxPrompt, PointPrompt, VisualPromptsUnavailable, load_model
from sam3_runner.video_objects import track_object

HEIGHT, WIDTH = 48, 64
PROMPT_FRAME = 3
FRAMES = 40  # 37 tracked frames: more than twice the tracker's longest window (16 object pointers)

CASES = {
    "points and box": ((PointPrompt(14, 20), PointPrompt(50, 40, positive=False)), BoxPrompt(6, 8, 30, 32)),
    "one point": ((PointPrompt(14.5, 20.25),), None),
    "box": ((), BoxPrompt(6, 8, 30, 32)),
    "negative point only": ((PointPrompt(50, 40, positive=False),), None),
}


def moving_squares(count: int, height: int = HEIGHT, width: int = WIDTH) -> list[np.ndarray]:
    """uint8 RGB frames: a red square drifting right and a green one drifting down on a grey background."""
    frames = []
    for t in range(count):
        frame = np.full((height, width, 3), 40, np.uint8)
        x = 4 + (t % 30)
        frame[10:26, x : x + 16] = (220, 40, 40)
        y = 2 + (t % 20)
        frame[y : y + 12, 44:58] = (40, 200, 60)
        frames.append(frame)
    return frames


def on_this_thread(work):
    return work()


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers' standalone video tracker from the same directory: its vision encoder is the detector's trunk and
    the tracker's neck (transformers' `sam3_tracker` key renaming). The directory holds no video processor config:
    the streaming recipe never uses the video processor, so a default one fills the slot."""
    image_processor = Sam3ImageProcessor.from_pretrained(tiny_model_dir)
    processor = Sam3TrackerVideoProcessor(
        image_processor=image_processor, video_processor=Sam2VideoVideoProcessor(size=image_processor.size)
    )
    return processor, Sam3TrackerVideoModel.from_pretrained(tiny_model_dir).eval()


def reference_track(reference, frames, points, box) -> list[tuple[np.ndarray, float]]:
    """(mask [H, W] bool, object score) per frame from the prompt frame on: the streaming recipe of transformers'
    Sam3TrackerVideo model card (frames processed one by one, the prompt added on the first, masks post-processed)."""
    processor, model = reference
    session = processor.init_video_session(inference_device="cpu", dtype=torch.float32)
    prompt = {}
    if points:
        prompt["input_points"] = [[[[point.x, point.y] for point in points]]]
        prompt["input_labels"] = [[[int(point.positive) for point in points]]]
    if box is not None:
        prompt["input_boxes"] = [[[box.x1, box.y1, box.x2, box.y2]]]
    answers = []
    for index, frame in enumerate(frames):
        inputs = processor(images=frame, device="cpu", return_tensors="pt")
        if index == 0:
            processor.add_inputs_to_inference_session(
                session, frame_idx=0, obj_ids=1, original_size=inputs.original_sizes[0], **prompt
            )
        with torch.inference_mode():
            output = model(inference_session=session, frame=inputs.pixel_values[0])
        mask = processor.post_process_masks([output.pred_masks], original_sizes=inputs.original_sizes)[0][0, 0]
        answers.append((mask.numpy(), output.object_score_logits.sigmoid().item()))
    return answers


@pytest.mark.parametrize("case", CASES)
def test_tracks_as_transformers_streaming_video_tracker_does(loaded, reference, case):
    points, box = CASES[case]
    frames = moving_squares(FRAMES)
    session = track_object(loaded, PROMPT_FRAME, points, box, on_this_thread)
    results = [result for frame in frames for result in session.add_frame(frame)] + session.finish()

    assert [result.frame_index for result in results] == list(range(FRAMES))
    assert all(not result.objects for result in results[:PROMPT_FRAME])
    expected = reference_track(reference, frames[PROMPT_FRAME:], points, box)
    for result, (mask, score) in zip(results[PROMPT_FRAME:], expected, strict=True):
        if not mask.any():
            assert result.objects == [], f"frame {result.frame_index}: an empty mask is an absent object"
            continue
        [tracked] = result.objects
        assert (tracked.object_id, tracked.label) == (0, "object")
        assert tracked.score == pytest.approx(score, abs=1e-5)
        assert tracked.rle["size"] == [HEIGHT, WIDTH]
        np.testing.assert_array_equal(decode_rle(tracked.rle), mask, err_msg=f"frame {result.frame_index}")
        assert tracked.area == int(mask.sum())
        rows, columns = np.nonzero(mask)
        assert tracked.box == (columns.min(), rows.min(), columns.max() + 1.0, rows.max() + 1.0)


def test_the_session_holds_the_same_bytes_after_n_and_3n_frames(loaded):
    """Longer than every window of the tracker (16 object pointers, 7 memories): what it keeps stops growing."""
    tracked = 20
    session = track_object(loaded, 0, (PointPrompt(14, 20),), None, on_this_thread)
    frames = moving_squares(3 * tracked)
    for frame in frames[:tracked]:
        session.add_frame(frame)
    after_n = held_tensor_bytes(session.session)
    for frame in frames[tracked:]:
        session.add_frame(frame)
    after_3n = held_tensor_bytes(session.session)

    assert after_n > 0
    assert after_3n == after_n
    config = loaded.video.tracker_model.config
    outputs = session.session.output_dict_per_obj[0]
    assert len(outputs["cond_frame_outputs"]) == 1  # the prompt frame
    assert len(outputs["non_cond_frame_outputs"]) == max(config.num_maskmem, config.max_object_pointers_in_encoder) - 1


def test_one_unit_of_device_work_per_frame_from_the_prompt_frame(loaded):
    calls = []

    def device_thread(work):
        calls.append(threading.current_thread().name)
        return work()

    session = track_object(loaded, 2, (), BoxPrompt(6, 8, 30, 32), device_thread)
    for count, frame in enumerate(moving_squares(6), start=1):
        session.add_frame(frame)
        assert len(calls) == max(0, count - 2)


def test_bad_input_is_refused(loaded, tiny_detector_dir):
    with pytest.raises(VisualPromptsUnavailable):
        track_object(load_model(str(tiny_detector_dir), device="cpu"), 0, (PointPrompt(1, 1),), None, on_this_thread)
    with pytest.raises(ValueError, match="points or a box"):
        track_object(loaded, 0, (), None, on_this_thread)
    with pytest.raises(ValueError, match="frame_index"):
        track_object(loaded, -1, (PointPrompt(1, 1),), None, on_this_thread)
    session = track_object(loaded, 0, (PointPrompt(1, 1),), None, on_this_thread)
    session.add_frame(moving_squares(1)[0])
    with pytest.raises(ValueError, match="one size"):
        session.add_frame(moving_squares(1, HEIGHT + 2, WIDTH)[0])
    with pytest.raises(ValueError, match="uint8"):
        session.add_frame(moving_squares(1)[0].astype(np.float32))


def held_tensor_bytes(session) -> int:
    """Bytes of every distinct tensor storage reachable from a transformers inference session (its attributes, its
    cache, nested dicts / lists / tuples)."""
    storages: dict[int, int] = {}
    seen: set[int] = set()
    pending = [session]
    while pending:
        value = pending.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif type(value).__module__.startswith("transformers.models.sam3_tracker_video"):
            pending.extend(vars(value).values())
    return sum(storages.values())
