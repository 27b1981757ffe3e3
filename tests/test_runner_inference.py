"""The runner's batched inference: batching never changes answers, prompts and limits do what they say."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import random_image
from runner_asserts import assert_same_result, decode_rle
from transformers.modeling_outputs import BaseModelOutputWithPooling

from sam3_runner import Abandoned, BoxPrompt, Job, Prompt, Sam3Engine
from sam3_runner.postprocess import FULL_HD_PIXELS

ALL = {"score_threshold": 0.0, "max_instances": 200}


def test_many_prompts_in_one_call_equal_one_at_a_time(engine, rng):
    image = random_image(rng, 48, 80)
    prompts = [Prompt("cat", **ALL), Prompt("a red car", **ALL), Prompt("dog", boxes=(BoxPrompt(5, 5, 40, 30),), **ALL)]
    together = engine.run([Job(image, prompts)])[0]
    for prompt, result in zip(prompts, together, strict=True):
        alone = engine.run([Job(image, [prompt])])[0][0]
        assert_same_result(result, alone)


def test_batch_of_jobs_equals_jobs_run_alone(engine, rng):
    jobs = [
        Job(random_image(rng, 40, 60), [Prompt("cat", **ALL)]),
        Job(random_image(rng, 90, 30), [Prompt("tree", **ALL), Prompt(boxes=(BoxPrompt(1, 1, 20, 50),), **ALL)]),
        Job(random_image(rng, 56, 56), [Prompt("person", boxes=(BoxPrompt(0, 0, 10, 10, positive=False),), **ALL)]),
    ]
    batched = engine.run(jobs)
    assert [len(results) for results in batched] == [1, 2, 1]
    for job, results in zip(jobs, batched, strict=True):
        alone = engine.run([job])[0]
        for got, want in zip(results, alone, strict=True):
            assert_same_result(got, want)


def test_box_exemplars_change_the_result(engine, rng):
    image = random_image(rng, 64, 64)
    text_only = engine.run([Job(image, [Prompt("cat", **ALL)])])[0][0]
    with_box = engine.run([Job(image, [Prompt("cat", boxes=(BoxPrompt(4, 4, 30, 30),), **ALL)])])[0][0]
    assert not np.allclose([i.score for i in text_only.instances], [i.score for i in with_box.instances])


def test_negative_and_box_only_prompts_are_answered(engine, rng):
    image = random_image(rng, 50, 70)
    negative = Prompt("cat", boxes=(BoxPrompt(10, 10, 40, 40), BoxPrompt(0, 0, 5, 5, positive=False)), **ALL)
    box_only = Prompt(boxes=(BoxPrompt(10, 10, 40, 40),), **ALL)
    negative_result, box_only_result = engine.run([Job(image, [negative, box_only])])[0]
    assert len(negative_result.instances) == 8  # every query of the tiny model, threshold 0
    assert len(box_only_result.instances) == 8
    positive_only = engine.run([Job(image, [Prompt("cat", boxes=(BoxPrompt(10, 10, 40, 40),), **ALL)])])[0][0]
    assert not np.allclose(
        sorted(i.score for i in negative_result.instances), sorted(i.score for i in positive_only.instances)
    )


def test_rle_decodes_to_original_size_and_matches_union_and_area(engine, rng):
    image = random_image(rng, 37, 91)
    result = engine.run([Job(image, [Prompt("cat", score_threshold=0.5, mask_threshold=0.5)])])[0][0]
    assert result.instances, "the demo weights are biased to detect something at the default threshold"
    assert result.image_size == (91, 37)
    assert result.union_mask.shape == (37, 91) and result.union_mask.dtype == bool
    union = np.zeros((37, 91), dtype=bool)
    for instance in result.instances:
        mask = decode_rle(instance.rle)
        assert mask.shape == (37, 91)
        assert instance.rle["size"] == [37, 91]
        assert int(mask.sum()) == instance.area
        x1, y1, x2, y2 = instance.box
        assert 0 <= x1 <= x2 <= 91 and 0 <= y1 <= y2 <= 37
        union |= mask
    assert np.array_equal(union, result.union_mask)


def test_threshold_and_max_instances_are_honoured(engine, rng):
    image = random_image(rng, 48, 48)
    everything = engine.run([Job(image, [Prompt("cat", **ALL)])])[0][0]
    scores = sorted((i.score for i in everything.instances), reverse=True)
    threshold = (scores[2] + scores[3]) / 2
    above = engine.run([Job(image, [Prompt("cat", score_threshold=threshold, max_instances=200)])])[0][0]
    assert [i.score for i in above.instances] == sorted((i.score for i in above.instances), reverse=True)
    assert len(above.instances) == 3 and all(i.score > threshold for i in above.instances)
    top_two = engine.run([Job(image, [Prompt("cat", score_threshold=0.0, max_instances=2)])])[0][0]
    assert [round(i.score, 6) for i in top_two.instances] == [round(s, 6) for s in scores[:2]]
    none = engine.run([Job(image, [Prompt("cat", score_threshold=1.0)])])[0][0]
    assert none.instances == [] and not none.union_mask.any() and none.union_mask.shape == (48, 48)


def test_text_cache_hit_returns_identical_results(engine, rng):
    image = random_image(rng, 40, 40)
    text = "a unique phrase for the cache test"
    misses_before = engine.text_cache.misses
    first = engine.run([Job(image, [Prompt(text, **ALL)])])[0][0]
    assert engine.text_cache.misses == misses_before + 1
    hits_before = engine.text_cache.hits
    second = engine.run([Job(image, [Prompt(text, **ALL)])])[0][0]
    assert engine.text_cache.hits == hits_before + 1 and engine.text_cache.misses == misses_before + 1
    assert [(i.score, i.box, i.rle) for i in first.instances] == [(i.score, i.box, i.rle) for i in second.instances]


def test_timings_cover_every_stage(engine, rng):
    result = engine.run([Job(random_image(rng, 30, 30), [Prompt("cat")])])[0][0]
    assert set(result.timings_ms) == {"preprocess", "vision", "neck", "text", "heads", "postprocess", "total"}
    assert all(value >= 0 for value in result.timings_ms.values())


def test_text_only_prompt_runs_the_geometry_cls_token_like_meta(engine, rng):
    """Meta's reference always adds the geometry encoder's CLS token; plain transformers skips it for text."""
    model, processor = engine.model, engine.processor
    image = random_image(rng, 56, 56)
    ours = engine.run([Job(image, [Prompt("cat", **ALL)])])[0][0]

    with torch.inference_mode():
        pixels = processor(images=image, return_tensors="pt").pixel_values
        text = processor.tokenizer(["cat"], padding="max_length", max_length=32, return_tensors="pt")
        features = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
        common = {
            "pixel_values": pixels,
            "attention_mask": text.attention_mask,
            "text_embeds": BaseModelOutputWithPooling(pooler_output=features.pooler_output),
        }
        with_cls = model(**common, input_boxes=torch.zeros(1, 1, 4), input_boxes_labels=torch.full((1, 1), -10))
        without_cls = model(**common)

    def scores(outputs):
        return sorted((outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid())[0].tolist())

    np.testing.assert_allclose(sorted(i.score for i in ours.instances), scores(with_cls), atol=1e-5)
    assert not np.allclose(scores(with_cls), scores(without_cls), atol=1e-5)


def test_a_box_ending_outside_the_image_reaches_the_model_as_drawn(engine):
    """Normalised cxcywh of the box as drawn: past 1 on the right and bottom, as Meta's reference encodes it."""
    image = np.zeros((48, 64, 3), dtype=np.uint8)
    prompt = Prompt("car", boxes=(BoxPrompt(40, 30, 100, 60), BoxPrompt(2, 4, 10, 12, positive=False)))
    boxes, labels = engine._box_tensors([Job(image, [prompt])], [(0, prompt)])
    expected = [[70 / 64, 45 / 48, 60 / 64, 30 / 48], [6 / 64, 8 / 48, 8 / 64, 8 / 48]]
    torch.testing.assert_close(boxes, torch.tensor([expected]))
    assert labels.tolist() == [[1, 0]]


