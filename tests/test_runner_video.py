"""Concept tracking on a stream (sam3_runner/video.py) against transformers' whole-video propagation, on the tiny
model saved and loaded like real weights, with moving squares as frames."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from sam3_runner import load_model
from sam3_runner.postprocess import mask_boxes
from sam3_runner.rle import encode_rle
from sam3_runner.video import VideoUnavailable, _tensor_bytes, _with_padding_box, track_concepts, video_processor

TEXTS = ["red square", "green square"]
# The tiny model's random detector and tracker never agree, so under the released hotstart settings every object is
# removed within its first frames and nothing is shown; these keep objects alive (and few) so that masks are tracked
# and compared, and make confident detections re-condition the tracker every 10 frames.
KEEP_OBJECTS = {"hotstart_unmatch_thresh": 1000, "hotstart_dup_thresh": 1000, "max_num_objects": 4}
RECONDITION = {**KEEP_OBJECTS, "high_conf_thresh": 0.0, "high_iou_thresh": 0.0, "recondition_every_nth_frame": 10}


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(str(tiny_model_dir), device="cpu")


def moving_squares(count: int, height: int = 48, width: int = 64) -> list[np.ndarray]:
    frames = []
    for index in range(count):
        frame = np.full((height, width, 3), (30, 60, 90), dtype=np.uint8)
        x = (2 * index) % (width - 16)
        frame[10:26, x : x + 16] = (250, 40, 40)
        y = index % (height - 12)
        frame[y : y + 12, 40:52] = (40, 250, 40)
        frames.append(frame)
    return frames


def stream(tracker, frames):
    results = []
    for frame in frames:
        results += tracker.add_frame(frame)
    return results + tracker.finish()


def whole_video(loaded, frames, texts):
    """transformers' documented recipe: the clip loaded whole into a session, propagate_in_video_iterator,
    postprocess_outputs; with Meta's padding box given to the detector as sam3_runner/video.py gives it."""
    processor = video_processor(loaded)
    session = processor.init_video_session(video=frames, inference_device="cpu", dtype=torch.float32)
    processor.add_text_prompt(session, texts)
    hook = loaded.video.detector_model.register_forward_pre_hook(_with_padding_box, with_kwargs=True)
    try:
        outputs = [
            (output.frame_idx, processor.postprocess_outputs(session, output))
            for output in loaded.video.propagate_in_video_iterator(inference_session=session)
        ]
    finally:
        hook.remove()
    return outputs, session


def configure(monkeypatch, loaded, settings: dict) -> None:
    for name, value in settings.items():
        monkeypatch.setattr(loaded.video, name, value)


@pytest.mark.parametrize(
    ("settings", "count", "frames_total"),
    [({}, 40, None), (KEEP_OBJECTS, 40, None), (RECONDITION, 40, None), (KEEP_OBJECTS, 12, 12)],
    ids=["released-settings", "objects-kept", "reconditioned", "short-clip"],
)
def test_stream_equals_transformers_whole_video(loaded, monkeypatch, settings, count, frames_total):
    """A clip longer than every window the model keeps (7 memory frames, 16 object pointers, the 15-frame hotstart,
    re-conditioning every 10 frames): object ids, labels, masks and boxes exact, scores within 1e-5; and the stream
    holds a fraction of what the whole-video session holds."""
    configure(monkeypatch, loaded, settings)
    frames = moving_squares(count)
    tracker = track_concepts(loaded, TEXTS, frames_total=frames_total)
    results = stream(tracker, frames)
    expected, session = whole_video(loaded, frames, TEXTS)

    assert [result.frame_index for result in results] == list(range(count))
    shown = 0
    for result, (frame_index, reference) in zip(results, expected, strict=True):
        assert result.frame_index == frame_index
        present = reference["masks"].flatten(1).any(dim=1)
        masks = reference["masks"][present]
        ids = reference["object_ids"][present].tolist()
        labels = {obj_id: text for text, obj_ids in reference["prompt_to_obj_ids"].items() for obj_id in obj_ids}
        assert [obj.object_id for obj in result.objects] == ids
        assert [obj.label for obj in result.objects] == [labels[obj_id] for obj_id in ids]
        assert [obj.rle for obj in result.objects] == encode_rle(masks)
        assert [list(obj.box) for obj in result.objects] == mask_boxes(masks).tolist()
        assert [obj.area for obj in result.objects] == masks.flatten(1).sum(dim=1).tolist()
        scores = reference["scores"][present].tolist()
        assert [obj.score for obj in result.objects] == pytest.approx(scores, abs=1e-5)
        shown += len(ids)
    if settings:
        assert shown > 2 * count, "objects are tracked through the clip"
    if settings is RECONDITION:
        conditioning = [sorted(outputs["cond_frame_outputs"]) for outputs in session.output_dict_per_obj.values()]
        assert all(len(frames) > 1 for frames in conditioning), "the tracker was re-conditioned"
    assert tracker.held_bytes() < _tensor_bytes([session.__dict__]) / 2


