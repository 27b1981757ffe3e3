"""The mask PNG the gateway writes per request: Pillow's default deflate vs the run-length strategy it uses.

    python bench/mask_png.py [--iterations 20]

Full-HD masks: object-like (bench/rle.py's) and pixel noise (what random weights give, the worst case). Same
pixels either way (checked); writes bench/results/<date>-<machine>-mask-png.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.rle import object_like_masks  # noqa: E402
from bench.run import timed  # noqa: E402
from renderers.png import PNG_OPTIONS, mask_png  # noqa: E402


def pillow_default(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def measure(mask: np.ndarray, iterations: int) -> dict:
    case = {}
    for name, encode in (("pillow_default", pillow_default), ("run_length", mask_png)):
        encoded = encode(mask)
        assert np.array_equal(np.array(Image.open(io.BytesIO(encoded))) == 255, mask)
        case[name] = {
            **timed(lambda encode=encode: encode(mask), torch.device("cpu"), iterations),
            "bytes": len(encoded),
        }
    return case


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    machine = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    masks = {
        "object_like_1920x1080": object_like_masks(1, torch.device("cpu"))[0].numpy(),
        "noise_1920x1080": np.random.default_rng(0).random((1080, 1920)) > 0.5,
    }
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "pillow": Image.__version__,
        "options": {key: str(value) for key, value in PNG_OPTIONS.items()},
        "cases": {name: measure(mask, args.iterations) for name, mask in masks.items()},
    }
    print(json.dumps(report["cases"], indent=2))
    save(report, args.out, machine, "mask-png")


if __name__ == "__main__":
    main()
