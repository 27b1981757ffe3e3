"""Post-processing details a user would notice in the numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sam3_runner.postprocess import MASKS_PER_GPU_PASS, KeptQueries, MaskRenderer, _passes, render_pairs
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


def _reference_pair(mask_logits, box, score, height, width, mask_threshold):
    """One instance rendered alone, the plain way: resize its probabilities, threshold, encode on the host."""
    probabilities = torch.nn.functional.interpolate(
        mask_logits.float().sigmoid()[None, None], size=(height, width), mode="bilinear", align_corners=False
    )[0, 0]
    mask = (probabilities > mask_threshold).numpy()
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    scaled = [min(max(v * s, 0.0), s) for v, s in zip(box.tolist(), (width, height, width, height), strict=True)]
    return mask, (round(float(score), 4), [round(v, 2) for v in scaled], int(mask.sum()), rle["counts"].decode())


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
    counts = kept.counts
    rendered = render_pairs(kept, sizes, mask_thresholds, per_pass)

    assert [len(pair.instances) for pair in rendered] == counts
    index = 0
    for pair, (height, width), threshold in zip(rendered, sizes, mask_thresholds, strict=True):
        union = np.zeros((height, width), dtype=bool)
        for instance in pair.instances:
            mask, expected = _reference_pair(
                kept.mask_logits[index], kept.boxes[index], kept.scores[index], height, width, threshold
            )
            got = (round(instance.score, 4), list(instance.box), instance.area, instance.rle["counts"])
            assert got == expected and instance.rle["size"] == [height, width]
            union |= mask
            index += 1
        assert pair.union_mask.shape == (height, width) and np.array_equal(pair.union_mask, union)


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
