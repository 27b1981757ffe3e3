"""What each `outputs` entry costs the gateway's CPU at full HD: the drawing the gateway does in a thread once the
model has answered (backend/outputs.py: decoding the photo when a file needs it, decoding the instances' RLEs,
renderers/), without the R2 upload.

    python bench/outputs.py [--iterations 20] [--instances 10]

Two kinds of masks, each as COCO RLE as the model service sends them: `objects` (one ellipse per instance, 1-20 %
of the image each, what SAM 3 finds in a photo) and `blobs` (bench/rle.py's object-like masks: every instance
spreads over the whole image in many parts, the hard case for polygons). The photo is bench/run.py's synthetic
full-HD JPEG. Writes bench/results/<date>-<machine>-outputs.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.rle import object_like_masks  # noqa: E402
from bench.run import synthetic_jpeg  # noqa: E402
from renderers import Drawable, render  # noqa: E402
from sam3_runner import decode_image  # noqa: E402
from sam3_runner.rle import encode_with_pycocotools  # noqa: E402

WIDTH, HEIGHT = 1920, 1080
CASES = {
    "the photo decoded alone (part of cutout and overlay)": frozenset(),
    "polygons": frozenset({"polygons"}),
    "instance_map": frozenset({"instance_map"}),
    "cutout": frozenset({"cutout"}),
    "overlay": frozenset({"overlay"}),
    "all four": frozenset({"polygons", "instance_map", "cutout", "overlay"}),
}


def ellipses(count: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    masks = np.zeros((count, HEIGHT, WIDTH), dtype=np.uint8)
    for mask in masks:
        center = (int(rng.integers(200, WIDTH - 200)), int(rng.integers(150, HEIGHT - 150)))
        axes = (int(rng.integers(60, 420)), int(rng.integers(60, 300)))
        cv2.ellipse(mask, center, axes, float(rng.integers(0, 180)), 0, 360, 1, -1)
    return masks.astype(bool)


def instances_of(masks: np.ndarray) -> list[Drawable]:
    rles = [{"size": [HEIGHT, WIDTH], "counts": counts} for counts in encode_with_pycocotools(torch.from_numpy(masks))]
    instances = []
    for index, (mask, rle) in enumerate(zip(masks, rles, strict=True)):
        rows, columns = np.nonzero(mask)
        box = [float(columns.min()), float(rows.min()), float(columns.max() + 1), float(rows.max() + 1)]
        instances.append(Drawable(rle=rle, score=0.95 - index * 0.02, box=box, label="dog"))
    return instances


def draw(jpeg: bytes, instances: list[Drawable], union: np.ndarray, wanted: frozenset[str]):
    """What the gateway's drawing thread does for a request (backend/outputs.py OutputMaker.make, less uploads);
    nothing wanted: the photo's decoding alone."""
    pixels = np.asarray(decode_image(jpeg).pixels) if not wanted or wanted & {"cutout", "overlay"} else None
    return render(instances, (WIDTH, HEIGHT), wanted, 1.0, pixels=pixels, union=union if "cutout" in wanted else None)


def measure(jpeg: bytes, instances: list[Drawable], union: np.ndarray, wanted: frozenset[str], iterations: int):
    rendered = draw(jpeg, instances, union, wanted)
    cpu, wall = [], []
    for _ in range(iterations):
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        draw(jpeg, instances, union, wanted)
        cpu.append((time.process_time() - cpu_start) * 1000)
        wall.append((time.perf_counter() - wall_start) * 1000)
    return {
        "cpu_ms_p50": round(statistics.median(cpu), 1),
        "wall_ms_p50": round(statistics.median(wall), 1),
        "n": iterations,
        "bytes": {name: len(data) for name, data in rendered.files.items()},
        **(
            {
                "polygons_json_bytes": len(json.dumps(rendered.polygons, separators=(",", ":"))),
                "vertices": sum(len(p["exterior"]) + sum(map(len, p["holes"])) for i in rendered.polygons for p in i),
            }
            if rendered.polygons is not None
            else {}
        ),
    }


def markdown(report: dict) -> str:
    lines = [
        f"# What each output costs at full HD ({report['machine']}, {report['instances']} instances)",
        "",
        "CPU ms (p50) of the gateway's drawing thread per request, R2 upload not included. A request without "
        "`outputs` draws nothing (its mask PNG, 7.7 ms at full HD, is written either way).",
        "",
        "| outputs | objects: CPU ms | objects: size | blobs: CPU ms | blobs: size |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in CASES:
        cells = []
        for kind in ("objects", "blobs"):
            case = report["masks"][kind][name]
            sizes = [f"{key} {value / 1024:.0f} KB" for key, value in case["bytes"].items()]
            if "polygons_json_bytes" in case:
                sizes.insert(0, f"polygons {case['polygons_json_bytes'] / 1024:.0f} KB JSON")
            cells += [str(case["cpu_ms_p50"]), ", ".join(sizes) or "-"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    rle = {kind: report["masks"][kind]["rle_json_bytes"] / 1024 for kind in ("objects", "blobs")}
    lines += [
        "",
        f"For comparison, the instances' `rle` in JSON: {rle['objects']:.0f} KB (objects), "
        f"{rle['blobs']:.0f} KB (blobs).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    machine = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    jpeg = synthetic_jpeg(WIDTH, HEIGHT, seed=0)
    kinds = {
        "objects": ellipses(args.instances),
        "blobs": object_like_masks(args.instances, torch.device("cpu")).numpy(),
    }
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "instances": args.instances,
        "image": f"{WIDTH}x{HEIGHT} JPEG ({len(jpeg)} bytes)",
        "polygon_tolerance": 1.0,
        "opencv": cv2.__version__,
        "masks": {},
    }
    for kind, masks in kinds.items():
        instances = instances_of(masks)
        union = masks.any(axis=0)
        report["masks"][kind] = {
            "rle_json_bytes": len(json.dumps([i.rle for i in instances], separators=(",", ":"))),
            **{name: measure(jpeg, instances, union, wanted, args.iterations) for name, wanted in CASES.items()},
        }
    table = markdown(report)
    print(table)
    save(report, args.out, machine, "outputs", markdown=table)


if __name__ == "__main__":
    main()
