"""Model outputs -> kept instances, on the model's device; only the kept masks are upsampled and copied back.

On a GPU every kept mask of a head call is rendered in passes of MASKS_PER_GPU_PASS, across prompts: with 32
prompts of a few instances each, per-prompt work (a resize, an RLE pass and several host syncs per prompt) would
cost more than the pixels themselves. On the CPU one mask at a time is fastest: a full-HD mask's float
temporaries (8 MB) stay in cache (32 prompts x 3 instances at 1080p, 2 cores: 1.13 s per prompt, 1.57 s 32 per
pass, 0.91 s one per pass).
"""

from __future__ import annotations

from collections import deque
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
    """The queries that passed each pair's threshold and top-k, flattened over pairs (pair-major, best first).
    For visual prompts: each prompt's candidates, best first (see MaskRenderer's `candidates`)."""

    counts: list[int]  # per pair
    scores: torch.Tensor  # [N]
    boxes: torch.Tensor | None  # [N, 4] normalised xyxy; None: each instance's box is its mask's (candidates)
    mask_logits: torch.Tensor  # [N, h, w]

    @staticmethod
    def concat(parts: list[KeptQueries]) -> KeptQueries:
        """Several head calls' kept queries as one, pairs in order."""
        if len(parts) == 1:
            return parts[0]
        return KeptQueries(
            counts=[count for part in parts for count in part.counts],
            scores=torch.cat([part.scores for part in parts]),
            boxes=torch.cat([part.boxes for part in parts]),
            mask_logits=torch.cat([part.mask_logits for part in parts]),
        )

    def take(self, pairs: list[int]) -> KeptQueries:
        """The kept queries of these pairs (indices into `counts`), in that order."""
        starts = np.cumsum([0, *self.counts])
        rows = [row for pair in pairs for row in range(starts[pair], starts[pair + 1])]
        return self._rows(rows, [self.counts[pair] for pair in pairs])

    def _rows(self, rows: list[int], counts: list[int]) -> KeptQueries:
        index = to_device(torch.tensor(rows, dtype=torch.long), self.scores.device)
        return KeptQueries(
            counts=counts,
            scores=self.scores[index],
            boxes=None if self.boxes is None else self.boxes[index],
            mask_logits=self.mask_logits[index],
        )


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


def suppress_overlaps(
    kept: KeptQueries, mask_thresholds: list[float], ranks: list[int], iou_threshold: float
) -> tuple[KeptQueries, list[int]]:
    """Greedy mask non-maximum suppression over the kept queries of one image, whichever pair (prompt) each belongs
    to: best score first, a query is removed when its mask's IoU with a better query still kept is above
    `iou_threshold` (strictly: 1 removes nothing, since no IoU is above 1; 0 removes every query that shares a pixel
    with a better one).

    The masks are the low-resolution ones ([N, h, w] mask logits, 288 x 288 for SAM 3), on their device; only the
    scores and the [N, N] boolean overlap matrix reach the host. Each mask is binarised as it is rendered:
    logit > logit(t) at its pair's mask_threshold t (mask_thresholds, per pair). This is Meta's mask NMS
    (sam3/perflib/nms.py, nms_masks, which SAM 3's detector runs on its low-resolution masks), whose cut,
    logit > 0, is t = 0.5, the default. IoU is |A and B| / |A or B| with the union clamped to 1, so two empty
    masks have IoU 0 (Meta's sam3/perflib/masks_ops.py, mask_iou); a query is removed when IoU > iou_threshold
    (Meta's generic_nms keeps IoU <= threshold, as torchvision.ops.nms does with box IoU). The intersections are
    one float32 matrix product of 0/1 masks: exact integers up to 2^24 pixels.

    Ties in score go to the pair of lower rank (`ranks`, per pair: e.g. each prompt's index in its job), then to
    the earlier query of the pair. Returns the queries left (pairs in order, each still best first) and, per
    pair, how many were removed.
    """
    pairs = len(kept.counts)
    owner = np.repeat(np.arange(pairs), kept.counts)
    if not len(owner):
        return kept, [0] * pairs
    device = kept.mask_logits.device
    cuts = torch.logit(_on_device([mask_thresholds[pair] for pair in owner], device))
    masks = (kept.mask_logits.float() > cuts[:, None, None]).flatten(1).float()
    intersections = masks @ masks.T
    areas = masks.sum(dim=1)
    iou = intersections / (areas[:, None] + areas[None, :] - intersections).clamp(min=1)
    overlaps = (iou > iou_threshold).cpu().numpy()
    np.fill_diagonal(overlaps, False)
    scores = kept.scores.float().cpu().numpy()
    order = np.lexsort((np.arange(len(owner)), np.asarray(ranks)[owner], -scores))  # the last key sorts first
    removed = np.zeros(len(owner), dtype=bool)
    for index in order:
        if not removed[index]:  # no better query kept overlaps it: it stays, and removes the worse ones it overlaps
            removed |= overlaps[index]
    left = np.flatnonzero(~removed)
    counts = np.bincount(owner[left], minlength=pairs).tolist()
    return kept._rows(left.tolist(), counts), np.bincount(owner[removed], minlength=pairs).tolist()


