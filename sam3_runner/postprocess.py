"""Model outputs -> kept instances, on the model's device; only the kept masks are upsampled and copied back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sam3_runner.rle import encode_rle
from sam3_runner.types import Instance

# Upsampling is done this many masks at a time, to bound memory at 200 full-resolution masks.
UPSAMPLE_CHUNK = 16


@dataclass
class KeptQueries:
    """The queries that passed each pair's threshold and top-k, flattened over pairs (pair-major, best first)."""

    counts: list[int]  # per pair
    scores: torch.Tensor  # [N]
    boxes: torch.Tensor  # [N, 4] normalised xyxy
    mask_logits: torch.Tensor  # [N, h, w]


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


def upsample_masks(mask_logits: torch.Tensor, height: int, width: int, mask_threshold: float) -> torch.Tensor:
    """Low-resolution mask logits [n, h, w] -> bool masks [n, H, W] (probabilities resized, then thresholded)."""
    if mask_logits.shape[0] == 0:
        return torch.zeros((0, height, width), dtype=torch.bool, device=mask_logits.device)
    chunks = []
    for start in range(0, mask_logits.shape[0], UPSAMPLE_CHUNK):
        probabilities = mask_logits[start : start + UPSAMPLE_CHUNK].float().sigmoid()
        resized = F.interpolate(probabilities[None], size=(height, width), mode="bilinear", align_corners=False)[0]
        chunks.append(resized > mask_threshold)
    return torch.cat(chunks)


def scale_boxes(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
    limit = scale.clone()
    return torch.minimum((boxes * scale).clamp(min=0), limit)


def build_instances(
    scores: torch.Tensor, boxes: torch.Tensor, masks: torch.Tensor
) -> tuple[list[Instance], np.ndarray]:
    """Kept results for one prompt -> instances and their union mask, copying only kept data to the host."""
    areas = masks.sum(dim=(1, 2)).tolist()
    union = masks.any(dim=0) if masks.shape[0] else torch.zeros(masks.shape[1:], dtype=torch.bool, device=masks.device)
    rles = encode_rle(masks)
    instances = [
        Instance(score=float(score), box=tuple(round(float(v), 2) for v in box), area=int(area), rle=rle)
        for score, box, area, rle in zip(scores.tolist(), boxes.tolist(), areas, rles, strict=True)
    ]
    return instances, union.cpu().numpy()
