"""Host -> device copies that never make the host wait for the GPU.

A blocking copy (torch.tensor(..., device=...)) waits for every kernel already queued, e.g. the vision encoder
of the batch: the host then cannot queue the heads while the GPU still runs the encoder. non_blocking alone is
not enough from pageable memory (CUDA may stage such a copy through the stream), so the source is pinned first.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    if device.type != "cuda":
        return tensor.to(device, dtype)
    return tensor.pin_memory().to(device, dtype, non_blocking=True)
