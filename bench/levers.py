"""Each GPU speed lever alone, then all together, in one process on one device (issue 5's "measured one by one").

    python bench/levers.py                      # full-size SAM 3, random weights, bf16, object-like masks
    python bench/levers.py --tiny --device cpu  # the tiny model on the CPU: checks the script itself

Levers: JPEG decoding on the device (SAM3_JPEG_DECODE=device), torch.compile of the vision encoder and CUDA-graphed
heads (SAM3_COMPILE=vision|heads|all). For each: one 1920x1080 request bytes -> RLE, one image x 32 prompts,
16 single-prompt requests as one batch (decoded in a pool sized as the model service's), peak memory, the time the
engine spent compiling while loading, and its answers against the eager engine's on the same weights.
Writes <out>/<date>-<device>-levers.json and .md; a run cut short leaves <out>/levers-partial.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import (  # noqa: E402
    PROMPTS_32,
    build,
    naive_request,
    peak_memory_gb,
    reset_peak,
    smooth_masks,
    synthetic_jpeg,
    timed,
)
from sam3_runner import Job, Prompt, PromptResult, Sam3Engine, decode_image, decode_threads  # noqa: E402
from sam3_runner.acceleration import CompileOptions, use_compile_cache  # noqa: E402
from sam3_runner.loading import LoadedModel, resolve_device  # noqa: E402

# name, SAM3_COMPILE, SAM3_JPEG_DECODE. `all` runs before the compile levers alone: it compiles with an empty
# cache (the cold-start cost), and they then reuse its kernels (the warm-cache cost).
LEVERS = (
    ("eager", "off", "cpu"),
    ("jpeg_on_device", "off", "device"),
    ("all", "all", "device"),
    ("compile_vision", "vision", "cpu"),
    ("graphed_heads", "heads", "cpu"),
)


def compare(results: list[PromptResult], reference: list[PromptResult]) -> dict:
    """Each instance matched to the reference instance whose mask overlaps it most: score diff and mask IoU."""
    diffs, ious = [], []
    for got, want in zip(results, reference, strict=True):
        if not got.instances or not want.instances:
            continue
        rles = [[{"size": i.rle["size"], "counts": i.rle["counts"].encode()} for i in r.instances] for r in (got, want)]
        overlaps = np.asarray(mask_utils.iou(rles[0], rles[1], [0] * len(rles[1]))).reshape(len(rles[0]), -1)
        for index, instance in enumerate(got.instances):
            best = int(overlaps[index].argmax())
            ious.append(float(overlaps[index, best]))
            diffs.append(abs(instance.score - want.instances[best].score))
    counts = [(len(g.instances), len(w.instances)) for g, w in zip(results, reference, strict=True)]
    return {
        "instances": counts,
        "max_score_diff": round(max(diffs, default=0.0), 6),
        "mean_mask_iou": round(float(np.mean(ious)) if ious else 1.0, 4),
        "share_mask_iou_ge_0.99": round(float(np.mean(np.array(ious) >= 0.99)) if ious else 1.0, 4),
    }


def measure(engine: Sam3Engine, jpeg_device, images: dict, batch: list[bytes], iterations: int, pool) -> dict:
    device = engine.device
    prompt = Prompt("car", score_threshold=0.5, max_instances=200)
    single = images["1920x1080"]
    cases: dict = {}
    holder: dict = {}

    def one_request():
        holder["result"] = engine.run([Job(decode_image(single, device=jpeg_device).pixels, [prompt])])[0][0]

    cases["single_1920x1080"] = timed(one_request, device, iterations)
    cases["single_1920x1080"]["stages_ms"] = holder["result"].timings_ms
    prompts = [Prompt(text, score_threshold=0.5, max_instances=200) for text in PROMPTS_32]
    reset_peak(device)
    cases["32_prompts_1920x1080"] = timed(
        lambda: engine.run([Job(decode_image(single, device=jpeg_device).pixels, prompts)]),
        device,
        max(3, iterations // 4),
    )
    cases["32_prompts_1920x1080"]["peak_gb"] = peak_memory_gb(device)

    def one_batch():
        decoded = pool.map(lambda data: decode_image(data, device=jpeg_device), batch)
        return engine.run([Job(image.pixels, [prompt]) for image in decoded])

    reset_peak(device)
    stats = timed(one_batch, device, max(3, iterations // 4), warmup=1)
    stats["images_per_s"] = round(len(batch) * 1000 / stats["p50_ms"], 1)
    stats["peak_gb"] = peak_memory_gb(device)
    cases[f"batch_{len(batch)}_1920x1080"] = stats
    return cases


def naive_baseline(model, processor, image: bytes, device, dtype, iterations: int) -> dict:
    """The model card's usage on the same weights, in the same process: the row every lever is compared with."""
    single = timed(
        lambda: naive_request(model, processor, image, "car", device, dtype), device, max(3, iterations // 2)
    )
    loop = timed(
        lambda: [naive_request(model, processor, image, text, device, dtype) for text in PROMPTS_32],
        device,
        1,
        warmup=0,
    )
    return {
        "single_1920x1080": single,
        "32_prompts_loop_1920x1080": loop,
        "images_per_s_one_at_a_time": round(1000 / single["p50_ms"], 1),
    }


def measure_lever(loaded, compile_mode: str, jpeg: str, args, images: dict, batch, every_query, pool) -> dict:
    engine = Sam3Engine(
        loaded, max_pairs_per_forward=args.max_pairs, compile_options=CompileOptions.parse(compile_mode)
    )
    jpeg_device = loaded.device if jpeg == "device" else "cpu"
    entry = {"compile": compile_mode, "jpeg_decode": jpeg, "acceleration": engine.acceleration}
    entry.update(measure(engine, jpeg_device, images, batch, args.iterations, pool))
    entry["answers"] = engine.run([Job(decode_image(images["1008x1008"]).pixels, every_query)])[0]
    return entry


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-pairs", type=int, default=64, help="MAX_PAIRS_PER_FORWARD: the largest pair bucket")
    parser.add_argument("--levers", default=",".join(name for name, _, _ in LEVERS))
    parser.add_argument("--compile-cache", default=None, help="SAM3_COMPILE_CACHE_DIR (default: Inductor's own)")
    parser.add_argument("--budget-s", type=float, default=480, help="start no new lever after this many seconds")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    started = time.perf_counter()
    use_compile_cache(args.compile_cache)
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = build(args.tiny, device, dtype)
    smooth_masks(model)
    loaded = LoadedModel(model, processor, device, dtype, "bench", "bench", True, 0.0)
    images = {"1920x1080": synthetic_jpeg(1920, 1080, 1), "1008x1008": synthetic_jpeg(1008, 1008, 2)}
    batch = [synthetic_jpeg(1920, 1080, 10 + i) for i in range(args.batch)]
    every_query = [Prompt("car", score_threshold=0.0, max_instances=200), Prompt("red car", score_threshold=0.0)]
    pool = ThreadPoolExecutor(decode_threads())  # as the model service
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "date": dt.date.today().isoformat(),
        "device": name,
        "torch": torch.__version__,
        "model": "tiny demo" if args.tiny else "full-size SAM 3 (840M, random weights, object-like masks)",
        "dtype": str(dtype).removeprefix("torch."),
        "max_pairs": args.max_pairs,
        "levers": {},
    }
    report["naive_bf16"] = naive_baseline(model, processor, images["1920x1080"], device, dtype, args.iterations)
    print(f"[{time.perf_counter() - started:6.1f}s] naive: {json.dumps(report['naive_bf16'])}", flush=True)
    reference = None
    selected = args.levers.split(",")
    for lever, compile_mode, jpeg in LEVERS:
        if lever not in selected:
            continue
        if time.perf_counter() - started > args.budget_s:
            report["levers"][lever] = {"skipped": "time budget spent"}
            continue
        torch._dynamo.reset()  # each lever compiles for itself; from the second on, Inductor's disk cache is warm
        try:
            entry = measure_lever(loaded, compile_mode, jpeg, args, images, batch, every_query, pool)
        except Exception as exc:  # one broken lever must not cost the others their numbers (one device call)
            entry = {"failed": f"{type(exc).__name__}: {exc}"[:500]}
        if reference is None and "answers" in entry:
            reference = entry["answers"]
        if "answers" in entry:
            entry["vs_eager"] = compare(entry.pop("answers"), reference)
        report["levers"][lever] = entry
        print(f"[{time.perf_counter() - started:6.1f}s] {lever}: {json.dumps(entry)}", flush=True)
        (out / "levers-partial.json").write_text(json.dumps(report, indent=2))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = round(time.perf_counter() - started, 1)
    save(report, out, "tiny" if args.tiny else name, "levers", markdown(report))
    (out / "levers-partial.json").unlink(missing_ok=True)
    print(markdown(report))


