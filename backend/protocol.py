"""What travels between the gateway and the model service (pickled by BentoML): plain dicts built here only.

The image travels encoded (a JPEG is ~20x smaller than its pixels; bench/transport.py measures it) and is
decoded in the model service; union masks travel bit-packed (8x smaller than bool).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from sam3_runner import BoxPrompt, Prompt, PromptResult


def make_item(image: bytes, prompts: list[Prompt], max_pixels: int, image_identity: str | None = None) -> dict:
    """`image_identity`: the stored object's identity and version (equal identities, equal bytes), under which the
    model service caches the image's encoding; None (not a stored object) is never cached."""
    return {
        "image": image,
        "prompts": [asdict(prompt) for prompt in prompts],
        "max_pixels": max_pixels,
        "image_identity": image_identity,
    }


def addressed(item: dict, request_id: str, deadline: float) -> dict:
    """The item as sent: with the id a later `cancel` names, and the wall-clock time (time.time()) after which
    nobody waits for it (backend/cancellation.py)."""
    return {**item, "request_id": request_id, "deadline": deadline}


def item_prompts(item: dict) -> list[Prompt]:
    return [
        Prompt(**{**fields, "boxes": tuple(BoxPrompt(**box) for box in fields["boxes"])}) for fields in item["prompts"]
    ]


def success(results: list[PromptResult], decode_ms: float) -> dict:
    return {
        "ok": True,
        "results": [
            {
                "instances": [
                    {"score": i.score, "box": list(i.box), "area": i.area, "rle": i.rle} for i in result.instances
                ],
                "mask_bits": np.packbits(result.union_mask, axis=None).tobytes(),
                "image_size": list(result.image_size),
                "timings": {**result.timings_ms, "decode": round(decode_ms, 3)},
                "cache": "hit" if result.cached_image else "miss",
            }
            for result in results
        ],
    }


def failure(code: str, message: str) -> dict:
    return {"ok": False, "error": {"code": code, "message": message}}


def unpack_mask(result: dict) -> np.ndarray:
    width, height = result["image_size"]
    bits = np.frombuffer(result["mask_bits"], dtype=np.uint8)
    return np.unpackbits(bits, count=width * height).reshape(height, width).astype(bool)


def union_of(results: list[dict]) -> dict:
    """The union of several results' masks (one image), OR-ed in their packed form: 8x less data than bool."""
    packed = [np.frombuffer(result["mask_bits"], dtype=np.uint8) for result in results]
    return {"mask_bits": np.bitwise_or.reduce(packed).tobytes(), "image_size": results[0]["image_size"]}


def box_prompts(boxes: list) -> tuple[BoxPrompt, ...]:
    return tuple(BoxPrompt(b.x1, b.y1, b.x2, b.y2, positive=b.label == "positive") for b in boxes)
