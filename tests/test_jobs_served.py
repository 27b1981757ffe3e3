"""Async jobs end to end: a real `bentoml serve` with the R2 and Supabase stand-ins, a real webhook receiver
process, kill -9 and SIGTERM of real processes, and a restart on the same job store."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import re
import signal
import sqlite3
import time
import uuid

import httpx
import numpy as np
import pytest
from conftest import encode, random_image
from PIL import Image
from served import ServedBento
from stack import STACK_API_KEY, new_task_row, r2_settings, supabase_settings, task_row
from standardwebhooks import Webhook
from webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.stack
HEADERS = {"X-API-Key": STACK_API_KEY}
SECRET = "whsec_" + base64.b64encode(bytes(range(100, 132))).decode()
SLOW_PROMPTS = [f"thing {n}" for n in range(24)]  # one job of these takes seconds with the demo model on the CPU


@pytest.fixture(scope="module")
def slow_image(r2, bucket) -> str:
    key = "images/slow.jpg"
    pixels = random_image(np.random.default_rng(5), 480, 640)
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key=key, Body=encode(pixels, "JPEG"), ContentType="image/jpeg")
    return key


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    started = WebhookReceiver(tmp_path_factory.mktemp("receiver")).start()
    yield started
    started.stop()


def serve_env(r2, supabase, store_path, **settings: str) -> dict[str, str]:
    return {
        **r2_settings(r2),
        **supabase_settings(supabase),
        "API_SECRET_KEY": STACK_API_KEY,
        "JOB_STORE_PATH": str(store_path),
        **settings,
    }


@pytest.fixture(scope="module")
def server(r2, supabase, bucket, receiver, tmp_path_factory):
    """Two gateway workers sharing one job store; webhooks allowed to the receiver."""
    directory = tmp_path_factory.mktemp("async-server")
    env = serve_env(
        r2,
        supabase,
        directory / "jobs.sqlite3",
        GATEWAY_WORKERS="2",
        WEBHOOK_ALLOWED_ORIGINS=receiver.origin,
        WEBHOOK_SECRET=SECRET,
        WEBHOOK_BACKOFF_S="0.05",
    )
    bento = ServedBento(env, directory / "serve.log").start()
    yield bento
    bento.stop()


def request_body(task_id: str, user_id: str, **extra) -> dict:
    return {"image_url": "images/in.jpg", "text_prompt": "thing", "user_id": user_id, "task_id": task_id, **extra}


def slow_batch(task_id: str, user_id: str, image: str, **extra) -> dict:
    return {"image_url": image, "prompts": SLOW_PROMPTS, "user_id": user_id, "task_id": task_id, **extra}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=HEADERS, timeout=60)


def task_status(server, task_id: str) -> httpx.Response:
    return httpx.get(f"{server.url}/api/v1/tasks/{task_id}", headers=HEADERS, timeout=30)


def wait_for(server, task_id: str, done=lambda status: status["status"] in ("completed", "failed"), timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = task_status(server, task_id).json()
        if done(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} did not get there in {timeout} s: {status}")


def submit_all(server, path: str, bodies: list[dict]) -> list[httpx.Response]:
    async def burst():
        async with httpx.AsyncClient(timeout=60, headers=HEADERS) as client:
            return await asyncio.gather(*(client.post(f"{server.url}{path}", json=body) for body in bodies))

    return asyncio.run(burst())


def model_calls(server) -> float:
    """Calls the model service answered (BentoML's request counter for its /segment route). A scrape now and then
    lacks the model service's lines (its multiprocess metrics are read from files the worker is rewriting): such a
    scrape is read again, so a missing line never reads as 0 calls."""
    pattern = r"^bentoml_service_request_total\{([^}]*)\} ([0-9.e+]+)$"
    for _ in range(20):
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        values = [
            float(value)
            for labels, value in re.findall(pattern, metrics, flags=re.MULTILINE)
            if 'endpoint="/segment"' in labels and 'service_name="sam3-model"' in labels
        ]
        if values:
            return sum(values)
        time.sleep(0.25)
    return 0.0


def mask_pixels(r2, bucket, key: str) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(bucket.get_object(Bucket=r2["R2_BUCKET"], Key=key)["Body"].read())))


def without_run_details(body: dict) -> dict:
    """A response body less what differs between two runs of the same input (ids, keys, timings, image cache)."""
    varying = {"task_id", "mask_url", "mask_key", "timings", "inference_time_ms", "total_inference_time_ms", "cache"}
    kept = {key: value for key, value in body.items() if key not in varying}
    if "results" in kept:
        kept["results"] = [without_run_details(result) for result in kept["results"]]
    return kept


@pytest.mark.parametrize("path", ["/api/v1/predict", "/api/v1/predict/batch"])
def test_202_then_completed_agrees_with_the_sync_call(server, r2, supabase, bucket, path):
    (async_task, user_id), (sync_task, sync_user) = new_task_row(supabase), new_task_row(supabase)
    extra = {"prompts": ["thing", "stuff"], "text_prompt": None} if path.endswith("batch") else {}
    accepted = post(
        server, path, request_body(async_task, user_id, threshold=0.0, max_instances=3, **extra, **{"async": True})
    )

    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {
        "task_id": async_task,
        "status": "queued",
        "status_url": f"/api/v1/tasks/{async_task}",
    }
    assert task_row(supabase, async_task)["status"] in ("processing", "completed")  # marked before the 202
    status = wait_for(server, async_task)
    sync = post(server, path, request_body(sync_task, sync_user, threshold=0.0, max_instances=3, **extra))
    assert sync.status_code == 200, sync.text

    result = status["result"]
    assert status["status"] == "completed" and status["error"] is None and status["webhook"] is None
    assert status["submitted_at"] <= status["started_at"] <= status["finished_at"]
    assert result["task_id"] == async_task and result["mask_key"].startswith(f"masks/{user_id}/{async_task}")
    assert without_run_details(result) == without_run_details(sync.json())
    row = task_row(supabase, async_task)
    assert row["status"] == "completed" and row["error_message"] is None
    assert row["mask_url"] == result["mask_url"]
    labels = result["labels"] if "labels" in result else [label for r in result["results"] for label in r["labels"]]
    assert row["labels"] == labels
    assert np.array_equal(mask_pixels(r2, bucket, result["mask_key"]), mask_pixels(r2, bucket, sync.json()["mask_key"]))


def test_the_same_task_submitted_while_running_runs_once(server, supabase, slow_image):
    task_id, user_id = new_task_row(supabase)
    before = model_calls(server)
    body = slow_batch(task_id, user_id, slow_image, **{"async": True})
    responses = submit_all(server, "/api/v1/predict/batch", [body] * 5)

    assert [response.status_code for response in responses] == [202] * 5
    assert {response.json()["task_id"] for response in responses} == {task_id}
    first = wait_for(server, task_id)
    assert first["status"] == "completed"
    assert model_calls(server) - before == 1

    again = post(server, "/api/v1/predict/batch", body)  # finished: a new submission runs again
    assert again.status_code == 202 and again.json()["status"] == "queued"
    second = wait_for(
        server, task_id, lambda s: s["status"] == "completed" and s["submitted_at"] > first["finished_at"]
    )
    assert second["result"]["mask_key"] == first["result"]["mask_key"]
    assert model_calls(server) - before == 2


TASK = str(uuid.uuid4())


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        ({"text_prompt": "x" * 300}, 422, "prompt_too_long"),
        ({"text_prompt": None}, 422, "missing_prompt"),
        ({"boxes": [{"x1": 5, "y1": 1, "x2": 1, "y2": 9}]}, 422, "invalid_box"),
        ({"threshold": 2}, 422, "invalid_option"),
        ({"user_id": "../etc"}, 422, "invalid_user_id"),
        ({"image_url": "http://169.254.169.254/latest"}, 400, "unsupported_image_url"),
        ({"image_url": "file:///etc/passwd"}, 400, "unsupported_image_url"),
    ],
)
def test_bad_input_with_async_gets_the_same_sync_error_and_the_row_is_untouched(
    server, supabase, payload, status, code
):
    task_id, user_id = new_task_row(supabase)
    asynchronous = post(server, "/api/v1/predict", {**request_body(task_id, user_id), **payload, "async": True})
    other_task, other_user = new_task_row(supabase)
    synchronous = post(server, "/api/v1/predict", {**request_body(other_task, other_user), **payload})

    assert (asynchronous.status_code, asynchronous.json()["error"]["code"]) == (status, code)
    assert (synchronous.status_code, synchronous.json()["error"]["code"]) == (status, code)
    assert task_row(supabase, task_id)["status"] == "pending"
    assert task_status(server, task_id).status_code == 404


def test_async_for_a_missing_row_is_a_synchronous_404_and_nothing_is_queued(server):
    missing = str(uuid.uuid4())
    response = post(server, "/api/v1/predict", request_body(missing, "u", **{"async": True}))
    assert response.status_code == 404 and response.json()["error"]["code"] == "task_not_found"
    status = task_status(server, missing)
    assert status.status_code == 404 and status.json()["error"]["code"] == "task_not_found"


def test_status_of_a_task_never_accepted_is_404_and_a_malformed_id_422(server):
    assert task_status(server, str(uuid.uuid4())).json()["error"]["code"] == "task_not_found"
    malformed = task_status(server, "not-a-uuid")
    assert malformed.status_code == 422 and malformed.json()["error"]["code"] == "invalid_task_id"
    assert httpx.get(f"{server.url}/api/v1/tasks/{TASK}").status_code == 401


@pytest.mark.parametrize(
    "callback",
    ["https://evil.example.com/hook", "http://127.0.0.1:9/hook", "http://user:pw@localhost/hook", "ftp://localhost/"],
)
def test_a_callback_url_outside_the_allow_list_is_refused_before_anything_runs(server, supabase, receiver, callback):
    task_id, user_id = new_task_row(supabase)
    before = model_calls(server)
    response = post(server, "/api/v1/predict", request_body(task_id, user_id, callback_url=callback, **{"async": True}))

    assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_callback_url"
    assert task_row(supabase, task_id)["status"] == "pending"
    assert task_status(server, task_id).status_code == 404
    assert model_calls(server) == before


def test_a_callback_url_without_async_is_refused(server, supabase, receiver):
    task_id, user_id = new_task_row(supabase)
    response = post(server, "/api/v1/predict", request_body(task_id, user_id, callback_url=receiver.url("/204/x")))
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    assert task_row(supabase, task_id)["status"] == "pending"


@pytest.mark.parametrize(("plan", "attempts"), [("204", 1), ("500,503,204", 3)])
def test_the_webhook_is_delivered_signed_and_retried(server, supabase, receiver, plan, attempts):
    task_id, user_id = new_task_row(supabase)
    path = f"/{plan}/{task_id}"
    body = request_body(task_id, user_id, callback_url=receiver.url(path), **{"async": True})
    assert post(server, "/api/v1/predict", body).status_code == 202

    status = wait_for(server, task_id, lambda s: (s["webhook"] or {}).get("status") in ("delivered", "failed"))
    requests = receiver.requests(path)
    assert len(requests) == attempts
    assert len({request["headers"]["webhook-id"] for request in requests}) == 1
    payload = Webhook(SECRET).verify(requests[-1]["body"], requests[-1]["headers"])
    assert payload["task_id"] == task_id and payload["status"] == "completed"
    assert payload["result"] == status["result"] and payload["result"]["task_id"] == task_id
    webhook = status["webhook"]
    assert (webhook["status"], webhook["attempts"], webhook["last_status_code"]) == ("delivered", attempts, 204)
    assert webhook["url"] == receiver.url(path) and webhook["delivered_at"]
    assert task_row(supabase, task_id)["status"] == "completed"


def test_sigterm_to_a_gateway_worker_lets_its_running_job_finish(server, supabase, slow_image):
    """The worker stops claiming, finishes the job it runs within JOB_SHUTDOWN_GRACE_S (20 s) instead of
    failing it as interrupted, then exits; the jobs still queued are run by the other worker (and the
    respawned one)."""
    rows = [new_task_row(supabase) for _ in range(6)]
    bodies = [slow_batch(task_id, user_id, slow_image, **{"async": True}) for task_id, user_id in rows]
    assert [r.status_code for r in submit_all(server, "/api/v1/predict/batch", bodies)] == [202] * 6
    owner = running_owner(server, [task_id for task_id, _ in rows])
    pid = int(owner.split("/")[1])
    assert pid in server.worker_pids("sam3-gateway")

    os.kill(pid, signal.SIGTERM)
    statuses = [wait_for(server, task_id) for task_id, _ in rows]
    assert [status["status"] for status in statuses] == ["completed"] * 6
    assert [task_row(supabase, task_id)["status"] for task_id, _ in rows] == ["completed"] * 6
    deadline = time.monotonic() + 60
    while pid in server.worker_pids("sam3-gateway") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pid not in server.worker_pids("sam3-gateway")


def running_owner(server, task_ids: list[str]) -> str:
    """The worker (host/pid/id) running one of these tasks, read from the job store the server writes."""
    deadline = time.monotonic() + 60
    store = server._env["JOB_STORE_PATH"]
    while time.monotonic() < deadline:
        with sqlite3.connect(store) as db:
            marks = ", ".join("?" * len(task_ids))
            row = db.execute(
                f"SELECT owner FROM jobs WHERE status = 'running' AND task_id IN ({marks}) LIMIT 1", task_ids
            ).fetchone()
        if row:
            return row[0]
        time.sleep(0.05)
    raise AssertionError("no job started running")


def statuses_now(server, task_ids: list[str]) -> dict[str, str]:
    return {task_id: task_status(server, task_id).json()["status"] for task_id in task_ids}


def test_queue_full_then_kill_9_and_restart_loses_no_job(r2, supabase, bucket, slow_image, tmp_path):
    """One worker running one job at a time, three may wait: a burst overflows with 429; then kill -9 of the
    whole server while one job runs and others wait; after a restart on the same job store every accepted
    job ends completed (it was waiting) or failed as interrupted (it was running), and no row stays processing."""
    env = serve_env(
        r2,
        supabase,
        tmp_path / "jobs.sqlite3",
        MAX_QUEUED_JOBS="3",
        JOB_CONCURRENCY="1",
        JOB_LEASE_S="3",
    )
    bento = ServedBento(env, tmp_path / "serve.log").start()
    rows = [new_task_row(supabase) for _ in range(10)]
    try:
        bodies = [slow_batch(task_id, user_id, slow_image, **{"async": True}) for task_id, user_id in rows]
        responses = submit_all(bento, "/api/v1/predict/batch", bodies)
        accepted = [task_id for (task_id, _), r in zip(rows, responses, strict=True) if r.status_code == 202]
        refused = [(task_id, r) for (task_id, _), r in zip(rows, responses, strict=True) if r.status_code == 429]
        assert 0 < len(accepted) <= 4 and len(accepted) + len(refused) == 10
        for task_id, response in refused:
            assert response.json()["error"]["code"] == "queue_full"
            assert int(response.headers["Retry-After"]) >= 1
            assert task_row(supabase, task_id)["status"] == "pending"
            assert task_status(bento, task_id).status_code == 404

        deadline = time.monotonic() + 60
        while "processing" not in (before := statuses_now(bento, accepted)).values():
            assert time.monotonic() < deadline, before
            time.sleep(0.05)
        bento.kill()
    finally:
        bento.stop()
    running_at_kill = [task_id for task_id, status in before.items() if status == "processing"]
    queued_at_kill = [task_id for task_id, status in before.items() if status == "queued"]
    assert running_at_kill and queued_at_kill, before
    assert {task_row(supabase, task_id)["status"] for task_id in queued_at_kill} == {"processing"}

    restarted = ServedBento(env, tmp_path / "serve-again.log").start()
    try:
        final = {task_id: wait_for(restarted, task_id) for task_id in accepted}
    finally:
        restarted.stop()
    for task_id, status in final.items():
        row = task_row(supabase, task_id)
        if status["status"] == "completed":
            assert row["status"] == "completed" and row["mask_url"] == status["result"]["mask_url"]
        else:
            assert status["error"]["code"] == "interrupted" and "resubmitted" in status["error"]["message"]
            assert row["status"] == "failed" and row["error_message"].startswith("interrupted: ")
    assert all(final[task_id]["status"] == "completed" for task_id in queued_at_kill)
    assert any(final[task_id]["status"] == "failed" for task_id in running_at_kill)


def test_sigterm_with_a_clean_drain_fails_the_waiting_jobs_and_leaves_no_row_processing(
    r2, supabase, bucket, slow_image, tmp_path
):
    env = serve_env(
        r2,
        supabase,
        tmp_path / "jobs.sqlite3",
        JOB_CONCURRENCY="1",
        JOB_DRAIN_ON_SHUTDOWN="true",
        JOB_SHUTDOWN_GRACE_S="60",
    )
    bento = ServedBento(env, tmp_path / "serve.log").start()
    rows = [new_task_row(supabase) for _ in range(5)]
    try:
        bodies = [slow_batch(task_id, user_id, slow_image, **{"async": True}) for task_id, user_id in rows]
        assert [r.status_code for r in submit_all(bento, "/api/v1/predict/batch", bodies)] == [202] * 5
        running_owner(bento, [task_id for task_id, _ in rows])
    finally:
        bento.stop()  # SIGTERM to the whole server, as `docker stop` does
    rows_after = [task_row(supabase, task_id) for task_id, _ in rows]
    assert "processing" not in [row["status"] for row in rows_after]
    drained = [row for row in rows_after if row["status"] == "failed"]
    assert drained and all(row["error_message"].startswith("interrupted: ") for row in drained)
    with sqlite3.connect(env["JOB_STORE_PATH"]) as db:
        left = db.execute("SELECT count(*) FROM jobs WHERE status NOT IN ('completed', 'failed')").fetchone()[0]
    assert left == 0


def test_concurrent_duplicate_submissions_for_a_missing_row_are_all_refused(server):
    """Seen (tester13): the first submission reserves the task and gets 404 task_not_found; the duplicates that
    arrived while it asked Supabase answered 202 "queued" for a job that was then given back and never exists
    (the same with Supabase down: 502 for the first, 202 for the rest, the row left pending for good)."""
    missing = str(uuid.uuid4())
    responses = submit_all(server, "/api/v1/predict", [request_body(missing, "u", **{"async": True})] * 8)
    assert [response.status_code for response in responses] == [404] * 8
    assert task_status(server, missing).status_code == 404