def _transformers_scores(model, processor, image: np.ndarray, text: str, box: list[float]) -> list[float]:
    """Plain transformers on one box: Sam3Processor normalises it (no clamp), Sam3Model runs it."""
    inputs = processor(images=image, text=text, input_boxes=[[box]], input_boxes_labels=[[1]], return_tensors="pt")
    with torch.inference_mode():
        outputs = model(**{name: value for name, value in inputs.items() if name != "original_sizes"})
    return sorted((outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid())[0].tolist())


def test_a_box_ending_outside_the_image_is_answered_like_transformers(engine, rng):
    """A box that runs past the right and bottom edges: the same scores as transformers' Sam3Processor +
    Sam3Model on the same box, not those of the box clamped to the image."""
    image = random_image(rng, 48, 64)
    drawn = [40.0, 20.0, 120.0, 90.0]
    ours = engine.run([Job(image, [Prompt("car", boxes=(BoxPrompt(*drawn),), **ALL)])])[0][0]
    reference = _transformers_scores(engine.model, engine.processor, image, "car", drawn)
    np.testing.assert_allclose(sorted(i.score for i in ours.instances), reference, atol=1e-5)
    clamped = _transformers_scores(engine.model, engine.processor, image, "car", [40.0, 20.0, 64.0, 48.0])
    assert not np.allclose(reference, clamped, atol=1e-5)


