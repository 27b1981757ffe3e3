"""Post-processing details a user would notice in the numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from runner_asserts import decode_rle

from sam3_runner.postprocess import (
    MASKS_PER_GPU_PASS,
    KeptQueries,
    MaskRenderer,
    _passes,
    mask_boxes,
    render_pairs,
    suppress_overlaps,
)
from sam3_runner.rle import encode_rle, encode_vectorised, encode_with_pycocotools


def _masks(height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(height * width)
    masks = rng.random((8, height, width)) > 0.6
    masks[0] = True  # a mask that starts (and ends) with foreground
    masks[1] = False  # an empty mask
    masks[2] = False
    masks[2, -1, -1] = True  # one pixel at the very end: a run as long as the image
    masks[3] = False
    masks[3, height // 4 : height // 2 + 1, width // 5 : width // 2 + 1] = True  # an object: long runs, big deltas
    masks[4] = False
    masks[4, 0, 0] = True  # one pixel at the very start
    return masks


@pytest.mark.parametrize("encode", [encode_with_pycocotools, encode_vectorised])
@pytest.mark.parametrize(("height", "width"), [(1, 1), (7, 5), (33, 64), (300, 700)])
def test_rle_matches_pycocotools_encode(encode, height, width):
    masks = _masks(height, width)
    ours = encode(torch.from_numpy(masks))
    reference = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert ours == [r["counts"].decode("ascii") for r in reference]
    for counts, mask in zip(ours, masks, strict=True):
        decoded = mask_utils.decode({"size": [height, width], "counts": counts.encode()})
        assert np.array_equal(decoded.astype(bool), mask)


def test_rle_dicts_carry_the_size_and_cover_every_mask():
    masks = torch.from_numpy(_masks(40, 90)).repeat(6, 1, 1)  # more masks than one encoding pass takes
    rles = encode_rle(masks)
    assert len(rles) == 48 and all(rle["size"] == [40, 90] for rle in rles)
    assert [rle["counts"] for rle in rles] == encode_vectorised(masks[:24]) * 2


def test_no_masks_no_rle():
    assert encode_rle(torch.zeros((0, 4, 4), dtype=torch.bool)) == []


def _meta_mask(mask_logits: torch.Tensor, height: int, width: int, mask_threshold: float) -> np.ndarray:
    """Meta's rendering (sam3/model/sam3_image_processor.py, Sam3Processor._forward_grounding): resize the
    logits bilinearly, sigmoid, threshold (Meta's threshold is 0.5; the others are mask_threshold's meaning)."""
    resized = torch.nn.functional.interpolate(
        mask_logits.float()[None, None], size=(height, width), mode="bilinear", align_corners=False
    )[0, 0]
    return (resized.sigmoid() > mask_threshold).numpy()


def _reference_pair(mask_logits, box, score, height, width, mask_threshold):
    """One instance rendered alone, the plain way: Meta's mask, encoded on the host by pycocotools."""
    mask = _meta_mask(mask_logits, height, width, mask_threshold)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    scaled = [min(max(v * s, 0.0), s) for v, s in zip(box.tolist(), (width, height, width, height), strict=True)]
    return mask, (round(float(score), 4), [round(v, 2) for v in scaled], int(mask.sum()), rle["counts"].decode())


def _assert_rendered_like_the_reference(kept, sizes, mask_thresholds, rendered):
    """Every pair holds the reference's non-empty instances, in order, and their union; nothing else."""
    index = 0
    for pair, count, (height, width), threshold in zip(rendered, kept.counts, sizes, mask_thresholds, strict=True):
        union, expected = np.zeros((height, width), dtype=bool), []
        for _ in range(count):
            mask, instance = _reference_pair(
                kept.mask_logits[index], kept.boxes[index], kept.scores[index], height, width, threshold
            )
            if mask.any():
                expected.append(instance)
            union |= mask
            index += 1
        got = [(round(i.score, 4), list(i.box), i.area, i.rle["counts"]) for i in pair.instances]
        assert got == expected and all(i.rle["size"] == [height, width] for i in pair.instances)
        assert pair.union_mask.shape == (height, width) and np.array_equal(pair.union_mask, union)


