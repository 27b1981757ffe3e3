"""Heavy requests under a real `bentoml serve` with the R2 and Supabase stand-ins (demo model, this CPU): what the
caller gets when the model is slow, overloaded or abandoned, and what the row says."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from served import ServedBento
from stack import STACK_API_KEY, new_task_row, r2_settings, supabase_settings, task_row

pytestmark = [pytest.mark.served, pytest.mark.stack]

HEADERS = {"X-API-Key": STACK_API_KEY}
MODEL_TIMEOUT_S = 2
# 6000x4000, 12 prompts, every demo query kept: 96 masks of 24 MP, ~14 s of post-processing on the idle 2-core CPU
# (far longer when it is busy), 7x the timeout; stopped early, it costs only seconds.
SLOW = {
    "image_url": "images/huge.jpg",
    "prompts": [f"thing {index}" for index in range(12)],
    "threshold": 0.0,
    "max_instances": 8,
}
# The same with 32 prompts: 6,144 mask megapixels (32 x 8 x 24), over HEAVY_REQUEST_MEGAPIXELS: the sliced path.
HEAVY = {**SLOW, "prompts": [f"thing {index}" for index in range(32)]}
BATCH = "/api/v1/predict/batch"


def gradient_jpeg(width: int, height: int) -> bytes:
    """A photo-sized JPEG that stays small (a smooth gradient), so MAX_IMAGE_BYTES is not what refuses it."""
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = x[None, :]
    pixels[..., 1] = y[:, None]
    pixels[..., 2] = 128
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(r2, bucket):
    sizes = {"images/huge.jpg": (6000, 4000), "images/large.jpg": (2000, 1500), "images/small.jpg": (320, 240)}
    for key, size in sizes.items():
        bucket.put_object(Bucket=r2["R2_BUCKET"], Key=key, Body=gradient_jpeg(*size), ContentType="image/jpeg")


@pytest.fixture(scope="module")
def impatient(r2, supabase, images, tmp_path_factory):
    """MODEL_TIMEOUT_S=2, and a batch queue that sheds a request as soon as it would wait (MAX_LATENCY_MS=10)."""
    env = {
        **r2_settings(r2),
        **supabase_settings(supabase),
        "API_SECRET_KEY": STACK_API_KEY,
        "MODEL_TIMEOUT_S": str(MODEL_TIMEOUT_S),
        "MAX_LATENCY_MS": "10",
    }
    bento = ServedBento(env, tmp_path_factory.mktemp("impatient") / "serve.log").start()
    yield bento
    bento.stop()


@pytest.fixture(scope="module")
def patient(r2, supabase, images, tmp_path_factory):
    """The default timeouts: work stops only because its caller has gone."""
    env = {**r2_settings(r2), **supabase_settings(supabase), "API_SECRET_KEY": STACK_API_KEY}
    bento = ServedBento(env, tmp_path_factory.mktemp("patient") / "serve.log").start()
    yield bento
    bento.stop()


def request(supabase, **fields) -> dict:
    task_id, user_id = new_task_row(supabase)
    prompt = {} if "prompts" in fields else {"text_prompt": "car"}
    return {"image_url": "images/small.jpg", **prompt, "user_id": user_id, "task_id": task_id, **fields}


def wait_until_idle(server, supabase) -> None:
    """Work an earlier test abandoned may still hold the model: wait until a small request is served."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        response = httpx.post(f"{server.url}/api/v1/predict", json=request(supabase), headers=HEADERS, timeout=60)
        if response.status_code == 200:
            return
        time.sleep(0.5)
    raise AssertionError("the model never became idle")


PATHS = pytest.mark.parametrize(("slow", "sliced"), [(SLOW, 0), (HEAVY, 1)], ids=["batched", "sliced"])


@PATHS
def test_a_request_slower_than_the_model_timeout_is_504_inference_timeout(impatient, supabase, slow, sliced):
    wait_until_idle(impatient, supabase)
    before = batching(impatient)
    body = request(supabase, **slow)
    response = httpx.post(f"{impatient.url}{BATCH}", json=body, headers=HEADERS, timeout=120)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "inference_timeout"
    assert "MODEL_TIMEOUT_S" in response.json()["error"]["message"]
    row = task_row(supabase, body["task_id"])
    assert row["status"] == "failed" and row["error_message"].startswith("inference_timeout")
    eventually(lambda: batching(impatient)["timed_out"] == before["timed_out"] + 1)  # stopped at its deadline
    assert batching(impatient)["sliced"] == before["sliced"] + sliced


