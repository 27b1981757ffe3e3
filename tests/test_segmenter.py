"""The model service's batch handling: per-item answers, so one bad item never fails the others."""

from __future__ import annotations

import time
from unittest.mock import ANY

import numpy as np
import pytest
import torch
from conftest import encode, random_image
from meta_checkpoints import write_meta_checkpoint
from PIL import Image
from runner_asserts import decode_rle

from backend.protocol import addressed, make_item, make_visual_item, unpack_mask
from backend.segmenter import Segmenter
from backend.settings import Settings
from sam3_runner import BoxPrompt, PointPrompt, Prompt, VisualPrompt, WeightsError
from sam3_runner.demo import build_demo_model, build_demo_video_model


def items(count: int) -> list[dict]:
    rng = np.random.default_rng(count)
    return [
        make_item(encode(random_image(rng, 40, 60), "JPEG"), [Prompt("cat", score_threshold=0.0)], 10**8)
        for _ in range(count)
    ]


def test_bad_items_fail_alone(segmenter):
    batch = items(2) + [make_item(b"not an image", [Prompt("cat")], 10**8)]
    batch.append(
        make_item(
            encode(random_image(np.random.default_rng(0), 40, 60)),
            [Prompt(boxes=(BoxPrompt(100, 100, 120, 120),))],
            10**8,
        )
    )
    batch.append(make_item(encode(random_image(np.random.default_rng(0), 400, 600)), [Prompt("cat")], 1000))
    outcomes = segmenter.segment(batch)
    assert [o["ok"] for o in outcomes] == [True, True, False, False, False]
    assert [o["error"]["code"] for o in outcomes[2:]] == ["invalid_image", "invalid_box", "image_too_large"]
    assert unpack_mask(outcomes[0]["results"][0]).shape == (40, 60)


def test_an_item_that_cannot_be_prepared_fails_alone_and_not_as_the_model_being_down(segmenter):
    batch = items(3)
    batch[1]["prompts"][0]["boxes"] = [{"x1": 1}]  # what no gateway sends: a box without its corners
    outcomes = segmenter.segment(batch)
    assert [o["ok"] for o in outcomes] == [True, False, True]
    assert outcomes[1]["error"] == {
        "code": "internal_error",
        "message": "the request could not be prepared (TypeError)",
    }


def test_a_box_may_run_past_the_right_and_bottom_edge_but_must_overlap_the_image(segmenter):
    """x2 = 5000 on a 640-wide image is answered, with the box as drawn (not the clamped box's answer); a box that
    starts at or past the right or bottom edge does not overlap the image: invalid_box for that item alone."""
    image = encode(random_image(np.random.default_rng(7), 480, 640))

    def item(*box: float) -> dict:
        return make_item(image, [Prompt("car", boxes=(BoxPrompt(*box),), score_threshold=0.0)], 10**8)

    outcomes = segmenter.segment(
        [item(600, 400, 5000, 3000), item(600, 400, 640, 480), item(640, 10, 700, 20), item(10, 480, 20, 500)]
    )
    assert [o["ok"] for o in outcomes] == [True, True, False, False]
    assert [o["error"]["code"] for o in outcomes[2:]] == ["invalid_box", "invalid_box"]
    drawn, clamped = ([i["score"] for i in o["results"][0]["instances"]] for o in outcomes[:2])
    assert drawn and not np.allclose(sorted(drawn), sorted(clamped), atol=1e-5)


def test_items_past_their_deadline_or_cancelled_are_stopped_and_their_batch_is_served(segmenter):
    batch = items(4)
    batch[1] = addressed(batch[1], "late", deadline=time.time() - 1)
    batch[2] = addressed(batch[2], "gone", deadline=time.time() + 60)
    batch[3] = addressed(batch[3], "wanted", deadline=time.time() + 60)
    segmenter.cancel(["gone"])
    before = segmenter.status()["batching"]
    outcomes = segmenter.segment(batch)
    assert [o["ok"] for o in outcomes] == [True, False, False, True]
    assert [o["error"]["code"] for o in outcomes[1:3]] == ["inference_timeout", "cancelled"]
    assert "MODEL_TIMEOUT_S" in outcomes[1]["error"]["message"]
    after = segmenter.status()["batching"]
    assert (after["timed_out"], after["cancelled"]) == (before["timed_out"] + 1, before["cancelled"] + 1)