def _prompts_of_two_sizes() -> tuple[KeptQueries, list[tuple[int, int]], list[float]]:
    generator = torch.Generator().manual_seed(3)
    counts = [0, 5, MASKS_PER_GPU_PASS + 7, 1, 0, 2]
    sizes = [(30, 50), (30, 50), (30, 50), (41, 23), (41, 23), (30, 50)]
    mask_thresholds = [0.5, 0.3, 0.5, 0.7, 0.5, 0.5]
    total = sum(counts)
    kept = KeptQueries(
        counts=counts,
        scores=torch.rand(total, generator=generator),
        boxes=torch.rand(total, 4, generator=generator) * 1.2 - 0.1,  # some outside the image: clamped
        mask_logits=torch.randn(total, 12, 12, generator=generator) * 3 - 4,  # small objects: unions differ
    )
    return kept, sizes, mask_thresholds


@pytest.mark.parametrize("per_pass", [1, MASKS_PER_GPU_PASS])  # the CPU's and the GPU's
def test_masks_rendered_across_prompts_match_each_rendered_alone(per_pass):
    """Prompts of two image sizes, with their own mask thresholds, none or many instances (passes that hold
    several prompts, prompts spread over several passes): every instance and union is what rendering that
    instance alone gives."""
    kept, sizes, mask_thresholds = _prompts_of_two_sizes()
    rendered = render_pairs(kept, sizes, mask_thresholds, per_pass)
    assert sum(len(pair.instances) for pair in rendered) > sum(kept.counts) // 2
    _assert_rendered_like_the_reference(kept, sizes, mask_thresholds, rendered)


def _one_instance(mask_logits: torch.Tensor) -> KeptQueries:
    return KeptQueries(
        counts=[1], scores=torch.tensor([0.9]), boxes=torch.tensor([[0.0, 0.0, 1.0, 1.0]]), mask_logits=mask_logits
    )


@pytest.mark.parametrize("per_pass", [1, MASKS_PER_GPU_PASS])
def test_mask_logits_are_resized_before_the_threshold_like_meta(per_pass):
    """The issue's smallest case: logits [-20, 5] rendered 16 px wide. Meta (logits resized, then sigmoid > 0.5)
    gives 10 background pixels then 6 object pixels; resizing probabilities gave 8 and 8."""
    instance = render_pairs(_one_instance(torch.tensor([[[-20.0, 5.0]]])), [(1, 16)], [0.5], per_pass)[0].instances[0]
    assert decode_rle(instance.rle)[0].astype(int).tolist() == [0] * 10 + [1] * 6
    assert instance.area == 6


def _disks(low_res: int, height: int, width: int) -> torch.Tensor:
    """Smooth objects as SAM 3's mask head draws them: logits that grow with the distance inside a disk's edge
    (4 per low-resolution pixel), disks of radius 5-120 output pixels at off-grid centres."""
    scale_y, scale_x = height / low_res, width / low_res
    ys = ((torch.arange(low_res) + 0.5) * scale_y)[:, None]
    xs = ((torch.arange(low_res) + 0.5) * scale_x)[None, :]
    disks = [(5.0, 101.3, 77.7), (8.0, 30.2, 500.9), (12.0, 400.4, 300.1), (23.0, 250.0, 700.3), (120.0, 350.7, 480.2)]
    return torch.stack(
        [4 * (radius - ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()) / scale_x for radius, cy, cx in disks]
    ).float()


@pytest.mark.parametrize("per_pass", [1, MASKS_PER_GPU_PASS])
def test_smooth_objects_render_exactly_like_meta_at_every_mask_threshold(per_pass):
    """Masks, areas, RLE and union equal Meta's rendering (logits resized bilinearly, sigmoid, threshold) for
    small and large disks; resizing probabilities instead shrinks or grows every edge."""
    logits = _disks(288, 720, 960)
    mask_thresholds = [0.5, 0.02, 0.3, 0.7, 0.98]
    count = len(logits)
    kept = KeptQueries(
        counts=[count] * len(mask_thresholds),
        scores=torch.linspace(0.9, 0.5, count).repeat(len(mask_thresholds)),
        boxes=torch.tensor([[0.1, 0.2, 0.3, 0.4]]).repeat(count * len(mask_thresholds), 1),
        mask_logits=logits.repeat(len(mask_thresholds), 1, 1),
    )
    sizes = [(720, 960)] * len(mask_thresholds)
    rendered = render_pairs(kept, sizes, mask_thresholds, per_pass)
    assert [len(pair.instances) for pair in rendered] == [count] * len(mask_thresholds)
    _assert_rendered_like_the_reference(kept, sizes, mask_thresholds, rendered)


