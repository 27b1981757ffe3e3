"""The instances as one label image: pixel value i marks instance i (1-based, in the order they are numbered), 0 the
background. A tap on the image reads one pixel and knows which instance it hit."""

from __future__ import annotations

import numpy as np
from PIL import Image

from renderers.instances import InstanceMask
from renderers.png import png_bytes

MAX_8_BIT = 255  # instances an 8-bit map holds; more make a 16-bit map (up to 65,535)


class InstanceMap:
    """Built instance by instance; a pixel that several instances cover goes to the highest score (on equal scores,
    to the lowest number)."""

    def __init__(self, height: int, width: int, count: int) -> None:
        if count > np.iinfo(np.uint16).max:
            raise ValueError(f"an instance map holds at most 65,535 instances, not {count}")
        self.values = np.zeros((height, width), dtype=np.uint8 if count <= MAX_8_BIT else np.uint16)
        self._scores = np.full((height, width), -np.inf, dtype=np.float32)

    def add(self, number: int, score: float, mask: InstanceMask) -> None:
        height, width = mask.pixels.shape
        window = np.s_[mask.y : mask.y + height, mask.x : mask.x + width]
        scores = self._scores[window]
        takes = mask.pixels & (np.float32(score) > scores)
        self.values[window][takes] = number
        scores[takes] = score

    def png(self) -> bytes:
        """An 8-bit greyscale PNG (mode L) for up to 255 instances, else 16-bit (mode I;16), at the image's size."""
        return png_bytes(Image.fromarray(self.values))