@pytest.mark.parametrize(("height", "width", "black"), [(1, 1, False), (48, 64, True)])
def test_threshold_0_on_a_small_image_returns_no_empty_instance(engine, rng, height, width, black):
    """Every query passes threshold 0, but a query whose mask has no pixel at the image's size is no instance:
    every returned instance's RLE decodes to a non-empty mask of its area, and the union is theirs."""
    prompts = [Prompt(text, **ALL) for text in ("cat", "a red car", "person")]
    image = np.zeros((height, width, 3), dtype=np.uint8) if black else random_image(rng, height, width)
    results = engine.run([Job(image, prompts)])[0]
    for result in results:
        union = np.zeros((height, width), dtype=bool)
        for instance in result.instances:
            mask = decode_rle(instance.rle)
            assert instance.area > 0 and int(mask.sum()) == instance.area
            union |= mask
        assert np.array_equal(union, result.union_mask)
    assert any(result.instances for result in results)


def test_a_job_abandoned_between_post_processing_slices_stops_there_and_its_batch_goes_on(engine, rng):
    """On the CPU a slice is one full-HD mask's pixels, so each of the big image's masks is a slice of its own."""
    big = random_image(rng, 1200, 1600)
    assert 1200 * 1600 <= FULL_HD_PIXELS < 2 * 1200 * 1600
    asked = []

    def abandoned_at_the_second_slice():
        asked.append(True)  # before the vision pass, at the head chunk, before slice 1, before slice 2
        return "cancelled" if len(asked) == 4 else None

    small = random_image(rng, 40, 60)
    jobs = [
        Job(big, [Prompt("cat", **ALL)], abandoned=abandoned_at_the_second_slice),
        Job(small, [Prompt("dog", **ALL)]),
    ]
    outcomes = engine.run(jobs)
    assert outcomes[0] == Abandoned("cancelled")
    assert len(asked) == 4  # not asked again: the rest of its masks were never rendered
    assert_same_result(outcomes[1][0], engine.run([Job(small, [Prompt("dog", **ALL)])])[0][0], score_tol=1e-6)


def test_a_job_abandoned_before_the_vision_pass_costs_nothing(engine, rng):
    image = random_image(rng, 40, 60)
    jobs = [Job(image, [Prompt("cat", **ALL)], abandoned=lambda: "inference_timeout"), Job(image, [Prompt("cat")])]
    outcomes = engine.run(jobs)
    assert outcomes[0] == Abandoned("inference_timeout") and len(outcomes[1]) == 1
    assert engine.run(jobs[:1]) == [Abandoned("inference_timeout")]


def test_a_sliced_job_gives_what_the_batch_gives(engine, rng):
    """Several head chunks (2 pairs per call), text and box prompts, many slices (a 1200x1600 mask per slice)."""
    chunked = Sam3Engine(engine.loaded, max_pairs_per_forward=2)
    image = random_image(rng, 1200, 1600)
    prompts = [Prompt("cat", **ALL), Prompt("dog", boxes=(BoxPrompt(5, 5, 400, 300),), **ALL), Prompt("tree", **ALL)]
    sliced = chunked.run_sliced(Job(image, prompts))
    batched = chunked.run([Job(image, prompts)])[0]
    assert len(sliced) == 3
    for got, want in zip(sliced, batched, strict=True):
        assert got.instances == want.instances and np.array_equal(got.union_mask, want.union_mask)
        assert {"preprocess", "vision", "text", "heads", "postprocess", "total"} <= set(got.timings_ms)


def test_batches_run_between_the_slices_of_a_heavy_job(engine, rng):
    """The heavy job pauses between two of its slices until a batch submitted then has been served: were the whole
    job one unit of device work, the batch would queue behind it and the pause would fail after 60 s."""
    heavy_between_slices, batch_served = threading.Event(), threading.Event()
    asked = []

    def pause_at_the_second_slice():
        asked.append(True)  # before the first unit, at the head chunk, before slice 1, before slice 2
        if len(asked) == 4:
            heavy_between_slices.set()
            assert batch_served.wait(60)
        return None

    heavy = Job(random_image(rng, 1200, 1600), [Prompt("cat", **ALL)], abandoned=pause_at_the_second_slice)
    small = Job(random_image(rng, 40, 60), [Prompt("dog", **ALL)])
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(engine.run_sliced, heavy)
        assert heavy_between_slices.wait(60)
        served = engine.run([small])
        batch_served.set()
        results = running.result(timeout=120)
    assert served[0][0].instances and len(results[0].instances) == 8 and len(asked) > 4


