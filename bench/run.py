"""SAM 3 speed, naive transformers usage vs this project's runner, in one process on one device.

    python bench/run.py                      # full-size SAM 3, random weights, bf16, on the GPU
    python bench/run.py --tiny --device cpu  # the tiny model on the CPU: checks the script itself

Random weights cost the same as real ones; the presence head is biased (as in the demo model) so that about half
of the 200 queries pass the 0.5 threshold, i.e. ~100 instances per prompt, like the paper's "100+ objects" case.
Writes <out>/<date>-<device>.json and .md (default out: bench/results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from sam3_runner import Job, Prompt, Sam3Engine, decode_image  # noqa: E402
from sam3_runner.demo import DEMO_PRESENCE_LOGIT, build_demo_model, demo_tokenizer  # noqa: E402
from sam3_runner.loading import LoadedModel, resolve_device  # noqa: E402

PROMPTS_32 = [f"object number {i}" for i in range(32)]


def synthetic_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: smooth colour fields plus noise (JPEG size and decode cost close to a real photo)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([np.sin(x / (37 + 11 * c) + c) * np.cos(y / (53 + 7 * c)) for c in range(3)], axis=-1)
    pixels = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, (height, width, 3))).clip(0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import Sam3Config, Sam3ImageProcessor, Sam3Model, Sam3Processor

    if tiny:
        model, processor = build_demo_model()
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = Sam3Model(Sam3Config()).eval()
        with torch.no_grad():
            model.detr_decoder.presence_head.layer3.bias.fill_(DEMO_PRESENCE_LOGIT)
        processor = Sam3Processor(image_processor=Sam3ImageProcessor(), tokenizer=demo_tokenizer())
    model.requires_grad_(False)
    return model.to(device=device, dtype=dtype), processor


def smooth_masks(model, cells: int = 12) -> None:
    """Make random-weight masks object-like: average down to cells x cells blocks, then upsample back.

    Random weights give pixel-noise masks (~400k runs per full-HD mask), whose encoding dwarfs everything else
    (bench/results/*-noise-masks.*); real SAM 3 masks are smooth objects. The hook is applied to the one model
    that both the naive path and ours use, so the comparison stays fair.
    """
    import torch.nn.functional as F

    def hook(module, inputs, outputs):
        masks = outputs.pred_masks
        size = masks.shape[-2:]
        cell = max(1, size[-1] // cells)
        flat = masks.flatten(0, 1)[:, None].float()
        blurred = F.interpolate(F.avg_pool2d(flat, cell), size=size, mode="bilinear", align_corners=False)
        outputs.pred_masks = (blurred * cell).to(masks.dtype).view_as(masks)
        return outputs

    model.mask_decoder.register_forward_hook(hook)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iterations: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return {
        "p50_ms": round(statistics.median(samples), 2),
        "p90_ms": round(samples[int(0.9 * (len(samples) - 1))], 2),
        "min_ms": round(samples[0], 2),
        "n": len(samples),
    }


def naive_rle(masks: np.ndarray) -> list[dict]:
    """What a hand-rolled server does: copy the full-resolution masks to the host and encode them there."""
    from pycocotools import mask as mask_utils

    if masks.shape[0] == 0:
        return []
    return mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def naive_request(model, processor, image_bytes: bytes, text: str, device, dtype, like_meta=False, threshold=0.5):
    """The model card's usage: processor -> model -> post_process_instance_segmentation, then RLE.

    like_meta: Meta's reference behaviour instead, on the same model: the padded geometry box (the CLS token) and
    the masks' logits resized before the threshold (sam3's Sam3Processor._forward_grounding); transformers'
    post-processing resizes probabilities.
    """
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    inputs = processor(images=image, text=text, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    extra = {}
    if like_meta:
        extra = {
            "input_boxes": torch.zeros(1, 1, 4, device=device, dtype=dtype),
            "input_boxes_labels": torch.full((1, 1), -10, device=device),
        }
    with torch.inference_mode():
        outputs = model(**{k: v for k, v in inputs.items() if k != "original_sizes"}, **extra)
        result = processor.post_process_instance_segmentation(
            outputs, threshold=threshold, mask_threshold=0.5, target_sizes=[image.size[::-1]]
        )[0]
        masks = result["masks"].bool()
        if like_meta:
            scores = outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid()
            logits = outputs.pred_masks[0][scores[0] > threshold].float()
            resized = torch.nn.functional.interpolate(
                logits[None], size=image.size[::-1], mode="bilinear", align_corners=False
            )[0]
            masks = resized.sigmoid() > 0.5
    masks = masks.cpu().numpy()
    rles = naive_rle(masks)
    return result["scores"].float().cpu().numpy(), result["boxes"].float().cpu().numpy(), masks, rles


def ours_request(engine, image_bytes: bytes, prompts: list[Prompt]):
    image = decode_image(image_bytes)
    return engine.run([Job(image.pixels, prompts)])[0]


def peak_memory_gb(device) -> float:
    return round(torch.cuda.max_memory_allocated() / 1e9, 2) if device.type == "cuda" else 0.0


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def matched_comparison(naive, ours_result) -> dict:
    """Every query of both runs (threshold 0), matched greedily by box IoU; scores and masks of the pairs whose
    naive score is >= 0.5 (the instances a default request returns)."""
    from pycocotools import mask as mask_utils
    from torchvision.ops import box_iou

    naive_scores, naive_boxes, naive_masks = naive
    ours = ours_result.instances
    ious = box_iou(
        torch.as_tensor(naive_boxes, dtype=torch.float32), torch.tensor([i.box for i in ours], dtype=torch.float32)
    )
    diffs, mask_ious, used = [], [], set()
    for index in np.argsort(-naive_scores):
        if naive_scores[index] < 0.5:
            break
        candidates = [(float(ious[index, j]), j) for j in range(len(ours)) if j not in used]
        best_iou, best = max(candidates)
        used.add(best)
        ours_mask = mask_utils.decode({"size": ours[best].rle["size"], "counts": ours[best].rle["counts"].encode()})
        union = np.logical_or(naive_masks[index], ours_mask).sum()
        mask_ious.append(1.0 if union == 0 else float(np.logical_and(naive_masks[index], ours_mask).sum() / union))
        diffs.append(abs(float(naive_scores[index]) - ours[best].score))
    return {
        "matched": len(diffs),
        "max_score_diff": round(max(diffs, default=0.0), 6),
        "min_mask_iou": round(min(mask_ious, default=1.0), 4),
        "mean_mask_iou": round(float(np.mean(mask_ious)) if mask_ious else 1.0, 4),
        "share_mask_iou_ge_0.99": round(float(np.mean(np.array(mask_ious) >= 0.99)) if mask_ious else 1.0, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="the tiny demo model (script check on a CPU)")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile of the vision encoder")
    parser.add_argument("--smooth-masks", action="store_true", help="object-like masks (see smooth_masks)")
    parser.add_argument("--skip-fp32", action="store_true")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    device = resolve_device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    bf16 = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    report: dict = {
        "date": dt.date.today().isoformat(),
        "device": gpu,
        "torch": torch.__version__,
        "model": "tiny demo" if args.tiny else "full-size SAM 3 (840M, random weights)",
        "cases": {},
    }
    import transformers

    report["transformers"] = transformers.__version__
    images = {"1920x1080": synthetic_jpeg(1920, 1080, 1), "1008x1008": synthetic_jpeg(1008, 1008, 2)}
    batch_images = [synthetic_jpeg(1920, 1080, 10 + i) for i in range(max(map(int, args.batch_sizes.split(","))))]
    cases = report["cases"]
    iterations = args.iterations

    out_dir, device_name = Path(args.out), "tiny" if args.tiny else gpu

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", flush=True)
        partial = out_dir / "partial.json"  # a run cut short still leaves its numbers
        out_dir.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps({**report, "partial": True, "device_name": device_name}, indent=2))

    # --- naive fp32 (the model card, default dtype) --------------------------------------------------------
    report["smooth_masks"] = args.smooth_masks
    if device.type == "cuda" and not args.tiny and not args.skip_fp32:
        model32, processor = build(False, device, torch.float32)
        if args.smooth_masks:
            smooth_masks(model32)
        for name, data in images.items():
            cases[f"naive_fp32_single_{name}"] = timed(
                lambda data=data: naive_request(model32, processor, data, "car", device, torch.float32),
                device,
                max(5, iterations // 2),
            )
            log(f"naive fp32 {name}: {cases[f'naive_fp32_single_{name}']}")
        del model32
        torch.cuda.empty_cache()

    # --- naive bf16 and ours, same weights ----------------------------------------------------------------
    model, processor = build(args.tiny, device, bf16)
    if args.smooth_masks:
        smooth_masks(model)
    loaded = LoadedModel(model, processor, device, bf16, "bench", "bench", True, 0.0)
    engine = Sam3Engine(loaded, text_cache_size=1024, max_pairs_per_forward=64)
    prompt = Prompt("car", score_threshold=0.5, mask_threshold=0.5, max_instances=200)

    for name, data in images.items():
        cases[f"naive_bf16_single_{name}"] = timed(
            lambda data=data: naive_request(model, processor, data, "car", device, bf16), device, iterations
        )
        log(f"naive bf16 {name}: {cases[f'naive_bf16_single_{name}']}")
        result_holder = {}

        def ours(data=data, holder=result_holder):
            holder["result"] = ours_request(engine, data, [prompt])[0]

        cases[f"ours_single_{name}"] = timed(ours, device, iterations)
        cases[f"ours_single_{name}"]["stages_ms"] = result_holder["result"].timings_ms
        cases[f"ours_single_{name}"]["instances"] = len(result_holder["result"].instances)
        log(f"ours {name}: {cases[f'ours_single_{name}']}")

    # --- correctness on the same weights ------------------------------------------------------------------
    data = images["1008x1008"]
    every_query = Prompt("car", score_threshold=0.0, mask_threshold=0.5, max_instances=200)
    ours_result = ours_request(engine, data, [every_query])[0]
    for name, like_meta in (
        ("correctness_vs_reference_behaviour", True),
        ("difference_vs_plain_transformers_text_only", False),
    ):
        scores, boxes, masks, _ = naive_request(model, processor, data, "car", device, bf16, like_meta, threshold=0.0)
        report[name] = matched_comparison((scores, boxes, masks), ours_result)
    log(f"correctness: {report['correctness_vs_reference_behaviour']}")

    # --- one image x 32 prompts ---------------------------------------------------------------------------
    data = images["1920x1080"]
    prompts = [Prompt(text, score_threshold=0.5, max_instances=200) for text in PROMPTS_32]
    cases["naive_bf16_32_prompts_loop_1920x1080"] = timed(
        lambda: [naive_request(model, processor, data, text, device, bf16) for text in PROMPTS_32], device, 1, warmup=1
    )
    log(f"naive 32 prompts: {cases['naive_bf16_32_prompts_loop_1920x1080']}")
    reset_peak(device)
    cases["ours_32_prompts_1920x1080"] = timed(
        lambda: ours_request(engine, data, prompts), device, max(3, iterations // 4)
    )
    cases["ours_32_prompts_1920x1080"]["peak_gb"] = peak_memory_gb(device)
    log(f"ours 32 prompts: {cases['ours_32_prompts_1920x1080']}")

    # --- throughput: many single-prompt requests batched together -----------------------------------------
    naive_ms = cases["naive_bf16_single_1920x1080"]["p50_ms"]
    report["throughput_images_per_s"] = {"naive_one_at_a_time": round(1000 / naive_ms, 1)}
    for size in map(int, args.batch_sizes.split(",")):
        chunk = batch_images[:size]

        def batch(chunk=chunk):
            jobs = [Job(decode_image(item).pixels, [prompt]) for item in chunk]
            return engine.run(jobs)

        reset_peak(device)
        stats = timed(batch, device, max(3, iterations // 4), warmup=1)
        stats["peak_gb"] = peak_memory_gb(device)
        stats["images_per_s"] = round(size * 1000 / stats["p50_ms"], 1)
        cases[f"ours_batch_{size}_1920x1080"] = stats
        report["throughput_images_per_s"][f"ours_batch_{size}"] = stats["images_per_s"]
        log(f"ours batch {size}: {stats}")

    # --- lever: torch.compile of the vision encoder (batch 1) ---------------------------------------------
    if args.compile and device.type == "cuda":
        pixels = torch.randn(1, 3, 1008, 1008, device=device, dtype=bf16)
        eager = timed(lambda: model.get_vision_features(pixel_values=pixels), device, iterations)
        compile_started = time.perf_counter()
        compiled = torch.compile(model.vision_encoder, dynamic=False)
        with torch.inference_mode():
            compiled(pixels)
        compile_s = time.perf_counter() - compile_started
        with torch.inference_mode():
            fast = timed(lambda: compiled(pixels), device, iterations)
        cases["lever_compile_vision_b1"] = {"eager": eager, "compiled": fast, "compile_s": round(compile_s, 1)}
        log(f"compile vision: {cases['lever_compile_vision_b1']}")

    report["wall_s"] = round(time.perf_counter() - started, 1)
    (out_dir / "partial.json").unlink(missing_ok=True)
    write(report, out_dir, device_name)


def write(report: dict, out: Path, device_name: str) -> None:
    save(report, out, device_name, markdown=markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    cases = report["cases"]

    def p50(name):
        return f"{cases[name]['p50_ms']:.1f}" if name in cases else "n/a"

    rows = [
        f"Device: **{report['device']}**, torch {report['torch']}, transformers {report['transformers']}, "
        f"{report['model']}, bf16 unless stated. p50 over repeated runs, milliseconds.",
        "",
        "| case | naive (transformers, per request) | ours |",
        "| --- | --- | --- |",
    ]
    for name in ("1920x1080", "1008x1008"):
        naive = p50(f"naive_bf16_single_{name}")
        fp32 = p50(f"naive_fp32_single_{name}")
        rows.append(
            f"| 1 image + 1 prompt, {name}, bytes -> RLE | {naive} (fp32: {fp32}) | {p50(f'ours_single_{name}')} |"
        )
    rows.append(
        f"| 1 image x 32 prompts, 1920x1080 | {p50('naive_bf16_32_prompts_loop_1920x1080')} (loop) | "
        f"{p50('ours_32_prompts_1920x1080')} |"
    )
    throughput = report["throughput_images_per_s"]
    best = max((v, k) for k, v in throughput.items() if k.startswith("ours"))
    rows.append(
        f"| throughput, single-prompt requests, images/s | {throughput['naive_one_at_a_time']} | "
        f"{best[0]} ({best[1].replace('ours_', '')}) |"
    )
    peaks = {k: v.get("peak_gb") for k, v in cases.items() if "peak_gb" in v}
    if peaks:
        largest = max((k for k in peaks if k.startswith("ours_batch")), key=lambda k: int(k.split("_")[2]))
        rows.append(
            f"| peak GPU memory at the largest batch ({largest.split('_')[2]} images) | | {peaks[largest]} GB |"
        )
    correct = report["correctness_vs_reference_behaviour"]
    rows += [
        "",
        "Correctness on the same weights vs the reference behaviour (transformers + the geometry CLS token, masks "
        "rendered as Meta does): "
        f"{correct['matched']} matched instances, max |score diff| {correct['max_score_diff']}, "
        f"min mask IoU {correct['min_mask_iou']} (mean {correct['mean_mask_iou']}, "
        f"{correct['share_mask_iou_ge_0.99']:.0%} >= 0.99). Masks: "
        f"{'object-like (--smooth-masks)' if report.get('smooth_masks') else 'random-weight pixel noise'}.",
        "Batch sizes: "
        + ", ".join(
            f"{k.replace('ours_batch_', '')}: {v} img/s" for k, v in throughput.items() if k.startswith("ours")
        ),
    ]
    stages = cases.get("ours_single_1920x1080", {}).get("stages_ms")
    if stages:
        rows.append("Stages of one 1920x1080 request (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    if "lever_compile_vision_b1" in cases:
        lever = cases["lever_compile_vision_b1"]
        rows.append(
            f"torch.compile(vision encoder), batch 1: {lever['eager']['p50_ms']} -> "
            f"{lever['compiled']['p50_ms']} ms after {lever['compile_s']} s of compilation."
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
