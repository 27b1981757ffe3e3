"""A task's instances -> everything the request asked to draw, each mask decoded once and handed to every renderer
that needs it (one instance at a time: memory stays at one full-size mask plus the outputs)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from renderers.cutout import cutout_png
from renderers.instance_map import InstanceMap
from renderers.instances import decode
from renderers.polygons import polygons

NEEDS_INSTANCE_MASKS = frozenset({"polygons", "instance_map", "overlay"})
NEEDS_IMAGE = frozenset({"cutout", "overlay"})


@dataclass(frozen=True)
class Drawable:
    """An instance as the renderers draw it: its COCO RLE mask, score, xyxy box (original-image pixels) and label."""

    rle: dict
    score: float
    box: list[float]
    label: str


@dataclass
class Rendered:
    polygons: list[list[dict]] | None = None  # per instance, when asked (renderers.polygons' shape)
    files: dict[str, bytes] = field(default_factory=dict)  # per file output asked ("instance_map", ...): its bytes


def render(
    instances: Sequence[Drawable],
    size: tuple[int, int],
    wanted: frozenset[str],
    tolerance: float,
    pixels: np.ndarray | None = None,
    union: np.ndarray | None = None,
) -> Rendered:
    """Draws what `wanted` names of "polygons", "instance_map", "cutout", "overlay" (other names are not drawn here).

    size: the image's (width, height); instances are numbered 1, 2, ... in the order given. pixels (H x W x 3 uint8
    RGB, display orientation) are needed for the cut-out and the overlay, union (H x W bool, the instances' union)
    for the cut-out.
    """
    width, height = size
    rendered = Rendered(polygons=[] if "polygons" in wanted else None)
    instance_map = InstanceMap(height, width, len(instances)) if "instance_map" in wanted else None
    overlay = None
    if "overlay" in wanted:
        # supervision (it imports scipy) costs 1.2 s and 59 MiB per process: loaded by the first overlay, not by every
        # gateway and model worker at start
        from renderers.overlay import Overlay

        overlay = Overlay(pixels)
    if wanted & NEEDS_INSTANCE_MASKS:
        for number, instance in enumerate(instances, start=1):
            mask = decode(instance.rle)
            if rendered.polygons is not None:
                rendered.polygons.append(polygons(mask, tolerance))
            if instance_map is not None:
                instance_map.add(number, instance.score, mask)
            if overlay is not None:
                overlay.add(mask, instance.box, f"{instance.label} {instance.score:.2f}")
    if instance_map is not None:
        rendered.files["instance_map"] = instance_map.png()
    if "cutout" in wanted:
        rendered.files["cutout"] = cutout_png(pixels, union)
    if overlay is not None:
        rendered.files["overlay"] = overlay.jpeg()
    return rendered