def test_memory_stays_flat_over_the_clip(loaded, monkeypatch):
    """The tensors held after N frames and after 3N frames take the same bytes."""
    configure(monkeypatch, loaded, KEEP_OBJECTS)
    tracker = track_concepts(loaded, TEXTS)
    held = {}
    for index, frame in enumerate(moving_squares(120), start=1):
        tracker.add_frame(frame)
        held[index] = tracker.held_bytes()
    assert len(tracker.session.obj_ids) == 4
    assert held[40] == held[120]


def test_memory_stays_bounded_with_conditioning_frames(loaded, monkeypatch):
    """Objects re-conditioned every 4 frames: more conditioning frames than the tracker selects. Each object keeps
    its max_cond_frame_num latest and the 15 frames before the next, so the bytes held vary with how many of the
    conditioning frames fall in that window, never above what the first N frames reached."""
    configure(monkeypatch, loaded, {**RECONDITION, "recondition_every_nth_frame": 4})
    tracker = track_concepts(loaded, TEXTS)
    held = {}
    for index, frame in enumerate(moving_squares(120), start=1):
        tracker.add_frame(frame)
        held[index] = tracker.held_bytes()
        for outputs in tracker.session.output_dict_per_obj.values():
            assert len(outputs["cond_frame_outputs"]) <= loaded.video.tracker_model.config.max_cond_frame_num
            assert all(index - 16 <= t < index for t in outputs["non_cond_frame_outputs"])
    assert len(tracker.session.obj_ids) == 4
    assert max(held[index] for index in range(41, 121)) <= max(held[index] for index in range(20, 41))


def test_threshold_is_the_score_an_object_needs(loaded, monkeypatch):
    configure(monkeypatch, loaded, {**KEEP_OBJECTS, "max_num_objects": 16})
    frames = moving_squares(8)
    released = (loaded.video.new_det_thresh, loaded.video.score_threshold_detection)

    def scores(threshold):
        tracker = track_concepts(loaded, TEXTS, threshold)
        return [obj.score for result in stream(tracker, frames) for obj in result.objects]

    assert min(scores(None)) > released[1]
    lowered = scores(0.2)
    assert min(lowered) > 0.2
    assert min(lowered) < released[1], "detections below the released thresholds start objects"
    raised = scores(0.505)
    assert raised and min(raised) >= 0.505
    assert not scores(1.0)
    assert (loaded.video.new_det_thresh, loaded.video.score_threshold_detection) == released


def test_each_frame_is_one_unit_of_device_work(loaded):
    device = ThreadPoolExecutor(1, thread_name_prefix="device")
    units = []

    def run_on_device(work):
        units.append(work)
        return device.submit(work).result()

    frames = moving_squares(20)
    tracker = track_concepts(loaded, TEXTS, run_on_device=run_on_device)
    finals = [tracker.add_frame(frame) for frame in frames]
    delay = loaded.video.hotstart_delay
    assert [len(final) for final in finals] == [0] * (delay - 1) + [1] * (len(frames) - delay + 1)
    assert len(tracker.finish()) == delay - 1
    assert len(units) == len(frames) + 1
    device.shutdown()


def test_bad_input(loaded, tiny_detector_dir):
    with pytest.raises(ValueError, match="1 to 8 prompts"):
        track_concepts(loaded, [])
    with pytest.raises(ValueError, match="1 to 8 prompts"):
        track_concepts(loaded, ["a"] * 9)
    with pytest.raises(ValueError, match="empty"):
        track_concepts(loaded, [" "])
    with pytest.raises(ValueError, match="threshold"):
        track_concepts(loaded, ["a"], 1.5)
    tracker = track_concepts(loaded, ["a"])
    tracker.add_frame(np.zeros((48, 64, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="one size"):
        tracker.add_frame(np.zeros((64, 48, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tracker.add_frame(np.zeros((48, 64, 3), dtype=np.float32))
    with pytest.raises(VideoUnavailable):
        track_concepts(load_model(str(tiny_detector_dir), device="cpu"), ["a"])
