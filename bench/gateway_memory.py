"""What a gateway worker costs in memory and start-up, now that it loads no torch, against a revision where it did.

    python bench/gateway_memory.py [--baseline 0c69425] [--workers 2] [--requests 8]

Serves each tree (`--baseline` REV exported with git archive, then the working tree) with `bentoml serve`, the
demo model, local storage and GATEWAY_WORKERS=--workers. Per tree: seconds from launch until /livez answers (a
gateway worker is up) and until /readyz does (the model too); then --requests predicts that ask for an overlay and
a cutout (the gateway decodes the photo and draws on it); then, per worker process, RSS, USS (memory only it holds)
and PSS, in MiB, its CPU seconds so far, and whether it has libtorch mapped. Start-up times on a 2-core box that
starts the model worker at the same moment are noisy: compare the CPU seconds and the memory.
Writes bench/results/<date>-<machine>-gateway-memory.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from served import ServedBento  # noqa: E402

from bench.async_submit import cpu_model, export  # noqa: E402
from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import synthetic_jpeg  # noqa: E402

MIB = 2**20


def first_answer(url: str, since: float, stop: threading.Event, into: dict) -> None:
    """Seconds from `since` until `url` first answers 200 (polled every 50 ms)."""
    while not stop.is_set():
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                into["s"] = round(time.monotonic() - since, 2)
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)


def worker(pid: int) -> dict:
    process = psutil.Process(pid)
    memory = process.memory_full_info()
    cpu = process.cpu_times()
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {
        "rss_mib": round(memory.rss / MIB),
        "uss_mib": round(memory.uss / MIB),
        "pss_mib": round(memory.pss / MIB),
        "cpu_s": round(cpu.user + cpu.system, 2),
        "libtorch_mapped": "libtorch" in maps,
    }


def measure(name: str, directory: Path, workdir: Path, args) -> dict:
    storage = workdir / f"storage-{name}"
    (storage / "images").mkdir(parents=True)
    (storage / "images" / "photo.jpg").write_bytes(synthetic_jpeg(1920, 1080, 1))
    env = {
        "LOCAL_STORAGE_DIR": str(storage),
        "GATEWAY_WORKERS": str(args.workers),
        "JOB_STORE_PATH": str(workdir / f"jobs-{name}.sqlite3"),
    }
    bento = ServedBento(env, workdir / f"serve-{name}.log", directory=directory)
    live: dict = {}
    stop = threading.Event()
    launched = time.monotonic()
    poller = threading.Thread(target=first_answer, args=(f"{bento.url}/livez", launched, stop, live))
    poller.start()
    try:
        bento.start(timeout_s=300)
        ready_s = round(time.monotonic() - launched, 2)
        poller.join(timeout=5)
        body = {"image_url": "images/photo.jpg", "text_prompt": "car", "outputs": ["overlay", "cutout"]}
        for _ in range(args.requests):
            request = {**body, "user_id": "bench", "task_id": str(uuid.uuid4())}
            response = httpx.post(f"{bento.url}/api/v1/predict", json=request, timeout=300)
            assert response.status_code == 200, response.text
        assert len(list(storage.glob("masks/bench/*.overlay.jpg"))) == args.requests
        return {
            "served": name,
            "gateway_live_s": live.get("s"),
            "ready_s": ready_s,
            "gateway_workers": [worker(pid) for pid in bento.worker_pids("sam3-gateway")],
            "model_worker": [worker(pid) for pid in bento.worker_pids("sam3-model")],
        }
    finally:
        stop.set()
        bento.stop()


def markdown(report: dict) -> str:
    lines = [
        f"Gateway worker memory on {report['machine']} ({report['cpu']}), {report['served']}.",
        "",
        "| tree | worker | RSS MiB | USS MiB | PSS MiB | CPU s | libtorch | gateway live s | ready s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for tree in report["trees"]:
        rows = [("gateway", w) for w in tree["gateway_workers"]] + [("model", w) for w in tree["model_worker"]]
        for kind, w in rows:
            lines.append(
                f"| {tree['served']} | {kind} | {w['rss_mib']} | {w['uss_mib']} | {w['pss_mib']} | {w['cpu_s']} "
                f"| {'yes' if w['libtorch_mapped'] else 'no'} | {tree['gateway_live_s']} | {tree['ready_s']} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", default="0c69425", help="a revision whose gateway imported torch")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    machine = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    with tempfile.TemporaryDirectory(prefix="gateway-memory-") as tmp:
        workdir = Path(tmp)
        baseline = export(args.baseline, workdir / "baseline")
        trees = [
            measure(f"baseline {args.baseline}", baseline, workdir, args),
            measure("working tree", ROOT, workdir, args),
        ]
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "cpu": cpu_model(),
        "served": f"bentoml serve, demo model, GATEWAY_WORKERS={args.workers}, {args.requests} predicts with an "
        "overlay and a cutout of a 1920x1080 JPEG (drawn by the gateway) before measuring",
        "trees": trees,
    }
    table = markdown(report)
    print(table)
    save(report, args.out, machine, "gateway-memory", table)


if __name__ == "__main__":
    main()