def test_mask_threshold_0_takes_every_pixel_and_1_none():
    """t = 0 and t = 1 are logits of -inf and +inf: every pixel, or an empty mask (no instance), never NaN."""
    logits = torch.cat([_disks(72, 48, 64)[:1], torch.full((1, 72, 72), -200.0)])
    kept = KeptQueries(
        counts=[2, 2], scores=torch.tensor([0.9, 0.8] * 2), boxes=torch.rand(4, 4), mask_logits=logits.repeat(2, 1, 1)
    )
    every, none = render_pairs(kept, [(48, 64), (48, 64)], [0.0, 1.0], 1)
    assert [instance.area for instance in every.instances] == [48 * 64] * 2 and every.union_mask.all()
    assert none.instances == [] and not none.union_mask.any()


def test_an_instance_whose_mask_is_empty_is_dropped():
    """A query above the score threshold whose mask has no pixel at the image's size is no instance: a 1x1
    image samples one point of the logits; only the masks that cover it come back."""
    logits = torch.full((3, 8, 8), -5.0)
    logits[0, 3:5, 3:5] = 5.0  # covers the centre, the one pixel a 1x1 image samples
    logits[1, 0, 0] = 5.0  # positive logits elsewhere: an empty mask at 1x1
    logits[2, 4, 4] = 30.0  # one strong logit beside the centre
    kept = KeptQueries(counts=[3], scores=torch.tensor([0.9, 0.8, 0.7]), boxes=torch.rand(3, 4), mask_logits=logits)
    pair = render_pairs(kept, [(1, 1)], [0.5], 1)[0]
    assert [round(instance.score, 2) for instance in pair.instances] == [0.9, 0.7]
    assert all(instance.area == 1 and decode_rle(instance.rle).all() for instance in pair.instances)
    assert pair.union_mask.tolist() == [[True]]


def test_a_pass_holds_fewer_masks_of_a_larger_image():
    """32 full-HD masks per GPU pass, but one 50 MP mask: a huge image must not need 32x its size in memory."""
    full_hd, huge = (1080, 1920), (7071, 7071)
    passes = _passes([full_hd] * 40 + [huge] * 3, MASKS_PER_GPU_PASS)
    assert passes == [(0, 32), (32, 40), (40, 41), (41, 42), (42, 43)]


@pytest.mark.parametrize("per_pass", [1, MASKS_PER_GPU_PASS])
@pytest.mark.parametrize("max_pixels", [1, 30 * 50, 5 * 30 * 50, 10**9])  # one pass per slice ... all in one
def test_rendering_in_slices_gives_what_rendering_in_one_go_gives(per_pass, max_pixels):
    kept, sizes, mask_thresholds = _prompts_of_two_sizes()
    whole = render_pairs(kept, sizes, mask_thresholds, per_pass)
    renderer = MaskRenderer(kept, sizes, mask_thresholds, per_pass)
    slices = []
    while not renderer.done:
        slices.append(renderer.render(max_pixels))
    sliced = renderer.result()
    assert [pair.instances for pair in sliced] == [pair.instances for pair in whole]
    for got, want in zip(sliced, whole, strict=True):
        assert got.union_mask.dtype == want.union_mask.dtype and np.array_equal(got.union_mask, want.union_mask)
    mask_sizes = [size for size, count in zip(sizes, kept.counts, strict=True) for _ in range(count)]
    assert sum(slices) == sum(height * width for height, width in mask_sizes)
    passes = _passes(mask_sizes, per_pass)
    largest_pass = max((stop - start) * mask_sizes[start][0] * mask_sizes[start][1] for start, stop in passes)
    assert all(pixels <= max(max_pixels, largest_pass) for pixels in slices)
    if max_pixels == 1:
        assert len(slices) == len(passes)  # a slice renders at least one pass


def test_a_dropped_pair_is_no_longer_rendered_and_the_others_are_unchanged():
    kept, sizes, mask_thresholds = _prompts_of_two_sizes()
    whole = render_pairs(kept, sizes, mask_thresholds, 1)
    renderer = MaskRenderer(kept, sizes, mask_thresholds, 1)
    first = renderer.render(1)  # pair 1's first mask
    renderer.drop({2})
    rest = 0
    while not renderer.done:
        rest += renderer.render(1)
    result = renderer.result()
    assert result[2] is None
    assert [pair.instances for index, pair in enumerate(result) if index != 2] == [
        pair.instances for index, pair in enumerate(whole) if index != 2
    ]
    all_pixels = sum(height * width * count for (height, width), count in zip(sizes, kept.counts, strict=True))
    assert first + rest == all_pixels - kept.counts[2] * sizes[2][0] * sizes[2][1]


