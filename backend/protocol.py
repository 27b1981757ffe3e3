"""What travels between the gateway and the model service (pickled by BentoML): plain dicts built here only.

The image travels encoded (a JPEG is ~20x smaller than its pixels; bench/transport.py measures it) and is
decoded in the model service; union masks travel bit-packed (8x smaller than bool).

A visual-prompt item (make_visual_item) has no concept prompts and a "visual" entry; its answer has one result (the
candidates, best first; mask_bits = the best one) and "mask_logits", the best candidate's low-resolution logits, in
the form a later item's "mask_input" takes (refinement: the gateway keeps them and sends them back as they came).
Logits travel as float16 (half the bytes; float16 holds the [-32, 32] range to ~0.016).
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from sam3_runner import BoxPrompt, PointPrompt, Prompt, PromptResult, VisualPrompt

LOGITS_DTYPE = "float16"
_LOGITS_BYTES = np.dtype("<f2")  # float16, little-endian on every machine


def make_item(
    image: bytes,
    prompts: list[Prompt],
    max_pixels: int,
    image_identity: str | None = None,
    nms_iou_threshold: float | None = None,
) -> dict:
    """`image_identity`: the stored object's identity and version (equal identities, equal bytes), under which the
    model service caches the image's encoding; None (not a stored object) is never cached. `nms_iou_threshold`:
    Job.nms_iou_threshold (None: off); each result then has "suppressed"."""
    return {
        "image": image,
        "prompts": [asdict(prompt) for prompt in prompts],
        "max_pixels": max_pixels,
        "image_identity": image_identity,
        "nms_iou_threshold": nms_iou_threshold,
    }


def make_visual_item(image: bytes, visual: VisualPrompt, max_pixels: int, image_identity: str | None = None) -> dict:
    """An item with one visual prompt: {"image", "max_pixels", "prompts": [], "visual": {"points": [{"x", "y",
    "positive"}], "box": {"x1", "y1", "x2", "y2", "positive"} | None, "mask_input": packed logits | None, "multimask",
    "mask_threshold", "include_rle"}, "image_identity"} (packed logits: see pack_logits; image_identity: as in
    make_item)."""
    return {
        "image": image,
        "max_pixels": max_pixels,
        "image_identity": image_identity,
        "prompts": [],
        "visual": {
            **object_fields(visual),
            "mask_input": None if visual.mask_input is None else pack_logits(visual.mask_input),
            "multimask": visual.multimask,
            "mask_threshold": visual.mask_threshold,
            "include_rle": visual.include_rle,
        },
    }


def item_visual(item: dict) -> VisualPrompt | None:
    """The item's visual prompt, None for a concept item."""
    fields = item.get("visual")
    if fields is None:
        return None
    points, box = object_of(fields)
    return VisualPrompt(
        points=points,
        box=box,
        mask_input=None if fields["mask_input"] is None else unpack_logits(fields["mask_input"]),
        multimask=fields["multimask"],
        mask_threshold=fields["mask_threshold"],
        include_rle=fields["include_rle"],
    )


def object_fields(visual: VisualPrompt) -> dict:
    """A visual prompt's points and box as they travel: {"points": [{"x", "y", "positive"}], "box": {"x1", "y1",
    "x2", "y2", "positive"} | None} (an image item's "visual", a clip's request)."""
    return {
        "points": [asdict(point) for point in visual.points],
        "box": None if visual.box is None else asdict(visual.box),
    }


def object_of(fields: dict) -> tuple[tuple[PointPrompt, ...], BoxPrompt | None]:
    """object_fields' dict -> (points, box)."""
    points = tuple(PointPrompt(**point) for point in fields["points"])
    return points, None if fields["box"] is None else BoxPrompt(**fields["box"])


def pack_logits(logits: np.ndarray) -> dict:
    """[h, w] logits -> {"shape": [h, w], "dtype": "float16", "data": bytes (little-endian, row-major)}."""
    return {"shape": list(logits.shape), "dtype": LOGITS_DTYPE, "data": logits.astype(_LOGITS_BYTES).tobytes()}


def unpack_logits(packed: dict) -> np.ndarray:
    """pack_logits' dict -> float32 [h, w]. Raises ValueError for another dtype or a size that does not match."""
    if packed["dtype"] != LOGITS_DTYPE:
        raise ValueError(f"mask logits must be {LOGITS_DTYPE}, not {packed['dtype']!r}")
    return np.frombuffer(packed["data"], dtype=_LOGITS_BYTES).reshape(packed["shape"]).astype(np.float32)


def addressed(item: dict, request_id: str, deadline: float) -> dict:
    """The item as sent: with the id a later `cancel` names, and the wall-clock time (time.time()) after which
    nobody waits for it (backend/cancellation.py)."""
    return {**item, "request_id": request_id, "deadline": deadline}


def item_prompts(item: dict) -> list[Prompt]:
    return [
        Prompt(**{**fields, "boxes": tuple(BoxPrompt(**box) for box in fields["boxes"])}) for fields in item["prompts"]
    ]


def success(results: list[PromptResult], decode_ms: float) -> dict:
    """The answer of an item: one result per concept prompt, or a visual prompt's one result plus "mask_logits".
    A result has "suppressed" (an int) only when its item asked for nms_iou_threshold."""
    answer = {
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
                **({} if result.suppressed is None else {"suppressed": result.suppressed}),
            }
            for result in results
        ],
    }
    if len(results) == 1 and results[0].mask_logits is not None:
        answer["mask_logits"] = pack_logits(results[0].mask_logits)
    return answer


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


def object_prompt(points: list, box, **options) -> VisualPrompt:
    """A request's taps (api_models.Point) and box (api_models.ObjectBox or None) as the model's VisualPrompt;
    `options`: its other fields (mask_input, multimask, mask_threshold, include_rle)."""
    return VisualPrompt(
        points=tuple(PointPrompt(p.x, p.y, positive=p.label == "positive") for p in points),
        box=BoxPrompt(box.x1, box.y1, box.x2, box.y2) if box else None,
        **options,
    )
