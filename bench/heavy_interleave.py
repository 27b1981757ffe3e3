"""Can one heavy request starve the small ones? Small-request latency alone and beside a heavy request, with the
heavy request batched like any other (the old behaviour) and served alone in slices (HEAVY_REQUEST_MEGAPIXELS).

    python bench/heavy_interleave.py                      # demo model on this CPU, local storage, ~6 minutes

A real `bentoml serve` per mode. Small requests (640x480 JPEG, one prompt, defaults) arrive at a steady --rate
from concurrent clients (open loop: a request is sent every 1/rate s whatever the others do), first alone for
--seconds, then while one heavy request runs (--prompts prompts on a --heavy-size JPEG, threshold 0, every
instance the model finds). Reported: p50/p99 of the small requests' latency and their errors per phase, and the
heavy request's own latency. MODEL_TIMEOUT_S is raised so that the heavy request completes in both modes.
Writes <out>/<date>-<machine>-heavy-interleave.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from served import ServedBento  # noqa: E402

from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import synthetic_jpeg  # noqa: E402

API_KEY = "interleave-key-0123456789"
WARM_UP_S = 20
MODES = {
    "batched (old)": {"HEAVY_REQUEST_MEGAPIXELS": "1000000000"},  # above MAX_REQUEST_MEGAPIXELS: never sliced
    "sliced (new)": {},  # the default HEAVY_REQUEST_MEGAPIXELS
}


def small_body() -> dict:
    return {"image_url": "images/small.jpg", "text_prompt": "car", "user_id": "bench", "task_id": str(uuid.uuid4())}


def heavy_body(prompts: int) -> dict:
    return {
        "image_url": "images/heavy.jpg",
        "prompts": [f"thing {index}" for index in range(prompts)],
        "threshold": 0.0,
        "max_instances": 8,  # what the demo model can find (8 queries); the estimate uses it
        "include_rle": False,
        "user_id": "bench",
        "task_id": str(uuid.uuid4()),
    }


def percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[round(fraction * (len(ordered) - 1))], 1)


def summary(outcomes: list[tuple[int, float]]) -> dict:
    served = [ms for status, ms in outcomes if status == 200]
    errors: dict[str, int] = {}
    for status, _ in outcomes:
        if status != 200:
            errors[str(status)] = errors.get(str(status), 0) + 1
    return {
        "sent": len(outcomes),
        "served": len(served),
        "errors": errors,
        "p50_ms": percentile(served, 0.5),
        "p99_ms": percentile(served, 0.99),
        "max_ms": percentile(served, 1.0),
    }


async def stream(client: httpx.AsyncClient, rate: float, until) -> list[tuple[int, float]]:
    """Small requests every 1/rate s while until() is false; returns (status, latency ms) of each."""
    outcomes: list[tuple[int, float]] = []

    async def one() -> None:
        started = time.perf_counter()
        try:
            status = (await client.post("/api/v1/predict", json=small_body())).status_code
        except httpx.HTTPError:
            status = 0
        outcomes.append((status, (time.perf_counter() - started) * 1000))

    sent = []
    while not until():
        sent.append(asyncio.ensure_future(one()))
        await asyncio.sleep(1 / rate)
    await asyncio.gather(*sent)
    return outcomes


async def measure(url: str, rate: float, seconds: float, prompts: int) -> dict:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": API_KEY}, timeout=900, limits=limits) as client:
        await stream(client, rate, _after(WARM_UP_S))  # BentoML's batcher learns its timings from the first batches
        alone = await stream(client, rate, _after(seconds))

        started = time.perf_counter()
        heavy = asyncio.ensure_future(client.post("/api/v1/predict/batch", json=heavy_body(prompts)))
        beside = await stream(client, rate, heavy.done)
        response = await heavy
        heavy_ms = (time.perf_counter() - started) * 1000
    return {
        "alone": summary(alone),
        "beside_heavy": summary(beside),
        "heavy": {"status": response.status_code, "latency_ms": round(heavy_ms, 1)},
    }


def _errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{count} x {status}" for status, count in errors.items()) or "0"


def _after(seconds: float):
    deadline = time.perf_counter() + seconds
    return lambda: time.perf_counter() >= deadline


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=2.0, help="small requests per second")
    parser.add_argument("--seconds", type=float, default=30, help="the small stream alone")
    parser.add_argument("--prompts", type=int, default=32, help="prompts of the heavy request")
    parser.add_argument("--heavy-size", default="4000x3000")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    width, height = (int(side) for side in args.heavy_size.split("x"))

    workdir = Path(tempfile.mkdtemp(prefix="sam3-interleave-"))
    images = workdir / "storage" / "images"
    images.mkdir(parents=True)
    (images / "small.jpg").write_bytes(synthetic_jpeg(640, 480, 1))
    (images / "heavy.jpg").write_bytes(synthetic_jpeg(width, height, 2))
    base = {
        "API_SECRET_KEY": API_KEY,
        "LOCAL_STORAGE_DIR": str(workdir / "storage"),
        "SAM3_WEIGHTS_PATH": "demo",
        "SAM3_DEVICE": "cpu",
        "MODEL_TIMEOUT_S": "900",
    }
    results = {}
    for mode, env in MODES.items():
        bento = ServedBento({**base, **env}, workdir / f"serve-{len(results)}.log").start()
        try:
            results[mode] = asyncio.run(measure(bento.url, args.rate, args.seconds, args.prompts))
            results[mode]["model_batching"] = httpx.get(
                f"{bento.url}/api/v1/info", headers={"X-API-Key": API_KEY}
            ).json()["batching"]
        finally:
            bento.stop()
        print(mode, results[mode], flush=True)

    machine = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    heavy_cost = args.prompts * 8 * width * height / 1e6
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
        "model": "demo (random tiny SAM 3) on the CPU, local storage, no Supabase",
        "small": f"640x480 JPEG, 1 prompt, defaults, {args.rate}/s open loop",
        "heavy": f"{width}x{height} JPEG, {args.prompts} prompts, threshold 0, max_instances 8: "
        f"{heavy_cost:,.0f} mask megapixels",
        "modes": results,
    }
    lines = [
        f"Served Bento on {machine}, {report['model']}. Small requests: {report['small']}; heavy: {report['heavy']}.",
        "",
        "| mode | small alone p50 / p99 ms | small beside the heavy p50 / p99 / max ms | small errors beside | "
        "heavy latency ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for mode, result in results.items():
        alone, beside = result["alone"], result["beside_heavy"]
        lines.append(
            f"| {mode} | {alone['p50_ms']} / {alone['p99_ms']} | {beside['p50_ms']} / {beside['p99_ms']} / "
            f"{beside['max_ms']} ({beside['served']} of {beside['sent']}) | {_errors(beside['errors'])} | "
            f"{result['heavy']['latency_ms']} ({result['heavy']['status']}) |"
        )
    save(report, args.out, machine, "heavy-interleave", markdown="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
