"""The predict pipeline against REAL servers: SeaweedFS standing in for R2, PostgreSQL + PostgREST + nginx for
Supabase. Both start here, on 127.0.0.1 and free ports, and stop by PID."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from botocore.exceptions import ClientError
from conftest import encode, random_image
from in_process import InProcessModel
from PIL import Image
from stack import STACK_API_KEY, new_task_row, running, s3_client, task_row

from backend.api_models import PredictRequest
from backend.errors import ApiError
from backend.pipeline import Limits, PredictPipeline
from storage import LocalStorage, ObjectNotFound, ObjectTooLarge, R2Storage, StorageUnavailable, UnsupportedImageUrl
from tasks import SupabaseTaskStore, TaskNotUpdated, TaskResult, TaskStoreTimeout, TaskStoreUnavailable

pytestmark = pytest.mark.stack
BATCH = "/api/v1/predict/batch"


def predict(server, payload, path="/api/v1/predict"):
    return httpx.post(f"{server.url}{path}", json=payload, headers={"X-API-Key": STACK_API_KEY}, timeout=60)


def mask_in_bucket(bucket, r2, key) -> np.ndarray:
    data = bucket.get_object(Bucket=r2["R2_BUCKET"], Key=key)
    assert data["ContentType"] == "image/png"
    return np.array(Image.open(io.BytesIO(data["Body"].read())))


def test_predict_end_to_end_writes_mask_and_row(stack_server, r2, supabase, bucket):
    task_id, user_id = new_task_row(supabase)
    request = {
        "image_url": f"r2://{r2['R2_BUCKET']}/images/in.jpg",
        "text_prompt": "car",
        "user_id": user_id,
        "task_id": task_id,
        "threshold": 0.3,
    }
    response = predict(stack_server, request)
    assert response.status_code == 200, response.text
    result = response.json()
    mask = mask_in_bucket(bucket, r2, result["mask_key"])
    assert mask.shape == (90, 160) and (mask == 255).sum() > 0
    row = task_row(supabase, task_id)
    assert row["status"] == "completed" and row["error_message"] is None
    assert row["mask_url"] == result["mask_url"] and row["labels"] == result["labels"]
    assert row["confidence"] == pytest.approx(result["confidence"], abs=1e-6)
    assert row["inference_time_ms"] == round(result["inference_time_ms"])
    assert row["result"]["results"][0]["num_instances"] == result["num_instances"]


def test_batch_end_to_end(stack_server, r2, supabase, bucket):
    task_id, user_id = new_task_row(supabase)
    url = f"{r2['R2_ENDPOINT_URL']}/{r2['R2_BUCKET']}/images/in.jpg"
    response = predict(
        stack_server,
        {
            "image_url": url,
            "prompts": ["car", "road"],
            "user_id": user_id,
            "task_id": task_id,
            "threshold": 0.0,
            "max_instances": 2,
        },
        "/api/v1/predict/batch",
    )
    assert response.status_code == 200, response.text
    for index, result in enumerate(response.json()["results"]):
        assert result["mask_key"] == f"masks/{user_id}/{task_id}/{index}.png"
        assert mask_in_bucket(bucket, r2, result["mask_key"]).shape == (90, 160)
    row = task_row(supabase, task_id)
    assert row["status"] == "completed" and len(row["labels"]) == 4


def test_a_batch_with_prompt_objects_and_nms_reports_removals_in_the_response_and_the_row(stack_server, supabase):
    """A phrase twice (the second as an object with its own options): every instance of the copy overlaps the
    first's (IoU 1) and is removed; the counts are in each result, in the row's result too; the labels hold what
    is left."""
    request = {
        "image_url": "images/in.jpg",
        "prompts": ["car", {"text": "car", "threshold": 0.0, "max_instances": 3}],
        "threshold": 0.0,
        "max_instances": 5,
    }
    answers = []
    for nms in ({}, {"nms_iou_threshold": 0.5}):
        task_id, user_id = new_task_row(supabase)
        response = predict(stack_server, {**request, **nms, "user_id": user_id, "task_id": task_id}, BATCH)
        assert response.status_code == 200, response.text
        answers.append(response.json()["results"])
    (plain_first, plain_second), (first, second) = answers
    assert "suppressed" not in plain_first and plain_second["num_instances"] >= 1
    assert second["num_instances"] == 0 and second["suppressed"] >= plain_second["num_instances"]
    assert 1 <= first["num_instances"] <= plain_first["num_instances"] <= first["num_instances"] + first["suppressed"]
    row = task_row(supabase, task_id)
    assert row["status"] == "completed" and len(row["labels"]) == first["num_instances"]
    assert [result["suppressed"] for result in row["result"]["results"]] == [first["suppressed"], second["suppressed"]]


@pytest.mark.parametrize("include_rle", [True, False])
def test_the_row_keeps_no_rle_and_include_rle_false_drops_it_from_the_response(stack_server, supabase, include_rle):
    task_id, user_id = new_task_row(supabase)
    request = {"image_url": "images/in.jpg", "prompts": ["car"], "user_id": user_id, "task_id": task_id}
    options = {"threshold": 0.0, "max_instances": 2, "include_rle": include_rle}
    response = predict(stack_server, {**request, **options}, "/api/v1/predict/batch")
    assert response.status_code == 200, response.text
    assert all(("rle" in instance) == include_rle for instance in response.json()["results"][0]["instances"])
    row_instances = task_row(supabase, task_id)["result"]["results"][0]["instances"]
    assert len(row_instances) == 2 and all(set(i) == {"label", "score", "box", "area"} for i in row_instances)


def test_outputs_land_in_r2_under_keys_beside_the_mask_and_in_the_row(stack_server, r2, supabase, bucket):
    task_id, user_id = new_task_row(supabase)
    request = {"image_url": "images/in.jpg", "text_prompt": "car", "user_id": user_id, "task_id": task_id}
    outputs = ["polygons", "instance_map", "cutout", "overlay"]
    response = predict(stack_server, {**request, "threshold": 0.0, "max_instances": 2, "outputs": outputs})
    assert response.status_code == 200, response.text
    result = response.json()
    stem = f"masks/{user_id}/{task_id}"
    files = {"instance_map_url": ".instances.png", "cutout_url": ".cutout.png", "overlay_url": ".overlay.jpg"}
    urls = {field: f"{r2['R2_ENDPOINT_URL']}/{r2['R2_BUCKET']}/{stem}{end}" for field, end in files.items()}
    assert result["outputs"] == urls
    types = {".instances.png": "image/png", ".cutout.png": "image/png", ".overlay.jpg": "image/jpeg"}
    for end, content_type in types.items():
        stored = bucket.get_object(Bucket=r2["R2_BUCKET"], Key=stem + end)
        assert stored["ContentType"] == content_type
        Image.open(io.BytesIO(stored["Body"].read())).load()
    row = task_row(supabase, task_id)
    assert row["status"] == "completed" and row["result"]["outputs"] == result["outputs"]
    assert all("polygons" in instance for instance in row["result"]["results"][0]["instances"])


def test_same_task_twice_is_idempotent(stack_server, r2, supabase, bucket):
    task_id, user_id = new_task_row(supabase)
    request = {"image_url": "images/in.jpg", "text_prompt": "car", "user_id": user_id, "task_id": task_id}
    first, second = predict(stack_server, request).json(), predict(stack_server, request).json()
    assert first["mask_key"] == second["mask_key"] and first["instances"] == second["instances"]
    assert task_row(supabase, task_id)["status"] == "completed"


@pytest.mark.parametrize(
    ("image_url", "status", "code"),
    [
        ("images/nope.jpg", 404, "image_not_found"),
        ("images/corrupt.png", 400, "invalid_image"),
        ("r2://another-bucket/images/in.jpg", 400, "unsupported_image_url"),
    ],
)
def test_failures_mark_the_row_failed(stack_server, supabase, image_url, status, code):
    task_id, user_id = new_task_row(supabase)
    response = predict(
        stack_server, {"image_url": image_url, "text_prompt": "car", "user_id": user_id, "task_id": task_id}
    )
    assert response.status_code == status and response.json()["error"]["code"] == code
    row = task_row(supabase, task_id)
    assert row["status"] == "failed" and row["error_message"].startswith(code)


def test_missing_row_is_reported_and_nothing_is_processed(stack_server, r2, bucket):
    task_id = str(uuid.uuid4())
    response = predict(
        stack_server, {"image_url": "images/in.jpg", "text_prompt": "car", "user_id": "u", "task_id": task_id}
    )
    assert response.status_code == 404 and response.json()["error"]["code"] == "task_not_found"
    with pytest.raises(ClientError):
        bucket.head_object(Bucket=r2["R2_BUCKET"], Key=f"masks/u/{task_id}.png")


class ConnectionTrap:
    """A listening socket on 127.0.0.1 that counts every connection made to it."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen()
        self.socket.settimeout(0.2)
        self.port = self.socket.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self.socket.accept()
                self.connections += 1
                connection.close()
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.socket.close()


