"""Plain data carried in and out of the runner."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

# Annotations only: the types load no torch (the gateway builds prompts from them). typing.get_type_hints on Job
# needs torch and sam3_runner.image_cache imported first.
if TYPE_CHECKING:
    import torch

    from sam3_runner.image_cache import EncodedImage

# What the model is told when a prompt has exemplar boxes but no words (the reference does the same).
BOX_ONLY_TEXT = "visual"


PADDING_BOX_LABEL = -10  # transformers' label for a box slot that holds no box (Meta's padding)


@dataclass(frozen=True)
class BoxPrompt:
    """An exemplar box in original-image pixels (xyxy); negative boxes say "not this"."""

    x1: float
    y1: float
    x2: float
    y2: float
    positive: bool = True


@dataclass(frozen=True)
class Prompt:
    """One concept to segment: a noun phrase and/or exemplar boxes, with its own output limits."""

    text: str | None = None
    boxes: tuple[BoxPrompt, ...] = ()
    score_threshold: float = 0.5
    mask_threshold: float = 0.5
    max_instances: int = 100
    include_rle: bool = True  # False: instances carry no RLE (none is computed); areas, boxes, union stay exact

    def __post_init__(self) -> None:
        if not (self.text and self.text.strip()) and not self.boxes:
            raise ValueError("a prompt needs a text or at least one box")

    @property
    def model_text(self) -> str:
        return self.text.strip() if self.text and self.text.strip() else BOX_ONLY_TEXT


@dataclass(frozen=True)
class PointPrompt:
    """A click in original-image pixels (x right, y down, display orientation): on the object or, negative, not."""

    x: float
    y: float
    positive: bool = True


@dataclass(frozen=True, eq=False)
class VisualPrompt:
    """One object to segment from clicks, a box and/or a previous answer (SAM's promptable visual segmentation).

    - `points`: clicks in original-image pixels; `box`: the object's extent, xyxy in original-image pixels (its
      `positive` flag is not used: a box always says "this object");
    - `mask_input`: the low-resolution mask logits a previous answer on the same image returned
      (PromptResult.mask_logits, float32 [h, w]): SAM's refinement loop;
    - `multimask`: 3 candidates (an ambiguous prompt such as one click) or 1; the engine takes it as given;
    - `mask_threshold` (a probability, as for concept prompts) and `include_rle` as in Prompt.
    """

    points: tuple[PointPrompt, ...] = ()
    box: BoxPrompt | None = None
    mask_input: np.ndarray | None = None
    multimask: bool = False
    mask_threshold: float = 0.5
    include_rle: bool = True

    def __post_init__(self) -> None:
        if not self.points and self.box is None and self.mask_input is None:
            raise ValueError("a visual prompt needs points, a box or a mask_input")
        if self.mask_input is not None and self.mask_input.ndim != 2:
            raise ValueError(f"mask_input must be 2-D [h, w] logits, not {self.mask_input.shape}")


def _still_wanted() -> str | None:
    return None


@dataclass
class Job:
    """One decoded image (HxWx3 uint8 RGB, display orientation) with the prompts to run on it: concept prompts
    (one PromptResult each, in order) or one visual prompt (`visual`, prompts empty: one PromptResult).

    `abandoned` is asked at every stage boundary (before the vision pass, between head chunks, between
    post-processing slices): a reason (e.g. "cancelled") stops the job there, and the engine returns
    Abandoned(reason) for it while the other jobs of its batch go on.

    `image_key` names the image's identity and version (equal keys, equal pixels): its encoding is then taken from
    and kept in the engine's image cache. `encoded` is a cache entry taken before decoding (a hit): `image` is
    then None and the job is answered from the entry even if the cache has evicted it since.

    `nms_iou_threshold` (concept prompts; None: off): an instance whose mask overlaps a better one of the job, of
    any of its prompts, with an IoU above it is removed (postprocess.suppress_overlaps), before any full-size mask
    is rendered; each PromptResult then says how many of its instances were removed (`suppressed`).
    """

    image: np.ndarray | torch.Tensor | None
    prompts: list[Prompt]
    abandoned: Callable[[], str | None] = _still_wanted
    visual: VisualPrompt | None = None
    image_key: str | None = None
    encoded: EncodedImage | None = None
    nms_iou_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.visual is not None and self.prompts:
            raise ValueError("a job carries concept prompts or one visual prompt, not both")
        if self.nms_iou_threshold is not None and not 0 <= self.nms_iou_threshold <= 1:
            raise ValueError(f"nms_iou_threshold must be in [0, 1], not {self.nms_iou_threshold}")
        if self.image is None and self.encoded is None:
            raise ValueError("a job needs its image's pixels or its encoding")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the image in display orientation."""
        if self.encoded is not None:
            return self.encoded.height, self.encoded.width
        return int(self.image.shape[0]), int(self.image.shape[1])


@dataclass(frozen=True)
class Abandoned:
    """A job the engine stopped early: nobody wants its result any more."""

    reason: str


@dataclass
class Instance:
    score: float  # concept: detection score; visual: the model's predicted IoU
    box: tuple[float, float, float, float]  # xyxy, original-image pixels
    area: int
    rle: dict | None  # COCO RLE: {"size": [h, w], "counts": str}; None when its prompt did not ask for it


@dataclass
class PromptResult:
    instances: list[Instance]
    union_mask: np.ndarray  # HxW bool: every kept instance (concept), the best candidate (visual)
    image_size: tuple[int, int]  # (width, height)
    timings_ms: dict[str, float] = field(default_factory=dict)
    # Visual prompts only: the best candidate's low-resolution mask logits, float32 [h, w] in [-32, 32] (the
    # model's mask frame: the whole image resized to the model's square input, 288 x 288 at full size), to send
    # back as VisualPrompt.mask_input.
    mask_logits: np.ndarray | None = None
    cached_image: bool = False  # its image's encoding was not computed for it (image cache, or a twin in its batch)
    # Jobs with nms_iou_threshold only: how many of this prompt's instances were removed as overlapping a better
    # one; None when the job asked for no suppression.
    suppressed: int | None = None
