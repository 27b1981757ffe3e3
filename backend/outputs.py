"""What a request's `outputs` add to its answer (docs/api-contract.md, Outputs): polygons per instance, and the
task's instance map, cut-out and preview files, stored beside the mask PNG under keys derived from its key.

renderers/ draws them; this module decides what to draw from which instances, runs it off the event loop, and names
and stores the files. One set of files per task: a batch's are drawn from every prompt's instances together.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from backend.api_models import TaskOptions
from backend.protocol import unpack_mask
from renderers import NEEDS_IMAGE, NEEDS_INSTANCE_MASKS, Drawable, render
from sam3_runner import decode_image
from storage import ObjectStore, StoredObject


@dataclass(frozen=True)
class FileOutput:
    suffix: str  # replaces the mask key's ".png"
    content_type: str
    field: str  # in the response's `outputs`


FILE_OUTPUTS = {
    "instance_map": FileOutput(".instances.png", "image/png", "instance_map_url"),
    "cutout": FileOutput(".cutout.png", "image/png", "cutout_url"),
    "overlay": FileOutput(".overlay.jpg", "image/jpeg", "overlay_url"),
}


@dataclass
class TaskOutputs:
    polygons: list[list[list[dict]]] | None  # per prompt, per instance; None when not asked
    urls: dict[str, str]  # the response's `outputs` ({"overlay_url": ...}); empty when no file was asked
    render_ms: float | None  # drawing time; None when nothing was drawn


def model_needs_rle(request: TaskOptions) -> bool:
    """Whether the model service must encode each instance's mask: for the `rle` key, or to draw from it."""
    wanted = request.wanted_outputs
    return "rle" in wanted or bool(wanted & NEEDS_INSTANCE_MASKS)


def output_key(mask_key: str, output: str) -> str:
    """masks/u/t.png -> masks/u/t.instances.png, .cutout.png, .overlay.jpg: the same task always writes the same
    objects."""
    return mask_key.removesuffix(".png") + FILE_OUTPUTS[output].suffix


class OutputMaker:
    """store: where the files go; max_image_pixels: the decode limit the model used; guard: turns storage failures
    into the contract's errors (backend.pipeline.guard)."""

    def __init__(self, store: ObjectStore, max_image_pixels: int, guard: Callable[[Awaitable], Awaitable]) -> None:
        self.store = store
        self.max_image_pixels = max_image_pixels
        self.guard = guard

    async def make(
        self, request: TaskOptions, image: bytes, results: list[dict], labels: list[str], union: dict, mask_key: str
    ) -> TaskOutputs:
        """Draws and stores what the request asks for. results: the model's per-prompt results (with RLEs when
        model_needs_rle), labels: one per prompt, union: every prompt's union (packed, as the model sends it),
        mask_key: the task's union mask key."""
        wanted = request.wanted_outputs
        if not wanted - {"rle"}:
            return TaskOutputs(polygons=None, urls={}, render_ms=None)
        clock = time.perf_counter()
        instances = [
            Drawable(rle=instance["rle"], score=instance["score"], box=instance["box"], label=label)
            for result, label in zip(results, labels, strict=True)
            for instance in result["instances"]
        ]
        rendered = await asyncio.to_thread(
            lambda: render(
                instances,
                tuple(union["image_size"]),
                wanted,
                request.polygon_tolerance,
                pixels=self._pixels(image) if wanted & NEEDS_IMAGE else None,
                union=unpack_mask(union) if "cutout" in wanted else None,
            )
        )
        render_ms = round((time.perf_counter() - clock) * 1000, 3)
        stored: list[StoredObject] = await asyncio.gather(
            *(self._put(output_key(mask_key, name), data, name) for name, data in rendered.files.items())
        )
        urls = {FILE_OUTPUTS[name].field: item.url for name, item in zip(rendered.files, stored, strict=True)}
        return TaskOutputs(polygons=_per_prompt(rendered.polygons, results), urls=urls, render_ms=render_ms)

    def _pixels(self, image: bytes) -> np.ndarray:
        """The image as the model saw it (RGB, EXIF orientation applied): the model service decoded the same bytes.
        Pillow decodes here (device None): the same pixels as the model's decoder, and no torch in the gateway."""
        return np.asarray(decode_image(image, self.max_image_pixels, device=None).pixels)

    async def _put(self, key: str, data: bytes, output: str) -> StoredObject:
        return await self.guard(asyncio.to_thread(self.store.put_object, key, data, FILE_OUTPUTS[output].content_type))


def _per_prompt(polygons: list | None, results: list[dict]) -> list[list] | None:
    if polygons is None:
        return None
    counts = np.cumsum([0] + [len(result["instances"]) for result in results])
    return [polygons[start:stop] for start, stop in zip(counts[:-1], counts[1:], strict=True)]
