"""POST /api/v1/predict/visual end to end: a real `bentoml serve` (demo model) with the R2 and Supabase stand-ins.

What the gateway must get right is checked against the model service's worker run in this process on the same
prompt (the same seeded demo weights): the points, labels and box it passes, the mask it keeps for refinement and
feeds back, and what it writes to the response, the bucket and the row.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid

import httpx
import numpy as np
import pytest
from conftest import encode, random_image
from in_process import InProcessModel
from PIL import Image
from runner_asserts import decode_rle, mask_iou
from stack import STACK_API_KEY, new_task_row, task_row

from backend.api_models import VisualPredictRequest
from backend.errors import ApiError
from backend.pipeline import Limits, PredictPipeline
from backend.protocol import make_visual_item, unpack_logits
from backend.refinement import decode_record, encode_record, image_sha256, refine_key
from backend.segmenter import Segmenter
from backend.settings import Settings
from sam3_runner import BoxPrompt, PointPrompt, VisualPrompt
from storage import R2Storage
from tasks import SupabaseTaskStore

pytestmark = pytest.mark.stack
HEADERS = {"X-API-Key": STACK_API_KEY}
WIDTH, HEIGHT = 128, 96
PHOTO, OTHER_PHOTO = "visual/photo.png", "visual/other.png"
TAP = {"x": 40.0, "y": 30.0}


@pytest.fixture(scope="module")
def photos(r2, bucket) -> dict[str, bytes]:
    """Lossless images, so that this process decodes exactly the pixels the served model does."""
    rng = np.random.default_rng(11)
    images = {PHOTO: encode(random_image(rng, HEIGHT, WIDTH)), OTHER_PHOTO: encode(random_image(rng, HEIGHT, WIDTH))}
    for key, data in images.items():
        bucket.put_object(Bucket=r2["R2_BUCKET"], Key=key, Body=data, ContentType="image/png")
    return images


def visual(server, task_id: str, user_id: str, image_url: str = PHOTO, **fields) -> httpx.Response:
    body = {"image_url": image_url, "user_id": user_id, "task_id": task_id, **fields}
    return httpx.post(f"{server.url}/api/v1/predict/visual", json=body, headers=HEADERS, timeout=120)


def direct(segmenter, image: bytes, points=(), box=None, mask_input=None, multimask=False) -> dict:
    """The model service's answer to the same visual prompt, computed in this process."""
    prompt = VisualPrompt(
        points=tuple(PointPrompt(p["x"], p["y"], positive=p.get("label", "positive") == "positive") for p in points),
        box=BoxPrompt(**box) if box else None,
        mask_input=mask_input,
        multimask=multimask,
    )
    outcome = segmenter.segment([make_visual_item(image, prompt, 10**8)])[0]
    assert outcome["ok"], outcome
    return outcome


def assert_same_candidates(served: list[dict], expected: list[dict]) -> None:
    assert len(served) == len(expected)
    for got, want in zip(served, expected, strict=True):
        assert got["label"] == "object"
        assert abs(got["score"] - want["score"]) <= 1e-4
        np.testing.assert_allclose(got["box"], want["box"], atol=0.05)
        assert mask_iou(decode_rle(got["rle"]), decode_rle(want["rle"])) >= 0.99


def stored_record(r2, bucket, user_id: str, task_id: str):
    data = bucket.get_object(Bucket=r2["R2_BUCKET"], Key=refine_key(user_id, task_id))["Body"].read()
    return decode_record(task_id, data)


def mask_png(r2, bucket, key: str) -> np.ndarray:
    data = bucket.get_object(Bucket=r2["R2_BUCKET"], Key=key)["Body"].read()
    return np.array(Image.open(io.BytesIO(data))) == 255