@pytest.mark.parametrize(
    "template",
    [
        "http://127.0.0.1:{port}/{bucket}/images/in.jpg",
        "http://localhost:{port}/x.jpg",
        "https://user:pass@127.0.0.1:{port}/{bucket}/in.jpg",
        "http://[::1]:{port}/a.png",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "gopher://127.0.0.1:{port}/",
    ],
)
def test_ssrf_urls_are_refused_before_any_request(stack_server, r2, supabase, template):
    trap = ConnectionTrap()
    try:
        task_id, user_id = new_task_row(supabase)
        url = template.format(port=trap.port, bucket=r2["R2_BUCKET"])
        response = predict(stack_server, {"image_url": url, "text_prompt": "x", "user_id": user_id, "task_id": task_id})
        assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_image_url"
        time.sleep(0.3)
        assert trap.connections == 0
        assert task_row(supabase, task_id)["status"] == "failed"
    finally:
        trap.close()


def test_anon_key_cannot_update_rows(supabase):
    task_id, _ = new_task_row(supabase, status="pending")
    anon = SupabaseTaskStore(supabase["SUPABASE_URL"], supabase["SUPABASE_ANON_KEY"])
    with pytest.raises(TaskNotUpdated, match="service_role"):
        asyncio.run(anon.mark_processing(task_id))
    assert task_row(supabase, task_id)["status"] == "pending"


