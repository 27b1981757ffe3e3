"""A clip through the served video endpoint: its speed against the naive way, image latency beside it, flat memory.

    python bench/video_served.py            # demo model on this CPU, local storage, ~5 minutes on 2 cores

One real `bentoml serve` (demo model: tiny random Sam3VideoModel on the CPU; LOCAL_STORAGE_DIR as the bucket, no
Supabase: rows are not written), three measurements in the same run:

(a) A --size clip of --frames frames (tests/clips.py: moving squares, H.264) through POST /api/v1/predict/video with
    one prompt: frames/s from the 202 to the task's `completed` (status polled every 0.1 s) and the model's share
    (`timings.model`, the gateway's call to the model service, over the time to `completed`). Against the naive way
    on the same clip, prompt and server: every frame decoded by the client (PyAV, via video/), JPEG-encoded (quality
    90), uploaded (written to the storage directory) and sent through POST /api/v1/predict, one at a time and
    --naive-concurrency at a time; its model share is the responses' `timings.model` over their latency (requests
    in flight together overlap). The naive way gets no object ids: every frame is detected alone.
(b) Image requests (a distinct 640x480 JPEG each, one prompt, defaults) sent at a steady --rate (open loop: one every
    1/rate s whatever the others do), alone for --seconds, then while a clip of --beside-frames frames runs: p50/p99
    of their latency. The model does a clip's work one frame per unit on its device thread, so an image batch waits
    for at most one frame.
(c) The model worker's RSS (psutil, the sam3-model process; the gateway's too) sampled every 0.1 s while a clip of
    --memory-frames (50, 500 and 3000 = MAX_VIDEO_FRAMES) frames runs, with the task's frames_done: its peak, and
    the RSS at a few points of the long clips. Flat memory: the long clips' peak is the 50-frame clip's.

(a) and (b) are repeated --repeat times (the box is shared: the spread shows). A short clip and a few image requests
warm the server up first. Writes <out>/<date>-<machine>-video-served.json/.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import io
import itertools
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from clips import write_clip  # noqa: E402
from served import ServedBento  # noqa: E402

from bench.heavy_interleave import percentile  # noqa: E402
from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import synthetic_jpeg  # noqa: E402
from video import Sampling, frames  # noqa: E402

API_KEY = "video-served-key-0123456789"
PROMPT = "red square"
POLL_S = 0.1
MB = 1024 * 1024


class Server:
    """The served Bento's URL, its storage directory and its worker processes."""

    def __init__(self, bento: ServedBento, storage: Path) -> None:
        self.bento = bento
        self.storage = storage
        self.model = psutil.Process(bento.worker_pids("sam3-model")[0])
        self.gateway = psutil.Process(bento.worker_pids("sam3-gateway")[0])

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
        return httpx.AsyncClient(base_url=self.bento.url, headers={"X-API-Key": API_KEY}, timeout=900, limits=limits)


