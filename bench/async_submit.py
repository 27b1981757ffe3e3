"""How fast an async submission is answered: the 202's latency under 32 concurrent submitters, and the CPU it costs.

    python bench/async_submit.py [--loads 0,40] [--jobs meanwhile|held] [--baseline REV ...] [--env KEY=VALUE]

A real `bentoml serve` (demo model) wired to the real local stand-ins (PostgreSQL + PostgREST + nginx for
Supabase, SeaweedFS for R2), as the tests start them. Rows are created first, as the Edge would. Then, per load,
--clients submitters (spread over --processes client processes, aiohttp with keep-alive, so the load generator
costs little CPU of the 2 cores it shares) each send --requests-per-client `"async": true` predicts. Load 0 is a
closed loop (each submitter sends again as soon as answered: by Little's law p50 is about submitters /
throughput); load R is an open loop at R submissions/s in all. First, one submitter alone sends --sequential.
A 202 means: validated, a queue slot reserved (SQLite), the row marked processing (Supabase), the job committed.

--jobs meanwhile: the gateway's runner works through the jobs during the measured phase, the demo model's
inference on the same CPU (on a GPU box it runs on the GPU). --jobs held: the model service is paused (SIGSTOP)
for the measured phase, so the phase measures the submission path alone; the jobs run once it is resumed.
Every load ends with all its jobs finished (reported: how long they took, and a sample of outcomes).

CPU per 202 is read from /proc for each process group over the measured phase (the client processes report their
own): what the gateway spends per submission, beside PostgREST, PostgreSQL, nginx, SeaweedFS and the clients.

--baseline REV serves the code of git revision REV first (an export of it), then the working tree, on the same
stand-ins: before and after in one run; repeat it to serve several revisions in turn (one lever each).
--baseline-without PKG,... hides installed packages from the baselines' processes (packages REV did not require,
e.g. uvloop,httptools, which uvicorn uses whenever it can import them).
--repeat N measures each load N times on each tree (the box is shared: the spread shows).
Writes bench/results/<date>-<machine>-async-submit[-...].json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import httpx
import psutil
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
    it is ready, waits for the start time (epoch seconds), and puts ([(start, end, status)], its CPU seconds over
    the run) on `results`."""
    ready, start, results = channel
    ready.put(os.getpid())
    begin = start.get()

    async def one(session: aiohttp.ClientSession, rows: list[tuple[str, str]], at: list[float] | None):
        timings = []
        for index, (task_id, user_id) in enumerate(rows):
            body = {"image_url": IMAGE_KEY, "text_prompt": "car", "user_id": user_id, "task_id": task_id}
            await asyncio.sleep(max(0.0, begin + (at[index] if at else 0.0) - time.time()))
            started = time.time()
            async with session.post("/api/v1/predict", json={**body, "async": True, "include_rle": False}) as answer:
                await answer.read()
            timings.append((started, time.time(), answer.status))
        return timings

    async def run() -> list[tuple[float, float, int]]:
        connector = aiohttp.TCPConnector(limit=len(work))
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(url, headers=HEADERS, connector=connector, timeout=timeout) as session:
            schedule = offsets or [None] * len(work)
            per_submitter = await asyncio.gather(
                *(one(session, rows, at) for rows, at in zip(work, schedule, strict=True))
            )
        return [timing for timings in per_submitter for timing in timings]

    before = resource.getrusage(resource.RUSAGE_SELF)
    timings = asyncio.run(run())
    after = resource.getrusage(resource.RUSAGE_SELF)
    results.put((timings, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime))


def in_processes(context, url: str, groups: list, offsets: list) -> tuple[list[tuple[float, float, int]], float]:
    """Run `submitters` in one process per group, all starting together once every process is up. Returns the
    timings and the client processes' CPU seconds over the run."""
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
    answers = [results.get(timeout=900) for _ in processes]
    for process in processes:
        process.join()
    return [timing for timings, _ in answers for timing in timings], sum(cpu for _, cpu in answers)


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