def test_a_tap_answers_three_candidates_best_first_and_the_row_completes(
    stack_server, r2, supabase, bucket, photos, segmenter
):
    task_id, user_id = new_task_row(supabase)
    response = visual(stack_server, task_id, user_id, points=[TAP])
    assert response.status_code == 200, response.text
    body = response.json()

    expected = direct(segmenter, photos[PHOTO], points=[TAP], multimask=True)
    assert body["num_instances"] == len(body["instances"]) == 3
    assert body["labels"] == ["object"] * 3
    scores = [instance["score"] for instance in body["instances"]]
    assert scores == sorted(scores, reverse=True) and body["confidence"] == scores[0]
    assert_same_candidates(body["instances"], expected["results"][0]["instances"])
    assert body["image"] == {"width": WIDTH, "height": HEIGHT}
    assert body["mask_key"] == f"masks/{user_id}/{task_id}.png"
    best = decode_rle(body["instances"][0]["rle"])
    assert np.array_equal(mask_png(r2, bucket, body["mask_key"]), best)  # the best candidate, not a union

    row = task_row(supabase, task_id)
    assert row["status"] == "completed" and row["error_message"] is None
    assert row["mask_url"] == body["mask_url"] and row["labels"] == ["object"] * 3
    assert row["confidence"] == pytest.approx(body["confidence"])
    assert [instance["score"] for instance in row["result"]["results"][0]["instances"]] == scores
    assert all("rle" not in instance for instance in row["result"]["results"][0]["instances"])


@pytest.mark.parametrize(
    "prompt",
    [
        {"points": [TAP]},
        {"box": {"x1": 20.0, "y1": 10.0, "x2": 90.0, "y2": 70.0}},
        {"points": [TAP], "box": {"x1": 20.0, "y1": 10.0, "x2": 90.0, "y2": 70.0}},
        {"points": [TAP, {"x": 100.0, "y": 80.0, "label": "negative"}]},
    ],
    ids=["point", "box", "point-and-box", "negative-point"],
)
@pytest.mark.parametrize("multimask", [True, False])
def test_each_prompt_is_the_model_answer_to_the_same_prompt(
    stack_server, supabase, photos, segmenter, prompt, multimask
):
    task_id, user_id = new_task_row(supabase)
    response = visual(stack_server, task_id, user_id, multimask=multimask, **prompt)
    assert response.status_code == 200, response.text
    instances = response.json()["instances"]
    assert len(instances) == (3 if multimask else 1)
    assert_same_candidates(
        instances, direct(segmenter, photos[PHOTO], multimask=multimask, **prompt)["results"][0]["instances"]
    )


def test_a_negative_point_changes_the_answer(stack_server, supabase, photos):
    answers = []
    for label in ("positive", "negative"):
        task_id, user_id = new_task_row(supabase)
        points = [TAP, {"x": 100.0, "y": 80.0, "label": label}]
        response = visual(stack_server, task_id, user_id, points=points)
        assert response.status_code == 200, response.text
        answers.append(response.json()["instances"])
    assert answers[0][0]["rle"] != answers[1][0]["rle"]


@pytest.mark.parametrize(
    ("prompt", "candidates"),
    [
        ({"points": [TAP]}, 3),
        ({"points": [TAP, {"x": 60.0, "y": 50.0}]}, 1),
        ({"box": {"x1": 20.0, "y1": 10.0, "x2": 90.0, "y2": 70.0}}, 1),
        ({"points": [TAP], "box": {"x1": 20.0, "y1": 10.0, "x2": 90.0, "y2": 70.0}}, 1),
    ],
)
def test_multimask_defaults_to_true_for_a_single_point_only(stack_server, supabase, photos, prompt, candidates):
    task_id, user_id = new_task_row(supabase)
    response = visual(stack_server, task_id, user_id, **prompt)
    assert response.status_code == 200, response.text
    assert response.json()["num_instances"] == candidates


