"""The image with its background removed: an RGBA PNG cropped to the union mask's bounding box."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

from renderers.png import png_bytes

# Photo content: zlib's default strategy at its fastest level, not the run-length one the masks use (bench/outputs.py)
CUTOUT_PNG_OPTIONS = {"compress_level": 1, "optimize": False}


def cutout_png(pixels: np.ndarray, union: np.ndarray) -> bytes:
    """pixels: H x W x 3 uint8 RGB (display orientation); union: H x W bool, the instances' union.

    The PNG spans the union's bounding box (the smallest box holding every set pixel): alpha is 255 on the union
    and 0 elsewhere, where the colour is black too (the background is gone, not hidden). No instance: a single
    transparent pixel.
    """
    x, y, width, height = cv2.boundingRect(union.view(np.uint8))
    rgba = np.zeros((max(height, 1), max(width, 1), 4), dtype=np.uint8)
    if width and height:
        inside = union[y : y + height, x : x + width]
        rgba[..., :3] = pixels[y : y + height, x : x + width] * inside[..., None]
        rgba[..., 3] = inside * np.uint8(255)
    return png_bytes(Image.fromarray(rgba), **CUTOUT_PNG_OPTIONS)
