"""The request cost budget: the everyday requests pass, the unreasonable ones get a 422 that says what to reduce."""

from __future__ import annotations

import pytest

from backend.cost import Cost, refuse_if_too_heavy
from backend.errors import ApiError
from backend.settings import Settings

BUDGET = Settings(_env_file=None).max_request_megapixels
PHONE = (4032, 3024)
FULL_HD = (1920, 1080)


@pytest.mark.parametrize(
    ("prompts", "max_instances", "size"),
    [
        (1, 100, PHONE),  # one prompt on a 12 MP phone photo, defaults
        (32, 100, FULL_HD),  # 32 prompts on full HD, defaults
        (32, 100, (4000, 3000)),  # the photo with 32 prompts and the default max_instances
        (32, 100, PHONE),
        (1, 200, (7071, 7071)),  # the largest image allowed, one prompt, the most instances
    ],
)
def test_everyday_requests_are_within_the_default_budget(prompts, max_instances, size):
    refuse_if_too_heavy(Cost((max_instances,) * prompts, *size), BUDGET)


@pytest.mark.parametrize(
    ("prompts", "max_instances", "size"), [(32, 200, PHONE), (32, 100, (7071, 7071)), (16, 200, (6000, 4000))]
)
def test_requests_over_the_budget_are_422_request_too_heavy_saying_what_to_reduce(prompts, max_instances, size):
    cost = Cost((max_instances,) * prompts, *size)
    assert f"{prompts} prompt(s) x {max_instances} instances" in _refusal(cost).message


def _refusal(cost: Cost) -> ApiError:
    with pytest.raises(ApiError) as refused:
        refuse_if_too_heavy(cost, BUDGET)
    error = refused.value
    assert (error.status, error.code) == (422, "request_too_heavy")
    assert f"{cost.megapixels:,.0f} mask megapixels" in error.message and f"{BUDGET:,.0f}" in error.message
    assert f"{cost.width}x{cost.height}" in error.message
    for knob in ("prompts", "max_instances", "smaller image"):
        assert knob in error.message
    return error


def test_each_prompts_own_max_instances_enters_the_cost():
    """A batch whose prompts have their own max_instances costs their sum: 31 prompts at 1 and one at 200 on a phone
    photo pass, where 32 at 200 would not; one prompt more at 200 is refused, saying what the sum is."""
    mixed = Cost((1,) * 31 + (200,), *PHONE)
    assert mixed.megapixels == pytest.approx(231 * PHONE[0] * PHONE[1] / 1e6)
    refuse_if_too_heavy(mixed, BUDGET)
    heavier = Cost((1,) * 16 + (200,) * 16, 6000, 8000)
    message = _refusal(heavier).message
    assert "3216 instances (the max_instances of 32 prompts summed) x 6000x8000 pixels" in message


def test_an_unreadable_header_is_left_to_the_model_service():
    refuse_if_too_heavy(None, BUDGET)
