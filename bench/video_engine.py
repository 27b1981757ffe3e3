"""Concept tracking on a stream (sam3_runner/video.py): frames per second and peak memory over a clip.

    python bench/video_engine.py                                 # tiny model, 50 and 500 frames, CPU
    python bench/video_engine.py --model full --frames 4         # full-size architecture, random weights
    python bench/video_engine.py --device cuda --model full --frames 50,300 --size 1080x1920 --prompts 1,5

Each (frames, prompts) run is a fresh process, so its peak RSS (ru_maxrss) is its own; memory that grows with the
clip shows as a peak that grows with the frame count. Frames are moving coloured squares at --size (H x W), made on
the fly (the clip is never held). The tiny model's random detector and tracker never agree, so under the released
hotstart settings it removes every object in its first frames; --keep-objects (the default) raises the hotstart
thresholds and caps objects at 8, so objects are tracked through the whole clip. The full-size model is transformers'
default `Sam3VideoConfig()` (the architecture of Meta's sam3.pt) with random weights and the demo's confident
presence head, so that it detects (and then tracks) objects.
Writes bench/results/<date>-<device>-video-engine-<model>.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from sam3_runner.demo import DEMO_PRESENCE_LOGIT  # noqa: E402
from sam3_runner.loading import LoadedModel, load_model, resolve_device, resolve_dtype  # noqa: E402
from sam3_runner.video import track_concepts  # noqa: E402

PROMPTS = ["red square", "green square", "blue square", "person", "car", "dog", "cat", "tree"]
KEEP_OBJECTS = {"hotstart_unmatch_thresh": 10**6, "hotstart_dup_thresh": 10**6, "max_num_objects": 8}


def frame(index: int, height: int, width: int) -> np.ndarray:
    image = np.full((height, width, 3), (30, 60, 90), dtype=np.uint8)
    side = max(8, min(height, width) // 4)
    x = (index * max(1, width // 100)) % (width - side)
    y = (index * max(1, height // 100)) % (height - side)
    image[height // 8 : height // 8 + side, x : x + side] = (250, 40, 40)
    image[y : y + side, width - 2 * side : width - side] = (40, 250, 40)
    return image


def full_size(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import Sam3ImageProcessor, Sam3Processor, Sam3VideoConfig, Sam3VideoModel

    from sam3_runner.clip_tokenizer import clip_tokenizer

    started = time.perf_counter()
    with torch.device(device):
        model = Sam3VideoModel(Sam3VideoConfig())
    with torch.no_grad():  # as the demo does: random weights would detect nothing, and track nothing
        model.detector_model.detr_decoder.presence_head.layer3.bias.fill_(DEMO_PRESENCE_LOGIT)
    model = model.to(dtype=dtype).eval().requires_grad_(False)
    processor = Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=clip_tokenizer())
    return LoadedModel(
        model.detector_model,
        processor,
        device,
        dtype,
        "random full-size",
        "demo",
        True,
        time.perf_counter() - started,
        model.tracker_model,
        model.tracker_neck,
        model,
    )


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def one_run(args) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loaded = (
        load_model("demo", device=str(device), dtype=args.dtype) if args.model == "tiny" else full_size(device, dtype)
    )
    keep = args.keep_objects
    for name, value in (KEEP_OBJECTS if keep else {}).items():
        setattr(loaded.video, name, value)
    height, width = (int(side) for side in args.size.split("x"))
    rss_loaded = rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        cuda_loaded = torch.cuda.memory_allocated(device)
    tracker = track_concepts(loaded, PROMPTS[: args.one_prompts])
    shown, checkpoints = 0, {}
    started = time.perf_counter()
    for index in range(args.one_frames):
        for result in tracker.add_frame(frame(index, height, width)):
            shown += len(result.objects)
        if index + 1 in (args.one_frames // 10, args.one_frames // 2, args.one_frames):
            checkpoints[index + 1] = {"rss_mb": round(rss_bytes() / 2**20, 1), "held_kb": tracker.held_bytes() // 1024}
    shown += sum(len(result.objects) for result in tracker.finish())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    report = {
        "model": args.model,
        "frames": args.one_frames,
        "prompts": args.one_prompts,
        "size": [height, width],
        "keep_objects": keep,
        "frames_per_s": round(args.one_frames / seconds, 2),
        "seconds": round(seconds, 1),
        "objects_tracked_at_end": len(tracker.session.obj_ids),
        "objects_shown_over_clip": shown,
        "rss_after_load_mb": round(rss_loaded / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "by_frame": checkpoints,
    }
    if device.type == "cuda":
        report["cuda_after_load_mb"] = round(cuda_loaded / 2**20, 1)
        report["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--model", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--frames", default="50,500")
    parser.add_argument("--prompts", default="1")
    parser.add_argument("--size", default="360x640", help="frame height x width")
    parser.add_argument("--keep-objects", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    parser.add_argument("--one-frames", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--one-prompts", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.one_frames:
        print(json.dumps(one_run(args)))
        return
    runs = []
    for prompts in (int(count) for count in args.prompts.split(",")):
        for frames in (int(count) for count in args.frames.split(",")):
            command = [
                sys.executable,
                __file__,
                *sys.argv[1:],
                "--one-frames",
                str(frames),
                "--one-prompts",
                str(prompts),
            ]
            finished = subprocess.run(command, capture_output=True, text=True, check=True)
            runs.append(json.loads(finished.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    device = resolve_device(args.device)
    subject = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    report = {"date": dt.date.today().isoformat(), "device": subject, "threads": torch.get_num_threads(), "runs": runs}
    print(save(report, args.out, subject, f"video-engine-{args.model}"))


if __name__ == "__main__":
    main()
