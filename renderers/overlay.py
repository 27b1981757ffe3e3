"""A preview of the result: the image, at most 1024 pixels on its long side, with each instance's mask tinted in a
colour of its own, its outline, its box and a "label score" caption, drawn by supervision's annotators (the look of
Roboflow's tools) with its default palette (sv.ColorPalette.DEFAULT, one colour per instance in turn).

Captions use Pillow's built-in font (Latin letters, digits and punctuation; other scripts show as empty boxes).
"""

from __future__ import annotations

import cv2
import numpy as np
import supervision as sv
from supervision.detection.compact_mask import CompactMask

from renderers.instances import InstanceMask

MAX_SIDE = 1024
JPEG_QUALITY = 85
MAX_CAPTION_CHARS = 40  # longer labels are cut (with "…") so a caption never covers the preview
# Up to this many instances, captions are moved inside the image and apart from each other (supervision's
# smart_position); its cost grows faster than the count (50 labels: 39 ms, 200: 0.7 s, 1000: 13 s on 2 cores), so
# beyond it each caption stays above its box's top-left corner.
SPREAD_CAPTIONS_UP_TO = 50


class Overlay:
    """Built instance by instance: each mask is shrunk to the preview's scale as it is added, so the overlay never
    holds a full-size mask per instance."""

    def __init__(self, pixels: np.ndarray) -> None:
        """pixels: H x W x 3 uint8 RGB, display orientation."""
        height, width = pixels.shape[:2]
        self.scale = min(1.0, MAX_SIDE / max(height, width))
        self.size = (max(1, round(width * self.scale)), max(1, round(height * self.scale)))  # (width, height)
        scene = cv2.resize(pixels, self.size, interpolation=cv2.INTER_AREA) if self.scale < 1 else pixels
        self._scene = cv2.cvtColor(scene, cv2.COLOR_RGB2BGR)  # supervision draws on OpenCV's BGR images
        self._masks: list[CompactMask] = []
        self._boxes: list[list[float]] = []
        self._captions: list[str] = []
        self._colours: list[int] = []  # each drawn instance's place among the added ones: its palette colour
        self._added = 0

    def add(self, mask: InstanceMask, box: list[float], caption: str, colour: int | None = None) -> None:
        """box: xyxy in original-image pixels; caption: e.g. "cat 0.93"; colour: the index of the instance's colour in
        the palette (taken modulo its length), by default its place among the added instances. An empty mask (a
        visual candidate with no pixel above mask_threshold) is not drawn; the instances after it keep the colours of
        their places."""
        self._added += 1
        if mask.pixels.size == 0:
            return
        self._colours.append(self._added - 1 if colour is None else colour)
        width, height = self.size
        left, top = round(mask.x * self.scale), round(mask.y * self.scale)
        right = min(width, max(left + 1, round((mask.x + mask.pixels.shape[1]) * self.scale)))
        bottom = min(height, max(top + 1, round((mask.y + mask.pixels.shape[0]) * self.scale)))
        left, top = min(left, width - 1), min(top, height - 1)
        shrunk = cv2.resize(mask.pixels.view(np.uint8), (right - left, bottom - top), interpolation=cv2.INTER_AREA)
        canvas = np.zeros((1, height, width), dtype=bool)
        canvas[0, top:bottom, left:right] = shrunk > 0  # INTER_AREA rounds each area's mean of 0s and 1s
        box_in_preview = np.array([[left, top, right - 1, bottom - 1]])  # supervision's xyxy: inclusive
        self._masks.append(CompactMask.from_dense(canvas, box_in_preview, (height, width)))
        self._boxes.append([value * self.scale for value in box])
        self._captions.append(caption if len(caption) <= MAX_CAPTION_CHARS else caption[: MAX_CAPTION_CHARS - 1] + "…")

    def jpeg(self) -> bytes:
        """The preview as a JPEG (quality 85), `size` pixels; with no instance, the image alone."""
        ok, encoded = cv2.imencode(".jpg", self.draw(), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError("OpenCV could not encode the overlay as JPEG")
        return encoded.tobytes()

    def draw(self) -> np.ndarray:
        """The preview: `size` pixels, H x W x 3 uint8 BGR (OpenCV's order); with no instance, the image alone."""
        scene = self._scene.copy()
        if self._masks:
            detections = sv.Detections(
                xyxy=np.array(self._boxes, dtype=np.float32), mask=CompactMask.merge(self._masks)
            )
            font_size = max(12, round(max(self.size) / 64))
            colours = np.array(self._colours)
            scene = sv.MaskAnnotator().annotate(scene, detections, custom_color_lookup=colours)
            scene = sv.PolygonAnnotator(thickness=2).annotate(scene, detections, custom_color_lookup=colours)
            scene = sv.BoxAnnotator(thickness=2).annotate(scene, detections, custom_color_lookup=colours)
            labels = sv.RichLabelAnnotator(
                font_size=font_size,
                text_padding=font_size // 3,
                smart_position=len(self._captions) <= SPREAD_CAPTIONS_UP_TO,
            )
            scene = labels.annotate(scene, detections, labels=self._captions, custom_color_lookup=colours)
        return scene
