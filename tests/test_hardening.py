"""Hard to break: generated requests, a bad-image corpus, hostile inputs, slow storage, secrets, shutdown.

Everything runs against the real stand-ins (SeaweedFS, PostgreSQL + PostgREST + nginx) and a real `bentoml serve`.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import encode, random_image
from PIL import Image
from served import ServedBento
from stack import STACK_API_KEY, new_task_row, r2_settings, supabase_settings, task_row

from backend.api_models import PredictRequest
from backend.errors import ApiError
from backend.pipeline import Limits, PredictPipeline
from storage import R2Storage
from tasks import SupabaseTaskStore

pytestmark = pytest.mark.stack
HEADERS = {"X-API-Key": STACK_API_KEY}


def predict(server, payload: dict | str, path: str = "/api/v1/predict") -> httpx.Response:
    if isinstance(payload, str):
        return httpx.post(
            f"{server.url}{path}", content=payload, headers={**HEADERS, "Content-Type": "application/json"}, timeout=60
        )
    return httpx.post(f"{server.url}{path}", json=payload, headers=HEADERS, timeout=60)


def test_generated_requests_never_get_a_5xx_and_every_4xx_has_the_error_shape(stack_server, tmp_path):
    har = tmp_path / "schemathesis.har"
    command = [
        str(Path(sys.executable).parent / "st"),
        "run",
        f"{stack_server.url}/api/v1/openapi.json",
        "-H",
        f"X-API-Key: {STACK_API_KEY}",
        "--checks",
        "not_a_server_error,response_schema_conformance",
        "-n",
        "1000",
        "--seed",
        "20261126",
        "--workers",
        "4",
        "--generation-database",
        "none",
        "--report",
        "har",
        "--report-har-path",
        str(har),
        "--no-color",
        "--max-time",
        "90",
        "--request-timeout",
        "60",
    ]
    # run from tmp_path: schemathesis writes a .schemathesis/ cache into its working directory
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:]
    entries = json.loads(har.read_text())["log"]["entries"]
    statuses = [entry["response"]["status"] for entry in entries]
    assert len(entries) >= 1000
    assert not [s for s in statuses if s >= 500]
    for entry in entries:
        if 400 <= entry["response"]["status"] < 500:
            error = json.loads(entry["response"]["content"]["text"])["error"]
            assert error["code"] and error["message"]


def _saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _saved(
        Image.fromarray(random_image(np.random.default_rng(orientation), 30, 50)), "JPEG", exif=exif.tobytes()
    )


def _bad_image_corpus() -> dict[str, tuple[bytes, int | str]]:
    """name -> (bytes, expected (width, height) or error code)."""
    rng = np.random.default_rng(11)
    jpeg = encode(random_image(rng, 64, 64), "JPEG")
    png = encode(random_image(rng, 64, 64), "PNG")
    frames = [Image.new("RGB", (20, 10), colour) for colour in ("red", "blue")]
    palette = Image.new("P", (12, 12), 1)
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    corpus = {
        "zero-bytes": (b"", "invalid_image"),
        "truncated-jpeg": (jpeg[: len(jpeg) // 3], "invalid_image"),
        "truncated-png": (png[: len(png) // 2], "invalid_image"),
        "text-file": (b"this is a text file, not a picture\n", "invalid_image"),
        "png-named-jpg": (png, (64, 64)),
        "one-pixel": (encode(random_image(rng, 1, 1), "PNG"), (1, 1)),
        "decompression-bomb": (_saved(Image.new("L", (12000, 12000)), "PNG"), "image_too_large"),
        "animated-gif": (_saved(frames[0], "GIF", save_all=True, append_images=frames[1:]), (20, 10)),
        "animated-webp": (_saved(frames[0], "WEBP", save_all=True, append_images=frames[1:]), (20, 10)),
        "cmyk-jpeg": (_saved(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG"), (16, 8)),
        "16-bit-png": (_saved(Image.fromarray(np.full((8, 24), 40000, dtype=np.uint16)), "PNG"), (24, 8)),
        "palette-transparency": (_saved(palette, "PNG", transparency=0), (12, 12)),
    }
    for orientation in range(2, 9):
        corpus[f"exif-{orientation}"] = (_exif_jpeg(orientation), (30, 50) if orientation >= 5 else (50, 30))
    return corpus


BAD_IMAGES = _bad_image_corpus()


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_corpus_gives_a_mask_or_a_clear_4xx_and_the_row_says_so(stack_server, r2, supabase, bucket, name):
    data, expected = BAD_IMAGES[name]
    key = f"corpus/{name}.jpg"
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key=key, Body=data, ContentType="image/jpeg")
    task_id, user_id = new_task_row(supabase)
    response = predict(
        stack_server,
        {
            "image_url": key,
            "text_prompt": "thing",
            "user_id": user_id,
            "task_id": task_id,
            "threshold": 0.0,
            "max_instances": 2,
        },
    )
    row = task_row(supabase, task_id)
    if isinstance(expected, tuple):
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["image"]["width"], body["image"]["height"]) == expected
        mask = bucket.get_object(Bucket=r2["R2_BUCKET"], Key=body["mask_key"])["Body"].read()
        assert Image.open(io.BytesIO(mask)).size == expected
        assert row["status"] == "completed"
    else:
        assert 400 <= response.status_code < 500 and response.json()["error"]["code"] == expected
        assert row["status"] == "failed" and row["error_message"].startswith(expected)


TASK = str(uuid.uuid4())


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ({"text_prompt": "x" * 10_000}, "prompt_too_long"),
        ({"text_prompt": 123}, "invalid_prompt"),
        ({"text_prompt": "cat", "boxes": "everything"}, "invalid_box"),
        ({"text_prompt": "cat", "boxes": [{"x1": 1, "y1": 1, "x2": 5}]}, "invalid_box"),
        ({"text_prompt": "cat", "boxes": [{"x1": -5, "y1": 1, "x2": 5, "y2": 9}]}, "invalid_box"),
        ({"text_prompt": "cat", "boxes": [{"x1": 1, "y1": 1, "x2": 5, "y2": 9}] * 17}, "invalid_box"),
        ({"text_prompt": "cat", "threshold": None}, "invalid_option"),
        ({"text_prompt": "cat", "max_instances": 1.5}, "invalid_option"),
        ({"text_prompt": "cat", "include_rle": "yes please"}, "invalid_option"),
        ({"text_prompt": "   \t\n  "}, "missing_prompt"),
        ({"text_prompt": "cat", "user_id": {"$ne": 1}}, "invalid_user_id"),
        ({"text_prompt": "cat", "image_url": ["a", "b"]}, "unsupported_image_url"),
    ],
)
def test_hostile_inputs_are_refused_before_any_io(stack_server, supabase, payload, code):
    task_id, user_id = new_task_row(supabase)
    response = predict(stack_server, {"image_url": "images/in.jpg", "user_id": user_id, "task_id": task_id, **payload})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code
    assert task_row(supabase, task_id)["status"] == "pending"  # refused before the row (or R2) was touched


def test_nan_and_huge_prompt_lists_are_refused(stack_server):
    base = f'"image_url": "images/in.jpg", "user_id": "u", "task_id": "{TASK}"'
    nan = predict(stack_server, "{" + base + ', "text_prompt": "cat", "threshold": NaN}')
    assert nan.status_code == 422 and nan.json()["error"]["code"] == "invalid_option"
    many = predict(
        stack_server,
        {"image_url": "images/in.jpg", "user_id": "u", "task_id": TASK, "prompts": ["cat"] * 1000},
        "/api/v1/predict/batch",
    )
    assert many.status_code == 422 and many.json()["error"]["code"] == "too_many_prompts"


@pytest.mark.parametrize("prompt", ["猫", "🐶 dog", "قطة سوداء", "chat\u200fnoir", "Ω≈ç√∫"])
def test_unicode_prompts_are_answered(stack_server, supabase, prompt):
    task_id, user_id = new_task_row(supabase)
    response = predict(
        stack_server, {"image_url": "images/in.jpg", "text_prompt": prompt, "user_id": user_id, "task_id": task_id}
    )
    assert response.status_code == 200, response.text
    assert all(label == prompt for label in response.json()["labels"])


def test_box_outside_the_image_fails_the_row_with_invalid_box(stack_server, supabase):
    task_id, user_id = new_task_row(supabase)
    response = predict(
        stack_server,
        {
            "image_url": "images/in.jpg",
            "user_id": user_id,
            "task_id": task_id,
            "boxes": [{"x1": 500, "y1": 500, "x2": 600, "y2": 600}],
        },
    )
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_box"
    assert task_row(supabase, task_id)["status"] == "failed"


class NeverCalled:
    async def segment(self, item: dict, sliced: bool) -> dict:
        raise AssertionError("the model must not be called when the download failed")


class BlackHole:
    """Accepts TCP connections and never answers: a storage server that hangs."""

    def __init__(self) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(64)
        self.port = self.socket.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except OSError:
                return
            self._held.append(connection)

    def close(self) -> None:
        self.socket.close()
        for connection in self._held:
            connection.close()


def test_slow_r2_times_out_with_a_clear_error_and_a_failed_row(r2, supabase):
    hole = BlackHole()
    try:
        store = R2Storage(
            f"http://127.0.0.1:{hole.port}",
            r2["R2_BUCKET"],
            r2["R2_ACCESS_KEY_ID"],
            r2["R2_SECRET_ACCESS_KEY"],
            timeout_s=1,
            max_attempts=1,
        )
        tasks = SupabaseTaskStore(supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"])

        pipeline = PredictPipeline(store, tasks, NeverCalled(), Limits(10**7, 10**8, 40_000, 2_500, 86_400))
        task_id, user_id = new_task_row(supabase)
        started = time.monotonic()
        with pytest.raises(ApiError) as error:
            asyncio.run(
                pipeline.predict(
                    PredictRequest(image_url="images/in.jpg", text_prompt="cat", user_id=user_id, task_id=task_id)
                )
            )
        assert (error.value.status, error.value.code) == (504, "storage_timeout")
        assert time.monotonic() - started < 10
        row = task_row(supabase, task_id)
        assert row["status"] == "failed" and "storage_timeout" in row["error_message"]
    finally:
        hole.close()


def test_secrets_never_appear_in_logs_or_bodies(stack_server, r2, supabase):
    bogus = predict(stack_server, {"image_url": "images/nope.jpg", "text_prompt": "x", "user_id": "u", "task_id": TASK})
    unauthorized = httpx.post(f"{stack_server.url}/api/v1/predict", json={}, headers={"X-API-Key": "guess"})
    log = stack_server.log()
    assert "Starting production" in log or "initialized" in log  # the log really was captured
    for secret in (STACK_API_KEY, r2["R2_SECRET_ACCESS_KEY"], supabase["SUPABASE_SERVICE_ROLE_KEY"]):
        assert secret not in log
        assert secret not in bogus.text and secret not in unauthorized.text


def test_shutdown_with_requests_in_flight_leaves_no_row_processing(r2, supabase, bucket, tmp_path):
    env = {**r2_settings(r2), **supabase_settings(supabase), "API_SECRET_KEY": STACK_API_KEY}
    bento = ServedBento(env, tmp_path / "serve.log").start()
    rows = [new_task_row(supabase) for _ in range(48)]

    async def fire():
        async with httpx.AsyncClient(timeout=60, headers=HEADERS) as client:
            calls = [
                client.post(
                    f"{bento.url}/api/v1/predict",
                    json={
                        "image_url": "images/in.jpg",
                        "text_prompt": f"thing {i}",
                        "user_id": user_id,
                        "task_id": task_id,
                    },
                )
                for i, (task_id, user_id) in enumerate(rows)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    in_flight_at_stop = []

    def stop_while_requests_are_in_flight():
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            processing = [task_id for task_id, _ in rows if task_row(supabase, task_id)["status"] == "processing"]
            if processing:
                in_flight_at_stop.extend(processing)
                os.killpg(bento._process.pid, signal.SIGTERM)
                return
            time.sleep(0.02)

    stopper = threading.Thread(target=stop_while_requests_are_in_flight)
    stopper.start()
    responses = asyncio.run(fire())
    stopper.join()
    bento.stop()
    statuses = [task_row(supabase, task_id)["status"] for task_id, _ in rows]
    assert in_flight_at_stop, "SIGTERM must arrive while rows are processing"
    assert "processing" not in statuses, statuses
    for response, status in zip(responses, statuses, strict=True):
        if isinstance(response, httpx.Response) and response.status_code == 200:
            assert status == "completed"

    restarted = ServedBento(env, tmp_path / "serve-again.log").start()
    try:
        task_id, user_id = new_task_row(supabase)
        response = predict(
            restarted, {"image_url": "images/in.jpg", "text_prompt": "car", "user_id": user_id, "task_id": task_id}
        )
        assert response.status_code == 200 and task_row(supabase, task_id)["status"] == "completed"
    finally:
        restarted.stop()


def test_health_answers_while_the_model_worker_does_not(tmp_path):
    """A model worker that takes connections and answers nothing (SIGSTOP here; a killed worker is the same until
    BentoML's restart of it serves, 20-30 s on this box): /health still answers, saying the model is unavailable,
    and says ok again once the worker is back. Before, it waited on the model for 60 s."""
    bento = ServedBento({}, tmp_path / "serve.log").start()
    try:
        [model_pid] = bento.worker_pids("sam3-model")
        os.kill(model_pid, signal.SIGSTOP)
        try:
            stalled = httpx.get(f"{bento.url}/health", timeout=30)
        finally:
            os.kill(model_pid, signal.SIGCONT)
        assert stalled.status_code == 200
        assert stalled.json()["status"] == "unavailable" and stalled.json()["model_loaded"] is False
        assert httpx.get(f"{bento.url}/health", timeout=30).json()["status"] == "ok"
    finally:
        bento.stop()


def test_a_request_past_max_concurrency_is_429_in_the_error_shape(tmp_path):
    """MAX_CONCURRENCY requests in flight: one more is answered at once with the contract's error shape and
    Retry-After (BentoML's own limit answered {"error": "Too many requests"}); health probes still answer."""
    bento = ServedBento({"MAX_CONCURRENCY": "2"}, tmp_path / "serve.log").start()
    unknown_task = f"{bento.url}/api/v1/tasks/{uuid.uuid4()}"
    head = (
        b"POST /api/v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n{"
    )
    try:
        # two requests whose body never ends: each holds its slot until its connection closes, however slow the box
        holding = [socket.create_connection(("127.0.0.1", bento.port), timeout=30) for _ in range(2)]
        try:
            for connection in holding:
                connection.sendall(head)
            for _ in range(100):  # until the gateway has both
                refused = httpx.get(unknown_task, timeout=10)
                if refused.status_code == 429:
                    break
                time.sleep(0.1)
            health = httpx.get(f"{bento.url}/health", timeout=30)
        finally:
            for connection in holding:
                connection.close()
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert refused.json()["error"]["code"] == "too_many_requests"
        assert "MAX_CONCURRENCY" in refused.json()["error"]["message"]
        assert health.status_code == 200
        for _ in range(100):  # the closed connections give their slots back
            freed = httpx.get(unknown_task, timeout=10)
            if freed.status_code != 429:
                break
            time.sleep(0.1)
        assert freed.json()["error"]["code"] == "task_not_found"
    finally:
        bento.stop()
