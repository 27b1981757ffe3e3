"""Visual prompts (SAM's promptable visual segmentation): points / a box / a previous answer's mask -> one object's
1 or 3 candidate masks, answered from the ViT trunk output the detector's vision pass already computed.

Per image (Meta's Sam3Image.predict_inst, sam3/model/sam3_image.py; the neck as in transformers'
Sam3VideoModel.get_vision_features_for_tracker):
- the tracker's own FPN neck (`tracker_neck`, Meta's `sam2_convs`) on the trunk output, at 4x, 2x and 1x the patch
  grid; its 0.5x level is not computed (Meta's tracker drops it: `scalp=1`);
- the mask decoder's conv_s0 / conv_s1 on the 4x and 2x levels: its high-resolution features;
- the no-memory embedding added to the 1x level, the image embedding, as Meta's predict_inst does (transformers 5.17's
  Sam3TrackerModel adds it to the 0.5x level, which it then drops: there it has no effect).
Per prompt (transformers' Sam3TrackerProcessor + Sam3TrackerModel.forward):
- points and box corners scaled to the model's square input exactly as the processor does (x * size / width,
  y * size / height, float32); point labels 1 (positive) and 0 (negative); a prompt with neither points nor box gets
  one point of label -1 (not a point), as the model's forward gives it;
- a previous answer's low-resolution logits as the dense prompt, resized (bilinear, antialiased, as the forward
  does) when they are not at the prompt encoder's mask size;
- candidates sorted by predicted IoU, best first; the best one's logits come back clamped to [-32, 32] (Meta's
  SAM3InteractiveImagePredictor._predict) for the next refinement step.

Batching: prompts of different requests and images share one prompt-encoder + mask-decoder call when they have
the same token layout (number of points, box or not, mask or not, 1 or 3 candidates). They are not padded to one
layout: transformers' padding points (label -10) are zero vectors that still take part in the decoder's attention,
so padding would change a prompt's answer (one point padded to two, demo weights with logits ~1: up to 0.38 in a
mask logit, 0.03 in the predicted IoU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Sam3TrackerVideoModel
from transformers.models.sam3.modeling_sam3 import Sam3VisionNeck

from sam3_runner.postprocess import KeptQueries, MaskRenderer, masks_per_pass, pixels_per_slice
from sam3_runner.transfer import to_device
from sam3_runner.types import Job, PromptResult, VisualPrompt

NOT_A_POINT = -1  # the label of the point a prompt without points or box gets (transformers' forward, Meta's encoder)
LOGIT_LIMIT = 32.0  # Meta clamps the low-resolution logits it hands back for refinement to [-32, 32]
TRACKER_LEVELS = 3  # 4x, 2x, 1x: the tracker's neck levels Meta keeps


class VisualPromptsUnavailable(RuntimeError):
    """The loaded weights hold no tracker (a detector-only checkpoint): only concept prompts can be answered."""


@dataclass
class _Features:
    image: torch.Tensor  # [images, C, g, g] (g = the patch grid, 72 at full size), no-memory embedding added
    high_resolution: list[torch.Tensor]  # [images, C/8, 4g, 4g], [images, C/4, 2g, 2g]


class VisualSegmenter:
    """The tracker's prompt encoder and mask decoder on the detector's trunk output (see the module docstring)."""

    def __init__(
        self, tracker: Sam3TrackerVideoModel, neck: Sam3VisionNeck, input_size: int, device: torch.device
    ) -> None:
        self._tracker = tracker
        self._levels = neck.fpn_layers[:TRACKER_LEVELS]
        self._input_size = input_size  # the image processor's square size: Sam3TrackerProcessor's target_size
        self._device = device
        self._dtype = tracker.no_memory_embedding.dtype

    def candidates(self, jobs: Sequence[Job], trunk: torch.Tensor) -> KeptQueries:
        """Each job's candidates, best first: counts [jobs] (1 or 3 each), scores [N] (predicted IoU), boxes None,
        mask_logits [N, 4g, 4g]. `trunk` is the ViT trunk output of the jobs' images, in job order:
        Sam3VisionEncoderOutput.last_hidden_state, [jobs, g * g, hidden]."""
        features = self._features(trunk)
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(_layout(job.visual), []).append(index)
        scores: list[torch.Tensor | None] = [None] * len(jobs)
        logits: list[torch.Tensor | None] = [None] * len(jobs)
        for members in groups.values():
            group_logits, group_scores = self._decode([jobs[index] for index in members], members, features)
            for row, index in enumerate(members):
                scores[index], logits[index] = group_scores[row], group_logits[row]
        return KeptQueries(
            counts=[len(job_scores) for job_scores in scores],
            scores=torch.cat(scores).float(),
            boxes=None,
            mask_logits=torch.cat(logits),
        )

    def render(
        self, jobs: Sequence[Job], kept: KeptQueries, wanted: Callable[[int], bool]
    ) -> list[PromptResult | None]:
        """Candidates -> each job's PromptResult (instances best first, union = the best mask, the best candidate's
        low-resolution logits), with the concept path's renderer; `wanted(job index)` is asked between slices and a
        job it refuses gets None."""
        sizes = [job.size for job in jobs]
        renderer = MaskRenderer(
            kept,
            sizes,
            [job.visual.mask_threshold for job in jobs],
            masks_per_pass(self._device),
            [job.visual.include_rle for job in jobs],
            candidates=True,
        )
        while not renderer.done:
            renderer.drop({index for index in range(len(jobs)) if not wanted(index)})
            renderer.render(pixels_per_slice(self._device))
        firsts = np.cumsum([0, *kept.counts[:-1]])
        best = kept.mask_logits[to_device(torch.as_tensor(firsts), kept.mask_logits.device)]
        best = best.float().clamp(-LOGIT_LIMIT, LOGIT_LIMIT).cpu().numpy()
        return [
            None
            if pair is None
            else PromptResult(
                instances=pair.instances, union_mask=pair.union_mask, image_size=(width, height), mask_logits=logits
            )
            for pair, (height, width), logits in zip(renderer.result(), sizes, best, strict=True)
        ]

    def _features(self, trunk: torch.Tensor) -> _Features:
        images = trunk.shape[0]
        height, width = self._tracker.prompt_encoder.image_embedding_size
        spatial = trunk.view(images, height, width, -1).permute(0, 3, 1, 2)
        levels = [level(spatial) for level in self._levels]
        decoder = self._tracker.mask_decoder
        image = levels[2] + self._tracker.no_memory_embedding.view(1, -1, 1, 1)
        return _Features(image, [decoder.conv_s0(levels[0]), decoder.conv_s1(levels[1])])

    def _decode(self, jobs: list[Job], rows: list[int], features: _Features) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt-encoder + mask-decoder call for jobs of one layout: logits [jobs, K, 4g, 4g] and predicted
        IoUs [jobs, K], K = 1 or 3, each job's sorted best first."""
        tracker = self._tracker
        index = to_device(torch.tensor(rows), self._device)
        sparse, dense = tracker.prompt_encoder(*self._prompt_tensors(jobs))
        positional = tracker.get_image_wide_positional_embeddings().repeat(len(jobs), 1, 1, 1)
        logits, iou, _, _ = tracker.mask_decoder(
            image_embeddings=features.image.index_select(0, index),
            image_positional_embeddings=positional,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=jobs[0].visual.multimask,
            high_resolution_features=[level.index_select(0, index) for level in features.high_resolution],
        )
        scores, order = iou[:, 0].float().sort(dim=1, descending=True, stable=True)
        return logits[:, 0].gather(1, order[:, :, None, None].expand(-1, -1, *logits.shape[-2:])), scores

    def _prompt_tensors(self, jobs: list[Job]) -> tuple[torch.Tensor | None, ...]:
        """(points [n, 1, P, 2] float32, labels [n, 1, P], boxes [n, 1, 4] float32, masks [n, 1, 4g, 4g]) for the
        prompt encoder, None where the layout has none; coordinates in the model's input pixels."""
        visuals = [job.visual for job in jobs]
        sizes = [job.size for job in jobs]
        points = labels = boxes = masks = None
        if visuals[0].points:
            points = torch.stack(
                [
                    self._scaled(torch.tensor([[p.x, p.y] for p in visual.points], dtype=torch.float32), size)[None]
                    for visual, size in zip(visuals, sizes, strict=True)
                ]
            )
            labels = torch.tensor([[[1 if p.positive else 0 for p in visual.points]] for visual in visuals])
        elif visuals[0].box is None:
            points = torch.zeros(len(jobs), 1, 1, 2)
            labels = torch.full((len(jobs), 1, 1), NOT_A_POINT, dtype=torch.int32)
        if visuals[0].box is not None:
            boxes = torch.stack(
                [
                    self._scaled(
                        torch.tensor([[v.box.x1, v.box.y1], [v.box.x2, v.box.y2]], dtype=torch.float32), size
                    ).reshape(1, 4)
                    for v, size in zip(visuals, sizes, strict=True)
                ]
            )
        if visuals[0].mask_input is not None:
            masks = torch.cat([self._mask_prompt(visual.mask_input) for visual in visuals])
        return (
            None if points is None else to_device(points, self._device),
            None if labels is None else to_device(labels, self._device),
            None if boxes is None else to_device(boxes, self._device),
            None if masks is None else to_device(masks, self._device, self._dtype),
        )

    def _scaled(self, coordinates: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Original-image pixels [..., 2] (x, y) -> the model's input pixels, as Sam3TrackerProcessor computes them."""
        height, width = size
        coordinates = coordinates.clone()
        coordinates[..., 0] = coordinates[..., 0] * (self._input_size / width)
        coordinates[..., 1] = coordinates[..., 1] * (self._input_size / height)
        return coordinates

    def _mask_prompt(self, logits: np.ndarray) -> torch.Tensor:
        """[h, w] logits -> [1, 1, 4g, 4g] float32, resized as Sam3TrackerModel.forward resizes input_masks."""
        mask = torch.as_tensor(np.asarray(logits, dtype=np.float32))[None, None]
        size = self._tracker.prompt_encoder.mask_input_size
        if tuple(mask.shape[-2:]) != tuple(size):
            mask = F.interpolate(mask, size=size, mode="bilinear", align_corners=False, antialias=True)
        return mask


def _layout(visual: VisualPrompt) -> tuple[int, bool, bool, bool]:
    """What makes two prompts' decoder inputs stack: token count and kind, dense prompt, candidate count."""
    return len(visual.points), visual.box is not None, visual.mask_input is not None, visual.multimask
