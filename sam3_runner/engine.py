"""Batched segmentation: many jobs (images x prompts) from many requests in one pass.

One ViT trunk forward for the distinct images not in the image cache, one FPN neck forward for every distinct image,
one text forward for the prompts not yet cached, and one detector/mask-head call for every (image, prompt) pair,
with the image features indexed per pair. Visual-prompt jobs (points / a box / a previous mask) in the same batch
share the trunk output (and its cache): the tracker reads it through its own neck (sam3_runner/visual.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from sam3_runner.acceleration import (
    CompileOptions,
    bucket_for,
    compiled_heads,
    compiled_vision,
    learn_decoder_grid,
    mark_graph_step,
    pair_buckets,
    pin_decoder_grid,
    pool_boxes_in_one_call,
)
from sam3_runner.image_cache import EncodedImage, ImageCache
from sam3_runner.loading import LoadedModel
from sam3_runner.postprocess import (
    KeptQueries,
    MaskRenderer,
    masks_per_pass,
    pixels_per_slice,
    select_queries,
    suppress_overlaps,
)
from sam3_runner.text_cache import TextEmbeddingCache
from sam3_runner.transfer import to_device
from sam3_runner.types import (
    PADDING_BOX_LABEL,
    Abandoned,
    BoxPrompt,
    Job,
    PointPrompt,
    Prompt,
    PromptResult,
    VisualPrompt,
)
from sam3_runner.video import track_concepts
from sam3_runner.video_objects import track_object
from sam3_runner.video_types import TrackingSession
from sam3_runner.visual import VisualPromptsUnavailable, VisualSegmenter

log = logging.getLogger(__name__)

TEXT_LENGTH = 32  # the processor's fixed text length; CLIP's context in SAM 3
WARM_UP_IMAGE = np.zeros((64, 64, 3), dtype=np.uint8)
GRAPH_RECORD_CALLS = 3  # compile, warm up, record: after these a bucket replays its CUDA graph


class Sam3Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        text_cache_size: int = 1024,
        max_pairs_per_forward: int = 64,
        compile_options: CompileOptions | None = None,
        image_cache_bytes: int = 0,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.processor = loaded.processor
        self.device = loaded.device
        self.dtype = loaded.dtype
        self.max_pairs_per_forward = max_pairs_per_forward
        self.text_cache = TextEmbeddingCache(self._encode_texts, text_cache_size)
        self.image_cache = ImageCache(image_cache_bytes)
        # All device work runs on this one thread: one batch at a time, and the CUDA graphs that torch.compile
        # records belong to the thread that recorded them.
        self._device_thread = ThreadPoolExecutor(1, thread_name_prefix="sam3-device")
        self._trunk: Callable = self.model.vision_encoder.backbone
        self._neck: Callable = self.model.vision_encoder.neck
        patch = self.model.config.vision_config.backbone_config.patch_size
        size = self.processor.image_processor.size
        self._grid = (size["height"] // patch, size["width"] // patch)  # (rows, columns) of the trunk's token grid
        self._graphed_heads: Callable | None = None
        input_size = self.processor.image_processor.size["height"]
        self.visual = (
            VisualSegmenter(loaded.tracker, loaded.tracker_neck, input_size, self.device)
            if loaded.visual_prompts
            else None
        )
        self._pair_buckets = pair_buckets(max_pairs_per_forward)
        self.acceleration: dict = {"compile": "off", "warm_up_s": 0.0}
        self._serving = False  # while warming up, a compiled path's failure fails the compilation as a whole
        self._on_device_thread(self._warm_up, compile_options or CompileOptions())
        self._serving = True

    def run(self, jobs: Sequence[Job]) -> list[list[PromptResult] | Abandoned]:
        """Segment every prompt of every job; results come back per job, per prompt, in order (Abandoned for a job
        whose `abandoned` said so at a stage boundary). A job with a visual prompt gets one result: its candidates.
        Raises VisualPromptsUnavailable for a visual job when the weights hold no tracker."""
        if not jobs:
            return []
        if self.visual is None and any(job.visual is not None for job in jobs):
            raise VisualPromptsUnavailable("the loaded weights hold no tracker: visual prompts cannot be answered")
        return self._on_device_thread(self._run, jobs)

    def run_sliced(self, job: Job) -> list[PromptResult] | Abandoned:
        """One (heavy) job as separate units of device work, so batches queued meanwhile run in between and wait at
        most one unit: the first unit preprocesses, runs the vision pass, the text encoder, the heads and the query
        selection; then each post-processing slice (pixels_per_slice) is a unit of its own. `job.abandoned` is
        asked before every unit (and between head chunks). Same results as run([job]). A visual job (at most 3
        masks) is one unit: run([job])."""
        if job.visual is not None:
            return self.run([job])[0]
        gate = _Gate([job])
        selected = self._on_device_thread(self._select_for_slices, job, gate) if gate.wanted(0) else None
        while selected is not None and not selected.renderer.done and gate.wanted(0):
            self._on_device_thread(self._render_slice, selected)
        if gate.reasons:
            return Abandoned(gate.reasons[0])
        return self._on_device_thread(self._sliced_results, selected)

    def track_concepts(
        self, texts: list[str], threshold: float | None, frames_total: int | None = None
    ) -> TrackingSession:
        """A clip's session finding and tracking every instance of `texts` (sam3_runner/video.py); its device work
        runs here, one frame per unit between the batches."""
        return track_concepts(self.loaded, texts, threshold, self._on_device_thread, frames_total)

    def track_object(self, frame_index: int, points: Sequence[PointPrompt], box: BoxPrompt | None) -> TrackingSession:
        """A clip's session for one object prompted on `frame_index` (sam3_runner/video_objects.py); its device
        work runs here, one frame per unit between the batches."""
        return track_object(self.loaded, frame_index, points, box, self._on_device_thread)

    def _compiled_or_eager(self, compiled: Callable, eager: Callable, *args):
        """A compiled path that fails at run time is dropped for good and the call made eagerly; out-of-memory
        is not a compiler fault and goes to the caller, which splits the batch."""
        if compiled is eager:  # not compiled: a failure is the model's own and goes to the caller as before
            return eager(*args)
        try:
            return compiled(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as exc:
            if not self._serving:
                raise
            log.exception("a compiled path failed; running eager from now on")
            self._use_eager(exc)
            return eager(*args)

    def _on_device_thread(self, work: Callable, *args):
        def in_inference_mode():
            with torch.inference_mode():
                return work(*args)

        return self._device_thread.submit(in_inference_mode).result()

    def _warm_up(self, options: CompileOptions) -> None:
        """One eager pass (it also learns the decoder's grid), then every compiled shape, before any request."""
        started = time.perf_counter()
        pool_boxes_in_one_call(self.model)
        pin_decoder_grid(self.model, learn_decoder_grid(self.model, lambda: self._run(_warm_up_jobs(1, 1))))
        if self.visual is not None:  # a tracker that cannot run fails the start, not the first visual request
            self._run([Job(WARM_UP_IMAGE, [], visual=VisualPrompt(points=(PointPrompt(32, 32),)))])
        if options.vision or options.heads:
            try:
                self._compile(options)
                self.acceleration["compile"] = options.mode
            except Exception as exc:  # a compiler failure must cost speed, never the service
                log.warning("torch.compile failed; running eager: %s", exc)
                self._use_eager(exc)
        self.text_cache.clear()
        self.acceleration["warm_up_s"] = round(time.perf_counter() - started, 2)

    def _use_eager(self, error: Exception) -> None:
        self._trunk, self._neck = self.model.vision_encoder.backbone, self.model.vision_encoder.neck
        self._graphed_heads = None
        self.acceleration["compile"] = "off"
        self.acceleration.pop("pair_buckets", None)
        self.acceleration["compile_error"] = f"{type(error).__name__}: {error}"[:500]

    def _compile(self, options: CompileOptions) -> None:
        if options.vision:
            self._trunk, self._neck = compiled_vision(self.model)
            for images in (1, 2):  # the second size makes the batch dimension dynamic: no later recompiles
                self._run(_warm_up_jobs(images, 1))
        if options.heads:
            self._graphed_heads = compiled_heads(self._heads_forward)
            for bucket in self._pair_buckets:
                for _ in range(GRAPH_RECORD_CALLS):
                    self._run(_warm_up_jobs(1, bucket))
            self.acceleration["pair_buckets"] = list(self._pair_buckets)

    def _run(self, jobs: Sequence[Job]) -> list[list[PromptResult] | Abandoned]:
        gate = _Gate(jobs)
        wanted = [index for index in range(len(jobs)) if gate.wanted(index)]  # before the vision pass
        computed = self._run_wanted([jobs[index] for index in wanted], lambda job: gate.wanted(wanted[job]))
        results = dict(zip(wanted, computed, strict=True))
        return [Abandoned(gate.reasons[i]) if i in gate.reasons else results[i] for i in range(len(jobs))]

    def _run_wanted(self, jobs: Sequence[Job], wanted: Callable[[int], bool]) -> list[list[PromptResult]]:
        """`wanted(job index)` is asked between head chunks and post-processing slices; a job it refuses is not
        computed further, and its list of results is incomplete (the caller drops it)."""
        if not jobs:
            return []
        clock = _StageClock(self.device)
        images = self._encode_images(jobs, clock)

        pairs = [(job_index, prompt) for job_index, job in enumerate(jobs) for prompt in job.prompts]
        if pairs:
            text_features, text_mask = self.text_cache.lookup([prompt.model_text for _, prompt in pairs])
            clock.lap("text")

        flat_results: list[PromptResult | None] = [None] * len(pairs)
        deferred: dict[int, list[tuple[list[int], KeptQueries]]] = {}  # per job with NMS: its pairs' kept queries
        for group in self._head_groups(pairs) if pairs else []:
            for start in range(0, len(group), self.max_pairs_per_forward):
                members = [
                    index for index in group[start : start + self.max_pairs_per_forward] if wanted(pairs[index][0])
                ]
                if not members:
                    continue
                chunk = [pairs[index] for index in members]
                rows = to_device(torch.tensor(members), self.device)
                outputs = self._heads(jobs, chunk, images, text_features[rows], text_mask[rows])
                clock.lap("heads")
                kept = self._select(chunk, outputs)
                members, kept = _defer_suppressing_jobs(jobs, pairs, members, kept, deferred)
                if members:
                    chunk = [pairs[index] for index in members]
                    for index, result in zip(members, self._render(jobs, chunk, kept, wanted), strict=True):
                        flat_results[index] = result
                clock.lap("postprocess")
        if deferred:
            for index, result in self._suppressed_results(jobs, pairs, deferred, wanted):
                flat_results[index] = result
            clock.lap("postprocess")
        visual = self._visual_results(jobs, images, wanted, clock)

        timings = clock.totals()
        timings["total"] = round(sum(timings.values()), 3)
        results: list[list[PromptResult]] = [[] for _ in jobs]
        concept = [(job_index, result) for (job_index, _), result in zip(pairs, flat_results, strict=True)]
        for job_index, result in concept + visual:
            if result is not None:  # None: its job was abandoned
                result.timings_ms = images.timings(job_index, timings)
                result.cached_image = images.cached[job_index]
                results[job_index].append(result)
        return results

    def _visual_results(self, jobs, images: _Images, wanted, clock) -> list[tuple[int, PromptResult]]:
        """(job index, result) for the visual jobs still wanted: the tracker on their images' trunk output, then
        rendering (a job refused between slices gets None)."""
        indices = [index for index, job in enumerate(jobs) if job.visual is not None and wanted(index)]
        if not indices:
            return []
        chosen = [jobs[index] for index in indices]
        rows = to_device(torch.tensor([images.rows[index] for index in indices]), self.device)
        kept = self.visual.candidates(chosen, images.vision.last_hidden_state.index_select(0, rows))
        clock.lap("tracker")
        rendered = self.visual.render(chosen, kept, lambda pair: wanted(indices[pair]))
        clock.lap("postprocess")
        return list(zip(indices, rendered, strict=True))

    def _select_for_slices(self, job: Job, gate: _Gate) -> _Selected | None:
        """run_sliced's first unit: everything up to the kept queries. None if the job was abandoned meanwhile."""
        clock = _StageClock(self.device)
        images = self._encode_images([job], clock)
        pairs = [(0, prompt) for prompt in job.prompts]
        text_features, text_mask = self.text_cache.lookup([prompt.model_text for _, prompt in pairs])
        clock.lap("text")
        order: list[int] = []
        kept: list[KeptQueries] = []
        for group in self._head_groups(pairs):
            for start in range(0, len(group), self.max_pairs_per_forward):
                if not gate.wanted(0):
                    return None
                members = group[start : start + self.max_pairs_per_forward]
                chunk = [pairs[index] for index in members]
                rows = to_device(torch.tensor(members), self.device)
                outputs = self._heads([job], chunk, images, text_features[rows], text_mask[rows])
                clock.lap("heads")
                kept.append(self._select(chunk, outputs))
                order += members
                clock.lap("postprocess")
        prompts = [job.prompts[index] for index in order]
        size = job.size
        mask_thresholds = [prompt.mask_threshold for prompt in prompts]
        with_rle = [prompt.include_rle for prompt in prompts]
        kept_queries = KeptQueries.concat(kept)
        suppressed = None
        if job.nms_iou_threshold is not None:
            kept_queries, suppressed = suppress_overlaps(kept_queries, mask_thresholds, order, job.nms_iou_threshold)
            clock.lap("postprocess")
        renderer = MaskRenderer(
            kept_queries, [size] * len(prompts), mask_thresholds, masks_per_pass(self.device), with_rle
        )
        return _Selected(renderer, order, size, clock, images, suppressed)

    def _render_slice(self, selected: _Selected) -> None:
        selected.clock.lap(_StageClock.IDLE)  # the device ran other work since the last unit
        selected.renderer.render(pixels_per_slice(self.device))
        selected.clock.lap("postprocess")

    def _sliced_results(self, selected: _Selected) -> list[PromptResult]:
        height, width = selected.size
        selected.clock.lap(_StageClock.IDLE)
        rendered = selected.renderer.result()
        selected.clock.lap("postprocess")
        timings = selected.clock.totals()
        timings["total"] = round(sum(timings.values()), 3)
        results: list[PromptResult | None] = [None] * len(rendered)
        for position, (index, pair) in enumerate(zip(selected.order, rendered, strict=True)):
            results[index] = PromptResult(
                instances=pair.instances,
                union_mask=pair.union_mask,
                image_size=(width, height),
                timings_ms=selected.images.timings(0, timings),
                cached_image=selected.images.cached[0],
                suppressed=None if selected.suppressed is None else selected.suppressed[position],
            )
        return results

    def _head_groups(self, pairs: list[tuple[int, Prompt]]) -> list[list[int]]:
        """Pair indices per head call group: with graphed heads, text-only pairs (fixed shapes) apart from pairs
        with exemplar boxes (their box count varies, so they run eager)."""
        if self._graphed_heads is None:
            return [list(range(len(pairs)))]
        text_only = [index for index, (_, prompt) in enumerate(pairs) if not prompt.boxes]
        with_boxes = [index for index, (_, prompt) in enumerate(pairs) if prompt.boxes]
        return [group for group in (text_only, with_boxes) if group]

    def _encode_images(self, jobs: Sequence[Job], clock: _StageClock) -> _Images:
        """The vision features of the distinct images of `jobs`, and each job's row in them.

        The ViT trunk runs once, batched, for the images that no job's taken cache entry (`job.encoded`), no entry of
        the image cache and no earlier job of this batch with the same `image_key` provides; the output of each
        keyed one goes into the cache. The FPN neck then runs on every distinct image's trunk output, as
        transformers' Sam3VisionModel.forward runs it after the backbone. Laps "preprocess", "vision" (the trunk)
        and "neck".
        """
        rows: list[int] = []
        cached: list[bool] = []
        trunks: list[torch.Tensor | None] = []
        keyed_rows: dict[str, int] = {}
        fresh: list[int] = []  # the jobs whose pixels are encoded: one per row of `trunks` left None
        for index, job in enumerate(jobs):
            if job.image_key is not None and job.image_key in keyed_rows:
                rows.append(keyed_rows[job.image_key])
                cached.append(True)
                continue
            entry = job.encoded or (self.image_cache.get(job.image_key) if job.image_key is not None else None)
            if job.image_key is not None:
                keyed_rows[job.image_key] = len(trunks)
            rows.append(len(trunks))
            cached.append(entry is not None)
            trunks.append(None if entry is None else entry.trunk)
            if entry is None:
                fresh.append(index)
        keyed = [index for index, job in enumerate(jobs) if job.image_key is not None]
        hits = sum(cached[index] for index in keyed)
        self.image_cache.count(hits=hits, misses=len(keyed) - hits)
        if fresh:
            pixel_values = self._preprocess([jobs[index] for index in fresh])
            clock.lap("preprocess")
            backbone = self.model.vision_encoder.backbone
            encoded = self._compiled_or_eager(self._trunk, backbone, pixel_values).last_hidden_state
            for trunk, index in zip(encoded, fresh, strict=True):
                trunks[rows[index]] = trunk
                if jobs[index].image_key is not None:
                    height, width = jobs[index].size
                    self.image_cache.put(jobs[index].image_key, EncodedImage(trunk, height, width))
            clock.lap("vision")
        else:  # every image came encoded
            clock.lap("preprocess")
            clock.lap("vision")
        trunk = torch.stack(trunks)
        spatial = trunk.view(len(trunks), *self._grid, -1).permute(0, 3, 1, 2)
        fpn, positions = self._compiled_or_eager(self._neck, self.model.vision_encoder.neck, spatial)
        clock.lap("neck")
        vision = Sam3VisionEncoderOutput(
            last_hidden_state=trunk, fpn_hidden_states=fpn, fpn_position_encoding=positions
        )
        return _Images(vision, rows, cached)

    def _preprocess(self, jobs: Sequence[Job]) -> torch.Tensor:
        images = [torch.as_tensor(job.image).permute(2, 0, 1) for job in jobs]
        batch = self.processor.image_processor(images=images, return_tensors="pt", device=self.device)
        return batch["pixel_values"].to(device=self.device, dtype=self.dtype, non_blocking=True)

    def _encode_texts(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.processor.tokenizer(
            texts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
        )
        input_ids = to_device(tokens.input_ids, self.device)
        attention_mask = to_device(tokens.attention_mask, self.device)
        features = self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
        return features.pooler_output, attention_mask

    def _heads(self, jobs, pairs, images: _Images, text_features, text_mask):
        vision = images.vision
        image_index = [images.rows[job_index] for job_index, _ in pairs]
        boxes, labels = self._box_tensors(jobs, pairs)
        graphed = self._graphed_heads is not None and not any(prompt.boxes for _, prompt in pairs)
        padding = bucket_for(len(pairs), self._pair_buckets) - len(pairs) if graphed else 0
        if padding:  # repeat the last pair up to the bucket; its extra outputs are dropped below
            image_index += [image_index[-1]] * padding
            text_features, text_mask, boxes, labels = (
                torch.cat([tensor, tensor[-1:].expand(padding, *tensor.shape[1:])])
                for tensor in (text_features, text_mask, boxes, labels)
            )
        rows = to_device(torch.tensor(image_index), self.device)
        pair_vision = Sam3VisionEncoderOutput(
            last_hidden_state=vision.last_hidden_state.index_select(0, rows),
            fpn_hidden_states=tuple(f.index_select(0, rows) for f in vision.fpn_hidden_states),
            fpn_position_encoding=tuple(p.index_select(0, rows) for p in vision.fpn_position_encoding),
        )
        if not graphed:
            return self._heads_forward(pair_vision, text_features, text_mask, boxes, labels)
        mark_graph_step()
        inputs = (pair_vision, text_features, text_mask, boxes, labels)
        outputs = self._compiled_or_eager(self._graphed_heads, self._heads_forward, *inputs)
        return _HeadOutputs(
            pred_logits=outputs.pred_logits[: len(pairs)],
            presence_logits=outputs.presence_logits[: len(pairs)],
            pred_boxes=outputs.pred_boxes[: len(pairs)],
            pred_masks=outputs.pred_masks[: len(pairs)],
        )

    def _heads_forward(self, pair_vision, text_features, text_mask, boxes, labels):
        return self.model(
            vision_embeds=pair_vision,
            text_embeds=BaseModelOutputWithPooling(pooler_output=text_features),
            attention_mask=text_mask,
            input_boxes=boxes,
            input_boxes_labels=labels,
        )

    def _box_tensors(self, jobs, pairs: list[tuple[int, Prompt]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exemplar boxes [pairs, boxes, 4] as normalised cxcywh (the model's dtype), labels [pairs, boxes] (-10 pads).

        A box goes to the model as drawn, not clamped to the image: one that runs past the right or bottom edge
        has normalised coordinates above 1, as in Meta's reference (sam3's Sam3Processor.add_geometric_prompt
        takes normalised cxcywh as given) and transformers' Sam3Processor (it divides by the image size only).
        The segmenter has checked that each box overlaps the image and has x2 > x1, y2 > y1.

        A text-only prompt still gets one padding box: the geometry encoder then contributes its CLS token,
        as Meta's reference always does (transformers skips the encoder without boxes, and the trained
        weights expect the token).
        """
        width = max(1, max(len(prompt.boxes) for _, prompt in pairs))
        boxes = torch.zeros(len(pairs), width, 4, dtype=torch.float32)
        labels = torch.full((len(pairs), width), PADDING_BOX_LABEL, dtype=torch.long)
        for row, (job_index, prompt) in enumerate(pairs):
            height, image_width = jobs[job_index].size
            for column, box in enumerate(prompt.boxes):
                x1, y1, x2, y2 = box.x1, box.y1, box.x2, box.y2
                boxes[row, column] = torch.tensor(
                    [(x1 + x2) / 2 / image_width, (y1 + y2) / 2 / height, (x2 - x1) / image_width, (y2 - y1) / height]
                )
                labels[row, column] = 1 if box.positive else 0
        return to_device(boxes, self.device, self.dtype), to_device(labels, self.device)

    def _select(self, pairs: list[tuple[int, Prompt]], outputs) -> KeptQueries:
        score_thresholds = to_device(torch.tensor([prompt.score_threshold for _, prompt in pairs]), self.device)
        limits = to_device(torch.tensor([prompt.max_instances for _, prompt in pairs]), self.device)
        return select_queries(
            outputs.pred_logits,
            outputs.presence_logits,
            outputs.pred_boxes,
            outputs.pred_masks,
            score_thresholds,
            limits,
        )

    def _suppressed_results(self, jobs, pairs, deferred, wanted) -> list[tuple[int, PromptResult | None]]:
        """(pair index, result) for the pairs of the jobs with NMS still wanted: each job's kept queries, all of
        its pairs together, less those suppress_overlaps removes, then rendered together."""
        members: list[int] = []
        parts: list[KeptQueries] = []
        suppressed: list[int] = []
        for job_index, stashed in deferred.items():
            if not wanted(job_index):
                continue
            job_members = [index for indices, _ in stashed for index in indices]
            kept, removed = suppress_overlaps(
                KeptQueries.concat([kept for _, kept in stashed]),
                [pairs[index][1].mask_threshold for index in job_members],
                job_members,  # pairs are job-major, in prompt order: the lower index is the earlier prompt
                jobs[job_index].nms_iou_threshold,
            )
            members += job_members
            parts.append(kept)
            suppressed += removed
        if not members:
            return []
        chunk = [pairs[index] for index in members]
        results = self._render(jobs, chunk, KeptQueries.concat(parts), wanted)
        for result, removed in zip(results, suppressed, strict=True):
            if result is not None:
                result.suppressed = removed
        return list(zip(members, results, strict=True))

    def _render(self, jobs, pairs: list[tuple[int, Prompt]], kept: KeptQueries, wanted) -> list[PromptResult | None]:
        sizes = [jobs[job_index].size for job_index, _ in pairs]
        mask_thresholds = [prompt.mask_threshold for _, prompt in pairs]
        with_rle = [prompt.include_rle for _, prompt in pairs]
        renderer = MaskRenderer(kept, sizes, mask_thresholds, masks_per_pass(self.device), with_rle)
        while not renderer.done:
            renderer.drop({pair for pair, (job_index, _) in enumerate(pairs) if not wanted(job_index)})
            renderer.render(pixels_per_slice(self.device))
        return [
            None
            if pair is None
            else PromptResult(instances=pair.instances, union_mask=pair.union_mask, image_size=(width, height))
            for pair, (height, width) in zip(renderer.result(), sizes, strict=True)
        ]


def _defer_suppressing_jobs(
    jobs: Sequence[Job], pairs: list[tuple[int, Prompt]], members: list[int], kept: KeptQueries, deferred: dict
) -> tuple[list[int], KeptQueries]:
    """A head chunk's pairs to render now, and their kept queries: the pairs of a job with NMS wait in `deferred`
    (job index -> [(pair indices, their kept queries)]) until all of that job's pairs have been selected."""
    later = [position for position, index in enumerate(members) if jobs[pairs[index][0]].nms_iou_threshold is not None]
    if not later:
        return members, kept
    for job_index in dict.fromkeys(pairs[members[position]][0] for position in later):
        positions = [position for position in later if pairs[members[position]][0] == job_index]
        deferred.setdefault(job_index, []).append(([members[p] for p in positions], kept.take(positions)))
    now = sorted(set(range(len(members))) - set(later))
    return [members[position] for position in now], kept.take(now)


def _warm_up_jobs(images: int, prompts_per_image: int) -> list[Job]:
    """Blank images with prompts nothing passes (threshold 1): every device path runs, nothing is post-processed."""
    prompts = [Prompt("warm up", score_threshold=1.0)] * prompts_per_image
    return [Job(WARM_UP_IMAGE, prompts) for _ in range(images)]


class _Gate:
    """Which jobs are still wanted: asks a job at each stage boundary until it gives a reason to stop, then
    remembers the reason."""

    def __init__(self, jobs: Sequence[Job]) -> None:
        self._jobs = jobs
        self.reasons: dict[int, str] = {}

    def wanted(self, index: int) -> bool:
        if index not in self.reasons and (reason := self._jobs[index].abandoned()):
            self.reasons[index] = reason
        return index not in self.reasons


@dataclass
class _Images:
    """A batch's vision features: one row per distinct image, the row of each job, and whether each job's image
    was encoded for another job or an earlier request (the image cache) rather than for it."""

    vision: Sam3VisionEncoderOutput
    rows: list[int]
    cached: list[bool]

    def timings(self, job_index: int, batch: dict[str, float]) -> dict[str, float]:
        """The batch's stage times as the job's: a job whose encoding came ready did no preprocessing or vision."""
        return {**batch, "preprocess": 0.0, "vision": 0.0} if self.cached[job_index] else dict(batch)


@dataclass
class _Selected:
    """A sliced job between its units: what is left to render, and how to put its results back in prompt order."""

    renderer: MaskRenderer
    order: list[int]  # the prompt index of each rendered pair (head groups may reorder them)
    size: tuple[int, int]  # (height, width)
    clock: _StageClock
    images: _Images
    suppressed: list[int] | None  # per rendered pair, with the job's NMS: how many of its instances it removed


@dataclass
class _HeadOutputs:
    """The head outputs post-processing reads, cut back to the real pairs of a padded bucket."""

    pred_logits: torch.Tensor
    presence_logits: torch.Tensor
    pred_boxes: torch.Tensor
    pred_masks: torch.Tensor


class _StageClock:
    """Time per stage. On CUDA, events recorded on the stream mark the stage ends, so timing never makes the host
    wait for the GPU: it queues the next stage while the GPU runs this one. Read once, at the end of the batch.
    Time up to an IDLE mark (other work between a sliced job's units) counts for no stage."""

    IDLE = "idle"

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = [("start", self._mark())]

    def _mark(self):
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def lap(self, stage: str) -> None:
        self._marks.append((stage, self._mark()))

    def totals(self) -> dict[str, float]:
        if self._cuda:
            self._marks[-1][1].synchronize()
        totals: dict[str, float] = {}
        for (_, before), (stage, after) in itertools.pairwise(self._marks):
            elapsed = before.elapsed_time(after) if self._cuda else (after - before) * 1000
            totals[stage] = totals.get(stage, 0.0) + elapsed
        return {stage: round(ms, 3) for stage, ms in totals.items() if stage != self.IDLE}