@pytest.mark.parametrize("per_pass", [1, MASKS_PER_GPU_PASS])
def test_pairs_without_rle_get_none_and_everything_else_unchanged(per_pass):
    kept, sizes, mask_thresholds = _prompts_of_two_sizes()
    with_rle = [True, False, False, True, False, True]
    full = render_pairs(kept, sizes, mask_thresholds, per_pass)
    lean = render_pairs(kept, sizes, mask_thresholds, per_pass, with_rle)
    for wanted, got, want in zip(with_rle, lean, full, strict=True):
        assert [(i.score, i.box, i.area) for i in got.instances] == [(i.score, i.box, i.area) for i in want.instances]
        assert [i.rle for i in got.instances] == (
            [i.rle for i in want.instances] if wanted else [None] * len(got.instances)
        )
        assert np.array_equal(got.union_mask, want.union_mask)


def test_mask_boxes_are_cocos_boxes_of_the_masks():
    generator = torch.Generator().manual_seed(5)
    masks = torch.rand(6, 23, 31, generator=generator) > 0.97  # scattered pixels: boxes with odd extents
    masks[1] = False  # empty
    masks[2] = False
    masks[2, 22, 30] = True  # the last pixel alone
    masks[3] = True  # the whole image
    rles = mask_utils.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    want = [[x, y, x + w, y + h] for x, y, w, h in mask_utils.toBbox(rles).tolist()]
    assert mask_boxes(masks).tolist() == want
    assert want[1] == [0, 0, 0, 0] and want[2] == [30, 22, 31, 23] and want[3] == [0, 0, 31, 23]


@pytest.mark.parametrize("per_pass", [1, MASKS_PER_GPU_PASS])
def test_candidates_keep_every_mask_box_it_by_its_mask_and_unite_only_the_best(per_pass):
    """A visual prompt's candidates: the union is the first (best) mask alone, an empty candidate stays, boxes are
    the masks' own; masks, scores, areas and RLEs as for detections; slicing and dropping work the same."""
    generator = torch.Generator().manual_seed(6)
    counts, sizes = [3, 1, 3], [(30, 50), (41, 23), (30, 50)]
    logits = torch.randn(7, 12, 12, generator=generator) * 3 - 1
    logits[2] = -10.0  # the first prompt's third candidate: empty
    kept = KeptQueries(counts=counts, scores=torch.rand(7, generator=generator), boxes=None, mask_logits=logits)
    renderer = MaskRenderer(kept, sizes, [0.5] * 3, per_pass, candidates=True)
    renderer.drop({1})
    while not renderer.done:
        renderer.render(1)
    candidates = renderer.result()
    assert candidates[1] is None
    index = 0
    for pair, count, (height, width) in zip(candidates, counts, sizes, strict=True):
        if pair is None:
            index += count
            continue
        assert len(pair.instances) == count
        masks = [decode_rle(instance.rle) for instance in pair.instances]
        for instance, mask in zip(pair.instances, masks, strict=True):
            assert np.array_equal(mask, _meta_mask(logits[index], height, width, 0.5))
            assert instance.area == mask.sum() and instance.score == pytest.approx(float(kept.scores[index]))
            assert list(instance.box) == mask_boxes(torch.from_numpy(mask)[None])[0].tolist()
            index += 1
        assert np.array_equal(pair.union_mask, masks[0])
    assert candidates[0].instances[2].area == 0 and candidates[0].instances[2].box == (0.0, 0.0, 0.0, 0.0)


def _squares(*squares: tuple[int, int, int, int], size: int = 20) -> torch.Tensor:
    """Mask logits [n, size, size]: +5 inside each (row0, col0, row1, col1) square (end exclusive), -5 outside."""
    logits = torch.full((len(squares), size, size), -5.0)
    for index, (row0, col0, row1, col1) in enumerate(squares):
        logits[index, row0:row1, col0:col1] = 5.0
    return logits


def _kept(counts: list[int], scores: list[float], logits: torch.Tensor) -> KeptQueries:
    boxes = torch.arange(len(scores) * 4, dtype=torch.float32).reshape(-1, 4)  # tells the queries apart
    return KeptQueries(counts=counts, scores=torch.tensor(scores), boxes=boxes, mask_logits=logits)


def _left(kept: KeptQueries) -> list[tuple[float, float]]:
    """(score, first box value) of each query left, pair-major: which queries survived, in order."""
    return [(round(score, 4), box[0]) for score, box in zip(kept.scores.tolist(), kept.boxes.tolist(), strict=True)]


