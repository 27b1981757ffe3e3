"""Comparisons of runner results that tolerate float noise but not a different answer."""

from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils

from sam3_runner import PromptResult


def decode_rle(rle: dict) -> np.ndarray:
    return mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode("ascii")}).astype(bool)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def assert_same_result(actual: PromptResult, expected: PromptResult, score_tol: float = 1e-4) -> None:
    assert actual.image_size == expected.image_size
    assert len(actual.instances) == len(expected.instances)
    actual_sorted = sorted(actual.instances, key=lambda i: i.score)
    expected_sorted = sorted(expected.instances, key=lambda i: i.score)
    for got, want in zip(actual_sorted, expected_sorted, strict=True):
        assert abs(got.score - want.score) <= score_tol
        np.testing.assert_allclose(got.box, want.box, atol=0.05)
        assert mask_iou(decode_rle(got.rle), decode_rle(want.rle)) >= 0.99
    assert mask_iou(actual.union_mask, expected.union_mask) >= 0.99
