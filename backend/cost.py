"""What a request may cost the model, estimated before it runs, and the budget it must stay within.

The cost that grows without bound is mask post-processing: every kept instance's mask is resized to the image,
thresholded, encoded and OR-ed into the union, pixel by pixel, while the model itself always works at 1008x1008.
So the estimate is the full-resolution mask pixels a request may render: the sum of its prompts' max_instances x
image pixels (prompts x max_instances x image pixels when they share one max_instances), in megapixels ("mask
megapixels"). It uses the caller's own numbers (the image size comes from its header), so a caller can compute it
too; the model's real instance count is unknown before it runs, and max_instances bounds it.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.errors import ApiError
from sam3_runner import header_size


@dataclass(frozen=True)
class Cost:
    max_instances: tuple[int, ...]  # per prompt
    width: int
    height: int

    @property
    def prompts(self) -> int:
        return len(self.max_instances)

    @property
    def megapixels(self) -> float:
        """Mask megapixels: the sum of the prompts' max_instances x image megapixels."""
        return sum(self.max_instances) * self.width * self.height / 1e6

    def describe(self) -> str:
        """What the cost is made of, e.g. "32 prompt(s) x 100 instances x 4032x3024 pixels"."""
        pixels = f"{self.width}x{self.height} pixels"
        if len(set(self.max_instances)) == 1:
            return f"{self.prompts} prompt(s) x {self.max_instances[0]} instances x {pixels}"
        return f"{sum(self.max_instances)} instances (the max_instances of {self.prompts} prompts summed) x {pixels}"


def estimate(image: bytes, max_instances: list[int]) -> Cost | None:
    """The request's cost (max_instances: per prompt); None when the image header cannot be read (the model service
    then says why)."""
    size = header_size(image)
    return None if size is None else Cost(tuple(max_instances), *size)


def refuse_if_too_heavy(cost: Cost | None, budget_megapixels: float) -> None:
    """422 request_too_heavy, saying the cost, the budget and what to reduce, when the cost exceeds the budget."""
    if cost is None or cost.megapixels <= budget_megapixels:
        return
    raise ApiError(
        422,
        "request_too_heavy",
        f"this request could render up to {cost.describe()} = {cost.megapixels:,.0f} mask megapixels; the limit is "
        f"{budget_megapixels:,.0f}: send fewer prompts, a lower max_instances, or a smaller image",
    )