def test_nms_removes_exactly_the_greedy_duplicates_across_pairs():
    """A (0.9, pair 0) and B (0.8, pair 1) overlap with IoU 7/13 = 0.54; C (0.7, pair 0) overlaps B as much but A
    little (IoU 0.25); D (0.6, pair 1) overlaps nothing. Greedy NMS at 0.5 removes B only: C stays, since the one
    that overlaps it was removed (suppressing by every better query, kept or not, would remove C too)."""
    a, b, c, d = (0, 0, 10, 10), (0, 3, 10, 13), (0, 6, 10, 16), (14, 14, 20, 20)  # 10x10 squares 3 columns apart
    kept = _kept([2, 2], [0.9, 0.7, 0.8, 0.6], _squares(a, c, b, d))
    left, removed = suppress_overlaps(kept, [0.5, 0.5], [0, 1], 0.5)
    assert left.counts == [2, 1] and removed == [0, 1]
    assert _left(left) == [(0.9, 0.0), (0.7, 4.0), (0.6, 12.0)]
    assert torch.equal(left.mask_logits, _squares(a, c, d))
    everything, removed = suppress_overlaps(kept, [0.5, 0.5], [0, 1], 0.6)  # 0.54 is not above 0.6
    assert everything.counts == [2, 2] and removed == [0, 0] and _left(everything) == _left(kept)


def test_nms_removes_above_the_threshold_not_at_it():
    """IoU exactly 0.5 (two 10x15 rectangles sharing 10x10 pixels): kept at 0.5, removed just below; identical
    masks (IoU 1) are removed at any threshold below 1 and kept at 1, which therefore removes nothing."""
    half = _kept([1, 1], [0.9, 0.8], _squares((0, 0, 10, 15), (0, 5, 10, 20)))  # 100 shared of 200: IoU 0.5
    assert suppress_overlaps(half, [0.5, 0.5], [0, 1], 0.5)[1] == [0, 0]
    assert suppress_overlaps(half, [0.5, 0.5], [0, 1], 0.4999)[1] == [0, 1]
    same = _kept([1, 1], [0.9, 0.8], _squares((2, 2, 9, 9), (2, 2, 9, 9)))
    assert suppress_overlaps(same, [0.5, 0.5], [0, 1], 0.99)[1] == [0, 1]
    assert suppress_overlaps(same, [0.5, 0.5], [0, 1], 1.0)[1] == [0, 0]


def test_nms_at_0_removes_whatever_shares_a_pixel_and_keeps_apart_and_empty_masks():
    touching = _squares((0, 0, 5, 5), (4, 4, 12, 12), (15, 15, 20, 20), (0, 0, 0, 0), (0, 0, 0, 0))  # 2 empty
    left, removed = suppress_overlaps(_kept([5], [0.9, 0.8, 0.7, 0.6, 0.5], touching), [0.5], [0], 0.0)
    assert removed == [1] and _left(left) == [(0.9, 0.0), (0.7, 8.0), (0.6, 12.0), (0.5, 16.0)]


def test_nms_ties_go_to_the_earlier_prompt_then_the_earlier_instance():
    logits = _squares((0, 0, 10, 10), (0, 0, 10, 10))
    kept = _kept([1, 1], [0.8, 0.8], logits)
    assert suppress_overlaps(kept, [0.5, 0.5], [0, 1], 0.5)[1] == [0, 1]
    assert suppress_overlaps(kept, [0.5, 0.5], [1, 0], 0.5)[1] == [1, 0]  # pairs in another order than prompts
    within = suppress_overlaps(_kept([2], [0.8, 0.8], logits), [0.5], [0], 0.5)[0]
    assert _left(within) == [(0.8, 0.0)]


def test_nms_binarises_each_mask_at_its_pairs_mask_threshold():
    """A soft mask (probability 0.6 on a wide square, 0.95 on its centre) against the centre square: at its pair's
    mask_threshold 0.5 the masks differ (IoU 0.25), at 0.9 they are the same mask (IoU 1)."""
    soft = torch.full((20, 20), -5.0)
    soft[0:20, 0:20] = torch.logit(torch.tensor(0.6))
    soft[5:15, 5:15] = torch.logit(torch.tensor(0.95))
    centre = _squares((5, 5, 15, 15))[0]
    kept = _kept([1, 1], [0.9, 0.8], torch.stack([centre, soft]))
    assert suppress_overlaps(kept, [0.5, 0.5], [0, 1], 0.5)[1] == [0, 0]
    assert suppress_overlaps(kept, [0.5, 0.9], [0, 1], 0.5)[1] == [0, 1]


def test_nms_with_nothing_kept_removes_nothing():
    kept = _kept([0, 0], [], torch.zeros(0, 20, 20))
    left, removed = suppress_overlaps(kept, [0.5, 0.5], [0, 1], 0.5)
    assert left.counts == [0, 0] and removed == [0, 0]
