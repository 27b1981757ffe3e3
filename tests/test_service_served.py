"""The two services under a real `bentoml serve` (demo model, local storage, API key on): the contract end to end."""

from __future__ import annotations

import asyncio
import io
import re
import uuid

import httpx
import numpy as np
import pytest
from conftest import encode, random_image
from PIL import Image
from runner_asserts import decode_rle
from served import ServedBento

API_KEY = "test-api-key-0123456789"
HEADERS = {"X-API-Key": API_KEY}


@pytest.fixture(scope="module")
def storage_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def server(storage_dir, tmp_path_factory):
    bento = ServedBento(
        {
            "API_SECRET_KEY": API_KEY,
            "LOCAL_STORAGE_DIR": str(storage_dir),
            "MAX_BATCH_SIZE": "16",
            "MAX_LATENCY_MS": "60000",
            "GATEWAY_WORKERS": "2",
        },
        tmp_path_factory.mktemp("logs") / "serve.log",
    ).start()
    yield bento
    bento.stop()


@pytest.fixture(scope="module")
def image_key(storage_dir):
    rng = np.random.default_rng(7)
    (storage_dir / "images").mkdir(exist_ok=True)
    (storage_dir / "images" / "street.jpg").write_bytes(encode(random_image(rng, 120, 200), "JPEG"))
    (storage_dir / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return "images/street.jpg"


def body(image_url: str, **extra) -> dict:
    return {"image_url": image_url, "text_prompt": "car", "user_id": "user-1", "task_id": str(uuid.uuid4()), **extra}


def post(server, path, json, headers=HEADERS):
    return httpx.post(f"{server.url}{path}", json=json, headers=headers, timeout=60)


def test_health_and_probes_need_no_key(server):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model_loaded"] is True and health["gpu_available"] is False
    for probe in ("/livez", "/readyz", "/metrics"):
        assert httpx.get(f"{server.url}{probe}").status_code == 200


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}, {"X-API-Key": API_KEY + "x"}])
def test_missing_or_wrong_key_is_401(server, image_key, headers):
    for response in (
        post(server, "/api/v1/predict", body(image_key), headers),
        httpx.get(f"{server.url}/api/v1/info", headers=headers),
    ):
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "unauthorized"


def test_info_by_get_and_post(server):
    for response in (
        httpx.get(f"{server.url}/api/v1/info", headers=HEADERS),
        httpx.post(f"{server.url}/api/v1/info", headers=HEADERS),
    ):
        info = response.json()
        assert response.status_code == 200
        assert info["random_weights"] is True and info["parameters"] > 0
        for field in (
            "model_name",
            "model_version",
            "weights_size_gb",
            "device",
            "dtype",
            "weights_source",
            "max_batch_size",
        ):
            assert field in info
        assert info["acceleration"]["compile"] == "off" and info["acceleration"]["jpeg_decode"] == "cpu"


def test_predict_round_trip(server, storage_dir, image_key):
    request = body(image_key, threshold=0.3)
    response = post(server, "/api/v1/predict", request)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["task_id"] == request["task_id"]
    assert result["image"] == {"width": 200, "height": 120}
    assert result["num_instances"] == len(result["instances"]) == len(result["labels"]) > 0
    assert result["labels"] == ["car"] * result["num_instances"]
    assert result["confidence"] == max(instance["score"] for instance in result["instances"])
    assert result["mask_key"] == f"masks/user-1/{request['task_id']}.png"
    assert result["inference_time_ms"] > 0 and "model_vision" in result["timings"]
    mask = np.array(Image.open(storage_dir / result["mask_key"]))
    assert mask.shape == (120, 200) and set(np.unique(mask)) <= {0, 255}
    union = np.zeros((120, 200), dtype=bool)
    for instance in result["instances"]:
        decoded = decode_rle(instance["rle"])
        assert decoded.sum() == instance["area"]
        union |= decoded
    assert np.array_equal(union, mask == 255)


def test_batch_round_trip(server, storage_dir, image_key):
    request = body(image_key, threshold=0.0, max_instances=3, include_rle=False)
    del request["text_prompt"]
    request["prompts"] = ["car", "person", "tree"]
    response = post(server, "/api/v1/predict/batch", request)
    assert response.status_code == 200, response.text
    result = response.json()
    assert [r["labels"][0] for r in result["results"]] == ["car", "person", "tree"]
    for index, prompt_result in enumerate(result["results"]):
        assert prompt_result["mask_key"] == f"masks/user-1/{request['task_id']}/{index}.png"
        assert (storage_dir / prompt_result["mask_key"]).is_file()
        assert prompt_result["num_instances"] == 3 and all(i["rle"] is None for i in prompt_result["instances"])
    assert result["total_inference_time_ms"] > 0
    per_prompt = [np.array(Image.open(storage_dir / r["mask_key"])) == 255 for r in result["results"]]
    combined = np.array(Image.open(storage_dir / result["mask_key"])) == 255
    assert np.array_equal(combined, np.logical_or.reduce(per_prompt))


def test_nothing_found_is_a_success_with_zero_confidence(server, image_key):
    result = post(server, "/api/v1/predict", body(image_key, threshold=1.0)).json()
    assert result["num_instances"] == 0 and result["confidence"] == 0 and result["labels"] == []


def test_same_task_twice_gives_the_same_keys(server, image_key):
    request = body(image_key)
    first, second = (post(server, "/api/v1/predict", request).json() for _ in range(2))
    assert first["mask_key"] == second["mask_key"] and first["instances"] == second["instances"]


LONG = "x" * 300
TASK = "7c9e6679-7425-40de-944b-e07fc1f698c9"