def masks_per_pass(device: torch.device) -> int:
    return MASKS_PER_GPU_PASS if device.type == "cuda" else 1


def pixels_per_slice(device: torch.device) -> int:
    """The mask pixels of one post-processing slice: a GPU pass (32 full-HD masks) on a GPU, one full-HD mask on the
    CPU. A slice renders at least one pass, so a larger mask is a slice of its own."""
    return masks_per_pass(device) * FULL_HD_PIXELS


def render_pairs(
    kept: KeptQueries,
    sizes: list[tuple[int, int]],
    mask_thresholds: list[float],
    per_pass: int,
    with_rle: list[bool] | None = None,
) -> list[RenderedPair]:
    """Kept queries -> each pair's instances (original-size boxes, areas, RLEs) and union mask, in one go.

    sizes are (height, width) per pair. Up to per_pass consecutive masks of one size share a pass; only the
    areas, RLE strings, scores, boxes and union masks reach the host. A query whose mask is empty at the image's
    size (a small image samples few points of the logits; a high mask threshold) is no instance and is dropped,
    so a pair may hold fewer instances than it kept queries; it adds nothing to the union either. with_rle: per
    pair, whether its instances get an RLE (None: all); the others' RLEs are not computed and are None.
    """
    renderer = MaskRenderer(kept, sizes, mask_thresholds, per_pass, with_rle)
    renderer.render()
    return renderer.result()