def test_refining_feeds_the_previous_best_mask_back(stack_server, r2, supabase, bucket, photos, segmenter):
    """Tap, then tap again naming the first task: the model gets the first answer's logits as its mask prompt."""
    first_task, user_id = new_task_row(supabase)
    assert visual(stack_server, first_task, user_id, points=[TAP]).status_code == 200
    record = stored_record(r2, bucket, user_id, first_task)
    first = direct(segmenter, photos[PHOTO], points=[TAP], multimask=True)
    logits = first["mask_logits"]
    expected_logits = unpack_logits(logits)
    assert record.logits.dtype == np.float16
    np.testing.assert_allclose(
        record.logits.astype(np.float32), expected_logits.astype(np.float32), rtol=1e-2, atol=1e-2
    )
    assert record.image_sha256 == image_sha256(photos[PHOTO]) and time.time() - record.created_at < 600

    points = [TAP, {"x": 60.0, "y": 50.0, "label": "negative"}]
    refined_task, _ = new_task_row(supabase)
    refined = visual(stack_server, refined_task, user_id, points=points, refine_task_id=first_task)
    assert refined.status_code == 200, refined.text
    fed_back = direct(segmenter, photos[PHOTO], points=points, mask_input=record.logits.astype(np.float32))
    assert_same_candidates(refined.json()["instances"], fed_back["results"][0]["instances"])

    fresh_task, _ = new_task_row(supabase)
    fresh = visual(stack_server, fresh_task, user_id, points=points).json()["instances"]
    assert fresh[0]["rle"] != refined.json()["instances"][0]["rle"]  # the mask prompt changed the answer
    assert task_row(supabase, refined_task)["status"] == "completed"


def test_a_refined_task_can_be_refined_again(stack_server, supabase, photos):
    task_id, user_id = new_task_row(supabase)
    assert visual(stack_server, task_id, user_id, points=[TAP]).status_code == 200
    for step in range(2):
        next_task, _ = new_task_row(supabase)
        points = [TAP, {"x": 60.0 + 10 * step, "y": 50.0}]
        response = visual(stack_server, next_task, user_id, points=points, refine_task_id=task_id)
        assert response.status_code == 200, response.text
        task_id = next_task


def test_refine_task_id_of_no_visual_task_is_404_and_the_row_says_so(stack_server, supabase, photos):
    owner_task, owner = new_task_row(supabase)
    assert visual(stack_server, owner_task, owner, points=[TAP]).status_code == 200
    concept_task, _ = new_task_row(supabase)
    concept = {"image_url": PHOTO, "text_prompt": "thing", "user_id": owner, "task_id": concept_task}
    assert httpx.post(f"{stack_server.url}/api/v1/predict", json=concept, headers=HEADERS, timeout=60).is_success

    cases = [(owner, str(uuid.uuid4())), (owner, concept_task), ("someone-else", owner_task)]
    for user_id, refine_task_id in cases:
        task_id, _ = new_task_row(supabase)
        response = visual(stack_server, task_id, user_id, points=[TAP], refine_task_id=refine_task_id)
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "refine_not_found"
        row = task_row(supabase, task_id)
        assert row["status"] == "failed" and row["error_message"].startswith("refine_not_found: ")


@pytest.mark.parametrize("rerun", ["as a concept task", "failing"])
def test_a_visual_task_sent_again_is_not_refinable_with_its_earlier_mask(stack_server, supabase, photos, rerun):
    task_id, user_id = new_task_row(supabase)
    assert visual(stack_server, task_id, user_id, points=[TAP]).status_code == 200
    if rerun == "failing":
        assert visual(stack_server, task_id, user_id, points=[{"x": 5000.0, "y": 5.0}]).status_code == 422
    else:
        concept = {"image_url": PHOTO, "text_prompt": "thing", "user_id": user_id, "task_id": task_id}
        assert httpx.post(f"{stack_server.url}/api/v1/predict", json=concept, headers=HEADERS, timeout=60).is_success

    refining, _ = new_task_row(supabase)
    response = visual(stack_server, refining, user_id, points=[TAP], refine_task_id=task_id)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "refine_not_found"


def test_an_expired_refinement_is_404_and_says_expired(stack_server, r2, supabase, bucket, photos):
    old_task, user_id = new_task_row(supabase)
    assert visual(stack_server, old_task, user_id, points=[TAP]).status_code == 200
    record = stored_record(r2, bucket, user_id, old_task)
    two_days_ago = time.time() - 2 * 86_400  # the server's TASK_RETENTION_S is the default, one day
    aged = encode_record(record.logits, record.image_sha256, two_days_ago)
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key=refine_key(user_id, old_task), Body=aged)

    task_id, _ = new_task_row(supabase)
    response = visual(stack_server, task_id, user_id, points=[TAP], refine_task_id=old_task)
    assert response.status_code == 404 and response.json()["error"]["code"] == "refine_not_found"
    assert "expired" in response.json()["error"]["message"]
    assert task_row(supabase, task_id)["status"] == "failed"


