"""Instance masks -> what an app draws: polygons, an instance map, a cut-out, a preview; the union mask PNG; and a
tracked clip's MP4 preview.

Fed by the COCO RLE masks the model service returns; knows nothing of HTTP, storage or task rows. Everything here
is CPU work: callers on an event loop run it in a thread.
"""

from renderers.png import mask_png
from renderers.polygons import DEFAULT_TOLERANCE
from renderers.render import NEEDS_IMAGE, NEEDS_INSTANCE_MASKS, Drawable, Rendered, render
from renderers.video_overlay import OverlayInfo, render_video_overlay

__all__ = [
    "DEFAULT_TOLERANCE",
    "NEEDS_IMAGE",
    "NEEDS_INSTANCE_MASKS",
    "Drawable",
    "OverlayInfo",
    "Rendered",
    "mask_png",
    "render",
    "render_video_overlay",
]
