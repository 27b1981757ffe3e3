"""The job store on a real SQLite file: claims across processes, slots, leases, timeouts, retention; and the
stale-row sweep against the real Supabase stand-in."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import multiprocessing
import sqlite3
import uuid

import psycopg
import pytest
from stack import new_task_row, task_row

from jobs import JobStore, StaleRowSweeper
from tasks import SupabaseTaskStore

LEASE_S = 30.0


def request_json(task_id: str) -> str:
    return json.dumps({"task_id": task_id, "image_url": "images/in.jpg", "user_id": "u", "text_prompt": "cat"})


async def queue_jobs(store: JobStore, count: int, callback_url: str | None = None) -> list[str]:
    task_ids = []
    for _ in range(count):
        task_id = str(uuid.uuid4())
        request = request_json(task_id)
        reservation = await store.reserve(task_id, "predict", request, callback_url, 10**6, "test", LEASE_S)
        await store.confirm(task_id, reservation.job.submission)
        task_ids.append(task_id)
    return task_ids


def run(coroutine_function, *args):
    """One event loop per call: the store's thread outlives none of them (opened and closed inside)."""

    async def body():
        store = JobStore(args[0])
        await store.open()
        try:
            return await coroutine_function(store, *args[1:])
        finally:
            await store.close()

    return asyncio.run(body())


def _claim_all(path: str, owner: str, claimed) -> None:
    async def body(store: JobStore) -> None:
        while (job := await store.claim(owner, LEASE_S, 600)) is not None:
            claimed.put(job.task_id)

    run(body, path)