def test_refining_on_another_image_is_422_refine_image_mismatch(stack_server, r2, supabase, bucket, photos):
    first_task, user_id = new_task_row(supabase)
    assert visual(stack_server, first_task, user_id, points=[TAP]).status_code == 200
    task_id, _ = new_task_row(supabase)
    response = visual(stack_server, task_id, user_id, OTHER_PHOTO, points=[TAP], refine_task_id=first_task)
    assert response.status_code == 422 and response.json()["error"]["code"] == "refine_image_mismatch"
    row = task_row(supabase, task_id)
    assert row["status"] == "failed" and row["error_message"].startswith("refine_image_mismatch: ")

    # the same key, overwritten with other bytes since, is another image too
    key = "visual/overwritten.png"
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key=key, Body=photos[PHOTO])
    on_key, _ = new_task_row(supabase)
    assert visual(stack_server, on_key, user_id, key, points=[TAP]).status_code == 200
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key=key, Body=photos[OTHER_PHOTO])
    again, _ = new_task_row(supabase)
    response = visual(stack_server, again, user_id, key, points=[TAP], refine_task_id=on_key)
    assert response.status_code == 422 and response.json()["error"]["code"] == "refine_image_mismatch"


@pytest.mark.parametrize("point", [{"x": WIDTH, "y": 10.0}, {"x": 10.0, "y": HEIGHT}, {"x": 5000.0, "y": 5000.0}])
def test_a_point_outside_the_image_is_422_invalid_point_and_the_row_fails(stack_server, supabase, photos, point):
    task_id, user_id = new_task_row(supabase)
    response = visual(stack_server, task_id, user_id, points=[TAP, point])
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_point", response.text
    row = task_row(supabase, task_id)
    assert row["status"] == "failed" and row["error_message"].startswith("invalid_point: ")


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({}, "missing_prompt"),
        ({"points": []}, "missing_prompt"),
        ({"points": [{"x": -1.0, "y": 3.0}]}, "invalid_point"),
        ({"points": [{"x": "5", "y": 3.0}]}, "invalid_point"),
        ({"points": [{"x": 5.0, "y": 3.0, "label": "maybe"}]}, "invalid_point"),
        ({"points": [TAP] * 17}, "invalid_point"),
        ({"box": {"x1": 50.0, "y1": 10.0, "x2": 20.0, "y2": 70.0}}, "invalid_box"),
        ({"box": {"x1": 5.0, "y1": 10.0, "x2": 20.0, "y2": 70.0, "label": "negative"}}, "invalid_box"),
        ({"refine_task_id": "not-a-uuid"}, "invalid_task_id"),
        ({"points": [TAP], "multimask": "yes"}, "invalid_option"),
        ({"points": [TAP], "mask_threshold": 2}, "invalid_option"),
    ],
)
def test_a_bad_body_is_422_with_a_stable_code_and_the_row_untouched(stack_server, supabase, photos, fields, code):
    task_id, user_id = new_task_row(supabase)
    response = visual(stack_server, task_id, user_id, **fields)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code and response.json()["error"]["message"]
    assert task_row(supabase, task_id)["status"] == "pending"


def test_refining_a_task_with_itself_is_refused(stack_server, supabase):
    task_id, user_id = new_task_row(supabase)
    response = visual(stack_server, task_id, user_id, points=[TAP], refine_task_id=task_id.upper())
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_task_id"
    assert task_row(supabase, task_id)["status"] == "pending"


