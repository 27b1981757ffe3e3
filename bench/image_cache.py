"""The image cache: the second and later requests on one photo vs the first (concept prompts), through the model
service's worker (its cache check, decode and the engine), and what caching the FPN outputs as well would cost.

    python bench/image_cache.py                 # full-size SAM 3 (random weights), fp32 on this CPU: 8-10 minutes
    python bench/image_cache.py --tiny          # the demo model: seconds (its ratios mean little)

One photo-like 1920x1080 JPEG sent --requests times as the gateway sends it (with the object's identity), each time
with another noun phrase, so that only the image cache tells the first request from the later ones. The worker is
backend/segmenter.py's Segmenter around an engine built here from the full-size architecture (loading real
weights is not the point). Reported per request: the worker's wall time, its stages and the cache marker; the
later requests' time as a fraction of the first's. Also the bytes one cached image takes (the ViT trunk's output)
against what keeping the FPN levels too would add, and the neck's share of the vision time: the case for
recomputing the neck on a hit. Most of the engine's warm-up (one full vision pass) comes before the first request
and is not measured. Writes <out>/<date>-<machine>-image-cache.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backend.protocol import make_item  # noqa: E402
from backend.segmenter import Segmenter  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import build, smooth_masks, synthetic_jpeg  # noqa: E402
from sam3_runner import LoadedModel, Prompt, Sam3Engine  # noqa: E402

PHRASES = ["car", "person", "tree", "road", "sky", "window", "dog", "bicycle"]
IDENTITY = "bench-bucket/images/street.jpg#etag-1"


def worker_with(engine: Sam3Engine) -> Segmenter:
    """The model service's worker (decode pool, cache check, outcomes) serving `engine`: it loads the demo model
    as configured, which is then replaced by the engine under test."""
    segmenter = Segmenter(Settings(sam3_weights_path="demo", sam3_device="cpu", _env_file=None))
    deadline = time.monotonic() + 120
    while not segmenter.ready and time.monotonic() < deadline:
        time.sleep(0.1)
    segmenter._engine = engine
    return segmenter


def cached_bytes(engine: Sam3Engine) -> dict:
    """Per image, in the engine's dtype: the trunk's output (what is cached) and the FPN levels (what is not)."""
    entry = engine.image_cache.get(IDENTITY)
    grid = entry.trunk.shape[0] ** 0.5
    vision = engine.model.config.vision_config
    element = entry.trunk.element_size()
    levels = [int(grid * scale) ** 2 * vision.fpn_hidden_size * element for scale in vision.scale_factors]
    return {
        "trunk": entry.nbytes,
        "fpn_levels_used_by_the_detector": sum(levels[:-1]),
        "fpn_all_levels": sum(levels),
        "fpn_used_over_trunk": round(sum(levels[:-1]) / entry.nbytes, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="the demo model instead of the full-size architecture")
    parser.add_argument("--requests", type=int, default=3, help="the first request and the later ones")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    device, dtype = torch.device("cpu"), torch.float32
    started = time.perf_counter()
    model, processor = build(args.tiny, device, dtype)
    smooth_masks(model)
    loaded = LoadedModel(model, processor, device, dtype, "bench", "bench", True, 0.0)
    engine = Sam3Engine(loaded, image_cache_bytes=256 * 1024 * 1024)
    worker = worker_with(engine)
    image = synthetic_jpeg(1920, 1080, seed=0)
    print(f"model ready in {time.perf_counter() - started:.1f} s", flush=True)

    requests = []
    for index in range(args.requests):
        prompt = Prompt(PHRASES[index % len(PHRASES)], max_instances=10)
        clock = time.perf_counter()
        (outcome,) = worker.segment([make_item(image, [prompt], 50_000_000, IDENTITY)])
        wall_ms = (time.perf_counter() - clock) * 1000
        result = outcome["results"][0]
        requests.append({"cache": result["cache"], "wall_ms": round(wall_ms, 1), "stages_ms": result["timings"]})
        print(requests[-1], flush=True)
    first, later = requests[0], requests[1:]
    assert first["cache"] == "miss" and all(request["cache"] == "hit" for request in later)
    stages = first["stages_ms"]
    machine = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "model": "tiny demo" if args.tiny else "full-size SAM 3 (840M, random weights, object-like masks)",
        "dtype": str(dtype).removeprefix("torch."),
        "torch_threads": torch.get_num_threads(),
        "image": "photo-like 1920x1080 JPEG, one concept prompt per request (another phrase each time), 10 instances",
        "requests": requests,
        "later_over_first_wall": [round(request["wall_ms"] / first["wall_ms"], 4) for request in later],
        "neck_share_of_vision": round(stages["neck"] / (stages["vision"] + stages["neck"]), 4),
        "bytes_per_image": cached_bytes(engine),
        "image_cache": engine.image_cache.stats(),
        "run_s": round(time.perf_counter() - started, 1),
    }
    rows = "\n".join(
        f"| {index + 1} | {request['cache']} | {request['wall_ms']} | {request['stages_ms']['decode']} | "
        f"{request['stages_ms']['vision']} | {request['stages_ms']['neck']} | {request['stages_ms']['heads']} | "
        f"{round(request['wall_ms'] / first['wall_ms'], 3)} |"
        for index, request in enumerate(requests)
    )
    sizes = report["bytes_per_image"]
    markdown = (
        f"# Image cache: later requests on one photo vs the first ({report['date']}, {machine}, {report['model']}, "
        f"{report['dtype']})\n\n"
        "| request | cache | worker wall ms | decode | vision (trunk) | neck | heads | / first |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- |\n"
        f"{rows}\n\n"
        f"Per cached image: trunk output {sizes['trunk'] / 2**20:.1f} MiB; the FPN levels the detector uses would "
        f"add {sizes['fpn_levels_used_by_the_detector'] / 2**20:.1f} MiB ({sizes['fpn_used_over_trunk']}x) to save "
        f"the neck, {report['neck_share_of_vision'] * 100:.1f}% of the vision time.\n"
    )
    print(markdown)
    save(report, args.out, machine, "image-cache-tiny" if args.tiny else "image-cache", markdown)


if __name__ == "__main__":
    main()
