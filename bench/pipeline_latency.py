"""The round trips around the model: the Supabase row update and the R2 download, with a WAN round-trip time.

    python bench/pipeline_latency.py [--rtt-ms 40] [--requests 30]

Starts the real local stand-ins (SeaweedFS for R2; PostgreSQL + PostgREST + nginx for Supabase, as the tests do)
behind a proxy that delays every byte by half the round-trip time each way, as the path from a GPU box to
Supabase and R2 would. Measures, sequentially: the row's `processing` update alone, the image download alone,
and full predicts through the gateway's pipeline (demo model in this process); from the pipeline's own timings,
the time it spent before the model (row update and download). Done one after the other that would be their sum;
overlapped, about the longer of the two. Writes bench/results/<date>-<machine>-pipeline-latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from in_process import InProcessModel  # noqa: E402
from stack import new_task_row, running, s3_client  # noqa: E402

from backend.api_models import PredictRequest  # noqa: E402
from backend.pipeline import Limits, PredictPipeline  # noqa: E402
from backend.segmenter import Segmenter  # noqa: E402
from backend.settings import Settings  # noqa: E402
from bench.http_overhead import p50  # noqa: E402
from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import synthetic_jpeg  # noqa: E402
from storage import R2Storage  # noqa: E402
from tasks import SupabaseTaskStore  # noqa: E402


class DelayingProxy:
    """127.0.0.1:<port> -> upstream, each chunk delivered `one_way_s` after it was read, in both directions."""

    def __init__(self, upstream: str, one_way_s: float) -> None:
        parts = urlsplit(upstream)
        self.upstream_host, self.upstream_port = parts.hostname, parts.port
        self.one_way_s = one_way_s
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = urlunsplit((parts.scheme, f"127.0.0.1:{self.port}", parts.path, "", ""))
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _connection(self, client_reader, client_writer) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        await asyncio.gather(
            self._pump(client_reader, upstream_writer),
            self._pump(upstream_reader, client_writer),
            return_exceptions=True,
        )

    async def _pump(self, reader, writer) -> None:
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                writer.write(data)
                await writer.drain()
            writer.close()

        delivering = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.one_way_s, data))
        finally:
            queue.put_nowait(None)
            await delivering


async def measure(pipeline: PredictPipeline, supabase: dict, requests: int) -> dict:
    rows = [new_task_row(supabase) for _ in range(2 * requests + 2)]
    for task_id, user_id in rows[:2]:  # warm up: connections, the model's first call
        await pipeline.predict(
            PredictRequest(image_url="images/in.jpg", text_prompt="car", user_id=user_id, task_id=task_id)
        )
    row_alone, download_alone, before_model, totals = [], [], [], []
    for task_id, _ in rows[2 : 2 + requests]:
        started = time.perf_counter()
        await pipeline.tasks.mark_processing(task_id)
        row_alone.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        await asyncio.to_thread(pipeline.store.get_image, "images/in.jpg", 10**8)
        download_alone.append((time.perf_counter() - started) * 1000)
    for task_id, user_id in rows[2 + requests :]:
        request = PredictRequest(image_url="images/in.jpg", text_prompt="car", user_id=user_id, task_id=task_id)
        timings = (await pipeline.predict(request))["timings"]
        before_model.append(timings["total"] - timings["model"] - timings["upload"])
        totals.append(timings["total"])
    return {
        "row_processing_update_alone": p50(row_alone),
        "image_download_alone": p50(download_alone),
        "one_after_the_other_would_be": round(p50(row_alone) + p50(download_alone), 2),
        "pipeline_before_the_model": p50(before_model),
        "pipeline_total_before_the_completed_update": p50(totals),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rtt-ms", type=float, default=40)
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="sam3-latency-"))
    segmenter = Segmenter(Settings(sam3_weights_path="demo", sam3_device="cpu", _env_file=None))
    with running("s3_server.sh", workdir / "r2") as r2, running("supabase_stack.sh", workdir / "supabase") as supabase:
        s3_client(r2).put_object(Bucket=r2["R2_BUCKET"], Key="images/in.jpg", Body=synthetic_jpeg(1920, 1080, 1))
        r2_proxy = DelayingProxy(r2["R2_ENDPOINT_URL"], args.rtt_ms / 2000)
        supabase_proxy = DelayingProxy(supabase["SUPABASE_URL"], args.rtt_ms / 2000)
        store = R2Storage(r2_proxy.url, r2["R2_BUCKET"], r2["R2_ACCESS_KEY_ID"], r2["R2_SECRET_ACCESS_KEY"])
        tasks = SupabaseTaskStore(supabase_proxy.url, supabase["SUPABASE_SERVICE_ROLE_KEY"])
        while not segmenter.ready:
            time.sleep(0.1)

        pipeline = PredictPipeline(
            store, tasks, InProcessModel(segmenter), Limits(20_000_000, 50_000_000, 40_000, 2_500, 86_400)
        )
        results = asyncio.run(measure(pipeline, supabase, args.requests))
    machine = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    report = {
        "date": dt.date.today().isoformat(),
        "machine": machine,
        "round_trip_ms_added": args.rtt_ms,
        "image": "1920x1080 JPEG from the S3 stand-in; demo model on the CPU",
        "requests": args.requests,
        "p50_ms": results,
    }
    print(json.dumps(report, indent=2))
    save(report, args.out, machine, "pipeline-latency")


if __name__ == "__main__":
    main()
