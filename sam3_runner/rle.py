"""Bool masks -> COCO compressed RLE strings (what pycocotools.mask.encode returns, JSON-ready).

Both paths find run boundaries on the masks' device, so full-resolution masks never travel to the host.
- CPU tensors: pycocotools compresses the run lengths, from Python lists, one mask at a time.
- CUDA tensors: with ~100 instances per prompt and 32 prompts, that host loop is thousands of masks per request,
  so the whole encoding (run lengths, COCO's delta coding, its 6-bit characters) runs vectorised on the GPU and
  only the strings come back. On the CPU the vectorised form is slower than pycocotools (bench/rle.py).
tests/test_runner_postprocess.py checks both byte for byte against pycocotools.mask.encode.
"""

from __future__ import annotations

import numpy as np
import torch
from pycocotools import mask as mask_utils

MASKS_PER_PASS = 32  # bounds the temporaries (a few bytes per run) for masks with very many runs
_CHUNKS = 7  # 5 value bits per character: 7 characters hold any delta below 2^34, far above any image size


def encode_rle(masks: torch.Tensor) -> list[dict]:
    """Bool masks [n, H, W] -> [{"size": [H, W], "counts": str}] as pycocotools.mask.encode would give them."""
    count, height, width = masks.shape
    encode = encode_vectorised if masks.device.type == "cuda" else encode_with_pycocotools
    strings: list[str] = []
    for start in range(0, count, MASKS_PER_PASS):
        strings += encode(masks[start : start + MASKS_PER_PASS])
    return [{"size": [height, width], "counts": counts} for counts in strings]


def encode_with_pycocotools(masks: torch.Tensor) -> list[str]:
    count, height, width = masks.shape
    column_major = masks.transpose(1, 2).reshape(count, height * width)
    mask_index, position = (column_major[:, 1:] != column_major[:, :-1]).nonzero(as_tuple=True)
    first_values = column_major[:, 0].cpu().numpy()
    mask_index, position = mask_index.cpu().numpy(), position.cpu().numpy()
    splits = np.searchsorted(mask_index, np.arange(1, count))
    uncompressed = []
    for first, ends in zip(first_values, np.split(position + 1, splits), strict=True):
        runs = np.diff(np.concatenate(([0], ends, [height * width])))
        if first:
            runs = np.concatenate(([0], runs))  # COCO runs start with background
        uncompressed.append({"size": [height, width], "counts": runs.tolist()})
    return [r["counts"].decode("ascii") for r in mask_utils.frPyObjects(uncompressed, height, width)]


def encode_vectorised(masks: torch.Tensor) -> list[str]:
    count, height, width = masks.shape
    pixels = height * width
    device = masks.device
    column_major = masks.transpose(1, 2).reshape(count, pixels)  # COCO reads pixels column by column

    # Run boundaries of every mask as (mask, offset). Offsets 0 and H*W close each mask; a mask whose first pixel
    # is foreground gets a second 0, i.e. the empty background run COCO always starts with.
    changed_mask, changed_at = (column_major[:, 1:] != column_major[:, :-1]).nonzero(as_tuple=True)
    every_mask = torch.arange(count, device=device)
    starts_with_foreground = every_mask[column_major[:, 0]]
    owner = torch.cat([every_mask, starts_with_foreground, changed_mask, every_mask])
    offset = torch.cat(
        [
            torch.zeros(count + len(starts_with_foreground), dtype=torch.long, device=device),
            changed_at + 1,
            torch.full((count,), pixels, dtype=torch.long, device=device),
        ]
    )
    order = torch.argsort(owner * (pixels + 1) + offset)
    owner, offset = owner[order], offset[order]
    within = owner[1:] == owner[:-1]
    runs = (offset[1:] - offset[:-1])[within]
    run_owner = owner[1:][within]

    # COCO's coding: from the third run on, each run is stored as its difference to the run two before it.
    runs_per_mask = torch.bincount(run_owner, minlength=count)
    first_run = torch.cumsum(runs_per_mask, 0) - runs_per_mask
    index = torch.arange(len(runs), device=device) - first_run[run_owner]
    value = torch.where(index > 2, runs - torch.roll(runs, 2), runs)

    # 5 bits per character, low bits first, 0x20 = "more follows", then shifted into printable ASCII from 48.
    characters, emitted = [], []
    active = torch.ones_like(value, dtype=torch.bool)
    for _ in range(_CHUNKS):
        low = value & 0x1F
        value = value >> 5
        more = torch.where((low & 0x10) != 0, value != -1, value != 0)
        characters.append(torch.where(more, low | 0x20, low) + 48)
        emitted.append(active)
        active = active & more
    characters_matrix = torch.stack(characters, dim=1)
    emitted_matrix = torch.stack(emitted, dim=1)
    text = characters_matrix[emitted_matrix].to(torch.uint8).cpu().numpy().tobytes().decode("ascii")
    lengths = torch.zeros(count, dtype=torch.long, device=device)
    lengths.index_add_(0, run_owner, emitted_matrix.sum(dim=1))
    strings, cursor = [], 0
    for length in lengths.tolist():
        strings.append(text[cursor : cursor + length])
        cursor += length
    return strings
