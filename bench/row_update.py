"""The CPU one row UPDATE costs the gateway, by HTTP client: why tasks/store.py sends it through aiohttp.

    python bench/row_update.py [--updates 1000] [--concurrency 1,32]

The real Supabase stand-in (PostgreSQL + PostgREST + nginx). The same UPDATE (status processing, as before a 202)
of fresh rows, --concurrency at a time, sent by:
- supabase-py: `client.table(...).update(...).eq("id", ...).execute()` (what tasks/store.py did before);
- httpx: a plain httpx.AsyncClient PATCH (the same connection pool, httpcore, under supabase-py);
- tasks/store.py: SupabaseTaskStore.mark_processing as it is now (aiohttp).
Reports this process's CPU ms per update (the client side only: PostgREST, PostgreSQL and nginx are other
processes) and updates/s. Writes bench/results/<date>-<machine>-row-update.json and .md.
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
from pathlib import Path

import httpx
from supabase import AsyncClientOptions, acreate_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from stack import running  # noqa: E402

from bench.async_submit import create_rows  # noqa: E402
from bench.output import DEFAULT_OUT, save  # noqa: E402
from tasks import SupabaseTaskStore  # noqa: E402

TABLE = "segmentation_results"
VALUES = {"status": "processing", "error_message": None}


async def supabase_py(url: str, key: str):
    client = await acreate_client(url, key, options=AsyncClientOptions(auto_refresh_token=False))

    async def update(task_id: str) -> None:
        assert (await client.table(TABLE).update(VALUES).eq("id", task_id).execute()).data

    return update, client.postgrest.aclose


async def plain_httpx(url: str, key: str):
    headers = {"apikey": key, "Authorization": f"Bearer {key}", "Prefer": "return=representation"}
    client = httpx.AsyncClient(base_url=f"{url}/rest/v1", headers=headers)

    async def update(task_id: str) -> None:
        response = await client.patch(f"/{TABLE}", params={"id": f"eq.{task_id}", "select": "id"}, json=VALUES)
        assert response.json()

    return update, client.aclose


async def task_store(url: str, key: str):
    store = SupabaseTaskStore(url, key)
    return store.mark_processing, store.close


CLIENTS = {"supabase-py": supabase_py, "httpx": plain_httpx, "tasks/store.py (aiohttp)": task_store}


async def measure(make, url: str, key: str, task_ids: list[str], concurrency: int) -> dict:
    update, close = await make(url, key)
    await update(task_ids[0])  # connect first
    waiting = list(task_ids[1:])

    async def worker() -> None:
        while waiting:
            await update(waiting.pop())

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    await close()
    count = len(task_ids) - 1
    return {"cpu_ms_per_update": round(1000 * cpu / count, 3), "updates_per_s": round(count / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args()
    levels = [int(level) for level in args.concurrency.split(",")]

    load_before = os.getloadavg()
    subject = f"{platform.machine()} {len(os.sched_getaffinity(0))} cores"
    results: dict[str, dict[str, dict]] = {name: {} for name in CLIENTS}
    with running("supabase_stack.sh", Path(tempfile.mkdtemp(prefix="sam3-rows-")) / "supabase") as supabase:
        url, key = supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"]
        for level in levels:
            for _ in range(2):  # each client in turn, twice, so drift on the shared box shows
                for name, make in CLIENTS.items():
                    task_ids = [task for task, _ in create_rows(supabase["SUPABASE_DB_URL"], args.updates)]
                    measured = asyncio.run(measure(make, url, key, task_ids, level))
                    results[name].setdefault(str(level), []).append(measured)

    report = {
        "date": dt.date.today().isoformat(),
        "machine": subject,
        "load_average_before": [round(value, 2) for value in load_before],
        "what": f"{args.updates} row UPDATEs (status processing) through the Supabase stand-in, client CPU only",
        "results": results,
    }
    lines = [
        f"Row UPDATE, client CPU per update on {subject} ({report['what']}; two runs each, load average before "
        f"{report['load_average_before']}).",
        "",
        "| client | concurrency | CPU ms per update | updates/s |",
        "| --- | --- | --- | --- |",
    ]
    for name, by_level in results.items():
        for level, runs in by_level.items():
            cpu = " / ".join(str(run["cpu_ms_per_update"]) for run in runs)
            rate = " / ".join(str(run["updates_per_s"]) for run in runs)
            lines.append(f"| {name} | {level} | {cpu} | {rate} |")
    save(report, args.out, subject, "row-update", markdown="\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