def test_a_sliced_item_gets_what_the_batch_gives_it(segmenter):
    item = make_item(
        encode(random_image(np.random.default_rng(4), 300, 400)), [Prompt("cat", score_threshold=0.0)] * 3, 10**8
    )
    before = segmenter.status()["batching"]["sliced"]
    sliced, batched = segmenter.segment_sliced(item), segmenter.segment([item])[0]
    assert sliced["ok"] and segmenter.status()["batching"]["sliced"] == before + 1
    for got, want in zip(sliced["results"], batched["results"], strict=True):
        assert got["instances"] == want["instances"] and got["mask_bits"] == want["mask_bits"]
    late = addressed(item, "late", deadline=time.time() - 1)
    assert segmenter.segment_sliced(late)["error"]["code"] == "inference_timeout"
    assert segmenter.segment_sliced(make_item(b"junk", [Prompt("cat")], 10**8))["error"]["code"] == "invalid_image"


def test_an_items_nms_threshold_reaches_its_job_batched_or_sliced_and_each_result_counts_its_removals(segmenter):
    image = encode(random_image(np.random.default_rng(5), 300, 400))
    prompts = [Prompt("cat", score_threshold=0.0)] * 2
    plain = segmenter.segment([make_item(image, prompts, 10**8)])[0]
    assert all("suppressed" not in result for result in plain["results"])
    item = make_item(image, prompts, 10**8, nms_iou_threshold=0.5)
    batched, sliced = segmenter.segment([item])[0], segmenter.segment_sliced(item)
    for outcome in (batched, sliced):
        first, second = outcome["results"]
        assert second["instances"] == [] and second["suppressed"] == len(plain["results"][1]["instances"]) == 8
        assert len(first["instances"]) + first["suppressed"] == 8
        assert first["instances"] == [i for i in plain["results"][0]["instances"] if i in first["instances"]]
    assert sliced["results"] == [{**result, "timings": ANY} for result in batched["results"]]


def test_without_rle_the_model_computes_none_and_the_same_areas_and_union(segmenter):
    image = encode(random_image(np.random.default_rng(6), 50, 70))
    with_rle, without = segmenter.segment(
        [make_item(image, [Prompt("cat", score_threshold=0.0, include_rle=flag)], 10**8) for flag in (True, False)]
    )
    kept, lean = with_rle["results"][0], without["results"][0]
    assert kept["instances"] and all(instance["rle"] for instance in kept["instances"])
    assert [instance["rle"] for instance in lean["instances"]] == [None] * len(kept["instances"])
    assert [{**instance, "rle": None} for instance in kept["instances"]] == lean["instances"]
    assert lean["mask_bits"] == kept["mask_bits"]


def test_out_of_memory_splits_the_batch_and_retries(segmenter, monkeypatch):
    engine = segmenter._engine
    real_run, calls = engine.run, []

    def run_with_oom_above_two(jobs):
        calls.append(len(jobs))
        if len(jobs) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_run(jobs)

    monkeypatch.setattr(engine, "run", run_with_oom_above_two)
    outcomes = segmenter.segment(items(5))
    assert all(outcome["ok"] for outcome in outcomes)
    assert calls == [5, 2, 3, 1, 2]  # halves until every piece fits


def test_a_job_that_fails_alone_gets_an_error_and_the_rest_succeed(segmenter, monkeypatch):
    engine = segmenter._engine
    real_run = engine.run

    def fail_on_tall_images(jobs):
        if any(job.image.shape[0] == 99 for job in jobs):
            raise RuntimeError("kernel failure")
        return real_run(jobs)

    monkeypatch.setattr(engine, "run", fail_on_tall_images)
    batch = items(3)
    batch[1] = make_item(encode(random_image(np.random.default_rng(5), 99, 20)), [Prompt("cat")], 10**8)
    outcomes = segmenter.segment(batch)
    assert [o["ok"] for o in outcomes] == [True, False, True]
    assert outcomes[1]["error"]["code"] == "inference_failed"


