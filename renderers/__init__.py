"""Instance masks -> what an app draws: polygons, an instance map, a cut-out, a preview; and the union mask PNG.

Fed by the COCO RLE masks the model service returns; knows nothing of HTTP, storage or task rows. Everything here
is CPU work: callers on an event loop run it in a thread.
"""

from renderers.png import mask_png
from renderers.polygons import DEFAULT_TOLERANCE
from renderers.render import NEEDS_IMAGE, NEEDS_INSTANCE_MASKS, Drawable, Rendered, render

__all__ = [
    "DEFAULT_TOLERANCE",
    "NEEDS_IMAGE",
    "NEEDS_INSTANCE_MASKS",
    "Drawable",
    "Rendered",
    "mask_png",
    "render",
]
