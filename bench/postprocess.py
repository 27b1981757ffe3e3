"""Post-processing of one head call (32 prompts on a 1920x1080 image): the model card's way vs ours, one device.

    python bench/postprocess.py [--device cuda] [--prompts 32] [--instances 3,100] [--passes 32,128]

Synthetic head outputs: 200 queries per prompt, 288x288 mask logits shaped like objects (random 24x24 blocks),
`--instances` of them passing the 0.5 score threshold per prompt (3: what real weights give for most concepts;
100: the random-weight benchmarks' case). float32 outputs, so both paths see the same numbers.
- naive: the image processor's post_process_instance_segmentation per prompt (int64 full-size masks), masks
  copied to the host, pycocotools (what bench/run.py's naive request does).
- ours: select_queries + render_pairs, what the engine runs, with each `--passes` value as masks per pass (the
  engine's: MASKS_PER_GPU_PASS on a GPU, 1 on the CPU).
Checks that ours gives Meta's masks (logits resized, then sigmoid > 0.5; transformers' post-processing resizes
probabilities, so its masks differ at the edges). Writes <out>/<date>-<device>-postprocess.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import Sam3ImageProcessor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import naive_rle, timed  # noqa: E402
from sam3_runner.loading import resolve_device  # noqa: E402
from sam3_runner.postprocess import masks_per_pass, render_pairs, select_queries  # noqa: E402

QUERIES = 200
SIZE = (1080, 1920)


def head_outputs(prompts: int, passing: int, device: torch.device) -> SimpleNamespace:
    generator = torch.Generator().manual_seed(0)
    logits = torch.full((prompts, QUERIES), -8.0)
    logits[:, :passing] = 4.0
    blocks = torch.randn(prompts * QUERIES, 1, 24, 24, generator=generator) * 4
    masks = F.interpolate(blocks, size=(288, 288), mode="nearest")[:, 0].reshape(prompts, QUERIES, 288, 288)
    return SimpleNamespace(
        pred_logits=(logits + torch.rand(prompts, QUERIES, generator=generator)).to(device),
        presence_logits=torch.full((prompts, 1), 6.0).to(device),
        pred_boxes=torch.rand(prompts, QUERIES, 4, generator=generator).sort(dim=-1).values.to(device),
        pred_masks=masks.to(device),
    )


def naive(processor: Sam3ImageProcessor, outputs: SimpleNamespace) -> list[list[str]]:
    per_prompt = []
    for row in range(outputs.pred_logits.shape[0]):
        one = SimpleNamespace(**{name: value[row : row + 1] for name, value in vars(outputs).items()})
        result = processor.post_process_instance_segmentation(one, threshold=0.5, target_sizes=[SIZE])[0]
        per_prompt.append([r["counts"].decode() for r in naive_rle(result["masks"].bool().cpu().numpy())])
    return per_prompt


def meta(outputs: SimpleNamespace) -> list[list[str]]:
    """Meta's rendering of the same instances (sam3's Sam3Processor._forward_grounding), encoded by pycocotools."""
    scores = outputs.pred_logits.sigmoid() * outputs.presence_logits.sigmoid()
    per_prompt = []
    for row_scores, row_masks in zip(scores, outputs.pred_masks, strict=True):
        logits = row_masks[row_scores > 0.5]
        masks = F.interpolate(logits[None], size=SIZE, mode="bilinear", align_corners=False)[0].sigmoid() > 0.5
        per_prompt.append([r["counts"].decode() for r in naive_rle(masks.cpu().numpy())])
    return per_prompt


def ours(outputs: SimpleNamespace, device: torch.device, per_pass: int) -> list[list[str]]:
    prompts = outputs.pred_logits.shape[0]
    kept = select_queries(
        outputs.pred_logits,
        outputs.presence_logits,
        outputs.pred_boxes,
        outputs.pred_masks,
        torch.full((prompts,), 0.5, device=device),
        torch.full((prompts,), QUERIES, device=device),
    )
    rendered = render_pairs(kept, [SIZE] * prompts, [0.5] * prompts, per_pass)
    return [[instance.rle["counts"] for instance in pair.instances] for pair in rendered]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--instances", default="3,100", help="instances passing per prompt, one case each")
    parser.add_argument("--passes", default="", help="masks per pass to time (default: the engine's)")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    processor = Sam3ImageProcessor()
    passes = [int(n) for n in args.passes.split(",")] if args.passes else [masks_per_pass(device)]
    report: dict = {"date": dt.date.today().isoformat(), "device": name, "torch": torch.__version__, "cases": {}}
    for passing in map(int, args.instances.split(",")):
        outputs = head_outputs(args.prompts, passing, device)
        reference = [sorted(p) for p in meta(outputs)]
        case = {
            "masks": args.prompts * passing,
            "same_masks_as_meta": all([sorted(p) for p in ours(outputs, device, n)] == reference for n in passes),
            "naive": timed(lambda outputs=outputs: naive(processor, outputs), device, args.iterations, warmup=1),
        }
        for per_pass in passes:
            case[f"ours_{per_pass}_per_pass"] = timed(
                lambda outputs=outputs, n=per_pass: ours(outputs, device, n), device, args.iterations, warmup=1
            )
        report["cases"][f"{args.prompts}_prompts_x_{passing}_instances_1920x1080"] = case
        print(f"{args.prompts} prompts x {passing}: {json.dumps(case)}", flush=True)
        save(report, args.out, name, "postprocess")  # after each case: a time limit keeps what was measured


if __name__ == "__main__":
    main()
