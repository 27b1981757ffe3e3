"""`outputs` through the gateway's pipeline, in process, against the real stand-ins: SeaweedFS for R2 (presigned URLs
that really serve the files) and PostgreSQL + PostgREST for the Supabase row; the demo model in process."""

from __future__ import annotations

import asyncio
import io
import uuid

import cv2
import httpx
import numpy as np
import pytest
import torch
from in_process import InProcessModel
from PIL import Image, ImageOps
from runner_asserts import decode_rle, mask_iou
from stack import new_task_row, task_row

from backend.api_models import BatchPredictRequest, PredictRequest
from backend.outputs import output_key
from backend.pipeline import Limits, PredictPipeline
from backend.protocol import success
from sam3_runner import Instance, PromptResult
from sam3_runner.rle import encode_rle
from storage import R2Storage
from tasks import SupabaseTaskStore

EVERY_FILE = ["instance_map", "cutout", "overlay"]
FIELDS = {"instance_map": "instance_map_url", "cutout": "cutout_url", "overlay": "overlay_url"}
TYPES = {"instance_map": "image/png", "cutout": "image/png", "overlay": "image/jpeg"}
DEFAULT_INSTANCE_KEYS = {"label", "score", "box", "area", "rle"}
DEFAULT_TIMINGS = {"download", "model", "upload", "total"}


def pipeline_for(r2, supabase, model) -> PredictPipeline:
    store = R2Storage(
        r2["R2_ENDPOINT_URL"], r2["R2_BUCKET"], r2["R2_ACCESS_KEY_ID"], r2["R2_SECRET_ACCESS_KEY"], presign_ttl_s=300
    )
    tasks = SupabaseTaskStore(supabase["SUPABASE_URL"], supabase["SUPABASE_SERVICE_ROLE_KEY"])
    return PredictPipeline(store, tasks, model, Limits(20_000_000, 50_000_000, 40_000, 2_500, 86_400))