def outcomes(url: str, task_ids: list[str]) -> dict[str, int]:
    sample = task_ids[:: max(1, len(task_ids) // 100)]
    statuses = [httpx.get(f"{url}/api/v1/tasks/{task}", headers=HEADERS).json()["status"] for task in sample]
    return {status: statuses.count(status) for status in FINISHED}


def stack_roots(r2_dir: Path, supabase_dir: Path) -> dict[str, int]:
    """The stand-ins' main processes, from the pid files their scripts (scripts/local-stack/) write."""
    pgdata = Path((supabase_dir / "pgdata_path").read_text().strip()) / "data"
    return {
        "postgrest": int((supabase_dir / "postgrest.pid").read_text()),
        "postgres": int((pgdata / "postmaster.pid").read_text().split()[0]),
        "nginx": int((supabase_dir / "nginx" / "nginx.pid").read_text()),
        "seaweedfs": int((r2_dir / "weed.pid").read_text()),
    }


def cpu_by_process(roots: dict[str, list[int]]) -> dict[str, dict[int, float]]:
    """CPU seconds (user + system) so far of each process in each group: the roots and their descendants."""
    groups: dict[str, dict[int, float]] = {}
    for group, pids in roots.items():
        seconds = groups.setdefault(group, {})
        for pid in pids:
            try:
                root = psutil.Process(pid)
                family = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for process in family:
                try:
                    times = process.cpu_times()
                except psutil.Error:
                    continue
                seconds[process.pid] = times.user + times.system
    return groups


def cpu_ms_per(before: dict, after: dict, count: int) -> dict[str, float]:
    """Each group's CPU between the two readings, in ms per submission (a process that ended meanwhile is lost)."""
    return {
        group: round(
            1000 * sum(seconds - before.get(group, {}).get(pid, 0.0) for pid, seconds in now.items()) / count, 2
        )
        for group, now in after.items()
    }


def signal_all(pids: list[int], number: int) -> None:
    for pid in pids:
        os.kill(pid, number)


def measure_load(context, bento: ServedBento, db_url: str, args, rate: float, roots: dict) -> dict:
    """One load: fresh rows, the measured phase (model service paused with --jobs held), then its jobs to the end."""
    rows = create_rows(db_url, args.clients * args.requests_per_client)
    per_client = [rows[i :: args.clients] for i in range(args.clients)]
    groups = [per_client[i :: args.processes] for i in range(args.processes)]
    offsets = [None] * args.processes
    if rate:  # submission n (counted over all submitters) n / rate seconds after the start
        each = [[(k * args.clients + i) / rate for k in range(len(per_client[i]))] for i in range(args.clients)]
        offsets = [each[i :: args.processes] for i in range(args.processes)]
    model = bento.worker_pids("sam3-model")
    roots = {**roots, "gateway": bento.worker_pids("sam3-gateway"), "model service": model}
    if args.jobs == "held":
        signal_all(model, signal.SIGSTOP)
    try:
        before = cpu_by_process(roots)
        timings, client_s = in_processes(context, bento.url, groups, offsets)
        after = cpu_by_process(roots)
    finally:
        if args.jobs == "held":
            signal_all(model, signal.SIGCONT)
    result = summary(timings)
    cpu = {**cpu_ms_per(before, after, len(timings)), "clients": round(1000 * client_s / len(timings), 2)}
    task_ids = [task for task, _ in rows]
    return {
        "load": f"open loop, {rate:g} submissions/s in all" if rate else "closed loop",
        **result,
        "cpu_ms_per_submission": {**cpu, "all": round(sum(cpu.values()), 2)},
        "jobs_finished_s_after_the_phase": round(wait_until_finished(bento.url, task_ids, timeout_s=1800), 1),
        "sampled_outcomes": outcomes(bento.url, task_ids),
    }


def export(revision: str, into: Path) -> Path:
    """The tree of `revision` (git archive), to serve the code as it was."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def hiding(packages: list[str], into: Path) -> dict[str, str]:
    """The environment that makes `import PKG` fail in a served Bento, for each of `packages`."""
    into.mkdir(parents=True, exist_ok=True)
    for package in packages:
        (into / f"{package}.py").write_text(f'raise ImportError("{package} hidden by bench/async_submit.py")\n')
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(into), os.environ.get("PYTHONPATH")]))} if packages else {}


def serve_and_measure(name, directory, env, workdir, db_url, args, roots) -> dict:
    """One served tree: warm-up, one submitter alone, then each load."""
    context = multiprocessing.get_context("spawn")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    env = {**env, "JOB_STORE_PATH": str(workdir / f"jobs-{slug}.sqlite3")}
    bento = ServedBento(env, workdir / f"serve-{slug}.log", directory=directory).start(timeout_s=300)
    try:
        first = args.warmup + args.sequential
        rows = create_rows(db_url, first)
        in_processes(context, bento.url, [[rows[: args.warmup]]], [None])
        alone, _ = in_processes(context, bento.url, [[rows[args.warmup :]]], [None])
        wait_until_finished(bento.url, [task for task, _ in rows], timeout_s=600)
        loads = [
            measure_load(context, bento, db_url, args, rate, roots) for rate in args.loads for _ in range(args.repeat)
        ]
    finally:
        bento.stop()
    return {"served": name, "one_submitter": summary(alone), "loads": loads}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def markdown(report: dict) -> str:
    lines = [
        f"Async submission on {report['machine']} (host {report['host']}, {report['cpu']}): {report['served']}; "
        f"{report['request']}; {report['jobs']}.",
        f"Load average before: {report['load_average_before']} (the box is shared).",
        "",
        "| served | submitters | load | submissions | 202 p50 ms | 202 p99 ms | submissions/s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for run in report["runs"]:
        alone = run["one_submitter"]
        lines.append(
            f"| {run['served']} | 1 | closed loop | {alone['submissions']} | {alone['p50_ms']} | {alone['p99_ms']} "
            f"| {alone['submissions_per_s']} |"
        )
        for load in run["loads"]:
            lines.append(
                f"| {run['served']} | {report['submitters']} | {load['load']} | {load['submissions']} "
                f"| {load['p50_ms']} | {load['p99_ms']} | {load['submissions_per_s']} |"
            )
    groups = list(report["runs"][0]["loads"][0]["cpu_ms_per_submission"])
    lines += [
        "",
        "CPU per submission (ms, over the measured phase):",
        "",
        f"| served | load | {' | '.join(groups)} |",
        f"| --- | --- | {' | '.join('---' for _ in groups)} |",
    ]
    for run in report["runs"]:
        for load in run["loads"]:
            cpu = load["cpu_ms_per_submission"]
            lines.append(f"| {run['served']} | {load['load']} | {' | '.join(str(cpu[g]) for g in groups)} |")
    lines.append("")
    for run in report["runs"]:
        for load in run["loads"]:
            lines.append(
                f"- {run['served']}, {load['load']}: all jobs finished {load['jobs_finished_s_after_the_phase']} s "
                f"after the phase; of those sampled: {load['sampled_outcomes']}."
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--processes", type=int, default=4, help="client processes the submitters are spread over")
    parser.add_argument("--requests-per-client", type=int, default=25)
    parser.add_argument("--sequential", type=int, default=100, help="submissions by one submitter alone, first")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--loads", default="0,40", help="comma-separated: 0 = closed loop, R = R submissions/s in all (open loop)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="each load this many times (the box is shared)")
    parser.add_argument("--jobs", choices=("meanwhile", "held"), default="meanwhile")
    parser.add_argument(
        "--baseline",
        action="append",
        default=[],
        help="a git revision to serve first, for before/after on the same stand-ins (repeat: each in turn)",
    )
    parser.add_argument("--baseline-without", default="", help="comma-separated packages hidden from the baseline")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the served Bento")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    args.loads = [float(rate) for rate in args.loads.split(",")]

    workdir = Path(tempfile.mkdtemp(prefix="sam3-async-"))
    load_before = os.getloadavg()  # the dev box is shared: what else was running
    subject = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    settings = {"MAX_QUEUED_JOBS": "100000", **dict(item.split("=", 1) for item in args.env)}
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    trees = [(f"working tree ({head.stdout.strip()}+)", ROOT, {})]
    hidden = [package for package in args.baseline_without.split(",") if package]
    for index, revision in enumerate(args.baseline):
        name = f"baseline {revision}" + (f" without {', '.join(hidden)}" if hidden else "")
        trees.insert(index, (name, export(revision, workdir / f"baseline-{index}"), hiding(hidden, workdir / "hidden")))
    with running("s3_server.sh", workdir / "r2") as r2, running("supabase_stack.sh", workdir / "supabase") as supabase:
        s3_client(r2).put_object(Bucket=r2["R2_BUCKET"], Key=IMAGE_KEY, Body=synthetic_jpeg(640, 480, 1))
        env = {**r2_settings(r2), **supabase_settings(supabase), "API_SECRET_KEY": STACK_API_KEY, **settings}
        roots = {group: [pid] for group, pid in stack_roots(workdir / "r2", workdir / "supabase").items()}
        runs = [
            serve_and_measure(name, directory, {**env, **extra}, workdir, supabase["SUPABASE_DB_URL"], args, roots)
            for name, directory, extra in trees
        ]

    report = {
        "date": dt.date.today().isoformat(),
        "machine": subject,
        "host": platform.node(),
        "cpu": cpu_model(),
        "load_average_before": [round(value, 2) for value in load_before],
        "served": "bentoml serve (demo model), Supabase and R2 stand-ins on loopback, "
        + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "request": '640x480 JPEG, 1 text prompt, "async": true, include_rle false',
        "jobs": "the jobs run during the measured phase (demo model on the same CPU)"
        if args.jobs == "meanwhile"
        else "the jobs held during the measured phase (model service paused), run after it",
        "submitters": args.clients,
        "client_processes": args.processes,
        "runs": runs,
    }
    kind = "async-submit" + ("-held" if args.jobs == "held" else "") + (f"-x{args.repeat}" if args.repeat > 1 else "")
    kind += "".join("-" + re.sub(r"[^a-z0-9.]+", "-", item.lower()).strip("-") for item in args.env)
    save(report, args.out, subject, kind, markdown=markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