class MaskRenderer:
    """render_pairs in slices: each `render(max_pixels)` renders the next passes, so a caller can stop between
    slices (the job was abandoned) or let other work use the device in between. Any slicing gives the same
    result as rendering in one go; full-resolution masks live for one pass only.

    `candidates`: each pair's instances are alternative masks of one object (a visual prompt's 1 or 3 candidates,
    best first), not detections: the union mask is the first (best) one's, an instance whose mask is empty stays
    (the answer always has every candidate), and each box is its mask's, COCO's way (pycocotools.mask.toBbox:
    x1, y1 = the first foreground column and row, x2, y2 = one past the last; all 0 for an empty mask).
    """

    def __init__(
        self,
        kept: KeptQueries,
        sizes: list[tuple[int, int]],
        mask_thresholds: list[float],
        per_pass: int,
        with_rle: list[bool] | None = None,
        candidates: bool = False,
    ) -> None:
        self._kept = kept
        self._sizes = sizes
        self._mask_thresholds = mask_thresholds
        self._with_rle = with_rle if with_rle is not None else [True] * len(sizes)
        self._candidates = candidates
        self._mask_boxes: list[torch.Tensor] = []
        self._owner = [pair for pair, count in enumerate(kept.counts) for _ in range(count)]
        self._mask_sizes = [sizes[pair] for pair in self._owner]
        self._passes = deque(_passes(self._mask_sizes, per_pass))
        self._unions: list[torch.Tensor | None] = [None] * len(sizes)
        self._areas: list[torch.Tensor] = []
        self._rles: list[dict | None] = []
        self._dropped: set[int] = set()

    @property
    def done(self) -> bool:
        return not self._passes

    def render(self, max_pixels: int | None = None) -> int:
        """Render the next pass, then more while this slice's mask pixels stay within max_pixels (None: all).
        Returns the mask pixels rendered."""
        pixels = 0
        while self._passes:
            start, stop = self._passes[0]
            height, width = self._mask_sizes[start]
            size = (stop - start) * height * width
            if pixels and max_pixels is not None and pixels + size > max_pixels:
                break
            self._passes.popleft()
            if all(self._owner[index] in self._dropped for index in range(start, stop)):
                self._skip(start, stop)
            else:
                self._render_pass(start, stop)
                pixels += size
        return pixels

    def drop(self, pairs: set[int]) -> None:
        """Stop rendering these pairs (their job was abandoned): later passes that hold only their masks are skipped,
        and result() has None for them."""
        self._dropped |= pairs

    def _render_pass(self, start: int, stop: int) -> None:
        kept, owner = self._kept, self._owner
        height, width = self._mask_sizes[start]
        thresholds = _on_device([self._mask_thresholds[pair] for pair in owner[start:stop]], kept.mask_logits.device)
        masks = upsample_masks(kept.mask_logits[start:stop], height, width, thresholds)
        self._areas.append(torch.count_nonzero(masks, dim=(1, 2)))
        self._rles += self._encode(masks, start, stop)
        if self._candidates:
            self._mask_boxes.append(mask_boxes(masks))
        for pair, first, last in _runs(owner, start, stop):
            if self._candidates:  # the best candidate alone, once: the first of its pair
                if first > 0 and owner[first - 1] == pair:
                    continue
                last = first + 1
            piece = masks[first - start : last - start].any(dim=0)
            union = self._unions[pair]
            self._unions[pair] = piece if union is None else union | piece

    def _encode(self, masks: torch.Tensor, start: int, stop: int) -> list[dict | None]:
        """RLEs of the pass's masks whose pair wants them (None for the others): consecutive masks with the same wish
        are encoded together, so a pass of RLE-wanting pairs is one encoding call as before."""
        wants = [self._with_rle[pair] for pair in self._owner[start:stop]]
        rles: list[dict | None] = []
        first = 0
        for index in range(1, len(wants) + 1):
            if index == len(wants) or wants[index] != wants[first]:
                rles += encode_rle(masks[first:index]) if wants[first] else [None] * (index - first)
                first = index
        return rles

    def _skip(self, start: int, stop: int) -> None:
        self._areas.append(torch.zeros(stop - start, dtype=torch.long, device=self._kept.mask_logits.device))
        self._rles += [None] * (stop - start)
        if self._candidates:
            self._mask_boxes.append(torch.zeros(stop - start, 4, device=self._kept.mask_logits.device))

    def result(self) -> list[RenderedPair | None]:
        """Each pair's instances and union mask (None for a dropped pair), once `done`."""
        if not self.done:
            raise RuntimeError("render() has passes left")
        kept, sizes = self._kept, self._sizes
        if self._candidates:
            boxes = torch.cat(self._mask_boxes).tolist() if self._mask_boxes else []
        else:
            scale = _on_device([[w, h, w, h] for h, w in self._mask_sizes], kept.boxes.device).reshape(-1, 4)
            boxes = torch.minimum((kept.boxes * scale).clamp(min=0), scale).tolist()
        areas = torch.cat(self._areas).tolist() if self._areas else []
        instances = [
            Instance(score=float(score), box=tuple(round(float(v), 2) for v in box), area=int(area), rle=rle)
            for score, box, area, rle in zip(kept.scores.tolist(), boxes, areas, self._rles, strict=True)
        ]
        rendered: list[RenderedPair | None] = []
        offset = 0
        for pair, count in enumerate(kept.counts):
            union = self._unions[pair]
            if pair in self._dropped:
                rendered.append(None)
            else:
                union_mask = union.cpu().numpy() if union is not None else np.zeros(sizes[pair], dtype=bool)
                pair_instances = instances[offset : offset + count]
                kept_instances = [i for i in pair_instances if i.area or self._candidates]
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


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Bool masks [n, H, W] -> float32 boxes [n, 4] xyxy in pixels, as pycocotools.mask.toBbox gives them in xywh:
    the first foreground column and row, and one past the last; all 0 for an empty mask."""
    rows = masks.any(dim=2)  # [n, H]
    columns = masks.any(dim=1)  # [n, W]
    height, width = masks.shape[1:]
    first = [columns.to(torch.uint8).argmax(dim=1), rows.to(torch.uint8).argmax(dim=1)]  # argmax: the first maximum
    last = [columns.flip(1).to(torch.uint8).argmax(dim=1), rows.flip(1).to(torch.uint8).argmax(dim=1)]
    boxes = torch.stack([first[0], first[1], width - last[0], height - last[1]], dim=1).float()
    return torch.where(rows.any(dim=1)[:, None], boxes, torch.zeros_like(boxes))


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