@pytest.fixture(scope="module")
def photos(bucket, r2):
    """A smooth photo stored 160x90 with EXIF orientation 6: shown (and segmented) 90 wide, 160 tall."""
    rows, columns = np.mgrid[:90, :160]
    pixels = np.stack([columns * 255 // 160, rows * 255 // 90, (rows + columns) % 256], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95, exif=exif)
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key="images/rotated.jpg", Body=buffer.getvalue())
    return {"rotated": ("images/rotated.jpg", np.asarray(ImageOps.exif_transpose(Image.open(buffer))))}


def fetched(url: str, content_type: str) -> bytes:
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200 and response.headers["content-type"] == content_type
    return response.content


def image_at(url: str, content_type: str = "image/png") -> Image.Image:
    return Image.open(io.BytesIO(fetched(url, content_type)))


def assert_files_under_their_keys(bucket, r2, body: dict, wanted: list[str]) -> None:
    assert set(body["outputs"]) == {FIELDS[name] for name in wanted}
    for name in wanted:
        key = output_key(body["mask_key"], name)
        stored = bucket.get_object(Bucket=r2["R2_BUCKET"], Key=key)
        assert stored["ContentType"] == TYPES[name]
        assert fetched(body["outputs"][FIELDS[name]], TYPES[name]) == stored["Body"].read()


@pytest.mark.stack
def test_every_output_of_an_exif_rotated_photo_is_in_display_orientation(r2, supabase, bucket, photos, segmenter):
    image_url, shown = photos["rotated"]
    task_id, user_id = new_task_row(supabase)
    request = PredictRequest(
        image_url=image_url,
        text_prompt="car",
        user_id=user_id,
        task_id=task_id,
        threshold=0.0,
        max_instances=4,
        outputs=["rle", "polygons", *EVERY_FILE],
        polygon_tolerance=0.0,
    )
    body = asyncio.run(pipeline_for(r2, supabase, InProcessModel(segmenter)).predict(request))
    assert body["image"] == {"width": 90, "height": 160} and body["num_instances"] >= 2
    assert body["mask_key"] == f"masks/{user_id}/{task_id}.png"
    assert_files_under_their_keys(bucket, r2, body, EVERY_FILE)
    masks = [decode_rle(instance["rle"]) for instance in body["instances"]]
    union = np.logical_or.reduce(masks)

    for instance, mask in zip(body["instances"], masks, strict=True):
        drawn = np.zeros(mask.shape, dtype=np.uint8)
        for part in instance["polygons"]:
            rings = [np.array(part["exterior"], np.int32), *(np.array(hole, np.int32) for hole in part["holes"])]
            cv2.fillPoly(drawn, rings, 1)
        assert mask_iou(drawn.astype(bool), mask) == 1.0

    values = np.array(image_at(body["outputs"]["instance_map_url"]))
    assert values.shape == (160, 90) and np.array_equal(values > 0, union)
    for number, mask in enumerate(masks, start=1):  # best first: an overlap goes to the lower number
        better = np.logical_or.reduce(masks[: number - 1]) if number > 1 else np.zeros_like(mask)
        assert np.all(values[mask & ~better] == number)

    cutout = np.array(image_at(body["outputs"]["cutout_url"]))
    rows, columns = np.nonzero(union)
    box = np.s_[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
    assert np.array_equal(cutout[..., 3], union[box] * 255)
    inside = union[box]
    assert np.abs(cutout[..., :3][inside].astype(int) - shown[box][inside]).max() <= 1  # the photo as shown

    overlay = image_at(body["outputs"]["overlay_url"], "image/jpeg")
    assert overlay.format == "JPEG" and overlay.size == (90, 160)

    row = task_row(supabase, task_id)
    assert row["status"] == "completed" and row["result"]["outputs"] == body["outputs"]
    (row_body,) = row["result"]["results"]
    assert [i["polygons"] for i in row_body["instances"]] == [i["polygons"] for i in body["instances"]]
    assert all("rle" not in instance for instance in row_body["instances"])
    assert all(fetched(row["result"]["outputs"][FIELDS[name]], TYPES[name]) for name in EVERY_FILE)


@pytest.mark.stack
def test_with_no_instance_every_file_is_still_a_valid_image(r2, supabase, bucket, photos, segmenter):
    image_url, _ = photos["rotated"]
    task_id, user_id = new_task_row(supabase)
    request = PredictRequest(
        image_url=image_url,
        text_prompt="car",
        user_id=user_id,
        task_id=task_id,
        threshold=1.0,
        outputs=["polygons", *EVERY_FILE],
    )
    body = asyncio.run(pipeline_for(r2, supabase, InProcessModel(segmenter)).predict(request))
    assert body["num_instances"] == 0 and body["instances"] == []
    values = np.array(image_at(body["outputs"]["instance_map_url"]))
    assert values.shape == (160, 90) and not values.any()
    cutout = image_at(body["outputs"]["cutout_url"])
    assert cutout.mode == "RGBA" and cutout.size == (1, 1) and cutout.getpixel((0, 0))[3] == 0
    assert image_at(body["outputs"]["overlay_url"], "image/jpeg").size == (90, 160)


@pytest.mark.stack
def test_a_batch_draws_one_set_of_files_for_all_its_prompts(r2, supabase, bucket, segmenter):
    task_id, user_id = new_task_row(supabase)
    request = BatchPredictRequest(
        image_url="images/in.jpg",
        prompts=["car", "road"],
        user_id=user_id,
        task_id=task_id,
        threshold=0.0,
        max_instances=2,
        outputs=["rle", "polygons", *EVERY_FILE],
    )
    body = asyncio.run(pipeline_for(r2, supabase, InProcessModel(segmenter)).predict_batch(request))
    assert body["mask_key"] == f"masks/{user_id}/{task_id}.png"
    assert_files_under_their_keys(bucket, r2, body, EVERY_FILE)
    assert all("outputs" not in result and result["num_instances"] == 2 for result in body["results"])
    assert all(len(i["polygons"]) >= 1 for result in body["results"] for i in result["instances"])
    values = np.array(image_at(body["outputs"]["instance_map_url"]))
    instances = [instance for result in body["results"] for instance in result["instances"]]
    for number, instance in enumerate(instances, start=1):  # results[0]'s instances first, then results[1]'s
        assert (values == number).sum() <= instance["area"]
    assert set(np.unique(values)) <= set(range(len(instances) + 1))
    assert np.array_equal(values > 0, np.logical_or.reduce([decode_rle(i["rle"]) for i in instances]))
    assert task_row(supabase, task_id)["result"]["outputs"] == body["outputs"]


@pytest.mark.stack
def test_a_default_request_answers_and_stores_what_it_did_before(r2, supabase, bucket, segmenter):
    task_id, user_id = new_task_row(supabase)
    request = PredictRequest(image_url="images/in.jpg", text_prompt="car", user_id=user_id, task_id=task_id)
    body = asyncio.run(pipeline_for(r2, supabase, InProcessModel(segmenter)).predict(request))
    assert "outputs" not in body
    assert all(set(instance) == DEFAULT_INSTANCE_KEYS for instance in body["instances"])
    assert {key for key in body["timings"] if not key.startswith("model_")} == DEFAULT_TIMINGS
    assert set(task_row(supabase, task_id)["result"]) == {"results"}
    listed = bucket.list_objects_v2(Bucket=r2["R2_BUCKET"], Prefix=f"masks/{user_id}/")
    assert [item["Key"] for item in listed["Contents"]] == [body["mask_key"]]


@pytest.mark.stack
@pytest.mark.parametrize(
    ("options", "keys"),
    [
        ({"include_rle": False}, {"label", "score", "box", "area"}),
        ({"outputs": ["polygons"]}, {"label", "score", "box", "area", "polygons"}),
        ({"outputs": ["rle", "polygons"], "include_rle": False}, {"label", "score", "box", "area", "polygons"}),
        ({"outputs": []}, {"label", "score", "box", "area"}),
    ],
)
def test_without_rle_instances_carry_no_rle_key(r2, supabase, bucket, segmenter, options, keys):
    task_id, user_id = new_task_row(supabase)
    request = PredictRequest(
        image_url="images/in.jpg", text_prompt="car", user_id=user_id, task_id=task_id, threshold=0.0, **options
    )
    body = asyncio.run(pipeline_for(r2, supabase, InProcessModel(segmenter)).predict(request))
    assert body["num_instances"] > 0 and all(set(instance) == keys for instance in body["instances"])


class ManyInstances:
    """A stand-in model service that answers any item with `count` small square instances (best first), through
    the same protocol the model service uses (backend/protocol.success)."""

    def __init__(self, count: int) -> None:
        self.count = count

    async def segment(self, item: dict, sliced: bool) -> dict:
        height, width = 90, 160
        masks = np.zeros((self.count, height, width), dtype=bool)
        instances = []
        for index in range(self.count):
            row, column = divmod(index, width // 5)
            masks[index, row * 5 : row * 5 + 4, column * 5 : column * 5 + 4] = True
            box = (column * 5.0, row * 5.0, column * 5.0 + 4, row * 5.0 + 4)
            instances.append(Instance(score=0.9 - index * 1e-4, box=box, area=16, rle=None))
        for instance, rle in zip(instances, encode_rle(torch.from_numpy(masks)), strict=True):
            instance.rle = rle
        result = PromptResult(instances, masks.any(axis=0), (width, height), {"total": 1.0})
        return success([result] * len(item["prompts"]), decode_ms=0.0)


@pytest.mark.stack
def test_300_instances_make_a_16_bit_instance_map(r2, supabase, bucket):
    task_id, user_id = new_task_row(supabase)
    request = PredictRequest(
        image_url="images/in.jpg", text_prompt="grain", user_id=user_id, task_id=task_id, outputs=["instance_map"]
    )
    body = asyncio.run(pipeline_for(r2, supabase, ManyInstances(300)).predict(request))
    assert body["num_instances"] == 300
    image = image_at(body["outputs"]["instance_map_url"])
    values = np.array(image)
    assert image.mode == "I;16" and values.dtype == np.uint16 and values.shape == (90, 160)
    assert set(np.unique(values)) == set(range(301))
    assert values[0, 0] == 1 and values[85, 155] == 0 and values[5 * (299 // 32), 5 * (299 % 32)] == 300


@pytest.mark.parametrize(
    ("options", "wanted"),
    [
        ({}, {"rle"}),
        ({"include_rle": False}, set()),
        ({"outputs": ["polygons", "overlay"], "polygon_tolerance": 2.5}, {"polygons", "overlay"}),
    ],
)
def test_an_async_job_keeps_its_outputs_through_the_job_store(options, wanted):
    """A job is stored as the request's JSON (jobs/queue.py) and read back before it runs."""
    request = PredictRequest(image_url="images/in.jpg", text_prompt="car", user_id="u", task_id=str(uuid.uuid4()))
    request = PredictRequest.model_validate({**request.model_dump(by_alias=True), **options})
    again = PredictRequest.model_validate_json(request.model_dump_json(by_alias=True))
    assert again.wanted_outputs == wanted and again.polygon_tolerance == options.get("polygon_tolerance", 1.0)