def test_an_exif_rotated_photo_takes_points_in_display_orientation(stack_server, r2, supabase, bucket):
    """A photo stored 128 wide x 96 high with EXIF orientation 6 shows 96 wide x 128 high: a tap at (90, 120) lies
    in the displayed photo (outside the stored one) and answers as on the same photo stored upright."""
    stored = random_image(np.random.default_rng(12), HEIGHT, WIDTH)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="PNG", exif=exif.tobytes())
    upright = np.array(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270))
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key="visual/rotated.png", Body=buffer.getvalue())
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key="visual/upright.png", Body=encode(upright))

    tap = [{"x": 90.0, "y": 120.0}]
    answers = []
    for key in ("visual/rotated.png", "visual/upright.png"):
        task_id, user_id = new_task_row(supabase)
        response = visual(stack_server, task_id, user_id, key, points=tap)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    assert answers[0]["image"] == answers[1]["image"] == {"width": HEIGHT, "height": WIDTH}
    assert_same_candidates(answers[0]["instances"], answers[1]["instances"])


def test_async_visual_is_accepted_then_completed_like_the_sync_call(stack_server, supabase, photos):
    task_id, user_id = new_task_row(supabase)
    accepted = visual(stack_server, task_id, user_id, points=[TAP], **{"async": True})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"task_id": task_id, "status": "queued", "status_url": f"/api/v1/tasks/{task_id}"}
    deadline = time.monotonic() + 120
    while (status := _status(stack_server, task_id))["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, status
        time.sleep(0.2)
    assert status["status"] == "completed" and status["error"] is None, status

    sync_task, sync_user = new_task_row(supabase)
    synchronous = visual(stack_server, sync_task, sync_user, points=[TAP]).json()
    assert_same_candidates(status["result"]["instances"], synchronous["instances"])
    assert status["result"]["mask_key"] == f"masks/{user_id}/{task_id}.png"
    row = task_row(supabase, task_id)
    assert row["status"] == "completed" and row["mask_url"] == status["result"]["mask_url"]


def _status(server, task_id: str) -> dict:
    return httpx.get(f"{server.url}/api/v1/tasks/{task_id}", headers=HEADERS, timeout=30).json()


def test_the_schema_documents_the_visual_request(stack_server):
    schema = httpx.get(f"{stack_server.url}/api/v1/openapi.json").json()
    ((scheme, _),) = schema["components"]["securitySchemes"].items()
    operation = schema["paths"]["/api/v1/predict/visual"]["post"]
    assert operation["security"] == [{scheme: []}]
    assert {"202", "404", "422", "501"} <= set(operation["responses"])
    request = schema["components"]["schemas"]["VisualPredictRequest"]
    assert set(request["required"]) == {"image_url", "user_id", "task_id"}
    multimask = request["properties"]["multimask"]  # optional, never null: no anyOf, no default of null
    assert multimask["type"] == "boolean" and "anyOf" not in multimask and "default" not in multimask
    point = schema["components"]["schemas"]["Point"]
    assert point["properties"]["label"]["enum"] == ["positive", "negative"]


def test_weights_without_the_tracker_answer_501_and_the_row_says_so(r2, supabase, photos, tiny_detector_dir):
    """The gateway's pipeline in this process, on the model service's worker loaded with a detector-only checkpoint."""
    segmenter = Segmenter(Settings(sam3_weights_path=str(tiny_detector_dir), sam3_device="cpu", _env_file=None))
    deadline = time.monotonic() + 120
    while not segmenter.ready:
        assert time.monotonic() < deadline, segmenter.status()
        time.sleep(0.1)
    store = R2Storage(r2["R2_ENDPOINT_URL"], r2["R2_BUCKET"], r2["R2_ACCESS_KEY_ID"], r2["R2_SECRET_ACCESS_KEY"])
    tasks = SupabaseTaskStore(supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"])
    limits = Limits(20_000_000, 50_000_000, 40_000, 2_500, 86_400)
    pipeline = PredictPipeline(store, tasks, InProcessModel(segmenter), limits)

    task_id, user_id = new_task_row(supabase)
    request = VisualPredictRequest(image_url=PHOTO, user_id=user_id, task_id=task_id, points=[TAP])
    with pytest.raises(ApiError) as raised:
        asyncio.run(pipeline.predict_visual(request))
    assert (raised.value.status, raised.value.code) == (501, "visual_prompts_unavailable")
    row = task_row(supabase, task_id)
    assert row["status"] == "failed" and row["error_message"].startswith("visual_prompts_unavailable: ")
