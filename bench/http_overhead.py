"""The served HTTP path: what it adds around the model, and how many images/s it sustains.

    python bench/http_overhead.py                                   # demo model on this CPU
    python bench/http_overhead.py --weights full --device auto      # full-size random weights on the GPU

A real `bentoml serve` (local storage, no Supabase), a 1920x1080 JPEG, one text prompt. Phase 1, one client,
sequential requests: the client's latency split into the model's own time (decode + engine, reported by the
model service) and everything else (HTTP, auth, validation, download, the call between the two services,
adaptive batching, mask PNG upload, JSON). Phase 2 (--concurrency > 0): that many clients for --seconds,
images/s and latency through adaptive batching. --env KEY=VALUE passes settings (SAM3_COMPILE=all, ...).
Writes <out>/<date>-http-<device or machine>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import statistics
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

from bench.cold_start import save_weights  # noqa: E402
from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import synthetic_jpeg  # noqa: E402

API_KEY = "overhead-key-0123456789"


def request_body() -> dict:
    return {
        "image_url": "images/photo.jpg",
        "text_prompt": "car",
        "user_id": "bench",
        "task_id": str(uuid.uuid4()),
        "include_rle": True,
    }


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def sequential(url: str, warmup: int, requests: int) -> list[dict]:
    rows = []
    with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}, timeout=120) as client:
        for index in range(warmup + requests):
            started = time.perf_counter()
            response = client.post("/api/v1/predict", json=request_body())
            client_ms = (time.perf_counter() - started) * 1000
            response.raise_for_status()
            if index >= warmup:
                rows.append({"client": client_ms, **response.json()["timings"]})
    return rows


async def saturated(url: str, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def one_client(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            response = await client.post("/api/v1/predict", json=request_body())
            if response.status_code == 200:
                latencies.append((time.perf_counter() - started) * 1000)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": API_KEY}, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(one_client(client) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "clients": clients,
        "seconds": round(elapsed, 1),
        "completed": len(latencies),
        "errors": errors,
        "images_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": p50(latencies) if latencies else None,
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1) if latencies else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--weights", default="demo", help="demo, full (random full-size weights saved first) or a dir")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the served Bento")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sam3-http-"))
    (workdir / "storage" / "images").mkdir(parents=True)
    (workdir / "storage" / "images" / "photo.jpg").write_bytes(synthetic_jpeg(1920, 1080, 1))
    weights = args.weights
    if weights == "full":
        weights = str(workdir / "weights")
        save_weights(Path(weights), tiny=False)
    env = {
        "API_SECRET_KEY": API_KEY,
        "LOCAL_STORAGE_DIR": str(workdir / "storage"),
        "SAM3_WEIGHTS_PATH": weights,
        "SAM3_DEVICE": args.device,
        **dict(item.split("=", 1) for item in args.env),
    }
    bento = ServedBento(env, workdir / "serve.log").start(timeout_s=900)
    try:
        rows = sequential(bento.url, args.warmup, args.requests)
        load = asyncio.run(saturated(bento.url, args.concurrency, args.seconds)) if args.concurrency else None
        info = httpx.get(f"{bento.url}/api/v1/info", headers={"X-API-Key": API_KEY}).json()
    finally:
        bento.stop()

    gpu = info["device"].startswith("cuda")
    if gpu:
        import torch

        subject = torch.cuda.get_device_name()
    else:
        subject = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    model_own = [row["model_total"] + row["model_decode"] for row in rows]
    report = {
        "date": dt.date.today().isoformat(),
        "device": subject,
        "model": f"{info['model_name']} ({info['parameters']:,} parameters, {info['dtype']})",
        "acceleration": info.get("acceleration"),
        "image": "1920x1080 JPEG, 1 text prompt, RLE included, local storage, no Supabase",
        "requests": len(rows),
        "sequential_p50_ms": {
            "client_latency": p50([row["client"] for row in rows]),
            "server_total": p50([row["total"] for row in rows]),
            "download": p50([row["download"] for row in rows]),
            "model_call": p50([row["model"] for row in rows]),
            "model_decode": p50([row["model_decode"] for row in rows]),
            "model_engine": p50([row["model_total"] for row in rows]),
            "upload_mask_png": p50([row["upload"] for row in rows]),
            "overhead_outside_the_model": p50([row["client"] - own for row, own in zip(rows, model_own, strict=True)]),
            "between_services": p50([row["model"] - own for row, own in zip(rows, model_own, strict=True)]),
        },
        "saturated": load,
    }
    lines = [
        f"Served Bento on {subject}, {report['model']}, {report['image']}; {len(rows)} sequential requests, p50 ms.",
        "",
        "| part | p50 ms |",
        "| --- | --- |",
        *(f"| {name.replace('_', ' ')} | {value} |" for name, value in report["sequential_p50_ms"].items()),
    ]
    if load:
        lines += [
            "",
            f"{load['clients']} concurrent clients for {load['seconds']} s: {load['images_per_s']} images/s, "
            f"p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, {load['errors']} errors.",
        ]
    save(report, args.out, f"http-{subject}", markdown="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