def test_a_bad_weights_path_fails_the_start():
    with pytest.raises(WeightsError, match="does not exist"):
        Segmenter(Settings(sam3_weights_path="/nowhere/sam3", _env_file=None))


def test_a_lone_meta_checkpoint_serves_with_sam3_config_from_env(tiny_model_dir, segmenter, tmp_path, monkeypatch):
    """SAM3_WEIGHTS_PATH names a sam3.pt (detector + tracker) alone in its directory, SAM3_CONFIG the tiny config:
    the worker serves concept and visual prompts, a tap answered exactly as the same weights in memory answer it."""
    demo = segmenter
    checkpoint = write_meta_checkpoint(tmp_path / "weights", build_demo_video_model()[0])
    monkeypatch.setenv("SAM3_WEIGHTS_PATH", str(checkpoint))
    monkeypatch.setenv("SAM3_CONFIG", str(tiny_model_dir))
    segmenter = Segmenter(Settings(sam3_device="cpu", _env_file=None))
    deadline = time.monotonic() + 60
    while not segmenter.ready and segmenter.status()["state"] == "loading" and time.monotonic() < deadline:
        time.sleep(0.05)
    info = segmenter.status()["info"]
    assert info["weights_kind"] == "meta_checkpoint" and info["visual_prompts"] is True
    assert "error" not in segmenter.segment(items(1))[0]
    tap = visual_item(encode(random_image(np.random.default_rng(24), 40, 60)), points=(PointPrompt(30, 20),))
    [got], [want] = segmenter.segment([tap]), demo.segment([tap])
    assert got["ok"] and got["results"][0]["instances"] == want["results"][0]["instances"]
    assert got["mask_logits"] == want["mask_logits"]
    monkeypatch.setenv("SAM3_CONFIG", str(tmp_path / "nowhere.json"))
    with pytest.raises(WeightsError, match="SAM3_CONFIG"):  # a config path that cannot work fails the start
        Segmenter(Settings(sam3_device="cpu", _env_file=None))


def test_not_ready_until_the_weights_are_loaded(monkeypatch):
    """The model service answers (and says `loading`) while the weights load in the background."""
    import threading

    import backend.segmenter as segmenter_module
    from sam3_runner import load_model

    release = threading.Event()

    def slow_load(*args, **kwargs):
        release.wait(30)
        return load_model("demo", device="cpu")

    monkeypatch.setattr(segmenter_module, "load_model", slow_load)
    segmenter = Segmenter(Settings(sam3_weights_path="demo", sam3_device="cpu", _env_file=None))
    assert not segmenter.ready and segmenter.status()["state"] == "loading"
    assert segmenter.segment(items(1))[0]["error"]["code"] == "model_loading"
    release.set()
    deadline = time.monotonic() + 30
    while not segmenter.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert segmenter.status()["state"] == "ready" and segmenter.segment(items(1))[0]["ok"]


def test_each_worker_takes_its_own_gpu_when_several_are_visible(monkeypatch):
    from backend.segmenter import worker_device

    assert worker_device("auto", 3) == "auto"  # no GPU here: the loader decides (CPU)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [worker_device("auto", index) for index in (1, 2, 4, 5)] == ["cuda:0", "cuda:1", "cuda:3", "cuda:0"]
    assert worker_device("cuda:2", 1) == "cuda:2"  # an explicit device wins
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert worker_device("auto", 1) == "auto"


def test_device_jpeg_decoding_serves_jpegs_and_everything_else():
    settings = Settings(sam3_weights_path="demo", sam3_device="cpu", sam3_jpeg_decode="device", _env_file=None)
    segmenter = Segmenter(settings)
    deadline = time.monotonic() + 60
    while not segmenter.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    png = make_item(encode(random_image(np.random.default_rng(1), 30, 50)), [Prompt("cat", score_threshold=0.0)], 10**8)
    truncated = make_item(encode(random_image(np.random.default_rng(2), 30, 50), "JPEG")[:100], [Prompt("cat")], 10**8)
    outcomes = segmenter.segment(items(2) + [png, truncated])
    assert [o["ok"] for o in outcomes] == [True, True, True, False]
    assert outcomes[3]["error"]["code"] == "invalid_image"
    assert unpack_mask(outcomes[0]["results"][0]).shape == (40, 60)
    assert segmenter.status()["acceleration"]["jpeg_decode"] == "device"


