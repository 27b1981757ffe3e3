"""How fast an async submission is answered: the 202's latency under 32 concurrent submitters.

    python bench/async_submit.py [--clients 32] [--requests-per-client 25] [--env JOB_STORE_SYNCHRONOUS=full]

A real `bentoml serve` (demo model) wired to the real local stand-ins (PostgreSQL + PostgREST + nginx for
Supabase, SeaweedFS for R2), as the tests start them. Rows are created first, as the Edge would. Then
--clients submitters (spread over --processes client processes, so the load generator is not the bottleneck)
each send --requests-per-client `"async": true` predicts one after the other (a closed loop: by Little's law its
p50 is about submitters / throughput); first, one submitter alone sends --sequential. A 202 means: validated, a
queue slot reserved (SQLite), the row marked processing (Supabase), the job committed. Meanwhile the gateway's
runner works through the jobs on the same CPU. Reports the 202's p50/p99, submissions/s, and how long the jobs
took to finish. Writes bench/results/<date>-<machine>-async-submit.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from served import ServedBento  # noqa: E402
from stack import STACK_API_KEY, r2_settings, running, s3_client, supabase_settings  # noqa: E402

from bench.http_overhead import p50  # noqa: E402
from bench.output import DEFAULT_OUT, save  # noqa: E402
from bench.run import synthetic_jpeg  # noqa: E402

HEADERS = {"X-API-Key": STACK_API_KEY}
IMAGE_KEY = "images/bench.jpg"
FINISHED = ("completed", "failed")


def create_rows(db_url: str, count: int) -> list[tuple[str, str]]:
    """`count` fresh segmentation_results rows (one user each), inserted in one transaction."""
    rows = [(str(uuid.uuid4()), str(uuid.uuid4())) for _ in range(count)]
    with psycopg.connect(db_url) as db, db.cursor() as cursor:
        cursor.executemany(
            "insert into auth.users (id, email) values (%s, %s)", [(user, f"{user}@example.com") for _, user in rows]
        )
        cursor.executemany(
            "insert into segmentation_results (id, user_id, image_url, status) values (%s, %s, %s, 'pending')",
            [(task, user, IMAGE_KEY) for task, user in rows],
        )
    return rows


def submitters(url: str, work: list[list[tuple[str, str]]], offsets: list[list[float]] | None, channel) -> None:
    """One client process: one submitter per list in `work`, each submitting its rows one after the other, each
    as soon as the previous answer came (closed loop), or not before its offset in `offsets` (seconds after the
    common start, one list per submitter: an open loop). `channel` = (ready, start, results): this process says
    it is ready, waits for the start time (epoch seconds), and puts [(start, end, status)] on `results`."""
    ready, start, results = channel
    ready.put(os.getpid())
    begin = start.get()

    async def one(client: httpx.AsyncClient, rows: list[tuple[str, str]], at: list[float] | None):
        timings = []
        for index, (task_id, user_id) in enumerate(rows):
            body = {"image_url": IMAGE_KEY, "text_prompt": "car", "user_id": user_id, "task_id": task_id}
            await asyncio.sleep(max(0.0, begin + (at[index] if at else 0.0) - time.time()))
            started = time.time()
            response = await client.post("/api/v1/predict", json={**body, "async": True, "include_rle": False})
            timings.append((started, time.time(), response.status_code))
        return timings

    async def run() -> list[tuple[float, float, int]]:
        limits = httpx.Limits(max_connections=len(work), max_keepalive_connections=len(work))
        async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=120, limits=limits) as client:
            schedule = offsets or [None] * len(work)
            per_submitter = await asyncio.gather(
                *(one(client, rows, at) for rows, at in zip(work, schedule, strict=True))
            )
        return [timing for timings in per_submitter for timing in timings]

    results.put(asyncio.run(run()))


def in_processes(context, url: str, groups: list, offsets: list) -> list[tuple[float, float, int]]:
    """Run `submitters` in one process per group, all starting together once every process is up."""
    ready, start, results = context.Queue(), context.Queue(), context.Queue()
    processes = [
        context.Process(target=submitters, args=(url, group, group_offsets, (ready, start, results)))
        for group, group_offsets in zip(groups, offsets, strict=True)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=300)
    begin = time.time() + 0.5
    for _ in processes:
        start.put(begin)
    timings = [timing for _ in processes for timing in results.get(timeout=900)]
    for process in processes:
        process.join()
    return timings


def summary(timings: list[tuple[float, float, int]]) -> dict:
    latencies = sorted((end - start) * 1000 for start, end, status in timings if status == 202)
    elapsed = max(end for _, end, _ in timings) - min(start for start, _, _ in timings)
    return {
        "submissions": len(timings),
        "accepted_202": len(latencies),
        "other_statuses": sorted({status for _, _, status in timings if status != 202}),
        "submissions_per_s": round(len(timings) / elapsed, 1),
        "p50_ms": p50(latencies),
        "p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 1),
        "max_ms": round(latencies[-1], 1),
    }


def wait_until_finished(url: str, task_ids: list[str], timeout_s: float) -> float:
    """Seconds until every job is completed or failed (polling the status endpoint)."""
    started = time.perf_counter()
    pending = list(task_ids)
    with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as client:
        while pending and time.perf_counter() - started < timeout_s:
            pending = [t for t in pending if client.get(f"/api/v1/tasks/{t}").json()["status"] not in FINISHED]
            if pending:
                time.sleep(1)
    if pending:
        raise RuntimeError(f"{len(pending)} jobs not finished after {timeout_s} s")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=4, help="client processes the submitters are spread over")
    parser.add_argument("--requests-per-client", type=int, default=25)
    parser.add_argument("--sequential", type=int, default=100, help="submissions by one submitter alone, first")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rate", type=float, default=0, help="submissions/s over all submitters (0: closed loop)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the served Bento")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="sam3-async-"))
    load_before = os.getloadavg()  # the dev box is shared: what else was running
    subject = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    settings = {"MAX_QUEUED_JOBS": "100000", **dict(item.split("=", 1) for item in args.env)}
    with running("s3_server.sh", workdir / "r2") as r2, running("supabase_stack.sh", workdir / "supabase") as supabase:
        s3_client(r2).put_object(Bucket=r2["R2_BUCKET"], Key=IMAGE_KEY, Body=synthetic_jpeg(640, 480, 1))
        env = {
            **r2_settings(r2),
            **supabase_settings(supabase),
            "API_SECRET_KEY": STACK_API_KEY,
            "JOB_STORE_PATH": str(workdir / "jobs.sqlite3"),
            **settings,
        }
        first = args.warmup + args.sequential
        rows = create_rows(supabase["SUPABASE_DB_URL"], first + args.clients * args.requests_per_client)
        warmup, alone, measured = rows[: args.warmup], rows[args.warmup : first], rows[first:]
        bento = ServedBento(env, workdir / "serve.log").start(timeout_s=300)
        try:
            context = multiprocessing.get_context("spawn")
            in_processes(context, bento.url, [[warmup]], [None])
            one_submitter = summary(in_processes(context, bento.url, [[alone]], [None]))
            per_client = [measured[i :: args.clients] for i in range(args.clients)]
            groups = [per_client[i :: args.processes] for i in range(args.processes)]
            offsets = [None] * args.processes
            if args.rate:  # submission n (counted over all submitters) n / rate seconds after the start
                each = [
                    [(k * args.clients + i) / args.rate for k in range(len(per_client[i]))] for i in range(args.clients)
                ]
                offsets = [each[i :: args.processes] for i in range(args.processes)]
            concurrent = summary(in_processes(context, bento.url, groups, offsets))
            drain_s = wait_until_finished(bento.url, [task for task, _ in rows], timeout_s=1800)
            sample = rows[:: max(1, len(rows) // 100)]
            outcomes = {
                status: sum(
                    httpx.get(f"{bento.url}/api/v1/tasks/{task}", headers=HEADERS).json()["status"] == status
                    for task, _ in sample
                )
                for status in FINISHED
            }
        finally:
            bento.stop()

    report = {
        "date": dt.date.today().isoformat(),
        "machine": subject,
        "load_average_before": [round(value, 2) for value in load_before],
        "served": "bentoml serve (demo model), Supabase and R2 stand-ins on loopback, "
        + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "request": '640x480 JPEG, 1 text prompt, "async": true, include_rle false',
        "one_submitter": one_submitter,
        "concurrent": {
            "submitters": args.clients,
            "client_processes": args.processes,
            "load": f"open loop, {args.rate:g} submissions/s in all" if args.rate else "closed loop",
            **concurrent,
        },
        "jobs_finished_s_after_the_last_submission": round(drain_s, 1),
        "sampled_outcomes": outcomes,
    }
    lines = [
        f"Async submission on {subject}: {report['served']}; {report['request']}. The jobs run meanwhile.",
        "",
        "| submitters | load | submissions | 202 p50 ms | 202 p99 ms | submissions/s |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| 1 | closed loop | {one_submitter['submissions']} | {one_submitter['p50_ms']} | {one_submitter['p99_ms']} "
        f"| {one_submitter['submissions_per_s']} |",
        f"| {args.clients} | {report['concurrent']['load']} | {concurrent['submissions']} | {concurrent['p50_ms']} "
        f"| {concurrent['p99_ms']} | {concurrent['submissions_per_s']} |",
        "",
        f"All jobs finished {report['jobs_finished_s_after_the_last_submission']} s after the last submission;"
        f" of {len(sample)} sampled: {outcomes}.",
    ]
    kind = "async-submit" + (f"-rate-{args.rate:g}" if args.rate else "")
    kind += "".join(f"-{item.lower().replace('=', '-')}" for item in args.env)
    save(report, args.out, subject, kind, markdown="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
