"""What the HTTP path adds around the model: one client, sequential requests, against a served Bento.

    python bench/http_overhead.py [--requests 60]

Demo model on this machine's CPU, local storage, no Supabase, a 1920x1080 JPEG: the client's latency split into
the model's own time (decode + engine, reported by the model service) and everything else (HTTP, auth,
validation, download, the call between the two services, adaptive batching, mask PNG upload, JSON). Everything
else is CPU work that a GPU box does the same way, so it is the HTTP overhead to add to bench/run.py's numbers.
Writes bench/results/<date>-http-overhead-<machine>.json and .md.
"""

from __future__ import annotations

import argparse
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

from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import synthetic_jpeg  # noqa: E402

API_KEY = "overhead-key-0123456789"


def p50(values: list[float]) -> float:
    return round(statistics.median(values), 2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sam3-http-overhead-"))
    (workdir / "storage" / "images").mkdir(parents=True)
    (workdir / "storage" / "images" / "photo.jpg").write_bytes(synthetic_jpeg(1920, 1080, 1))
    bento = ServedBento(
        {"API_SECRET_KEY": API_KEY, "LOCAL_STORAGE_DIR": str(workdir / "storage")}, workdir / "serve.log"
    ).start()
    rows: list[dict] = []
    try:
        with httpx.Client(base_url=bento.url, headers={"X-API-Key": API_KEY}, timeout=60) as client:
            for index in range(args.warmup + args.requests):
                body = {
                    "image_url": "images/photo.jpg",
                    "text_prompt": "car",
                    "user_id": "bench",
                    "task_id": str(uuid.uuid4()),
                    "include_rle": True,
                }
                started = time.perf_counter()
                response = client.post("/api/v1/predict", json=body)
                client_ms = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                if index >= args.warmup:
                    rows.append({"client": client_ms, **response.json()["timings"]})
    finally:
        bento.stop()

    model_own = [row["model_total"] + row["model_decode"] for row in rows]
    report = {
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.machine()} {len(os.sched_getaffinity(0))} cores (CPU, demo model)",
        "image": "1920x1080 JPEG, 1 text prompt, RLE included, local storage, no Supabase",
        "requests": len(rows),
        "p50_ms": {
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
    }
    lines = [
        f"HTTP overhead, {report['machine']}, {report['image']}; {report['requests']} sequential requests, p50 ms.",
        "",
        "| part | p50 ms |",
        "| --- | --- |",
        *(f"| {name.replace('_', ' ')} | {value} |" for name, value in report["p50_ms"].items()),
    ]
    save(report, args.out, f"http-overhead-{platform.machine()}", markdown="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
