"""Union masks -> PNG files at the original image size (8-bit, 0 background, 255 object)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def mask_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