def test_requests_the_model_cannot_queue_are_429_model_busy_with_retry_after(impatient, supabase):
    wait_until_idle(impatient, supabase)
    bodies = [request(supabase) for _ in range(16)]

    async def burst():
        async with httpx.AsyncClient(headers=HEADERS, timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{impatient.url}/api/v1/predict", json=b) for b in bodies))

    responses = asyncio.run(burst())
    assert {response.status_code for response in responses} <= {200, 429}
    busy = [(body, response) for body, response in zip(bodies, responses, strict=True) if response.status_code == 429]
    assert busy, "16 concurrent requests with MAX_LATENCY_MS=10 must shed some"
    body, response = busy[0]
    assert response.json()["error"]["code"] == "model_busy" and response.headers["Retry-After"] == "1"
    row = task_row(supabase, body["task_id"])
    assert row["status"] == "failed" and row["error_message"].startswith("model_busy")


def batching(server) -> dict:
    return httpx.get(f"{server.url}/api/v1/info", headers=HEADERS, timeout=30).json()["batching"]


def eventually(check, seconds: float = 120):
    """Poll until check() is truthy (its value), or fail after `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"not within {seconds} s")


@PATHS
def test_a_client_that_disconnects_stops_the_model_and_the_row_says_cancelled(patient, supabase, slow, sliced):
    """The slow request needs 14 s or more of post-processing; its client leaves after 3 s. The gateway's handler is
    cancelled, the model service is told, and stops the job at its next slice: its `cancelled` counter moves."""
    wait_until_idle(patient, supabase)
    before = batching(patient)
    body = request(supabase, **slow)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{patient.url}{BATCH}", json=body, headers=HEADERS, timeout=3)
    row = eventually(lambda: (row := task_row(supabase, body["task_id"]))["status"] == "failed" and row)
    assert row["error_message"] == "cancelled: the client disconnected before the answer"
    eventually(lambda: batching(patient)["cancelled"] == before["cancelled"] + 1)
    assert batching(patient)["sliced"] == before["sliced"] + sliced


def test_a_heavy_request_is_served_alone_in_slices(patient, supabase):
    """5 prompts x 200 instances x 3 MP = 3,000 mask megapixels by the estimate: over 2,500, so sliced; the demo
    keeps 8 instances per prompt, so it is quick."""
    before = batching(patient)["sliced"]
    body = request(supabase, image_url="images/large.jpg", prompts=list("abcde"), max_instances=200)
    response = httpx.post(f"{patient.url}{BATCH}", json=body, headers=HEADERS, timeout=120)
    assert response.status_code == 200, response.text
    assert [result["image"] for result in response.json()["results"]] == [{"width": 2000, "height": 1500}] * 5
    assert batching(patient)["sliced"] == before + 1
    assert task_row(supabase, body["task_id"])["status"] == "completed"


def test_a_small_request_is_answered_while_a_heavy_one_runs(patient, supabase):
    """The heavy request (tens of seconds of post-processing here) runs in slices; a small request sent meanwhile
    is served between two of them. Then the heavy one's client leaves, and the model stops it."""
    wait_until_idle(patient, supabase)
    before = batching(patient)
    heavy = request(supabase, **HEAVY)

    async def scenario():
        async with httpx.AsyncClient(headers=HEADERS, timeout=600) as client:
            running = asyncio.ensure_future(client.post(f"{patient.url}{BATCH}", json=heavy))
            while (await client.get(f"{patient.url}/api/v1/info")).json()["batching"]["sliced"] == before["sliced"]:
                await asyncio.sleep(0.2)  # until the heavy request has reached the model
            small = await client.post(f"{patient.url}/api/v1/predict", json=request(supabase))
            heavy_still_running = not running.done()
            running.cancel()
            return small, heavy_still_running

    small, heavy_still_running = asyncio.run(scenario())
    assert small.status_code == 200, small.text
    assert heavy_still_running
    eventually(lambda: batching(patient)["cancelled"] == before["cancelled"] + 1)


def test_a_request_over_the_cost_budget_is_422_before_any_model_work(patient, supabase):
    """32 prompts x 200 instances x 24 MP = 153,600 mask megapixels, over the default 40,000."""
    before = batching(patient)["batches"]
    body = request(supabase, image_url="images/huge.jpg", prompts=["car"] * 32, max_instances=200)
    response = httpx.post(f"{patient.url}{BATCH}", json=body, headers=HEADERS, timeout=60)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "request_too_heavy"
    assert "153,600 mask megapixels" in error["message"] and "the limit is 40,000" in error["message"]
    row = task_row(supabase, body["task_id"])
    assert row["status"] == "failed" and row["error_message"].startswith("request_too_heavy")
    assert batching(patient)["batches"] == before


def test_each_prompt_objects_max_instances_enters_the_cost(patient, supabase):
    """23 prompts at the request's 1 and 9 objects at 200: 1,823 instances x 24 MP = 43,752 mask megapixels, over the
    budget, though 32 x 1 x 24 would pass."""
    prompts = ["car"] * 23 + [{"text": "car", "max_instances": 200}] * 9
    body = request(supabase, image_url="images/huge.jpg", prompts=prompts, max_instances=1)
    response = httpx.post(f"{patient.url}{BATCH}", json=body, headers=HEADERS, timeout=60)
    assert response.status_code == 422, response.text
    message = response.json()["error"]["message"]
    assert "1823 instances (the max_instances of 32 prompts summed)" in message and "43,752 mask megapixels" in message