@pytest.mark.timeout(600)
def test_compiled_heads_from_settings_serve_and_keep_their_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # restored after the test; the segmenter sets it
    torch._dynamo.reset()  # as in a fresh process: dynamo would reuse an earlier test's graph and compile nothing
    cache = tmp_path / "compile-cache"
    settings = Settings(
        sam3_weights_path="demo",
        sam3_device="cpu",
        sam3_compile="heads",
        sam3_compile_cache_dir=str(cache),
        max_pairs_per_forward=2,
        _env_file=None,
    )
    segmenter = Segmenter(settings)
    deadline = time.monotonic() + 500
    while not segmenter.ready and time.monotonic() < deadline:
        time.sleep(0.2)
    acceleration = segmenter.status()["acceleration"]
    assert acceleration["compile"] == "heads" and acceleration["pair_buckets"] == [1, 2]
    assert "compile_error" not in acceleration
    outcomes = segmenter.segment(items(3))
    assert all(o["ok"] for o in outcomes) and unpack_mask(outcomes[2]["results"][0]).shape == (40, 60)
    assert any(cache.rglob("*"))


def test_a_box_may_end_at_most_ten_image_sizes_away(segmenter):
    """Box pooling sizes its sampling grid from the box: x2 = y2 = 1e11 on a 640x480 image crashed the worker
    (torchvision's roi_align, SIGSEGV), 1e12 answered 500. Up to 10 times the image's size is answered; beyond,
    that item alone is invalid_box, before any model work."""
    image = encode(random_image(np.random.default_rng(8), 48, 64))

    def item(x2: float, y2: float) -> dict:
        return make_item(image, [Prompt("car", boxes=(BoxPrompt(10, 10, x2, y2),), score_threshold=0.0)], 10**8)

    outcomes = segmenter.segment([item(640, 480), item(641, 40), item(60, 481), item(1e5, 1e5), item(60, 40)])
    assert [o["ok"] for o in outcomes] == [True, False, False, False, True]
    assert {o["error"]["code"] for o in outcomes[1:4]} == {"invalid_box"}
    assert "runs too far past the 64x48 image (x2 <= 640, y2 <= 480)" in outcomes[1]["error"]["message"]


def test_a_bad_box_in_a_batch_names_its_prompt(segmenter):
    """A batch's boxes are checked per prompt once the image size is known: the message says which prompt's box
    (0-based, as sent), so a client can tell the request's boxes from one prompt object's."""
    image = encode(random_image(np.random.default_rng(9), 48, 64))
    prompts = [Prompt("cup"), Prompt("mug", boxes=(BoxPrompt(1, 1, 5, 5), BoxPrompt(70, 2, 80, 9)))]
    (outcome,) = segmenter.segment([make_item(image, prompts, 10**8)])
    assert outcome["error"] == {"code": "invalid_box", "message": "prompt 1 box 1 does not overlap the 64x48 image"}


def visual_item(image: bytes, **prompt) -> dict:
    return make_visual_item(image, VisualPrompt(**prompt), 10**8)


