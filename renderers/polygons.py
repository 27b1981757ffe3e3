"""An instance's mask -> its outlines: one polygon per separate part, with that part's holes (OpenCV).

Coordinates are original-image pixels in display orientation, as integers: a vertex [x, y] is the pixel in column
x, row y, i.e. the polygons run through the centres of the mask's boundary pixels (OpenCV's convention): an
exterior through the part's outermost pixels, a hole through the part's pixels that border the hole. Filling a
part's exterior and holes together, even-odd with the edges included (cv2.fillPoly(canvas, [exterior, *holes], 1)),
gives the part's pixels back (exactly at tolerance 0). To draw on a canvas whose pixel (x, y) spans [x, x + 1), add
0.5 to every coordinate.

Simplification is Douglas-Peucker (cv2.approxPolyDP) with `tolerance` pixels: no vertex of the outline moves further
than that from the simplified polygon. 0 keeps every corner of the traced outline (straight runs are still stored
as their two ends: cv2.CHAIN_APPROX_SIMPLE, lossless). A part 1 pixel thick that curves can lose up to its whole
width at tolerance 1 (a 1-pixel circle rasterises back with IoU 0.66): send 0 where such detail matters.
"""

from __future__ import annotations

import cv2
import numpy as np

from renderers.instances import InstanceMask

DEFAULT_TOLERANCE = 1.0

Point = list[int]


def polygons(mask: InstanceMask, tolerance: float = DEFAULT_TOLERANCE) -> list[dict[str, list]]:
    """The mask's parts: [{"exterior": [[x, y], ...], "holes": [[[x, y], ...], ...]}, ...].

    Parts are OpenCV's outer contours (8-connected pixels; a part inside another part's hole is a part of its own),
    in the order findContours traces them. A polygon may have 1 point (a single pixel) or 2 (a straight line
    1 pixel thick); its vertices go around it in no promised direction, so use the holes list or even-odd filling,
    not the winding. An empty mask has no parts.
    """
    if mask.pixels.size == 0:
        return []
    contours, hierarchy = cv2.findContours(
        mask.pixels.view(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=(mask.x, mask.y)
    )
    if hierarchy is None:
        return []
    links = hierarchy[0]  # per contour: next, previous, first child, parent (RETR_CCOMP: two levels)
    parts = []
    for index, contour in enumerate(contours):
        if links[index][3] != -1:  # a hole: listed with its part
            continue
        holes, child = [], links[index][2]
        while child != -1:
            holes.append(_simplified(contours[child], tolerance))
            child = links[child][0]
        parts.append({"exterior": _simplified(contour, tolerance), "holes": holes})
    return parts


def _simplified(contour: np.ndarray, tolerance: float) -> list[Point]:
    if tolerance > 0:
        contour = cv2.approxPolyDP(contour, tolerance, closed=True)
    return contour.reshape(-1, 2).tolist()
