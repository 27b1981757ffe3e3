"""COCO RLE encoding of full-HD masks: pycocotools on the host vs the vectorised encoder, on one device.

    python bench/rle.py [--device cuda] [--masks 100,3200]

Masks like bench/run.py --smooth-masks gives (random logits averaged to 12x12 blocks at 288x288, upsampled to
1920x1080), already on the device, as post-processing has them. Both encoders find run boundaries on the device;
they differ in what happens after. Writes bench/results/<date>-<device>-rle.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import timed  # noqa: E402
from sam3_runner.loading import resolve_device  # noqa: E402
from sam3_runner.rle import MASKS_PER_PASS, encode_vectorised, encode_with_pycocotools  # noqa: E402


def object_like_masks(count: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    chunks = []
    for start in range(0, count, 100):  # float intermediates of 100 full-HD masks at a time
        blocks = torch.randn(min(100, count - start), 1, 24, 24, generator=generator).to(device) * 4
        logits = F.interpolate(blocks, size=(288, 288), mode="nearest")
        chunks.append(F.interpolate(logits, size=(1080, 1920), mode="bilinear", align_corners=False)[:, 0] > 0)
    return torch.cat(chunks)


def encode_all(encode, masks: torch.Tensor, per_pass: int = MASKS_PER_PASS) -> list[str]:
    return [s for i in range(0, len(masks), per_pass) for s in encode(masks[i : i + per_pass])]


def measure(masks: torch.Tensor, passes: list[int], iterations: int) -> dict:
    sample = masks[:100].transpose(1, 2).reshape(min(100, len(masks)), -1)
    case: dict = {"runs_per_mask": int((sample.diff(dim=1) != 0).sum()) // len(sample)}
    case["pycocotools"] = timed(lambda: encode_all(encode_with_pycocotools, masks), masks.device, iterations)
    for per_pass in passes:
        case[f"vectorised_{per_pass}_per_pass"] = timed(
            lambda per_pass=per_pass: encode_all(encode_vectorised, masks, per_pass), masks.device, iterations
        )
    assert encode_all(encode_vectorised, masks) == encode_all(encode_with_pycocotools, masks)
    return case


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--masks", default="100,3200")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--passes", default=f"{MASKS_PER_PASS},128", help="masks per pass tried for the vectorised")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__, "cases": {}}
    for count in map(int, args.masks.split(",")):
        case = measure(object_like_masks(count, device), [int(n) for n in args.passes.split(",")], args.iterations)
        report["cases"][f"{count}_masks_1920x1080"] = case
        print(f"{count} masks: {json.dumps(case)}", flush=True)
    save(report, args.out, name, "rle")


if __name__ == "__main__":
    main()
