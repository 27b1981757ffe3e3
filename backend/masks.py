"""Union masks -> PNG files at the original image size (8-bit, 0 background, 255 object)."""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

# zlib's run-length strategy suits two-valued masks: a full-HD object mask deflates in 7.7 ms instead of Pillow's
# default 11.0 ms, into a smaller file; a noise mask in 55 ms instead of 231 ms (bench/mask_png.py, 2-core x86_64).
PNG_OPTIONS = {"compress_type": zlib.Z_RLE, "optimize": False}


def mask_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG", **PNG_OPTIONS)
    return buffer.getvalue()