def test_row_updates_answer_what_supabase_says(supabase):
    """The row UPDATE's outcomes through the real API gateway and PostgREST: done, no such row, a key the gateway
    refuses, an update PostgreSQL rejects (with its code and message), one store used from two event loops."""
    import psycopg

    url, key = supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"]
    task_id, _ = new_task_row(supabase, status="pending")
    store = SupabaseTaskStore(url, key)
    asyncio.run(store.mark_processing(task_id))
    asyncio.run(store.mark_failed(task_id, "invalid_image: not an image"))  # the same store, a second event loop
    row = task_row(supabase, task_id)
    assert (row["status"], row["error_message"]) == ("failed", "invalid_image: not an image")
    with pytest.raises(TaskNotUpdated, match="does not exist"):
        asyncio.run(store.mark_processing(str(uuid.uuid4())))
    with pytest.raises(TaskStoreUnavailable, match="Invalid API key"):
        asyncio.run(SupabaseTaskStore(url, "not-a-key").mark_processing(task_id))
    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        db.execute("create table public.short_results (id uuid primary key, status text, error_message varchar(10))")
        db.execute("insert into public.short_results (id, status) values (%s, 'pending')", (task_id,))
        db.execute("notify pgrst, 'reload schema'")
    time.sleep(1.0)
    short = SupabaseTaskStore(url, key, table="short_results")
    with pytest.raises(TaskStoreUnavailable, match=r"rejected the update \(22001: value too long"):
        asyncio.run(short.mark_failed(task_id, "inference_failed: a message longer than ten characters"))
    assert task_row(supabase, task_id)["status"] == "failed"


