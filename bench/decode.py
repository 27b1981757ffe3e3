"""JPEG decoding in the model service: Pillow (what the service did) vs torchvision's decoder on the CPU (what it
does now for plain JPEGs; same libjpeg-turbo, same pixels, decoded straight into a tensor).

    python bench/decode.py [--images 16] [--threads 1,4]

Photo-like full-HD JPEGs (bench/run.py's), decoded on 1 thread and in pools of --threads; per image.
The pixels are checked equal. Writes bench/results/<date>-<machine>-decode.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import synthetic_jpeg  # noqa: E402
from sam3_runner import decode_image  # noqa: E402


def pillow_decode(data: bytes) -> np.ndarray:
    return np.array(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def per_image_ms(decode, images: list[bytes], threads: int, repeats: int = 5) -> float:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(decode, images))
        samples = []
        for _ in range(repeats):
            started = time.perf_counter()
            list(pool.map(decode, images))
            samples.append((time.perf_counter() - started) * 1000 / len(images))
    return round(sorted(samples)[len(samples) // 2], 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", default="1,4")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    images = [synthetic_jpeg(1920, 1080, seed) for seed in range(args.images)]
    for data in images[:4]:
        assert np.array_equal(np.asarray(decode_image(data).pixels), pillow_decode(data))
    machine = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "images": f"{args.images} photo-like 1920x1080 JPEGs, quality 90",
        "ms_per_image": {
            f"{threads}_threads": {
                "pillow": per_image_ms(pillow_decode, images, threads),
                "torchvision_cpu": per_image_ms(lambda data: decode_image(data).pixels, images, threads),
            }
            for threads in map(int, args.threads.split(","))
        },
    }
    print(json.dumps(report, indent=2))
    save(report, args.out, machine, "decode")


if __name__ == "__main__":
    main()
