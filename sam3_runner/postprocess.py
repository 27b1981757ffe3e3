"""Model outputs -> kept instances, on the model's device; only the kept masks are upsampled and copied back.

On a GPU every kept mask of a head call is rendered in passes of MASKS_PER_GPU_PASS, across prompts: with 32
prompts of a few instances each, per-prompt work (a resize, an RLE pass and several host syncs per prompt) would
cost more than the pixels themselves. On the CPU one mask at a time is fastest: a full-HD mask's float
temporaries (8 MB) stay in cache (32 prompts x 3 instances at 1080p, 2 cores: 1.13 s per prompt, 1.57 s 32 per
pass, 0.91 s one per pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sam3_runner.rle import encode_rle
from sam3_runner.transfer import to_device
from sam3_runner.types import Instance

# Masks resized, encoded and OR-ed per GPU pass at full HD or smaller: ~270 MB of float temporaries. Larger images
# get proportionally fewer masks per pass (a 50 MP image: one), so a pass never needs more.
MASKS_PER_GPU_PASS = 32
FULL_HD_PIXELS = 1920 * 1080


@dataclass
class KeptQueries:
    """The queries that passed each pair's threshold and top-k, flattened over pairs (pair-major, best first)."""

    counts: list[int]  # per pair
    scores: torch.Tensor  # [N]
    boxes: torch.Tensor  # [N, 4] normalised xyxy
    mask_logits: torch.Tensor  # [N, h, w]


@dataclass
class RenderedPair:
    instances: list[Instance]
    union_mask: np.ndarray  # HxW bool


def select_queries(
    pred_logits: torch.Tensor,  # [P, Q]
    presence_logits: torch.Tensor,  # [P, 1]
    pred_boxes: torch.Tensor,  # [P, Q, 4]
    pred_masks: torch.Tensor,  # [P, Q, h, w]
    thresholds: torch.Tensor,  # [P]
    max_instances: torch.Tensor,  # [P]
) -> KeptQueries:
    """score = sigmoid(logit) x sigmoid(presence); keep score > threshold, at most max_instances, best first."""
    scores = pred_logits.float().sigmoid() * presence_logits.float().sigmoid()
    sorted_scores, order = scores.sort(dim=1, descending=True)
    rank = torch.arange(scores.shape[1], device=scores.device)
    keep = (sorted_scores > thresholds[:, None]) & (rank[None, :] < max_instances[:, None])
    pair_index, rank_index = keep.nonzero(as_tuple=True)
    query_index = order[pair_index, rank_index]
    return KeptQueries(
        counts=keep.sum(dim=1).tolist(),
        scores=sorted_scores[pair_index, rank_index],
        boxes=pred_boxes[pair_index, query_index].float(),
        mask_logits=pred_masks[pair_index, query_index],
    )


def masks_per_pass(device: torch.device) -> int:
    return MASKS_PER_GPU_PASS if device.type == "cuda" else 1


def render_pairs(
    kept: KeptQueries, sizes: list[tuple[int, int]], mask_thresholds: list[float], per_pass: int
) -> list[RenderedPair]:
    """Kept queries -> each pair's instances (original-size boxes, areas, RLEs) and union mask.

    sizes are (height, width) per pair. Up to per_pass consecutive masks of one size share a pass; only the
    areas, RLE strings, scores, boxes and union masks reach the host. A query whose mask is empty at the image's
    size (a small image samples few points of the logits; a high mask threshold) is no instance and is dropped,
    so a pair may hold fewer instances than it kept queries; it adds nothing to the union either.
    """
    owner = [pair for pair, count in enumerate(kept.counts) for _ in range(count)]
    mask_sizes = [sizes[pair] for pair in owner]
    unions: list[torch.Tensor | None] = [None] * len(sizes)
    areas: list[torch.Tensor] = []
    rles: list[dict] = []
    for start, stop in _passes(mask_sizes, per_pass):
        height, width = mask_sizes[start]
        thresholds = _on_device([mask_thresholds[pair] for pair in owner[start:stop]], kept.mask_logits.device)
        masks = upsample_masks(kept.mask_logits[start:stop], height, width, thresholds)
        areas.append(torch.count_nonzero(masks, dim=(1, 2)))
        rles += encode_rle(masks)
        for pair, first, last in _runs(owner, start, stop):
            piece = masks[first - start : last - start].any(dim=0)
            unions[pair] = piece if unions[pair] is None else unions[pair] | piece

    scale = _on_device([[w, h, w, h] for h, w in mask_sizes], kept.boxes.device).reshape(-1, 4)
    boxes = torch.minimum((kept.boxes * scale).clamp(min=0), scale).tolist()
    instances = [
        Instance(score=float(score), box=tuple(round(float(v), 2) for v in box), area=int(area), rle=rle)
        for score, box, area, rle in zip(
            kept.scores.tolist(), boxes, torch.cat(areas).tolist() if areas else [], rles, strict=True
        )
    ]
    rendered, offset = [], 0
    for pair, count in enumerate(kept.counts):
        union = unions[pair]
        union_mask = union.cpu().numpy() if union is not None else np.zeros(sizes[pair], dtype=bool)
        kept_instances = [instance for instance in instances[offset : offset + count] if instance.area]
        rendered.append(RenderedPair(instances=kept_instances, union_mask=union_mask))
        offset += count
    return rendered


def upsample_masks(mask_logits: torch.Tensor, height: int, width: int, mask_thresholds: torch.Tensor) -> torch.Tensor:
    """Low-resolution mask logits [n, h, w] -> bool masks [n, H, W], as Meta's reference renders them.

    Meta resizes the LOGITS, then thresholds: `interpolate(masks, (H, W), mode="bilinear", align_corners=False)
    .sigmoid() > 0.5` (torch's default antialias=False) in sam3/model/sam3_image_processor.py,
    Sam3Processor._forward_grounding, and sam3/eval/postprocessors.py, PostProcessImage._process_masks.
    (transformers' post_process_instance_segmentation resizes sigmoid probabilities instead, which moves every
    edge.) The logits are resized in float32 and compared with logit(t) = log(t / (1 - t)) per mask
    (mask_thresholds [n], probabilities in [0, 1]): sigmoid(x) > t exactly when x > logit(t), so t = 0.5 is
    Meta's cut (x > 0) and mask_threshold keeps its meaning, without a full-resolution sigmoid. (Only a logit
    within ~9e-8 of the cut can differ from float32 sigmoid's rounding, far below the model's own agreement with
    Meta's.) torch.logit gives -inf at t = 0 (every pixel) and +inf at t = 1 (no pixel).
    """
    resized = F.interpolate(mask_logits.float()[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    return resized > torch.logit(mask_thresholds)[:, None, None]


def _passes(mask_sizes: list[tuple[int, int]], per_pass: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive masks of one size: per_pass of them up to full HD, fewer above."""
    ranges, start = [], 0
    for index in range(1, len(mask_sizes) + 1):
        height, width = mask_sizes[start]
        limit = max(1, min(per_pass, per_pass * FULL_HD_PIXELS // (height * width)))
        if index == len(mask_sizes) or index - start == limit or mask_sizes[index] != mask_sizes[start]:
            ranges.append((start, index))
            start = index
    return ranges


def _runs(owner: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """(pair, first, last) for each pair's masks within [start, stop)."""
    runs, first = [], start
    for index in range(start + 1, stop + 1):
        if index == stop or owner[index] != owner[first]:
            runs.append((owner[first], first, index))
            first = index
    return runs


def _on_device(values: list, device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=torch.float32), device)
