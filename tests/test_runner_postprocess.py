"""Post-processing details a user would notice in the numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

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
