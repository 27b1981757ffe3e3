"""What travels between the gateway and the model service keeps masks exact."""

from __future__ import annotations

import numpy as np
import pytest

from backend.protocol import union_of, unpack_mask


@pytest.mark.parametrize(("height", "width"), [(5, 7), (120, 200), (1, 1)])
def test_union_of_packed_masks_equals_the_union_of_the_masks(height, width):
    rng = np.random.default_rng(height * width)
    masks = [rng.random((height, width)) > 0.7 for _ in range(4)]
    results = [{"mask_bits": np.packbits(m, axis=None).tobytes(), "image_size": [width, height]} for m in masks]
    assert [np.array_equal(unpack_mask(r), m) for r, m in zip(results, masks, strict=True)] == [True] * 4
    assert np.array_equal(unpack_mask(union_of(results)), np.logical_or.reduce(masks))
