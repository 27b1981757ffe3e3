"""Post-processing details a user would notice in the numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from sam3_runner.postprocess import encode_rle


@pytest.mark.parametrize(("height", "width"), [(1, 1), (7, 5), (33, 64)])
def test_rle_matches_pycocotools_encode(height, width):
    rng = np.random.default_rng(height * width)
    masks = rng.random((6, height, width)) > 0.6
    masks[0] = True  # a mask that starts (and ends) with foreground
    masks[1] = False  # an empty mask
    ours = encode_rle(torch.from_numpy(masks))
    reference = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    assert [r["counts"] for r in ours] == [r["counts"].decode("ascii") for r in reference]
    for rle, mask in zip(ours, masks, strict=True):
        decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
        assert np.array_equal(decoded.astype(bool), mask)


def test_no_masks_no_rle():
    assert encode_rle(torch.zeros((0, 4, 4), dtype=torch.bool)) == []