def test_two_processes_claiming_at_once_never_take_the_same_job(tmp_path):
    path = str(tmp_path / "jobs.sqlite3")
    task_ids = run(queue_jobs, path, 200)
    context = multiprocessing.get_context("spawn")
    claimed = context.Queue()
    workers = [context.Process(target=_claim_all, args=(path, f"worker-{n}", claimed)) for n in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    taken = [claimed.get(timeout=10) for _ in range(len(task_ids))]
    assert claimed.empty()
    assert sorted(taken) == sorted(task_ids)  # every job once: none twice, none left


def test_a_full_queue_reserves_nothing_and_an_active_task_gets_its_own_job_back(tmp_path):
    async def body(store: JobStore):
        first = await store.reserve("t1", "predict", request_json("t1"), None, 2, "a", LEASE_S)
        again = await store.reserve("t1", "predict", request_json("t1"), None, 2, "b", LEASE_S)
        second = await store.reserve("t2", "predict", request_json("t2"), None, 2, "a", LEASE_S)
        full = await store.reserve("t3", "predict", request_json("t3"), None, 2, "a", LEASE_S)
        return first, again, second, full, await store.get("t3")

    first, again, second, full, third = run(body, tmp_path / "jobs.sqlite3")
    assert (first.outcome, again.outcome, again.job.submission) == ("new", "existing", first.job.submission)
    assert second.outcome == "new"
    assert (full.outcome, full.job, full.waiting, third) == ("full", None, 2, None)


def test_an_expired_lease_fails_the_job_as_interrupted_and_queues_the_row_write(tmp_path):
    async def body(store: JobStore):
        (task_id,) = await queue_jobs(store, 1, callback_url="https://hooks.example.com/done")
        job = await store.claim("dead-worker", 0.05, 600)
        await asyncio.sleep(0.1)
        failed = await store.interrupt_expired("the server stopped; it may be resubmitted")
        late = await store.finish(job, "dead-worker", result={"late": True})
        writes = await store.claim_row_writes(retry_after_s=60)
        again = await store.claim_row_writes(retry_after_s=60)
        return failed, late, writes, again, await store.get(task_id)

    failed, late, writes, again, job = run(body, tmp_path / "jobs.sqlite3")
    assert failed == 1 and late == "lost"  # the late finisher learns it no longer owns the job
    assert (job.status, job.error_code, job.result) == ("failed", "interrupted", None)
    assert [write.message for write in writes] == ["interrupted: the server stopped; it may be resubmitted"]
    assert again == []  # one writer at a time
    assert job.webhook == {
        "url": "https://hooks.example.com/done",
        "status": "pending",
        "attempts": 0,
        "last_status_code": None,
        "last_error": None,
        "delivered_at": None,
    }


def test_a_job_queued_too_long_fails_with_queue_timeout_and_is_never_claimed(tmp_path):
    async def body(store: JobStore):
        (task_id,) = await queue_jobs(store, 1)
        await asyncio.sleep(0.1)
        claimed = await store.claim("w", LEASE_S, queue_timeout_s=0.05)
        expired = await store.expire_queued(0.05, "waited too long")
        return claimed, expired, await store.get(task_id)

    claimed, expired, job = run(body, tmp_path / "jobs.sqlite3")
    assert claimed is None and expired == 1
    assert (job.status, job.error_code, job.error_message) == ("failed", "queue_timeout", "waited too long")


def test_retention_deletes_finished_jobs_only_after_it(tmp_path):
    async def body(store: JobStore):
        done, waiting = await queue_jobs(store, 2)
        job = await store.claim("w", LEASE_S, 600)
        await store.finish(job, "w", result={"ok": True})
        kept = await store.delete_finished(retention_s=3600)
        await asyncio.sleep(0.05)
        deleted = await store.delete_finished(retention_s=0.01)
        return kept, deleted, await store.get(done), await store.get(waiting)

    kept, deleted, done, waiting = run(body, tmp_path / "jobs.sqlite3")
    assert (kept, deleted, done) == (0, 1, None)
    assert waiting.status == "queued"


def test_a_worker_at_its_video_limit_claims_the_next_image_job_past_a_video_one(tmp_path):
    async def body(store: JobStore):
        video_id = str(uuid.uuid4())
        reservation = await store.reserve(video_id, "predict_video", request_json(video_id), None, 10, "t", LEASE_S)
        await store.confirm(video_id, reservation.job.submission)
        (image_id,) = await queue_jobs(store, 1)
        skipping = await store.claim("w", LEASE_S, 600, skip_kinds=("predict_video",))
        next_one = await store.claim("w", LEASE_S, 600)
        return skipping, next_one

    skipping, next_one = run(body, tmp_path / "jobs.sqlite3")
    assert skipping.kind == "predict" and next_one.kind == "predict_video"


def test_a_running_jobs_progress_is_kept_and_a_store_from_before_video_gains_the_column(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    old = sqlite3.connect(path)  # the table as it was before video tasks: no progress column
    old.execute(
        "CREATE TABLE jobs (task_id TEXT PRIMARY KEY, submission TEXT NOT NULL, kind TEXT NOT NULL, request TEXT NOT "
        "NULL, callback_url TEXT, status TEXT NOT NULL, submitted_at REAL NOT NULL, started_at REAL, finished_at REAL, "
        "owner TEXT, lease_until REAL, result TEXT, error_code TEXT, error_message TEXT, row_pending TEXT, "
        "row_attempt_at REAL, webhook TEXT)"
    )
    old.close()

    async def body(store: JobStore):
        (task_id,) = await queue_jobs(store, 1)
        job = await store.claim("w", LEASE_S, 600)
        await store.set_progress(job, "other-worker", {"frames_done": 9, "frames_total": 10})  # not its owner
        unchanged = (await store.get(task_id)).progress
        await store.set_progress(job, "w", {"frames_done": 3, "frames_total": 10})
        return unchanged, (await store.get(task_id)).progress

    unchanged, progress = run(body, path)
    assert unchanged is None and progress == {"frames_done": 3, "frames_total": 10}


@pytest.mark.stack
def test_the_sweeper_fails_only_rows_left_processing_too_long(supabase, tmp_path):
    tasks = SupabaseTaskStore(supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"])
    stale, recent, finished = (new_task_row(supabase)[0] for _ in range(3))
    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        db.execute("SET session_replication_role = replica")  # keep the updated_at trigger from resetting the time
        hour_ago = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        for task_id, status, updated in (
            (stale, "processing", hour_ago),
            (recent, "processing", dt.datetime.now(dt.UTC)),
            (finished, "completed", hour_ago),
        ):
            db.execute(
                "update segmentation_results set status = %s, updated_at = %s where id = %s", (status, updated, task_id)
            )

    async def body(store: JobStore):
        sweeper = StaleRowSweeper(store, tasks, stale_after_s=600, interval_s=3600)
        return await sweeper.maybe_sweep(), await sweeper.maybe_sweep()

    first, second = run(body, tmp_path / "jobs.sqlite3")
    assert first == [stale] and second == []  # one sweep per interval per box
    row = task_row(supabase, stale)
    assert row["status"] == "failed" and row["error_message"].startswith("interrupted: no result after 600 s")
    assert "may be resubmitted" in row["error_message"]
    assert task_row(supabase, recent)["status"] == "processing"
    assert task_row(supabase, finished)["status"] == "completed"