def markdown(report: dict) -> str:
    rows = [
        f"Device: **{report['device']}**, torch {report['torch']}, {report['model']}, {report['dtype']}. "
        f"p50, milliseconds; MAX_PAIRS_PER_FORWARD={report['max_pairs']}. Compile times: `all` compiles with an "
        "empty cache; the compile levers after it find its kernels in Inductor's disk cache (warm-cache times).",
        "",
        "| lever | compile while loading (s) | 1 image + 1 prompt, 1080p | 1 image x 32 prompts | images/s (batch) "
        "| peak GB | vs eager: max score diff, mean mask IoU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    naive = report.get("naive_bf16")
    if naive:
        rows.append(
            f"| naive (transformers per request, as the model card) | | {naive['single_1920x1080']['p50_ms']} "
            f"| {naive['32_prompts_loop_1920x1080']['p50_ms']} (loop) | {naive['images_per_s_one_at_a_time']} (1) "
            "| | |"
        )
    for lever, entry in report["levers"].items():
        if "skipped" in entry or "failed" in entry:
            rows.append(f"| {lever} | {entry.get('skipped') or 'failed: ' + entry['failed']} | | | | | |")
            continue
        batch = next(key for key in entry if key.startswith("batch_"))
        error = entry["acceleration"].get("compile_error")
        rows.append(
            f"| {lever} | {entry['acceleration']['warm_up_s']}{' (failed: eager)' if error else ''} "
            f"| {entry['single_1920x1080']['p50_ms']} | {entry['32_prompts_1920x1080']['p50_ms']} "
            f"| {entry[batch]['images_per_s']} ({batch.split('_')[1]}) | {entry[batch]['peak_gb']} "
            f"| {entry['vs_eager']['max_score_diff']}, {entry['vs_eager']['mean_mask_iou']} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
