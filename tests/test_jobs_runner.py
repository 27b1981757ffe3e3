"""The job runner in this process, on the real R2 and Supabase stand-ins, with the model service replaced by a
function that never answers in time (or a model that never becomes ready): the bounded lifetime of a job."""

from __future__ import annotations

import asyncio
import time

import pytest
from stack import new_task_row, task_row

from backend.api_models import PredictRequest
from backend.errors import ApiError
from backend.pipeline import Limits, PredictPipeline
from jobs import JobQueue, JobRunner, JobStore, Pipelines, RunnerConfig, StaleRowSweeper
from storage import R2Storage
from tasks import SupabaseTaskStore

pytestmark = pytest.mark.stack


def refuse_callbacks(url: str) -> str:
    raise ApiError(400, "unsupported_callback_url", "webhooks are off")


class Model:
    """The model service as the pipeline sees it, answering with `segment(item)` whatever the path."""

    def __init__(self, segment) -> None:
        self._segment = segment

    async def segment(self, item: dict, sliced: bool) -> dict:
        return await self._segment(item)


async def run_one_job(r2, supabase, store_path, segment, ready, **config) -> tuple[str, JobStore]:
    """Submit one job through the real submission path and run the runner until the job has ended."""
    objects = R2Storage(r2["R2_ENDPOINT_URL"], r2["R2_BUCKET"], r2["R2_ACCESS_KEY_ID"], r2["R2_SECRET_ACCESS_KEY"])
    tasks = SupabaseTaskStore(supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"])
    pipeline = PredictPipeline(objects, tasks, Model(segment), Limits(10**7, 10**8, 40_000, 2_500, 86_400))
    store = JobStore(store_path)
    settings = {
        "concurrency": 1,
        "lease_s": 30,
        "queue_timeout_s": 600,
        "run_timeout_s": 300,
        "video_run_timeout_s": 3600,
        "shutdown_grace_s": 0,
        "drain_on_shutdown": False,
        "retention_s": 3600,
        "row_retry_s": 15,
        **config,
    }
    sweeper = StaleRowSweeper(store, tasks, stale_after_s=3600, interval_s=3600)
    runner = JobRunner(store, Pipelines(pipeline), tasks, ready, None, sweeper, RunnerConfig(**settings), "test-worker")
    queue = JobQueue(store, tasks, objects, refuse_callbacks, 10, 1, 30, "test-worker", runner.wake)
    task_id, user_id = new_task_row(supabase)
    await runner.start()
    try:
        request = PredictRequest(image_url="images/in.jpg", text_prompt="cat", user_id=user_id, task_id=task_id)
        await queue.submit("predict", request)
        deadline = time.monotonic() + 60
        while (await store.get(task_id)).status != "failed" or not task_row(supabase, task_id)["error_message"]:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        while task_row(supabase, task_id)["error_message"].startswith("cancelled"):  # then the job's own outcome
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        job = await store.get(task_id)
    finally:
        await runner.stop()
    return task_id, job


async def ready() -> bool:
    return True


async def never_ready() -> bool:
    return False


def test_a_job_running_past_request_timeout_fails_with_job_timeout_and_its_row_says_so(r2, supabase, bucket, tmp_path):
    async def hangs(item: dict) -> dict:
        await asyncio.sleep(3600)

    task_id, job = asyncio.run(run_one_job(r2, supabase, tmp_path / "jobs.sqlite3", hangs, ready, run_timeout_s=1))
    assert (job.status, job.error_code) == ("failed", "job_timeout")
    assert "REQUEST_TIMEOUT_S (1 s)" in job.error_message
    row = task_row(supabase, task_id)
    assert row["status"] == "failed" and row["error_message"].startswith("job_timeout: the job ran longer than")


def test_a_job_whose_model_never_gets_ready_fails_with_queue_timeout_and_its_row_says_so(
    r2, supabase, bucket, tmp_path
):
    async def never_called(item: dict) -> dict:
        raise AssertionError("no job may run while the model is not ready")

    task_id, job = asyncio.run(
        run_one_job(r2, supabase, tmp_path / "jobs.sqlite3", never_called, never_ready, queue_timeout_s=0.5)
    )
    assert (job.status, job.error_code, job.started_at) == ("failed", "queue_timeout", None)
    row = task_row(supabase, task_id)
    assert row["status"] == "failed"
    assert row["error_message"].startswith("queue_timeout: the task waited longer than JOB_QUEUE_TIMEOUT_S (0.5 s)")


class SwitchableTasks:
    """The real Supabase client, or one to a port nobody listens on (Supabase down), switched while a job runs."""

    enabled = True

    def __init__(self, live: SupabaseTaskStore, down: SupabaseTaskStore) -> None:
        self.live, self.down, self.current = live, down, live

    def __getattr__(self, name: str):
        return getattr(self.current, name)


def test_a_job_that_meets_supabase_down_does_not_leave_its_row_processing_once_supabase_is_back(
    r2, supabase, bucket, tmp_path
):
    """Seen served (tester13): Supabase unreachable for a few seconds while accepted jobs wait -> every job fails
    database_unavailable at its start, and their rows (marked processing before the 202) stay processing after
    Supabase is back, until the stale-row sweep (1230 s) calls them `interrupted`."""
    from served import free_port

    async def scenario():
        objects = R2Storage(r2["R2_ENDPOINT_URL"], r2["R2_BUCKET"], r2["R2_ACCESS_KEY_ID"], r2["R2_SECRET_ACCESS_KEY"])
        key = supabase["SUPABASE_SERVICE_ROLE_KEY"]
        tasks = SwitchableTasks(
            SupabaseTaskStore(supabase["SUPABASE_URL"], key, timeout_s=2),
            SupabaseTaskStore(f"http://127.0.0.1:{free_port()}", key, timeout_s=2),
        )

        async def model_fails(item: dict) -> dict:
            return {"ok": False, "error": {"code": "inference_failed", "message": "stand-in"}}

        pipeline = PredictPipeline(objects, tasks, Model(model_fails), Limits(10**7, 10**8, 10**6, 10**6, 86_400))
        store = JobStore(tmp_path / "jobs.sqlite3")
        model_up = False

        async def ready() -> bool:
            return model_up

        config = RunnerConfig(1, 30, 600, 300, 3600, 0, False, 3600, row_retry_s=1)
        sweeper = StaleRowSweeper(store, tasks, stale_after_s=3600, interval_s=3600)
        runner = JobRunner(store, Pipelines(pipeline), tasks, ready, None, sweeper, config, "test-worker")
        queue = JobQueue(store, tasks, objects, refuse_callbacks, 10, 1, 30, "test-worker", runner.wake)
        task_id, user_id = new_task_row(supabase)
        await runner.start()
        try:
            request = PredictRequest(image_url="images/in.jpg", text_prompt="cat", user_id=user_id, task_id=task_id)
            await queue.submit("predict", request)
            assert task_row(supabase, task_id)["status"] == "processing"
            tasks.current = tasks.down
            model_up = True
            runner.wake()
            deadline = time.monotonic() + 30
            while (await store.get(task_id)).status in ("queued", "running") and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            tasks.current = tasks.live  # Supabase is back
            deadline = time.monotonic() + 20
            while task_row(supabase, task_id)["status"] == "processing" and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            return task_row(supabase, task_id), await store.get(task_id)
        finally:
            await runner.stop()

    row, job = asyncio.run(scenario())
    assert row["status"] != "processing", (job.status, job.error_code, job.error_message)


def test_a_job_that_meets_the_model_reloading_is_not_failed_with_model_loading(r2, supabase, bucket, tmp_path):
    """Seen served (tester13): kill -9 of the model worker alone (an out-of-memory kill); the jobs claimed while
    BentoML restarts it reach the new worker while it loads and fail `model_loading` ("retry shortly"), which an
    async caller cannot act on (3 of 3 tries on a served Bento; real weights make the window tens of seconds).
    Here the model answers model_loading once, then a plain failure: the job should end with the latter."""
    calls = []

    async def reloading_then_fails(item: dict) -> dict:
        calls.append(item)
        if len(calls) == 1:
            return {"ok": False, "error": {"code": "model_loading", "message": "the model is still loading"}}
        return {"ok": False, "error": {"code": "inference_failed", "message": "stand-in"}}

    task_id, job = asyncio.run(run_one_job(r2, supabase, tmp_path / "jobs.sqlite3", reloading_then_fails, ready))
    assert job.error_code != "model_loading", (job.error_code, job.error_message, len(calls))
