"""Saturated throughput of the runner, decoding a batch's JPEGs serially vs in the model service's thread pool.

    python bench/throughput.py [--tiny --device cpu]

Same model and masks as bench/run.py --smooth-masks. Writes bench/results/<date>-<device>-throughput.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import build, peak_memory_gb, reset_peak, smooth_masks, synthetic_jpeg, timed  # noqa: E402
from sam3_runner import Job, Prompt, Sam3Engine, decode_image, decode_threads  # noqa: E402
from sam3_runner.loading import LoadedModel, resolve_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch-sizes", default="1,8,16,32")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = build(args.tiny, device, dtype)
    smooth_masks(model)
    engine = Sam3Engine(LoadedModel(model, processor, device, dtype, "bench", "bench", True, 0.0))
    prompt = Prompt("car", score_threshold=0.5, max_instances=200)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    images = [synthetic_jpeg(1920, 1080, 100 + i) for i in range(max(sizes))]
    pool = ThreadPoolExecutor(decode_threads())  # as the model service
    report = {
        "date": dt.date.today().isoformat(),
        "device": name,
        "torch": torch.__version__,
        "images": "1920x1080 JPEG",
        "model": "tiny demo" if args.tiny else "full-size SAM 3 (random weights, object-like masks)",
        "cases": {},
    }
    for size in sizes:
        chunk = images[:size]
        for mode, decode in (
            ("serial_decode", lambda c: [decode_image(d) for d in c]),
            ("pooled_decode", lambda c: list(pool.map(decode_image, c))),
        ):

            def batch(chunk=chunk, decode=decode):
                return engine.run([Job(image.pixels, [prompt]) for image in decode(chunk)])

            reset_peak(device)
            stats = timed(batch, device, args.iterations, warmup=1)
            stats["images_per_s"] = round(size * 1000 / stats["p50_ms"], 1)
            stats["peak_gb"] = peak_memory_gb(device)
            report["cases"][f"batch_{size}_{mode}"] = stats
            print(f"batch {size} {mode}: {stats}", flush=True)
    save(report, args.out, "tiny" if args.tiny else name, "throughput")


if __name__ == "__main__":
    main()
