"""A batch's prompts as strings and objects: which options each prompt ends up with."""

from __future__ import annotations

import uuid

from backend.api_models import BatchPredictRequest, Box

BOX = {"x1": 1.0, "y1": 2.0, "x2": 30.0, "y2": 40.0}
OTHER_BOX = {"x1": 5.0, "y1": 5.0, "x2": 9.0, "y2": 9.0, "label": "negative"}


def batch(**fields) -> BatchPredictRequest:
    ids = {"image_url": "images/in.jpg", "user_id": "u", "task_id": str(uuid.uuid4())}
    return BatchPredictRequest.model_validate({**ids, **fields})


def options(request: BatchPredictRequest) -> list[tuple]:
    return [
        (own.text, [box.model_dump() for box in own.boxes], own.threshold, own.mask_threshold, own.max_instances)
        for own in request.prompt_options()
    ]


def test_an_objects_own_options_replace_the_requests_and_the_rest_are_the_requests():
    request = batch(
        prompts=[
            " cup ",
            {"text": "mug", "threshold": 0.1},
            {"text": "jar", "boxes": [], "mask_threshold": 0.8, "max_instances": 3},
            {"boxes": [OTHER_BOX], "threshold": None},  # null counts as absent
            {},  # the request's boxes make it a box-only prompt
        ],
        boxes=[BOX],
        threshold=0.4,
        mask_threshold=0.6,
        max_instances=7,
    )
    box, other = {**BOX, "label": "positive"}, OTHER_BOX
    assert options(request) == [
        ("cup", [box], 0.4, 0.6, 7),
        ("mug", [box], 0.1, 0.6, 7),
        ("jar", [], 0.4, 0.8, 3),
        (None, [other], 0.4, 0.6, 7),
        (None, [box], 0.4, 0.6, 7),
    ]
    assert all(isinstance(own_box, Box) for own in request.prompt_options() for own_box in own.boxes)


def test_strings_alone_are_read_as_before():
    request = batch(prompts=["car", "  road\t"])
    assert request.prompts == ["car", "road"] and request.nms_iou_threshold is None
    assert options(request) == [("car", [], 0.5, 0.5, 100), ("road", [], 0.5, 0.5, 100)]


def test_an_async_job_keeps_its_prompt_objects_and_nms_through_the_job_store():
    """A job is stored as the request's JSON (jobs/queue.py) and read back before it runs."""
    request = batch(prompts=["cup", {"text": "mug", "boxes": [BOX], "max_instances": 2}], nms_iou_threshold=0.3)
    again = BatchPredictRequest.model_validate_json(request.model_dump_json(by_alias=True))
    assert options(again) == options(request) and again.nms_iou_threshold == 0.3
