"""Batched concept segmentation: many jobs (images x prompts) from many requests in one pass.

One vision forward for all distinct images, one text forward for the prompts not yet cached, and one
detector/mask-head call for every (image, prompt) pair, with the image features indexed per pair.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from sam3_runner.loading import LoadedModel
from sam3_runner.postprocess import build_instances, scale_boxes, select_queries, upsample_masks
from sam3_runner.text_cache import TextEmbeddingCache
from sam3_runner.types import Job, Prompt, PromptResult

TEXT_LENGTH = 32  # the processor's fixed text length; CLIP's context in SAM 3
PADDING_BOX_LABEL = -10


class Sam3Engine:
    def __init__(self, loaded: LoadedModel, text_cache_size: int = 1024, max_pairs_per_forward: int = 64) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.max_pairs_per_forward = max_pairs_per_forward
        self.text_cache = TextEmbeddingCache(self._encode_texts, text_cache_size)
        self._lock = threading.Lock()  # one batch at a time on the device

    def run(self, jobs: Sequence[Job]) -> list[list[PromptResult]]:
        """Segment every prompt of every job; results come back per job, per prompt, in order."""
        if not jobs:
            return []
        with self._lock, torch.inference_mode():
            return self._run(jobs)

    def _run(self, jobs: Sequence[Job]) -> list[list[PromptResult]]:
        clock = _StageClock(self.device)
        pixel_values = self._preprocess(jobs)
        clock.lap("preprocess")
        vision = self.model.get_vision_features(pixel_values=pixel_values)
        clock.lap("vision")

        pairs = [(job_index, prompt) for job_index, job in enumerate(jobs) for prompt in job.prompts]
        text_features, text_mask = self.text_cache.lookup([prompt.model_text for _, prompt in pairs])
        clock.lap("text")

        flat_results: list[PromptResult] = []
        heads_ms = postprocess_ms = 0.0
        for start in range(0, len(pairs), self.max_pairs_per_forward):
            chunk = pairs[start : start + self.max_pairs_per_forward]
            span = slice(start, start + len(chunk))
            outputs = self._heads(jobs, chunk, vision, text_features[span], text_mask[span])
            heads_ms += clock.lap("heads")
            flat_results.extend(self._postprocess(jobs, chunk, outputs))
            postprocess_ms += clock.lap("postprocess")

        timings = clock.totals()
        timings.update(heads=round(heads_ms, 3), postprocess=round(postprocess_ms, 3))
        timings["total"] = round(sum(timings.values()), 3)
        results: list[list[PromptResult]] = [[] for _ in jobs]
        for (job_index, _), result in zip(pairs, flat_results, strict=True):
            result.timings_ms = dict(timings)
            results[job_index].append(result)
        return results

    def _preprocess(self, jobs: Sequence[Job]) -> torch.Tensor:
        images = [torch.from_numpy(job.image).permute(2, 0, 1) for job in jobs]
        batch = self.processor.image_processor(images=images, return_tensors="pt", device=self.device)
        return batch["pixel_values"].to(device=self.device, dtype=self.dtype, non_blocking=True)

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.processor.tokenizer(
            texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        return features.pooler_output, tokens.attention_mask

    def _heads(self, jobs, pairs, vision: Sam3VisionEncoderOutput, text_features, text_mask):
        image_index = torch.tensor([job_index for job_index, _ in pairs], device=self.device)
        pair_vision = Sam3VisionEncoderOutput(
            last_hidden_state=vision.last_hidden_state.index_select(0, image_index),
            fpn_hidden_states=tuple(f.index_select(0, image_index) for f in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p.index_select(0, image_index) for p in vision.fpn_position_encoding),
        )
        boxes, labels = self._box_tensors(jobs, pairs)
        return self.model(
            vision_embeds=pair_vision,
            text_embeds=BaseModelOutputWithPooling(pooler_output=text_features),
            attention_mask=text_mask,
            input_boxes=boxes,
            input_boxes_labels=labels,
        )

    def _box_tensors(self, jobs, pairs: list[tuple[int, Prompt]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exemplar boxes as normalised cxcywh, padded with label -10.

        A text-only prompt still gets one padding box: the geometry encoder then contributes its CLS token,
        as Meta's reference always does (transformers skips the encoder without boxes, and the trained
        weights expect the token).
        """
        width = max(1, max(len(prompt.boxes) for _, prompt in pairs))
        boxes = torch.zeros(len(pairs), width, 4, dtype=torch.float32)
        labels = torch.full((len(pairs), width), PADDING_BOX_LABEL, dtype=torch.long)
        for row, (job_index, prompt) in enumerate(pairs):
            height, image_width = jobs[job_index].image.shape[:2]
            for column, box in enumerate(prompt.boxes):
                x1, x2 = sorted((min(max(box.x1, 0.0), image_width), min(max(box.x2, 0.0), image_width)))
                y1, y2 = sorted((min(max(box.y1, 0.0), height), min(max(box.y2, 0.0), height)))
                boxes[row, column] = torch.tensor(
                    [(x1 + x2) / 2 / image_width, (y1 + y2) / 2 / height, (x2 - x1) / image_width, (y2 - y1) / height]
                )
                labels[row, column] = 1 if box.positive else 0
        return boxes.to(self.device, self.dtype, non_blocking=True), labels.to(self.device, non_blocking=True)

    def _postprocess(self, jobs, pairs: list[tuple[int, Prompt]], outputs) -> list[PromptResult]:
        thresholds = torch.tensor([prompt.score_threshold for _, prompt in pairs], device=self.device)
        limits = torch.tensor([prompt.max_instances for _, prompt in pairs], device=self.device)
        kept = select_queries(
            outputs.pred_logits, outputs.presence_logits, outputs.pred_boxes, outputs.pred_masks, thresholds, limits
        )
        results = []
        offset = 0
        for (job_index, prompt), count in zip(pairs, kept.counts, strict=True):
            height, width = jobs[job_index].image.shape[:2]
            span = slice(offset, offset + count)
            offset += count
            masks = upsample_masks(kept.mask_logits[span], height, width, prompt.mask_threshold)
            boxes = scale_boxes(kept.boxes[span], width, height)
            instances, union = build_instances(kept.scores[span], boxes, masks)
            results.append(PromptResult(instances=instances, union_mask=union, image_size=(width, height)))
        return results


class _StageClock:
    """Wall time per stage; synchronises CUDA so each stage's kernels are counted in its own stage."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._last = time.perf_counter()
        self._totals: dict[str, float] = {}

    def lap(self, stage: str) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed = (now - self._last) * 1000
        self._last = now
        self._totals[stage] = self._totals.get(stage, 0.0) + elapsed
        return elapsed

    def totals(self) -> dict[str, float]:
        return {stage: round(ms, 3) for stage, ms in self._totals.items()}
