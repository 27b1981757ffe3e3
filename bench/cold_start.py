"""Cold start: a fresh process from nothing to its first answer, weights on local disk, empty then warm compile cache.

    python bench/cold_start.py --compile all            # full-size random weights saved to --weights-dir first
    python bench/cold_start.py --tiny --device cpu      # the tiny model on the CPU: checks the script itself

Each start is its own Python process (imports included), as `bentoml serve` or a container restart would be.
With a fresh --cache the first start finds it empty and the second finds what the first left; each start is
labelled by the state of the cache it found.
Writes <out>/<date>-<device>-cold-start.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.output import DEFAULT_OUT, save  # noqa: E402


def child(args: argparse.Namespace) -> None:
    """One start: import, load from disk, warm up (compiling if asked), answer one request."""
    started = time.perf_counter()
    import torch

    from bench.run import synthetic_jpeg
    from sam3_runner import Job, Prompt, Sam3Engine, decode_image, load_model
    from sam3_runner.acceleration import CompileOptions, use_compile_cache

    imported = time.perf_counter()
    use_compile_cache(args.cache)
    loaded = load_model(args.weights_dir, device=args.device)
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()
    ready_to_warm = time.perf_counter()
    engine = Sam3Engine(
        loaded, max_pairs_per_forward=args.max_pairs, compile_options=CompileOptions.parse(args.compile)
    )
    warmed = time.perf_counter()
    image = decode_image(synthetic_jpeg(1920, 1080, 1)).pixels
    engine.run([Job(image, [Prompt("car")])])
    answered = time.perf_counter()
    print(
        json.dumps(
            {
                "import_s": round(imported - started, 2),
                "load_s": round(ready_to_warm - imported, 2),
                "warm_up_and_compile_s": round(warmed - ready_to_warm, 2),
                "first_request_s": round(answered - warmed, 3),
                "acceleration": engine.acceleration,
                "device": str(loaded.device),
                "dtype": str(loaded.dtype).removeprefix("torch."),
            }
        ),
        flush=True,
    )


def save_weights(directory: Path, tiny: bool) -> None:
    """Random weights in transformers' format, as `hf download facebook/sam3` would leave them."""
    import torch

    from bench.run import build

    model, processor = build(tiny, torch.device("cpu"), torch.float32)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--compile", default="all", help="SAM3_COMPILE for the starts")
    parser.add_argument("--weights-dir", default=None, help="default: random weights saved to a temporary directory")
    parser.add_argument("--cache", default=None, help="compile cache directory (default: a fresh temporary one)")
    parser.add_argument("--starts", type=int, default=2)
    parser.add_argument("--max-pairs", type=int, default=64, help="MAX_PAIRS_PER_FORWARD: the largest pair bucket")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    scratch = Path(tempfile.mkdtemp(prefix="sam3-cold-start-"))
    weights = Path(args.weights_dir) if args.weights_dir else scratch / "weights"
    if not (weights / "config.json").exists():
        save_weights(weights, args.tiny)
    cache = Path(args.cache) if args.cache else scratch / "compile-cache"
    report: dict = {"date": dt.date.today().isoformat(), "compile": args.compile, "starts": {}}
    try:
        for start in range(1, args.starts + 1):
            label = f"start_{start}_{'warm' if cache.exists() and any(cache.iterdir()) else 'empty'}_cache"
            command = [sys.executable, __file__, "--child", "--weights-dir", str(weights), "--device", args.device]
            command += ["--compile", args.compile, "--cache", str(cache), "--max-pairs", str(args.max_pairs)]
            spawned = time.perf_counter()
            finished = subprocess.run(command, capture_output=True, text=True, check=True)
            phases = json.loads(finished.stdout.strip().splitlines()[-1])
            phases["process_start_to_first_answer_s"] = round(time.perf_counter() - spawned, 2)
            report["starts"][label] = phases
            print(f"{label}: {json.dumps(phases)}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the saved weights are gigabytes
    report["device"] = next(iter(report["starts"].values()))["device"]
    if report["device"].startswith("cuda"):
        import torch

        report["device"] = torch.cuda.get_device_name()
    save(report, args.out, "tiny" if args.tiny else report["device"], f"cold-start-{args.compile}")


if __name__ == "__main__":
    main()