def test_rows_marked_processing_together_share_a_patch_and_each_get_their_own_answer(supabase):
    """Concurrent submissions mark their rows processing through fewer PATCHes than rows (the API gateway's access
    log counts them), and each caller still gets its own row's answer: done, no such row, or the rejection
    PostgreSQL gives that row alone (its constraint fails the shared statement; the rows are then sent one by one)."""
    import psycopg

    url, key = supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"]
    rows = [str(uuid.uuid4()) for _ in range(30)]
    locked, missing = rows[7], str(uuid.uuid4())
    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        db.execute(
            "create table public.locked_results (id uuid primary key, status text, error_message text,"
            " locked boolean not null default false, check (not (locked and status = 'processing')))"
        )
        for row in rows:
            db.execute(
                "insert into public.locked_results (id, status, locked) values (%s, 'pending', %s)",
                (row, row == locked),
            )
        db.execute("notify pgrst, 'reload schema'")
    time.sleep(1.0)
    store = SupabaseTaskStore(url, key, table="locked_results")

    def mark(task_ids: list[str]) -> list:
        async def together():
            return await asyncio.gather(
                *(store.mark_processing(task_id) for task_id in task_ids), return_exceptions=True
            )

        return asyncio.run(together())

    def patches() -> int:
        log = Path(supabase["SUPABASE_ACCESS_LOG"]).read_text()
        return sum("PATCH /rest/v1/locked_results" in line for line in log.splitlines())

    before = patches()
    unlocked = [row for row in rows if row != locked]
    outcomes = mark([*unlocked[:15], missing, *unlocked[15:]])
    assert patches() - before < 5
    assert [type(outcome) for outcome in outcomes].count(type(None)) == 29
    assert isinstance(outcomes[15], TaskNotUpdated) and missing in str(outcomes[15])

    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        db.execute("update public.locked_results set status = 'pending'")
    outcomes = mark(rows)
    assert isinstance(outcomes[7], TaskStoreUnavailable) and "23514" in str(outcomes[7])
    assert [outcome for index, outcome in enumerate(outcomes) if index != 7] == [None] * 29
    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        statuses = dict(db.execute("select id::text, status from public.locked_results").fetchall())
    assert statuses == {row: "pending" if row == locked else "processing" for row in rows}


