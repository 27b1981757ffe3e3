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
    blocks = torch.randn(count, 1, 24, 24, generator=generator).to(device) * 4
    logits = F.interpolate(blocks, size=(288, 288), mode="nearest")
    smooth = F.interpolate(logits, size=(1080, 1920), mode="bilinear", align_corners=False)[:, 0]
    return smooth > 0


def encode_all(encode, masks: torch.Tensor) -> list[str]:
    return [s for i in range(0, len(masks), MASKS_PER_PASS) for s in encode(masks[i : i + MASKS_PER_PASS])]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--masks", default="100,3200")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__, "cases": {}}
    for count in map(int, args.masks.split(",")):
        masks = object_like_masks(count, device)
        runs = int((masks.transpose(1, 2).reshape(count, -1).diff(dim=1) != 0).sum()) // count
        case: dict = {"runs_per_mask": runs}
        for label, encode in (("pycocotools", encode_with_pycocotools), ("vectorised", encode_vectorised)):
            case[label] = timed(lambda encode=encode, masks=masks: encode_all(encode, masks), device, args.iterations)
        assert encode_all(encode_vectorised, masks) == encode_all(encode_with_pycocotools, masks)
        report["cases"][f"{count}_masks_1920x1080"] = case
        print(f"{count} masks: {json.dumps(case)}", flush=True)
    save(report, args.out, name, "rle")


if __name__ == "__main__":
    main()