def test_a_sliced_job_abandoned_between_slices_stops_there(engine, rng):
    asked = []

    def abandoned_at_the_second_slice():
        asked.append(True)
        return "cancelled" if len(asked) == 4 else None

    job = Job(random_image(rng, 1200, 1600), [Prompt("cat", **ALL)], abandoned=abandoned_at_the_second_slice)
    assert engine.run_sliced(job) == Abandoned("cancelled") and len(asked) == 4


def _answers(results) -> list[tuple[list, int | None]]:
    return [(result.instances, result.suppressed) for result in results]


def test_nms_keeps_one_copy_of_a_duplicated_prompts_instances_and_counts_the_rest(engine, rng):
    """The same phrase twice finds the same instances twice (IoU 1): the first prompt keeps them (ties go to the
    earlier prompt), the second loses every one, and says so. At 1 nothing is removed (no IoU is above 1)."""
    image = random_image(rng, 48, 80)
    alone = engine.run([Job(image, [Prompt("cat", **ALL)])])[0][0]
    first, second = engine.run([Job(image, [Prompt("cat", **ALL)] * 2, nms_iou_threshold=0.99)])[0]
    assert len(alone.instances) == 8 and second.instances == [] and second.suppressed == 8
    kept = {instance.box for instance in first.instances}
    assert first.instances == [i for i in alone.instances if i.box in kept] and first.suppressed == 8 - len(kept)
    assert not second.union_mask.any() and np.array_equal(first.union_mask, _union(first.instances, image.shape))
    both = engine.run([Job(image, [Prompt("cat", **ALL)] * 2, nms_iou_threshold=1.0)])[0]
    assert _answers(both) == [(alone.instances, 0)] * 2


def _union(instances, shape) -> np.ndarray:
    union = np.zeros(shape[:2], dtype=bool)
    for instance in instances:
        union |= decode_rle(instance.rle)
    return union


def test_nms_across_a_phrase_and_an_exemplar_removes_from_the_worse_and_leaves_order_and_the_rest(engine, rng):
    """A phrase and a box exemplar of one thing ("cup" and "mug"): with NMS each prompt keeps a subsequence of what it
    finds alone, best first, less exactly as many as it reports; lowering the threshold never keeps more."""
    image = random_image(rng, 64, 64)
    prompts = [Prompt("cup", **ALL), Prompt(boxes=(BoxPrompt(4, 4, 40, 40),), **ALL)]
    alone = engine.run([Job(image, prompts)])[0]
    assert [result.suppressed for result in alone] == [None, None]
    removed_before = 0
    for threshold in (0.9, 0.5, 0.0):
        deduplicated = engine.run([Job(image, prompts, nms_iou_threshold=threshold)])[0]
        for got, everything in zip(deduplicated, alone, strict=True):
            assert got.instances == [i for i in everything.instances if i in got.instances]
            assert len(got.instances) + got.suppressed >= len(everything.instances)
        removed = sum(result.suppressed for result in deduplicated)
        assert removed >= removed_before
        removed_before = removed
    assert 0 < removed_before < 16  # at 0 some instances share pixels, and the best one always stays


def test_nms_jobs_batched_with_others_and_sliced_give_what_they_give_alone(engine, rng):
    """Head chunks of 2 pairs mix an NMS job's prompts with another job's: the NMS job's selection waits for all of
    its prompts, the other job is answered as without NMS; the sliced run removes the same instances."""
    chunked = Sam3Engine(engine.loaded, max_pairs_per_forward=2)
    image = random_image(rng, 1200, 1600)
    prompts = [Prompt("cat", **ALL), Prompt("dog", boxes=(BoxPrompt(5, 5, 400, 300),), **ALL), Prompt("cat", **ALL)]
    other = Job(random_image(rng, 40, 60), [Prompt("tree", **ALL)])
    deduplicated = Job(image, prompts, nms_iou_threshold=0.5)
    batched = chunked.run([other, deduplicated, other])
    alone = chunked.run([deduplicated])[0]
    sliced = chunked.run_sliced(deduplicated)
    assert _answers(sliced) == _answers(alone)
    assert alone[2].instances == [] and alone[2].suppressed == 8  # the duplicate of prompt 0
    for got, want in zip(batched[1], alone, strict=True):  # another batch: float noise, not another answer
        assert got.suppressed == want.suppressed
        assert_same_result(got, want)
    other_alone = chunked.run([other])[0][0]
    for results in (batched[0], batched[2]):
        assert results[0].suppressed is None
        assert_same_result(results[0], other_alone)