async def run_clip(server: Server, client: httpx.AsyncClient, key: str) -> dict:
    """One clip through POST /api/v1/predict/video, from the 202 to `completed`, with the workers' RSS sampled at
    each status poll."""
    task_id = str(uuid.uuid4())
    body = {"video_url": key, "user_id": "bench", "task_id": task_id, "prompts": [PROMPT]}
    rss_before = server.model.memory_info().rss
    started = time.perf_counter()
    answer = await client.post("/api/v1/predict/video", json=body)
    assert answer.status_code == 202, answer.text
    samples = []  # (seconds, frames_done, model RSS, gateway RSS)
    while True:
        status = (await client.get(f"/api/v1/tasks/{task_id}")).json()
        elapsed = time.perf_counter() - started
        done = (status.get("progress") or {}).get("frames_done", 0)
        samples.append((elapsed, done, server.model.memory_info().rss, server.gateway.memory_info().rss))
        if status["status"] in ("completed", "failed"):
            break
        await asyncio.sleep(POLL_S)
    assert status["status"] == "completed", status
    result = status["result"]
    count = result["video"]["frames"]
    return {
        "frames": count,
        "objects": len(result["objects"]),
        "seconds": round(elapsed, 2),
        "frames_per_s": round(count / elapsed, 2),
        "timings_ms": result["timings"],
        "model_share": round(result["timings"]["model"] / 1000 / elapsed, 3),
        "model_ms_per_frame": round(result["timings"]["model"] / count, 1),
        "model_rss_mb": {"before": round(rss_before / MB, 1), "peak": round(max(s[2] for s in samples) / MB, 1)},
        "gateway_rss_peak_mb": round(max(s[3] for s in samples) / MB, 1),
        "samples": [  # about 100 of them, the last one included
            (round(t, 2), done, round(model / MB, 1), round(gateway / MB, 1))
            for t, done, model, gateway in samples[::-1][:: max(1, len(samples) // 100)][::-1]
        ],
    }


def jpeg(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def naive(server: Server, client: httpx.AsyncClient, clip: Path, concurrency: int) -> dict:
    """Every frame of the clip decoded, JPEG-encoded, uploaded and sent through POST /api/v1/predict, at most
    `concurrency` requests in flight; the client's own work (decode, encode, upload) is timed apart."""
    prefix = f"naive/{uuid.uuid4().hex}"
    (server.storage / prefix).mkdir(parents=True)
    gate = asyncio.Semaphore(concurrency)
    client_s = 0.0
    latencies, model_ms, statuses, sent = [], [], [], []

    async def one(key: str) -> None:
        body = {"image_url": key, "text_prompt": PROMPT, "user_id": "bench", "task_id": str(uuid.uuid4())}
        try:
            began = time.perf_counter()
            answer = await client.post("/api/v1/predict", json=body)
            latencies.append((time.perf_counter() - began) * 1000)
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                model_ms.append(answer.json()["timings"]["model"])
        finally:
            gate.release()

    started = time.perf_counter()
    decoded = frames(clip, Sampling())
    while True:
        began = time.perf_counter()
        frame = next(decoded, None)
        if frame is None:
            break
        key = f"{prefix}/{frame.index}.jpg"
        (server.storage / key).write_bytes(jpeg(frame.image))
        client_s += time.perf_counter() - began
        await gate.acquire()
        sent.append(asyncio.ensure_future(one(key)))
    await asyncio.gather(*sent)
    elapsed = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "frames": len(sent),
        "served": statuses.count(200),
        "seconds": round(elapsed, 2),
        "frames_per_s": round(len(sent) / elapsed, 2),
        "client_decode_encode_upload_ms_per_frame": round(client_s * 1000 / len(sent), 1),
        "request_p50_ms": percentile(latencies, 0.5),
        "model_share": round(sum(model_ms) / sum(latencies), 3),
        "model_ms_per_frame": round(sum(model_ms) / len(model_ms), 1),
    }


class ImageStream:
    """Image requests at a steady rate (open loop), each a distinct 640x480 JPEG (no image-cache hits)."""

    def __init__(self, server: Server, client: httpx.AsyncClient, rate: float) -> None:
        self.server, self.client, self.rate = server, client, rate
        self.seeds = itertools.count(1000)
        (server.storage / "stream").mkdir(exist_ok=True)

    async def run(self, until) -> dict:
        outcomes: list[tuple[int, float]] = []

        async def one() -> None:
            seed = next(self.seeds)
            key = f"stream/{seed}.jpg"
            (self.server.storage / key).write_bytes(await asyncio.to_thread(synthetic_jpeg, 640, 480, seed))
            body = {"image_url": key, "text_prompt": PROMPT, "user_id": "bench", "task_id": str(uuid.uuid4())}
            began = time.perf_counter()
            try:
                status = (await self.client.post("/api/v1/predict", json=body)).status_code
            except httpx.HTTPError:
                status = 0
            outcomes.append((status, (time.perf_counter() - began) * 1000))

        sent = []
        while not until():
            sent.append(asyncio.ensure_future(one()))
            await asyncio.sleep(1 / self.rate)
        await asyncio.gather(*sent)
        served = [ms for status, ms in outcomes if status == 200]
        return {
            "sent": len(outcomes),
            "served": len(served),
            "errors": len(outcomes) - len(served),
            "p50_ms": percentile(served, 0.5),
            "p99_ms": percentile(served, 0.99),
            "max_ms": percentile(served, 1.0),
        }


def after(seconds: float):
    deadline = time.perf_counter() + seconds
    return lambda: time.perf_counter() >= deadline


def without_samples(run: dict) -> dict:
    return {key: value for key, value in run.items() if key != "samples"}


async def measure(server: Server, clips: dict[str, Path], args) -> dict:
    async with server.client() as client:
        await run_clip(server, client, "videos/warm-up.mp4")  # the first clip pays the tracker's first calls
        stream = ImageStream(server, client, args.rate)
        await stream.run(after(5))  # BentoML's batcher learns its timings from the first batches

        runs = []
        for repetition in range(args.repeat):
            clip = without_samples(await run_clip(server, client, "videos/clip.mp4"))
            naive_runs = [await naive(server, client, clips["clip"], n) for n in (1, args.naive_concurrency)]
            print(f"({repetition}a)", clip, naive_runs, flush=True)

            alone = await stream.run(after(args.seconds))
            clip_task = asyncio.ensure_future(run_clip(server, client, "videos/beside.mp4"))
            beside = await stream.run(clip_task.done)
            clip_beside = without_samples(await clip_task)
            print(f"({repetition}b)", alone, beside, clip_beside["frames_per_s"], flush=True)
            runs.append(
                {
                    "clip": clip,
                    "naive": naive_runs,
                    "images_alone": alone,
                    "images_beside_clip": beside,
                    "clip_beside_images": clip_beside,
                }
            )

        memory = {}
        for count in args.memory_frames:
            memory[count] = await run_clip(server, client, f"videos/memory-{count}.mp4")
            print("(c)", count, memory[count]["model_rss_mb"], memory[count]["frames_per_s"], flush=True)
    return {"runs": runs, "memory": memory}


def rss_at(samples: list, frames_done: int) -> float | str:
    """The model worker's RSS (MB) at the first sample with at least `frames_done` frames done ("" if none)."""
    return next((model for _, done, model, _ in samples if done >= frames_done), "")


def table(report: dict) -> str:
    runs, memory = report["results"]["runs"], report["results"]["memory"]
    lines = [
        f"Served Bento on {report['machine']}, {report['model']}. Clip: {report['clip']}. "
        f"Load average at the start / end: {report['load_average_at_start']} / {report['load_average_at_end']}.",
        "",
        "| run | path | frames/s end to end | model share | model ms per frame | notes |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for number, run in enumerate(runs, 1):
        clip = run["clip"]
        lines.append(
            f"| {number} | POST /api/v1/predict/video | {clip['frames_per_s']} | {clip['model_share']:.0%} | "
            f"{clip['model_ms_per_frame']} | {clip['objects']} objects tracked, ids stable |"
        )
        for naive_run in run["naive"]:
            lines.append(
                f"| {number} | naive: every frame through /api/v1/predict, {naive_run['concurrency']} in flight | "
                f"{naive_run['frames_per_s']} | {naive_run['model_share']:.0%} | {naive_run['model_ms_per_frame']} | "
                f"client decode+JPEG+upload {naive_run['client_decode_encode_upload_ms_per_frame']} ms/frame, "
                f"request p50 {naive_run['request_p50_ms']} ms, no object ids |"
            )
    lines += [
        "",
        f"Image requests ({report['images']}):",
        "",
        "| run | phase | p50 / p99 / max ms | served / sent | clip frames/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for number, run in enumerate(runs, 1):
        alone, beside = run["images_alone"], run["images_beside_clip"]
        lines += [
            f"| {number} | no clip running | {alone['p50_ms']} / {alone['p99_ms']} / {alone['max_ms']} | "
            f"{alone['served']} / {alone['sent']} | |",
            f"| {number} | a clip running | {beside['p50_ms']} / {beside['p99_ms']} / {beside['max_ms']} | "
            f"{beside['served']} / {beside['sent']} | {run['clip_beside_images']['frames_per_s']} "
            f"({run['clip_beside_images']['frames']} frames; alone: {run['clip']['frames_per_s']}) |",
        ]
    lines += [
        "",
        "Model worker RSS (sam3-model process, MB) while a clip runs:",
        "",
        "| clip frames | before | peak | at frame 50 | at frame 500 | at the end | gateway peak | frames/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for count, run in memory.items():
        samples = run["samples"]
        lines.append(
            f"| {count} | {run['model_rss_mb']['before']} | {run['model_rss_mb']['peak']} | {rss_at(samples, 50)} | "
            f"{rss_at(samples, 500)} | {samples[-1][2]} | {run['gateway_rss_peak_mb']} | {run['frames_per_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="320x240", help="the clips' frame size")
    parser.add_argument("--frames", type=int, default=300, help="frames of the clip in (a)")
    parser.add_argument("--beside-frames", type=int, default=900, help="frames of the clip in (b)")
    parser.add_argument("--fps", type=int, default=30, help="the clips' frame rate")
    parser.add_argument("--naive-concurrency", type=int, default=4)
    parser.add_argument("--rate", type=float, default=4.0, help="image requests per second in (b)")
    parser.add_argument("--seconds", type=float, default=30, help="the image stream alone in (b)")
    parser.add_argument("--repeat", type=int, default=2, help="repetitions of (a) and (b): the box is shared")
    parser.add_argument("--memory-frames", default="50,500,3000", help="clip lengths in (c)")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    args.memory_frames = [int(count) for count in args.memory_frames.split(",")]
    width, height = (int(side) for side in args.size.split("x"))

    load_at_start = [round(value, 2) for value in os.getloadavg()]
    workdir = Path(tempfile.mkdtemp(prefix="sam3-video-served-"))
    videos = workdir / "storage" / "videos"
    videos.mkdir(parents=True)
    shape = {"width": width, "height": height, "fps": args.fps}
    clips = {
        "warm-up": write_clip(videos / "warm-up.mp4", **{**shape, "frames": 30}),
        "clip": write_clip(videos / "clip.mp4", **shape, frames=args.frames),
        "beside": write_clip(videos / "beside.mp4", **shape, frames=args.beside_frames),
        **{f"memory-{n}": write_clip(videos / f"memory-{n}.mp4", **shape, frames=n) for n in args.memory_frames},
    }
    env = {"API_SECRET_KEY": API_KEY, "LOCAL_STORAGE_DIR": str(workdir / "storage"), "SAM3_DEVICE": "cpu"}
    bento = ServedBento(env, workdir / "serve.log").start()
    try:
        results = asyncio.run(measure(Server(bento, workdir / "storage"), clips, args))
    finally:
        bento.stop()

    machine = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "load_average_at_start": load_at_start,
        "load_average_at_end": [round(value, 2) for value in os.getloadavg()],
        "model": "demo (tiny random Sam3VideoModel) on the CPU, local storage, no Supabase",
        "clip": f"{width}x{height} H.264, {args.fps} fps, moving squares, 1 prompt '{PROMPT}'; {args.frames} frames in "
        f"(a), {args.beside_frames} in (b)",
        "images": f"a distinct 640x480 JPEG each, 1 prompt, defaults, {args.rate}/s open loop",
        "memory_samples": "(seconds since the submission, frames_done, model RSS MB, gateway RSS MB) every status poll",
        "results": results,
    }
    markdown = table(report)
    save(report, args.out, machine, "video-served", markdown=markdown)
    print(markdown)


if __name__ == "__main__":
    main()
