"""What travels between the gateway and the model service, and the mask PNG stored, keep masks and prompts exact."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from backend.protocol import item_visual, make_item, make_visual_item, pack_logits, union_of, unpack_logits, unpack_mask
from renderers import mask_png
from sam3_runner import BoxPrompt, PointPrompt, Prompt, VisualPrompt


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


def test_a_visual_item_carries_its_prompt_and_logits_travel_as_float16():
    logits = np.random.default_rng(3).normal(scale=8, size=(16, 12)).astype(np.float32)
    visual = VisualPrompt(
        points=(PointPrompt(3.5, 4, positive=False), PointPrompt(10, 2)),
        box=BoxPrompt(1, 2, 30.5, 40),
        mask_input=logits,
        multimask=True,
        mask_threshold=0.3,
        include_rle=False,
    )
    item = make_visual_item(b"jpeg", visual, 1000)
    assert item["prompts"] == [] and item["image"] == b"jpeg" and item["max_pixels"] == 1000
    assert item["visual"]["points"][0] == {"x": 3.5, "y": 4, "positive": False}
    assert item["visual"]["box"] == {"x1": 1, "y1": 2, "x2": 30.5, "y2": 40, "positive": True}
    packed = item["visual"]["mask_input"]
    assert packed["shape"] == [16, 12] and packed["dtype"] == "float16" and len(packed["data"]) == 16 * 12 * 2
    back = item_visual(pickle.loads(pickle.dumps(item)))  # BentoML pickles what travels
    assert (back.points, back.box, back.multimask, back.mask_threshold, back.include_rle) == (
        visual.points,
        visual.box,
        True,
        0.3,
        False,
    )
    assert back.mask_input.dtype == np.float32 and back.mask_input.shape == (16, 12)
    np.testing.assert_allclose(back.mask_input, logits, rtol=1e-3, atol=1e-3)  # float16: ~3 significant digits
    assert item_visual(make_item(b"jpeg", [Prompt("cat")], 1000)) is None
    bare = item_visual(make_visual_item(b"jpeg", VisualPrompt(points=(PointPrompt(1, 1),)), 10))
    assert bare.box is None and bare.mask_input is None and not bare.multimask


def test_logits_of_another_dtype_are_refused():
    packed = pack_logits(np.zeros((2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match="float16"):
        unpack_logits({**packed, "dtype": "float32"})
