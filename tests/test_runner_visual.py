"""Visual prompts (points / a box / a previous mask -> one object): the same answers as transformers' own
Sam3TrackerProcessor + Sam3TrackerModel loaded from the same directory, batched with concept prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_image
from pycocotools import mask as mask_utils
from runner_asserts import assert_same_result, decode_rle
from transformers import Sam3TrackerModel, Sam3TrackerProcessor

from sam3_runner import (
    Abandoned,
    BoxPrompt,
    Job,
    PointPrompt,
    Prompt,
    PromptResult,
    Sam3Engine,
    VisualPrompt,
    VisualPromptsUnavailable,
    load_model,
)
from sam3_runner.visual import LOGIT_LIMIT

ALL = {"score_threshold": 0.0, "max_instances": 200}
HEIGHT, WIDTH = 45, 70

CASES = {
    "one point, 3 candidates": VisualPrompt(points=(PointPrompt(30, 20),), multimask=True),
    "one point, 1 candidate": VisualPrompt(points=(PointPrompt(30, 20),)),
    "box": VisualPrompt(box=BoxPrompt(8, 5, 50, 40)),
    "box, 3 candidates": VisualPrompt(box=BoxPrompt(8, 5, 50, 40), multimask=True),
    "points and box": VisualPrompt(points=(PointPrompt(20, 15), PointPrompt(44.5, 30.25)), box=BoxPrompt(8, 5, 60, 44)),
    "a negative point": VisualPrompt(points=(PointPrompt(20, 15), PointPrompt(60, 40, positive=False)), multimask=True),
    "negative only": VisualPrompt(points=(PointPrompt(60, 40, positive=False),)),
    "box running past the image": VisualPrompt(box=BoxPrompt(30, 20, 140, 90)),
}


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """transformers' own visual-prompt path from the same directory, its neck cut to the three levels Meta's tracker
    keeps (`scalp=1`): transformers 5.17's Sam3TrackerModel adds the no-memory embedding to the fourth (0.5x) level
    and then drops that level; Meta adds it to the image embedding (see the test below)."""
    processor = Sam3TrackerProcessor.from_pretrained(tiny_model_dir)
    model = Sam3TrackerModel.from_pretrained(tiny_model_dir).eval()
    model.vision_encoder.neck.fpn_layers = model.vision_encoder.neck.fpn_layers[:3]
    return processor, model


def reference_answer(reference, image: np.ndarray, visual: VisualPrompt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(predicted IoUs [K], masks [K, H, W] bool, low-res logits [K, h, w]), best first, as transformers gives them."""
    processor, model = reference
    prompts = {}
    if visual.points:
        prompts["input_points"] = [[[[point.x, point.y] for point in visual.points]]]
        prompts["input_labels"] = [[[int(point.positive) for point in visual.points]]]
    if visual.box is not None:
        prompts["input_boxes"] = [[[visual.box.x1, visual.box.y1, visual.box.x2, visual.box.y2]]]
    inputs = processor(images=image, return_tensors="pt", **prompts)
    masks = None if visual.mask_input is None else torch.from_numpy(visual.mask_input)[None, None]
    with torch.inference_mode():
        outputs = model(
            pixel_values=inputs["pixel_values"],
            input_points=inputs.get("input_points"),
            input_labels=inputs.get("input_labels"),
            input_boxes=inputs.get("input_boxes"),
            input_masks=masks,
            multimask_output=visual.multimask,
        )
    scores = outputs.iou_scores[0, 0]
    order = scores.argsort(descending=True)
    logits = outputs.pred_masks[0, 0][order]
    full = processor.post_process_masks([logits[None]], inputs["original_sizes"], mask_threshold=0.0)[0][0]
    return scores[order].numpy(), full.numpy(), logits.numpy()


def ours(engine: Sam3Engine, image: np.ndarray, visual: VisualPrompt) -> PromptResult:
    [result] = engine.run([Job(image, [], visual=visual)])[0]
    return result


