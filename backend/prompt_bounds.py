"""Prompts checked against the image they are for, once its display size is known (after decoding or from the
image cache, in the model service; from the probed first frame, for a clip in the gateway). Coordinates are
pixels in display orientation (EXIF applied); each check returns the item's failure (backend/protocol.failure) or
None."""

from __future__ import annotations

from backend.protocol import failure
from sam3_runner import BoxPrompt, Prompt, VisualPrompt

# A box may end at most this many image widths (heights) from the image's left (top) edge: see box_error.
MAX_BOX_OVERHANG = 10


def box_error(prompts: list[Prompt], width: int, height: int) -> dict | None:
    """Each box must overlap the image: it may run past the right or bottom edge (the model gets it as drawn, like
    Meta's reference), but must start inside it (x1, y1 >= 0 and x2 > x1, y2 > y1 are checked at the edge), and
    may end at most MAX_BOX_OVERHANG image widths (heights) from the left (top) edge: box pooling (torchvision's
    roi_align) sizes its sampling grid from the box, so a box far larger than the image costs seconds and, at
    extreme sizes, crashes the worker (seen on the CPU: x2 = y2 = 1e11 on a 640x480 image; at full size one
    pooling call took 0.15 s at 10x the image, 6.4 s at 60x)."""
    for prompt_index, prompt in enumerate(prompts):
        for index, box in enumerate(prompt.boxes):
            name = f"prompt {prompt_index} box {index}" if len(prompts) > 1 else f"box {index}"
            if error := one_box_error(name, box, width, height):
                return error
    return None


def one_box_error(name: str, box: BoxPrompt, width: int, height: int) -> dict | None:
    """`name` says which box in the message ("box 1", "prompt 2 box 0": indices as sent, 0-based)."""
    if box.x1 >= width or box.y1 >= height:
        return failure("invalid_box", f"{name} does not overlap the {width}x{height} image")
    if box.x2 > MAX_BOX_OVERHANG * width or box.y2 > MAX_BOX_OVERHANG * height:
        return failure(
            "invalid_box",
            f"{name} runs too far past the {width}x{height} image "
            f"(x2 <= {MAX_BOX_OVERHANG * width}, y2 <= {MAX_BOX_OVERHANG * height})",
        )
    return None


def visual_error(visual: VisualPrompt, width: int, height: int) -> dict | None:
    """Points must lie on the image (display orientation, like boxes): 0 <= x < width, 0 <= y < height, pixels;
    the box is checked as a concept prompt's boxes are (box_error)."""
    for index, point in enumerate(visual.points):
        if not (0 <= point.x < width and 0 <= point.y < height):
            return failure(
                "invalid_point",
                f"point {index} ({point.x:g}, {point.y:g}) is outside the {width}x{height} image "
                f"(0 <= x < {width}, 0 <= y < {height})",
            )
    return None if visual.box is None else one_box_error("the box", visual.box, width, height)
