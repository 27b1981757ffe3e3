"""Opt-in speed for the GPU: a compiled vision encoder and the detector/mask heads replayed as CUDA graphs.

Why (bench/NOTES.md): in eager bf16 on an H100 the heads are launch-bound (26 ms for 0.25 TFLOP) and the vision
encoder runs at ~4x its compute floor; torch.compile of the vision encoder alone measured 30 -> 16 ms at batch 1.
CUDA graphs need fixed shapes, so text-only pairs are padded to power-of-two buckets and every bucket is compiled
and recorded while the model loads, never on a request. Pairs with exemplar boxes (their box count varies) run eager.
In every mode the DETR decoder's coordinate grid is pinned and the box pooling takes one tensor, so the heads are one
graph whose pair count can stay symbolic (pin_decoder_grid and pool_boxes_in_one_call say why).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.ops import roi_align
from transformers import Sam3Model
from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy

log = logging.getLogger(__name__)

COMPILE_MODES = ("off", "vision", "heads", "all")


@dataclass(frozen=True)
class CompileOptions:
    vision: bool = False  # torch.compile of the vision trunk and neck (batch size dynamic after the first two sizes)
    heads: bool = False  # torch.compile(mode="reduce-overhead"): CUDA graphs per pair bucket on a GPU

    @classmethod
    def parse(cls, mode: str) -> CompileOptions:
        """SAM3_COMPILE: off | vision | heads | all."""
        mode = mode.strip().lower()
        if mode not in COMPILE_MODES:
            raise ValueError(f"SAM3_COMPILE must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")
        return cls(vision=mode in ("vision", "all"), heads=mode in ("heads", "all"))

    @property
    def mode(self) -> str:
        return {(False, False): "off", (True, False): "vision", (False, True): "heads", (True, True): "all"}[
            (self.vision, self.heads)
        ]


def use_compile_cache(directory: str | Path | None) -> None:
    """Keep Inductor's compiled kernels (FX graph, AOTAutograd and Triton caches) in `directory`, so a restart
    with the same directory skips most of the compilation. Must run before the first compilation."""
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(directory).resolve())


def pair_buckets(max_pairs: int) -> list[int]:
    """Powers of two up to max_pairs (and max_pairs itself): each bucket is recorded as one CUDA graph."""
    buckets = [1]
    while buckets[-1] * 2 < max_pairs:
        buckets.append(buckets[-1] * 2)
    if buckets[-1] != max_pairs:
        buckets.append(max_pairs)
    return buckets


def bucket_for(count: int, buckets: list[int]) -> int:
    return next(bucket for bucket in buckets if bucket >= count)


def learn_decoder_grid(model: Sam3Model, forward: Callable[[], object]) -> tuple[int, int] | None:
    """Run `forward` once and return the (height, width) of the feature map the DETR decoder attends to
    (None if this transformers version passes it differently: the grid then stays unpinned)."""
    seen: dict[str, tuple[int, int]] = {}

    def capture(module, args, kwargs):
        if isinstance(kwargs.get("spatial_shapes"), torch.Tensor):
            height, width = kwargs["spatial_shapes"][0].tolist()
            seen["grid"] = (int(height), int(width))

    handle = model.detr_decoder.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        forward()
    finally:
        handle.remove()
    return seen.get("grid")


def pin_decoder_grid(model: Sam3Model, grid: tuple[int, int] | None) -> None:
    """Give the DETR decoder its coordinate grid as constants.

    transformers rebuilds the grid in every decoder layer with `arange(0, size_tensor)`: the size is copied to the
    host (one GPU sync per layer) and torch.compile breaks the heads into 10 graphs there, so CUDA graphs could only
    cover pieces. Every image is resized to the model's input size, so the grid never changes.
    """
    if grid is None:
        log.warning("the DETR decoder's grid could not be learned; it is left as transformers builds it")
        return
    height, width = grid
    device = next(model.parameters()).device
    rows = torch.arange(0, height, device=device, dtype=torch.float32) / height
    columns = torch.arange(0, width, device=device, dtype=torch.float32) / width

    def coords(height_tensor, width_tensor, dtype: torch.dtype, device: torch.device):
        # Built once, outside any traced code: a lazily filled cache would make torch.compile guard on its
        # contents and trace the heads again after the first fill.
        return rows.to(device=device, dtype=dtype), columns.to(device=device, dtype=dtype)

    model.detr_decoder._get_coords = coords


def pool_boxes_in_one_call(model: Sam3Model) -> None:
    """Give the geometry encoder's ROI pooling every box as one tensor.

    transformers passes torchvision's roi_align the boxes as a list with one tensor per pair (`unbind(0)`), so
    torch.compile specialises on the pair count and traces the heads again for every pair bucket (full size,
    measured on the CPU: 5-9 s per trace, bench/NOTES.md). roi_align turns that list into one (K, 5) tensor with the
    pair index in front anyway; built here instead, the pair count stays symbolic and one graph serves every bucket
    from 2 up. Same computation as transformers' `_encode_boxes` otherwise (tested equal).
    """
    encoder = model.geometry_encoder
    if not hasattr(encoder, "_encode_boxes"):
        log.warning("this transformers version encodes boxes differently; box pooling is left as it is")
        return

    def encode_boxes(boxes, boxes_mask, boxes_labels, vision_features):
        pairs, boxes_per_pair = boxes.shape[:2]
        height, width = vision_features.shape[-2:]
        scale = torch.tensor([width, height, width, height], dtype=boxes.dtype, device=boxes.device)
        pixel_boxes = box_cxcywh_to_xyxy(boxes) * scale
        # roi_align takes float16 or float32, not bfloat16 (as in transformers)
        dtype = torch.float16 if vision_features.dtype == torch.bfloat16 else vision_features.dtype
        pair_index = torch.arange(pairs, device=boxes.device, dtype=dtype)[:, None, None]
        rois = torch.cat([pair_index.expand(pairs, boxes_per_pair, 1), pixel_boxes.to(dtype)], dim=-1)
        pooled = roi_align(vision_features.to(dtype), rois.reshape(-1, 5), encoder.roi_size).to(vision_features.dtype)
        embeds = encoder.boxes_direct_project(boxes)
        embeds = embeds + encoder.boxes_pool_project(pooled).view(pairs, boxes_per_pair, encoder.hidden_size)
        center_x, center_y, box_width, box_height = boxes.unbind(-1)
        positions = encoder._encode_box_coordinates(
            center_x.flatten(), center_y.flatten(), box_width.flatten(), box_height.flatten()
        )
        embeds = embeds + encoder.boxes_pos_enc_project(positions.view(pairs, boxes_per_pair, -1))
        return encoder.label_embed(boxes_labels.long()) + embeds, boxes_mask

    encoder._encode_boxes = encode_boxes


def compiled_vision(model: Sam3Model) -> tuple[Callable, Callable]:
    """The vision encoder's ViT trunk and FPN neck, compiled apart: the image cache keeps the trunk's output and a
    cached image runs only the neck. Each traces twice (batch 1, then a dynamic batch size from the second size on)."""
    return torch.compile(model.vision_encoder.backbone), torch.compile(model.vision_encoder.neck)


def compiled_heads(heads: Callable) -> Callable:
    """Two traces for all the pair buckets: bucket 1 alone (torch.compile specialises sizes 0 and 1), then the
    second bucket makes the pair count symbolic (automatic dynamic shapes; pool_boxes_in_one_call is what lets it)
    and every larger bucket reuses that graph. On CUDA "reduce-overhead" records one CUDA graph per bucket."""
    limit = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = max(limit, 64)
    return torch.compile(heads, mode="reduce-overhead")


def mark_graph_step() -> None:
    """Tell the CUDA-graph runtime that the previous replay's outputs have been consumed."""
    torch.compiler.cudagraph_mark_step_begin()
