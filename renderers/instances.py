"""One instance's mask as the renderers read it: its pixels inside its own bounding box, decoded from the COCO RLE
the model service returns (pycocotools), one instance at a time, so a request never holds a full-size array per
instance."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils


@dataclass(frozen=True)
class InstanceMask:
    """`pixels` (h x w bool, C order) is the mask's bounding box; its top-left pixel is column `x`, row `y` of the
    image (original-image pixels, display orientation). An empty mask is a 0 x 0 array at (0, 0)."""

    pixels: np.ndarray
    x: int
    y: int

    @property
    def area(self) -> int:
        return int(self.pixels.sum())


def decode(rle: dict) -> InstanceMask:
    """COCO RLE {"size": [H, W], "counts": str} (what pycocotools.mask.encode gives) -> the mask's bounding box.

    The box is pycocotools' own (mask.toBbox: the extent of the set pixels, from the runs, before decoding).
    """
    x, y, width, height = (int(value) for value in mask_utils.toBbox(rle))
    full = mask_utils.decode(rle)  # H x W uint8, column-major
    return InstanceMask(pixels=np.ascontiguousarray(full[y : y + height, x : x + width], dtype=bool), x=x, y=y)
