"""What travels between the gateway and the model service, and the mask PNG stored, keep masks exact."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from backend.protocol import union_of, unpack_mask
from renderers import mask_png


@pytest.mark.parametrize(("height", "width"), [(5, 7), (120, 200), (1, 1)])
def test_union_of_packed_masks_equals_the_union_of_the_masks(height, width):
    rng = np.random.default_rng(height * width)
    masks = [rng.random((height, width)) > 0.7 for _ in range(4)]
    results = [{"mask_bits": np.packbits(m, axis=None).tobytes(), "image_size": [width, height]} for m in masks]
    assert [np.array_equal(unpack_mask(r), m) for r, m in zip(results, masks, strict=True)] == [True] * 4
    assert np.array_equal(unpack_mask(union_of(results)), np.logical_or.reduce(masks))


@pytest.mark.parametrize("kind", ["object", "noise", "empty"])
def test_mask_png_is_the_mask_as_8_bit_0_and_255(kind):
    rng = np.random.default_rng(7)
    rows, columns = np.mgrid[:120, :200]
    mask = {
        "object": (rows - 60) ** 2 + (columns - 90) ** 2 < 40**2,
        "noise": rng.random((120, 200)) > 0.5,
        "empty": np.zeros((120, 200), dtype=bool),
    }[kind]
    image = Image.open(io.BytesIO(mask_png(mask)))
    assert (image.format, image.mode, image.size) == ("PNG", "L", (200, 120))
    assert np.array_equal(np.array(image), np.where(mask, 255, 0).astype(np.uint8))