def assert_matches_reference(result: PromptResult, want: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    scores, masks, logits = want
    np.testing.assert_allclose([instance.score for instance in result.instances], scores, rtol=0, atol=1e-6)
    for instance, mask in zip(result.instances, masks, strict=True):
        assert np.array_equal(decode_rle(instance.rle), mask)
    np.testing.assert_allclose(result.mask_logits, logits[0].clip(-LOGIT_LIMIT, LOGIT_LIMIT), rtol=0, atol=1e-5)


def assert_same_visual(actual: PromptResult, expected: PromptResult) -> None:
    assert_same_result(actual, expected, score_tol=1e-6)
    assert [i.score for i in actual.instances] == pytest.approx([i.score for i in expected.instances], abs=1e-6)
    np.testing.assert_allclose(actual.mask_logits, expected.mask_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_visual_prompts_answer_like_transformers(engine, reference, case):
    image = random_image(np.random.default_rng(11), HEIGHT, WIDTH)
    visual = CASES[case]
    result = ours(engine, image, visual)
    assert len(result.instances) == (3 if visual.multimask else 1)
    assert_matches_reference(result, reference_answer(reference, image, visual))


def test_a_refinement_step_answers_like_transformers_and_changes_the_answer(engine, reference):
    """Tap, then tap again with the first answer's low-res logits as the mask prompt (SAM's refinement loop)."""
    image = random_image(np.random.default_rng(12), HEIGHT, WIDTH)
    first = ours(engine, image, VisualPrompt(points=(PointPrompt(25, 18),), multimask=True))
    _, _, reference_logits = reference_answer(reference, image, CASES["one point, 3 candidates"])
    refine = VisualPrompt(
        points=(PointPrompt(25, 18), PointPrompt(50, 30, positive=False)), mask_input=first.mask_logits
    )
    refined = ours(engine, image, refine)
    assert_matches_reference(refined, reference_answer(reference, image, refine))
    without_mask = ours(engine, image, VisualPrompt(points=refine.points))
    assert abs(refined.instances[0].score - without_mask.instances[0].score) > 1e-3
    assert not np.allclose(refined.mask_logits, without_mask.mask_logits, atol=1e-3)
    mask_only = VisualPrompt(mask_input=first.mask_logits)  # a previous answer alone is a prompt too
    assert_matches_reference(ours(engine, image, mask_only), reference_answer(reference, image, mask_only))


def test_a_mask_input_of_another_size_is_resized_as_transformers_resizes_it(engine, reference):
    image = random_image(np.random.default_rng(13), HEIGHT, WIDTH)
    visual = VisualPrompt(
        points=(PointPrompt(10, 10),), mask_input=np.random.default_rng(1).normal(size=(9, 13)).astype(np.float32)
    )
    assert_matches_reference(ours(engine, image, visual), reference_answer(reference, image, visual))


def test_the_no_memory_embedding_is_added_to_the_image_embedding_as_meta_does(engine, tiny_model_dir):
    """Meta's predict_inst adds the no-memory embedding to the image embedding (sam3/model/sam3_image.py). Our answer
    is the reference's with the neck cut to Meta's three levels, and not that of transformers' Sam3TrackerModel as
    shipped, which adds it to a level it then drops (if transformers fixes that, the cut reference can go)."""
    processor = Sam3TrackerProcessor.from_pretrained(tiny_model_dir)
    as_shipped = Sam3TrackerModel.from_pretrained(tiny_model_dir).eval()
    image = random_image(np.random.default_rng(14), HEIGHT, WIDTH)
    visual = CASES["one point, 3 candidates"]
    shipped_scores, _, shipped_logits = reference_answer((processor, as_shipped), image, visual)
    result = ours(engine, image, visual)
    assert not np.allclose(result.mask_logits, shipped_logits[0].clip(-LOGIT_LIMIT, LOGIT_LIMIT), atol=1e-3)


def test_candidates_are_best_first_with_their_masks_boxes_areas_and_the_best_as_union(engine):
    image = random_image(np.random.default_rng(15), HEIGHT, WIDTH)
    visual = VisualPrompt(points=(PointPrompt(35, 22),), multimask=True)
    result = ours(engine, image, visual)
    scores = [instance.score for instance in result.instances]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 3
    assert result.image_size == (WIDTH, HEIGHT) and result.mask_logits.dtype == np.float32
    assert result.mask_logits.shape == (16, 16)  # 4 x the tiny model's 4 x 4 patch grid
    for instance in result.instances:
        mask = decode_rle(instance.rle)
        x, y, w, h = mask_utils.toBbox(instance.rle | {"counts": instance.rle["counts"].encode()})
        assert instance.box == (x, y, x + w, y + h) and instance.area == mask.sum()
    assert np.array_equal(result.union_mask, decode_rle(result.instances[0].rle))
    lean = ours(engine, image, VisualPrompt(points=visual.points, multimask=True, include_rle=False))
    assert [i.rle for i in lean.instances] == [None] * 3
    assert [(i.score, i.box, i.area) for i in lean.instances] == [(i.score, i.box, i.area) for i in result.instances]
    strict = ours(engine, image, VisualPrompt(points=visual.points, multimask=True, mask_threshold=0.9))
    assert [i.area for i in strict.instances] < [i.area for i in result.instances]


def test_concept_and_visual_jobs_in_one_batch_answer_as_alone(engine):
    """Several images, concept prompts beside visual ones of the same and of different layouts (one decoder call
    per layout, no padding): every job gets what it gets alone."""
    rng = np.random.default_rng(16)
    images = [random_image(rng, 40, 60), random_image(rng, 64, 48), random_image(rng, 56, 56)]
    jobs = [
        Job(images[0], [Prompt("cat", **ALL)]),
        Job(images[0], [], visual=VisualPrompt(points=(PointPrompt(10, 10),), multimask=True)),
        Job(images[1], [], visual=VisualPrompt(box=BoxPrompt(4, 4, 40, 60))),
        Job(images[2], [], visual=VisualPrompt(points=(PointPrompt(50, 3), PointPrompt(5, 5, positive=False)))),
        Job(images[2], [Prompt("dog", **ALL), Prompt(boxes=(BoxPrompt(1, 1, 30, 30),), **ALL)]),
        Job(images[1], [], visual=VisualPrompt(points=(PointPrompt(40, 60),), multimask=True)),
    ]
    together = engine.run(jobs)
    assert [len(results) for results in together] == [1, 1, 1, 1, 2, 1]
    for job, results in zip(jobs, together, strict=True):
        for got, want in zip(results, engine.run([job])[0], strict=True):
            if job.visual is None:
                assert_same_result(got, want) and got.mask_logits is None
            else:
                assert_same_visual(got, want)
    assert "tracker" in together[1][0].timings_ms and "heads" in together[1][0].timings_ms


def test_an_abandoned_visual_job_stops_and_the_batch_goes_on(engine):
    rng = np.random.default_rng(17)
    visual = VisualPrompt(points=(PointPrompt(10, 10),))
    gone = Job(random_image(rng, 30, 40), [], abandoned=lambda: "cancelled", visual=visual)
    kept = Job(random_image(rng, 30, 40), [], visual=visual)
    outcome = engine.run([gone, kept])
    assert outcome[0] == Abandoned("cancelled") and len(outcome[1]) == 1
    assert isinstance(engine.run_sliced(gone), Abandoned)
    assert_same_visual(engine.run_sliced(kept)[0], outcome[1][0])


def test_a_detector_only_directory_serves_concepts_and_refuses_visual_prompts(tiny_detector_dir, engine):
    detector_only = Sam3Engine(load_model(str(tiny_detector_dir), device="cpu"))
    assert detector_only.visual is None
    image = random_image(np.random.default_rng(18), 40, 50)
    prompts = [Prompt("cat", **ALL), Prompt("dog", boxes=(BoxPrompt(2, 2, 30, 30),), **ALL)]
    for got, want in zip(
        detector_only.run([Job(image, prompts)])[0], engine.run([Job(image, prompts)])[0], strict=True
    ):
        assert_same_result(got, want, score_tol=1e-6)
    with pytest.raises(VisualPromptsUnavailable):
        detector_only.run([Job(image, [Prompt("cat")]), Job(image, [], visual=CASES["box"])])


def test_a_job_carries_concept_prompts_or_one_visual_prompt():
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="not both"):
        Job(image, [Prompt("cat")], visual=CASES["box"])
    with pytest.raises(ValueError, match="points, a box or a mask_input"):
        VisualPrompt()
    with pytest.raises(ValueError, match="2-D"):
        VisualPrompt(mask_input=np.zeros((1, 16, 16), dtype=np.float32))