@pytest.mark.parametrize(
    ("path", "payload", "status", "code"),
    [
        ("/api/v1/predict", {"image_url": "images/street.jpg", "user_id": "u", "task_id": TASK}, 422, "missing_prompt"),
        (
            "/api/v1/predict",
            {"image_url": "a.jpg", "text_prompt": LONG, "user_id": "u", "task_id": TASK},
            422,
            "prompt_too_long",
        ),
        (
            "/api/v1/predict",
            {"image_url": "a.jpg", "text_prompt": "x", "user_id": "u", "task_id": "nope"},
            422,
            "invalid_task_id",
        ),
        (
            "/api/v1/predict",
            {"image_url": "a.jpg", "text_prompt": "x", "user_id": "../etc", "task_id": TASK},
            422,
            "invalid_user_id",
        ),
        (
            "/api/v1/predict",
            {
                "image_url": "a.jpg",
                "text_prompt": "x",
                "user_id": "u",
                "task_id": TASK,
                "boxes": [{"x1": 10, "y1": 10, "x2": 5, "y2": 20}],
            },
            422,
            "invalid_box",
        ),
        (
            "/api/v1/predict",
            {
                "image_url": "a.jpg",
                "text_prompt": "x",
                "user_id": "u",
                "task_id": TASK,
                "boxes": [{"x1": -1, "y1": 0, "x2": 5, "y2": 5}],
            },
            422,
            "invalid_box",
        ),
        (
            "/api/v1/predict",
            {"image_url": "a.jpg", "text_prompt": "x", "user_id": "u", "task_id": TASK, "max_instances": 201},
            422,
            "invalid_option",
        ),
        (
            "/api/v1/predict",
            {"image_url": "a.jpg", "text_prompt": "x", "user_id": "u", "task_id": TASK, "threshold": "high"},
            422,
            "invalid_option",
        ),
        (
            "/api/v1/predict",
            {"image_url": "file:///etc/passwd", "text_prompt": "x", "user_id": "u", "task_id": TASK},
            400,
            "unsupported_image_url",
        ),
        (
            "/api/v1/predict",
            {"image_url": "http://169.254.169.254/latest", "text_prompt": "x", "user_id": "u", "task_id": TASK},
            400,
            "unsupported_image_url",
        ),
        (
            "/api/v1/predict",
            {"image_url": "../../etc/passwd", "text_prompt": "x", "user_id": "u", "task_id": TASK},
            400,
            "unsupported_image_url",
        ),
        (
            "/api/v1/predict/batch",
            {"image_url": "a.jpg", "prompts": [], "user_id": "u", "task_id": TASK},
            422,
            "invalid_prompts",
        ),
        (
            "/api/v1/predict/batch",
            {"image_url": "a.jpg", "prompts": ["x"] * 33, "user_id": "u", "task_id": TASK},
            422,
            "too_many_prompts",
        ),
        (
            "/api/v1/predict/batch",
            {"image_url": "a.jpg", "prompts": [LONG], "user_id": "u", "task_id": TASK},
            422,
            "prompt_too_long",
        ),
        (
            "/api/v1/predict",
            {"image_url": "images/missing.jpg", "text_prompt": "x", "user_id": "u", "task_id": TASK},
            404,
            "image_not_found",
        ),
        (
            "/api/v1/predict",
            {"image_url": "images/broken.jpg", "text_prompt": "x", "user_id": "u", "task_id": TASK},
            400,
            "invalid_image",
        ),
    ],
)
def test_bad_input_gets_a_stable_code(server, image_key, path, payload, status, code):
    response = post(server, path, payload)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["message"]


def test_malformed_json_is_400(server):
    response = httpx.post(
        f"{server.url}/api/v1/predict", content=b"{not json", headers={**HEADERS, "Content-Type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_32_concurrent_requests_are_batched_without_errors(server, image_key):
    """Two gateway processes feed the one model worker; its batches still form."""
    assert (server.workers("sam3-gateway"), server.workers("sam3-model")) == (2, 1)

    async def burst():
        async with httpx.AsyncClient(timeout=120, headers=HEADERS) as client:
            return await asyncio.gather(
                *(client.post(f"{server.url}/api/v1/predict", json=body(image_key)) for _ in range(32))
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 32
    info = httpx.get(f"{server.url}/api/v1/info", headers=HEADERS).json()
    assert info["batching"]["largest_batch"] > 1
    metrics = httpx.get(f"{server.url}/metrics").text
    sizes = re.search(r'adaptive_batch_size_sum\{[^}]*service_name="sam3-model"[^}]*\} ([0-9.e+]+)', metrics)
    counts = re.search(r'adaptive_batch_size_count\{[^}]*service_name="sam3-model"[^}]*\} ([0-9.e+]+)', metrics)
    assert sizes and counts and float(sizes.group(1)) > float(counts.group(1)), "BentoML saw batches larger than 1"


def test_secrets_never_reach_the_log(server):
    assert API_KEY not in server.log()


def test_png_mask_is_a_real_png(server, storage_dir, image_key):
    result = post(server, "/api/v1/predict", body(image_key)).json()
    data = (storage_dir / result["mask_key"]).read_bytes()
    assert data.startswith(b"\x89PNG") and Image.open(io.BytesIO(data)).size == (200, 120)


def test_unknown_routes_and_methods_get_the_error_shape(server):
    missing = httpx.get(f"{server.url}/no/such/route", headers=HEADERS)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = httpx.delete(f"{server.url}/api/v1/predict", headers=HEADERS)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    for path in ("/no/such%0Aroute", "/api/v1/tasks/%F4%8A%93%AC%0A%C3%88x", "/api/v1/info%00"):
        control = httpx.get(f"{server.url}{path}", headers=HEADERS)  # a newline inside matched no route at all
        assert control.status_code == 404 and control.json()["error"]["code"] == "not_found"