def test_rows_marked_while_postgrest_is_down_fail_without_a_storm_of_retries(tmp_path):
    """The API gateway answers 502 while PostgREST is down: every mark gets Supabase's unavailability, and a shared
    PATCH is not sent again row by row (that is for PostgreSQL refusing a row, not for a service that is down)."""
    with running("supabase_stack.sh", tmp_path / "supabase") as supabase:
        rows = [new_task_row(supabase)[0] for _ in range(12)]
        os.kill(int((tmp_path / "supabase" / "postgrest.pid").read_text()), signal.SIGKILL)
        time.sleep(0.5)
        store = SupabaseTaskStore(supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"])

        async def together():
            return await asyncio.gather(*(store.mark_processing(row) for row in rows), return_exceptions=True)

        outcomes = asyncio.run(together())
        log = Path(supabase["SUPABASE_ACCESS_LOG"]).read_text()
    assert all(isinstance(outcome, TaskStoreUnavailable) for outcome in outcomes), outcomes
    assert all("502" in str(outcome) for outcome in outcomes)
    assert sum("PATCH /rest/v1/segmentation_results" in line for line in log.splitlines()) < len(rows)


def test_a_supabase_that_never_answers_is_a_timeout():
    listening = socket.socket()  # accepts connections (the kernel's backlog), never answers
    listening.bind(("127.0.0.1", 0))
    listening.listen()
    try:
        store = SupabaseTaskStore(f"http://127.0.0.1:{listening.getsockname()[1]}", "key", timeout_s=0.5)
        with pytest.raises(TaskStoreTimeout, match="did not answer in time"):
            asyncio.run(store.mark_processing(str(uuid.uuid4())))
    finally:
        listening.close()


def test_table_without_result_column_still_completes(supabase):
    import psycopg

    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        db.execute(
            "create table public.plain_results (id uuid primary key, status text, mask_url text, labels jsonb,"
            " confidence double precision, inference_time_ms integer, error_message text)"
        )
        task_id = str(uuid.uuid4())
        db.execute("insert into public.plain_results (id, status) values (%s, 'pending')", (task_id,))
        db.execute("notify pgrst, 'reload schema'")
    time.sleep(1.0)
    store = SupabaseTaskStore(supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"], table="plain_results")
    asyncio.run(store.mark_completed(task_id, TaskResult("u", ["car"], 0.9, 12, {"results": []})))
    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        assert db.execute("select status, labels from plain_results where id = %s", (task_id,)).fetchone() == (
            "completed",
            ["car"],
        )


# In-process pipeline against real servers: the same modules the gateway uses, with one server broken.


def pipeline_for(r2_env, supabase_env, segmenter, secret=None):
    store = R2Storage(
        r2_env["R2_ENDPOINT_URL"],
        r2_env["R2_BUCKET"],
        r2_env["R2_ACCESS_KEY_ID"],
        secret or r2_env["R2_SECRET_ACCESS_KEY"],
        timeout_s=2,
        max_attempts=1,
    )
    tasks = SupabaseTaskStore(supabase_env["SUPABASE_URL"], supabase_env["SUPABASE_SERVICE_ROLE_KEY"], timeout_s=3)

    return PredictPipeline(
        store, tasks, InProcessModel(segmenter), Limits(20_000_000, 50_000_000, 40_000, 2_500, 86_400)
    )


def run_predict(pipeline, task_id, user_id, image_url="images/in.jpg"):
    request = PredictRequest(image_url=image_url, text_prompt="car", user_id=user_id, task_id=task_id)
    return asyncio.run(pipeline.predict(request))


def test_wrong_r2_secret_is_a_clear_error_and_a_failed_row(r2, supabase, bucket, segmenter):
    task_id, user_id = new_task_row(supabase)
    with pytest.raises(ApiError) as error:
        run_predict(pipeline_for(r2, supabase, segmenter, secret="wrong-secret"), task_id, user_id)
    assert (error.value.status, error.value.code) == (502, "storage_unavailable")
    assert "SignatureDoesNotMatch" in error.value.message
    assert task_row(supabase, task_id)["status"] == "failed"
    with pytest.raises(StorageUnavailable):
        R2Storage(r2["R2_ENDPOINT_URL"], r2["R2_BUCKET"], r2["R2_ACCESS_KEY_ID"], "wrong").get_image(
            "images/in.jpg", 10**6
        )


def test_the_image_downloads_while_the_row_is_marked_processing(r2, supabase, bucket, segmenter):
    """The Supabase and R2 round trips overlap: here the row update only returns once the download has begun."""
    pipeline = pipeline_for(r2, supabase, segmenter)
    get_image, mark_processing = pipeline.store.get_image, pipeline.tasks.mark_processing
    download_began = threading.Event()

    def watched_get_image(key, max_bytes):
        download_began.set()
        return get_image(key, max_bytes)

    async def mark_processing_with_the_download_under_way(task_id):
        await mark_processing(task_id)
        assert await asyncio.to_thread(download_began.wait, 10), "the download waited for the row update"

    pipeline.store.get_image = watched_get_image
    pipeline.tasks.mark_processing = mark_processing_with_the_download_under_way
    task_id, user_id = new_task_row(supabase)
    assert run_predict(pipeline, task_id, user_id)["num_instances"] >= 0
    assert task_row(supabase, task_id)["status"] == "completed"


def test_an_overwritten_object_is_encoded_again_and_a_repeat_comes_from_the_image_cache(
    r2, supabase, bucket, segmenter
):
    """The model worker caches an image's encoding under the object's ETag: a new version of the key is a new image."""
    pipeline = pipeline_for(r2, supabase, segmenter)
    key, twin = f"images/overwritten-{uuid.uuid4().hex}.png", f"images/copy-{uuid.uuid4().hex}.png"
    old, new = (encode(random_image(np.random.default_rng(seed), 60, 80)) for seed in (21, 22))  # the same size

    async def predict_now(image_url: str) -> dict:
        task_id, user_id = new_task_row(supabase)
        request = PredictRequest(
            image_url=image_url, text_prompt="car", user_id=user_id, task_id=task_id, threshold=0.0, max_instances=5
        )
        return await pipeline.predict(request)

    async def overwrite_between_requests():
        bucket.put_object(Bucket=r2["R2_BUCKET"], Key=key, Body=old)
        version = pipeline.store.get_image(key, 10**6).identity
        first, repeat = await predict_now(key), await predict_now(key)
        bucket.put_object(Bucket=r2["R2_BUCKET"], Key=key, Body=new)
        assert pipeline.store.get_image(key, 10**6).identity != version
        overwritten = await predict_now(key)
        bucket.put_object(Bucket=r2["R2_BUCKET"], Key=twin, Body=new)
        return first, repeat, overwritten, await predict_now(twin)

    first, repeat, overwritten, fresh = asyncio.run(overwrite_between_requests())
    assert [first["cache"], repeat["cache"], overwritten["cache"], fresh["cache"]] == ["miss", "hit", "miss", "miss"]
    assert repeat["instances"] == first["instances"] and len(first["instances"]) == 5
    assert overwritten["instances"] == fresh["instances"] != first["instances"]
    assert repeat["timings"]["model_vision"] == repeat["timings"]["model_decode"] == 0.0


def test_a_request_cancelled_while_its_row_is_marked_processing_leaves_the_row_failed(r2, supabase, segmenter):
    """The update reached the database but the request ended before its answer came back."""
    pipeline = pipeline_for(r2, supabase, segmenter)
    mark_processing = pipeline.tasks.mark_processing
    update_landed = asyncio.Event()

    async def mark_processing_then_stall(task_id):
        await mark_processing(task_id)
        update_landed.set()
        await asyncio.sleep(60)

    pipeline.tasks.mark_processing = mark_processing_then_stall
    task_id, user_id = new_task_row(supabase)

    async def cancel_once_the_update_landed():
        request = PredictRequest(image_url="images/in.jpg", text_prompt="car", user_id=user_id, task_id=task_id)
        predicting = asyncio.ensure_future(pipeline.predict(request))
        await asyncio.wait_for(update_landed.wait(), 10)
        predicting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await predicting

    asyncio.run(cancel_once_the_update_landed())
    row = task_row(supabase, task_id)
    assert row["status"] == "failed" and row["error_message"].startswith("cancelled")


def test_a_missing_row_is_the_answer_even_when_the_image_is_missing_too(r2, supabase, segmenter):
    with pytest.raises(ApiError) as error:
        run_predict(pipeline_for(r2, supabase, segmenter), str(uuid.uuid4()), "u", image_url="images/absent.jpg")
    assert (error.value.status, error.value.code) == (404, "task_not_found")


def test_r2_down_fails_the_row(supabase, segmenter, tmp_path):
    with running("s3_server.sh", tmp_path / "r2-down") as dying_r2:
        s3_client(dying_r2).put_object(
            Bucket=dying_r2["R2_BUCKET"],
            Key="images/in.jpg",
            Body=encode(random_image(np.random.default_rng(1), 30, 30), "JPEG"),
        )
        task_id, user_id = new_task_row(supabase)
        assert run_predict(pipeline_for(dying_r2, supabase, segmenter), task_id, user_id)["num_instances"] >= 0
    task_id, user_id = new_task_row(supabase)
    with pytest.raises(ApiError) as error:
        run_predict(pipeline_for(dying_r2, supabase, segmenter), task_id, user_id)
    assert error.value.status in (502, 504) and error.value.code in ("storage_unavailable", "storage_timeout")
    row = task_row(supabase, task_id)
    assert row["status"] == "failed" and row["error_message"].startswith(error.value.code)


def test_supabase_down_is_a_clear_error_and_nothing_is_written(r2, bucket, segmenter, tmp_path):
    with running("supabase_stack.sh", tmp_path / "sb-down") as dying_supabase:
        task_id, user_id = new_task_row(dying_supabase)
        pipeline = pipeline_for(r2, dying_supabase, segmenter)
    with pytest.raises(ApiError) as error:
        run_predict(pipeline, task_id, user_id)
    assert (error.value.status, error.value.code) in ((502, "database_unavailable"), (504, "database_timeout"))
    with pytest.raises(ClientError):
        bucket.head_object(Bucket=r2["R2_BUCKET"], Key=f"masks/{user_id}/{task_id}.png")


@pytest.mark.parametrize("kind", ["local", "r2"])
def test_a_record_round_trips_through_either_store(r2, bucket, tmp_path, kind):
    """get_object / put_object, what refinement records (backend/refinement.py) go through."""
    if kind == "local":
        store = LocalStorage(tmp_path)
    else:
        store = R2Storage(r2["R2_ENDPOINT_URL"], r2["R2_BUCKET"], r2["R2_ACCESS_KEY_ID"], r2["R2_SECRET_ACCESS_KEY"])
    key = f"refine/u/{uuid.uuid4()}.npz"
    stored = store.put_object(key, b"record", "application/octet-stream")
    assert stored.key == key and store.get_object(key, 6) == b"record"
    if kind == "r2":
        assert bucket.head_object(Bucket=r2["R2_BUCKET"], Key=key)["ContentType"] == "application/octet-stream"
    with pytest.raises(ObjectTooLarge):
        store.get_object(key, 5)
    with pytest.raises(ObjectNotFound):
        store.get_object("refine/u/missing.npz", 100)
    with pytest.raises(UnsupportedImageUrl):
        store.get_object("../outside.npz", 100)


def test_presigned_mask_url_serves_the_png(r2):
    store = R2Storage(
        r2["R2_ENDPOINT_URL"], r2["R2_BUCKET"], r2["R2_ACCESS_KEY_ID"], r2["R2_SECRET_ACCESS_KEY"], presign_ttl_s=60
    )
    png = encode(np.zeros((4, 4, 3), dtype=np.uint8), "PNG")
    stored = store.put_png("masks/presign/t.png", png)
    assert "X-Amz-Signature" in stored.url
    response = httpx.get(stored.url)
    assert response.status_code == 200 and response.content == png
    assert response.headers["content-type"] == "image/png"
    assert httpx.get(stored.url.replace("X-Amz-Signature=", "X-Amz-Signature=0")).status_code == 403


def test_r2_stopped_mid_run_leaves_every_row_completed_or_failed(supabase, segmenter, tmp_path):
    from stack import stop

    workdir = tmp_path / "r2-mid-run"
    with running("s3_server.sh", workdir) as dying_r2:
        s3_client(dying_r2).put_object(
            Bucket=dying_r2["R2_BUCKET"],
            Key="images/in.jpg",
            Body=encode(random_image(np.random.default_rng(2), 60, 80), "JPEG"),
        )
        rows = [new_task_row(supabase) for _ in range(24)]

        async def run_all():
            pipeline = pipeline_for(dying_r2, supabase, segmenter)
            requests = [
                PredictRequest(image_url="images/in.jpg", text_prompt="car", user_id=user_id, task_id=task_id)
                for task_id, user_id in rows
            ]

            async def one(request, delay):
                await asyncio.sleep(delay)
                return await pipeline.predict(request)

            async def stop_r2_mid_run():
                await asyncio.sleep(0.4)
                await asyncio.to_thread(stop, "s3_server.sh", workdir)

            outcomes = asyncio.gather(*(one(r, 0.05 * i) for i, r in enumerate(requests)), return_exceptions=True)
            results, _ = await asyncio.gather(outcomes, stop_r2_mid_run())
            return results

        results = asyncio.run(run_all())
    succeeded = [r for r in results if isinstance(r, dict)]
    failed = [r for r in results if isinstance(r, ApiError)]
    assert succeeded and failed, "R2 must stop while requests are still arriving"
    assert len(succeeded) + len(failed) == len(rows)
    assert {error.code for error in failed} <= {"storage_unavailable", "storage_timeout"}
    for (task_id, _), result in zip(rows, results, strict=True):
        row = task_row(supabase, task_id)
        if isinstance(result, dict):
            assert row["status"] == "completed" and row["mask_url"] == result["mask_url"]
        else:
            assert row["status"] == "failed" and row["mask_url"] is None
