"""What differs between the two prompt kinds in one request's pipeline (backend/pipeline.py runs either):

- concept prompts (predict, batch): phrases and/or exemplar boxes -> every instance of each concept;
- a visual prompt (predict/visual): points, a box and/or an earlier task's mask -> one object, as 1 or 3 candidate
  masks, best first; its best mask's logits are kept for refinement (backend/refinement.py).

The pipeline calls, once each and in this order: `fetch` (while the image downloads), `cost` and `item` (with the
image), `keep` (with the model's outcome, while the masks upload).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from backend.api_models import VisualPredictRequest
from backend.cost import Cost, estimate
from backend.outputs import model_needs_rle
from backend.protocol import make_item, make_visual_item, object_prompt, unpack_logits
from backend.refinement import Refinement, Refinements, image_sha256
from sam3_runner import Prompt

# The label of a visual prompt's candidates: they are masks of the object pointed at, not of a named concept.
OBJECT_LABEL = "object"
MAX_CANDIDATES = 3  # SAM's multimask output


class PromptKind(Protocol):
    labels: list[str]  # one per result: the label its instances carry
    keys: list[str]  # one per result: its mask PNG's object key

    async def fetch(self) -> None:
        """Inputs besides the image, fetched while the image downloads."""

    def cost(self, image: bytes) -> Cost | None:
        """What the request may cost (backend/cost.py)."""

    async def item(self, image: bytes, max_pixels: int, image_identity: str | None) -> dict:
        """The model service's item (backend/protocol.py); `image_identity` keys the model's image cache (storage/'s
        ImageObject.identity). Raises the contract's ApiError."""

    async def keep(self, outcome: dict) -> None:
        """Store what this task leaves for later tasks."""


class ConceptPrompts:
    """Predict's one prompt or batch's many, on one image: nothing fetched beside it, nothing kept after."""

    def __init__(
        self, prompts: list[Prompt], labels: list[str], keys: list[str], nms_iou_threshold: float | None = None
    ) -> None:
        self.prompts = prompts
        self.labels = labels
        self.keys = keys
        self.nms_iou_threshold = nms_iou_threshold  # across the prompts (Job.nms_iou_threshold); None: off

    async def fetch(self) -> None:
        return None

    def cost(self, image: bytes) -> Cost | None:
        return estimate(image, [prompt.max_instances for prompt in self.prompts])

    async def item(self, image: bytes, max_pixels: int, image_identity: str | None) -> dict:
        return make_item(image, self.prompts, max_pixels, image_identity, self.nms_iou_threshold)

    async def keep(self, outcome: dict) -> None:
        return None


class ObjectPrompt:
    """One visual request. `refine_task_id`'s record is loaded by `fetch` and checked against the image by `item`
    (404 refine_not_found, 422 refine_image_mismatch); `keep` stores this task's record under its own id."""

    def __init__(self, request: VisualPredictRequest, key: str, refinements: Refinements) -> None:
        self.request = request
        self.labels = [OBJECT_LABEL]
        self.keys = [key]
        self._refinements = refinements
        self._refined: Refinement | None = None
        self._image_sha256: str | None = None

    async def fetch(self) -> None:
        if self.request.refine_task_id is not None:
            self._refined = await self._refinements.load(self.request.user_id, self.request.refine_task_id)

    def cost(self, image: bytes) -> Cost | None:
        return estimate(image, [MAX_CANDIDATES])

    async def item(self, image: bytes, max_pixels: int, image_identity: str | None) -> dict:
        self._image_sha256 = await asyncio.to_thread(image_sha256, image)
        request = self.request
        prompt = object_prompt(
            request.points,
            request.box,
            mask_input=self._refined.mask_input(self._image_sha256) if self._refined else None,
            multimask=request.multimask,
            mask_threshold=request.mask_threshold,
            include_rle=model_needs_rle(request),
        )
        return make_visual_item(image, prompt, max_pixels, image_identity)

    async def keep(self, outcome: dict) -> None:
        logits = unpack_logits(outcome["mask_logits"])
        await self._refinements.save(self.request.user_id, self.request.task_id, self._image_sha256, logits)