def test_visual_items_are_answered_in_the_batch_beside_concept_items(segmenter):
    """A visual item's answer: its candidates best first, the best one as the mask, its low-res logits; a concept
    item in the same batch gets what it gets alone; a refinement step takes the logits back as they came."""
    image = encode(random_image(np.random.default_rng(20), 40, 60))
    concept = make_item(image, [Prompt("cat", score_threshold=0.0)], 10**8)
    tap = visual_item(image, points=(PointPrompt(30, 20),), multimask=True)
    box = visual_item(image, box=BoxPrompt(5, 5, 50, 35))
    outcomes = segmenter.segment([concept, tap, box])
    assert all(o["ok"] for o in outcomes)
    alone = segmenter.segment([concept])[0]["results"][0]["instances"]
    assert [i["score"] for i in outcomes[0]["results"][0]["instances"]] == pytest.approx([i["score"] for i in alone])
    assert "mask_logits" not in outcomes[0]
    [candidates] = outcomes[1]["results"]
    scores = [instance["score"] for instance in candidates["instances"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    best = decode_rle(candidates["instances"][0]["rle"])
    assert np.array_equal(unpack_mask(candidates), best) and candidates["image_size"] == [60, 40]
    assert "tracker" in candidates["timings"] and "decode" in candidates["timings"]
    logits = outcomes[1]["mask_logits"]
    assert logits["shape"] == [16, 16] and logits["dtype"] == "float16"
    assert len(outcomes[2]["results"][0]["instances"]) == 1
    refine = {**tap, "visual": {**tap["visual"], "multimask": False, "mask_input": logits}}
    refined = segmenter.segment([refine])[0]
    assert refined["ok"] and refined["mask_logits"] != logits


def test_a_point_must_lie_on_the_image_and_a_visual_box_must_overlap_it(segmenter):
    image = encode(random_image(np.random.default_rng(21), 40, 60))
    outcomes = segmenter.segment(
        [
            visual_item(image, points=(PointPrompt(59.9, 39.9),)),
            visual_item(image, points=(PointPrompt(10, 10), PointPrompt(60, 10))),
            visual_item(image, points=(PointPrompt(-0.5, 10),)),
            visual_item(image, points=(PointPrompt(10, 40, positive=False),)),
            visual_item(image, box=BoxPrompt(60, 5, 70, 20)),
            visual_item(image, points=(PointPrompt(1, 1),), box=BoxPrompt(1, 1, 601, 20)),
            make_item(image, [Prompt("cat")], 10**8),
        ]
    )
    assert [o["ok"] for o in outcomes] == [True, False, False, False, False, False, True]
    codes = [o["error"]["code"] for o in outcomes[1:6]]
    assert codes == ["invalid_point"] * 3 + ["invalid_box"] * 2
    assert outcomes[1]["error"]["message"].startswith("point 1 (60, 10) is outside the 60x40 image")


def test_points_are_in_the_display_orientation_of_an_exif_rotated_photo(segmenter):
    """A photo stored 40x80 with EXIF orientation 6 is shown 80 tall and 40 wide: a point at y = 70 is on it, and
    the answer is the one for the same photo stored upright."""
    pixels = random_image(np.random.default_rng(22), 40, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    rotated = encode(pixels, "PNG", exif=exif.tobytes())
    upright = encode(np.ascontiguousarray(np.rot90(pixels, k=-1)), "PNG")
    prompt = {"points": (PointPrompt(30, 70),), "box": BoxPrompt(2, 40, 38, 79), "multimask": True}
    on_rotated, on_upright = segmenter.segment([visual_item(rotated, **prompt), visual_item(upright, **prompt)])
    assert on_rotated["ok"] and on_rotated["results"][0]["image_size"] == [40, 80]
    assert on_rotated["results"][0]["instances"] == on_upright["results"][0]["instances"]
    assert on_rotated["mask_logits"] == on_upright["mask_logits"]


@pytest.mark.parametrize("weights", ["a `sam3` directory", "a .pt without `tracker.*`"])
def test_detector_only_weights_serve_concepts_and_refuse_visual_items(
    tiny_detector_dir, tiny_model_dir, tmp_path, weights
):
    """The detector's weights alone: a transformers directory, or a Meta .pt with no tracker (beside a `sam3_video`
    config: the file decides)."""
    if weights == "a `sam3` directory":
        path = str(tiny_detector_dir)
    else:
        path = str(write_meta_checkpoint(tmp_path / "weights", build_demo_model()[0], files_from=tiny_model_dir))
    segmenter = Segmenter(Settings(sam3_weights_path=path, sam3_device="cpu", _env_file=None))
    deadline = time.monotonic() + 60
    while not segmenter.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert segmenter.status()["info"]["visual_prompts"] is False
    image = encode(random_image(np.random.default_rng(23), 40, 60))
    outcomes = segmenter.segment([visual_item(image, points=(PointPrompt(5, 5),)), *items(1)])
    assert [o["ok"] for o in outcomes] == [False, True]
    assert outcomes[0]["error"]["code"] == "visual_prompts_unavailable"
    assert "facebook/sam3" in outcomes[0]["error"]["message"]
    assert segmenter.segment_sliced(visual_item(image, box=BoxPrompt(1, 1, 9, 9)))["error"]["code"] == (
        "visual_prompts_unavailable"
    )
