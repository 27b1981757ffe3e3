"""The public contract's request and response bodies (docs/api-contract.md is the prose of these models)."""

from __future__ import annotations

import re
import unicodedata
import uuid
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

MAX_PROMPT_CHARS = 256
MAX_BATCH_PROMPTS = 32
MAX_BOXES = 16
MAX_POINTS = 16
MAX_INSTANCES = 200
MAX_IMAGE_URL_CHARS = 2048
MAX_CALLBACK_URL_CHARS = 2048
# Far past any image this server decodes (MAX_IMAGE_PIXELS): a larger coordinate is a mistake, refused at once. The
# model service also refuses a box that ends more than 10 image widths (heights) away (backend/prompt_bounds.py).
MAX_BOX_COORDINATE = 1_000_000
USER_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
# What a request may ask for beyond the mask PNG (docs/api-contract.md, Outputs): "rle" is on by default.
OutputName = Literal["rle", "polygons", "instance_map", "cutout", "overlay"]
MAX_POLYGON_TOLERANCE = 100.0
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
# Unicode categories that show nothing on their own: controls, format characters (zero-width space, joiners, BOM,
# bidi marks, tags), separators (every kind of space, line and paragraph) and combining marks with no base letter
# (variation selectors, the combining grapheme joiner).
_BLANK_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp", "Mn", "Me"})


class Box(BaseModel):
    """An exemplar box in pixels of the image as displayed (EXIF orientation applied); `negative` means "not this
    kind of thing".

    It must overlap the image and may run past its right or bottom edge, up to x2 <= 10 x width and y2 <= 10 x
    height: the model gets it as drawn (not clamped), as in Meta's reference. A box that does not overlap the
    image, or runs further past it, is refused once the image is decoded.
    """

    model_config = ConfigDict(extra="forbid")

    x1: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False)
    y1: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False)
    x2: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False)
    y2: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False)
    label: Literal["positive", "negative"] = "positive"

    @model_validator(mode="after")
    def _has_area(self) -> Box:
        if self.x2 <= self.x1 or self.y2 <= self.y1:
            raise ValueError("a box needs x2 > x1 and y2 > y1")
        return self


class JobOptions(BaseModel):
    """What every task request has: the ids, async and its webhook."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    user_id: str = Field(pattern=USER_ID_PATTERN)
    task_id: str = Field(description="The segmentation_results row id", json_schema_extra={"format": "uuid"})
    run_async: bool = Field(
        False, alias="async", strict=True, description="Answer 202 at once and run in the background (docs: Async jobs)"
    )
    callback_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_CALLBACK_URL_CHARS,
        description="With async: POST the task status here when it ends (origin in WEBHOOK_ALLOWED_ORIGINS)",
    )

    @field_validator("task_id")
    @classmethod
    def _task_id_is_uuid(cls, value: str) -> str:
        return _uuid(value, "task_id")

    @model_validator(mode="after")
    def _callback_needs_async(self) -> JobOptions:
        if self.callback_url is not None and not self.run_async:
            raise ValueError('callback_url is only used with "async": true')
        return self


class TaskOptions(JobOptions):
    """An image task: the image and how masks are rendered and returned."""

    image_url: str = Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS, description="Object key, r2:// URL or R2 URL")
    # strict: `true`, "0.3" or "5" are not numbers and "false" is not a boolean; coercing them would answer another
    # request than the one sent (`"threshold": true` became 1.0: no instance), so they are 422 invalid_option
    mask_threshold: float = Field(0.5, ge=0, le=1, allow_inf_nan=False, strict=True)
    include_rle: bool = Field(True, strict=True, description='false: no "rle", whatever outputs says')
    outputs: Annotated[list[OutputName], Field(max_length=5)] | SkipJsonSchema[None] = Field(
        None,
        description='What to produce (order and repeats do not matter); absent: ["rle"]. See the contract\'s Outputs',
        json_schema_extra=lambda schema: schema.pop("default", None),
    )
    polygon_tolerance: float = Field(
        1.0,
        ge=0,
        le=MAX_POLYGON_TOLERANCE,
        allow_inf_nan=False,
        strict=True,
        description="Polygon simplification (Douglas-Peucker), in pixels; 0 keeps every corner",
    )

    @property
    def source_url(self) -> str:
        """The object the task reads."""
        return self.image_url

    @property
    def wanted_outputs(self) -> frozenset[str]:
        """What to produce: `outputs` (absent: ["rle"]), less "rle" when include_rle is false."""
        wanted = frozenset(self.outputs) if self.outputs is not None else frozenset({"rle"})
        return wanted if self.include_rle else wanted - {"rle"}


class PredictOptions(TaskOptions):
    """Concept prompts (predict, batch): exemplar boxes and how instances are kept."""

    boxes: list[Box] = Field(default_factory=list, max_length=MAX_BOXES)
    threshold: float = Field(0.5, ge=0, le=1, allow_inf_nan=False, strict=True)
    max_instances: int = Field(100, ge=1, le=MAX_INSTANCES, strict=True)


def _uuid(value: str, field: str) -> str:
    """The UUID in its canonical form (lower case, hyphenated); ValueError naming `field` if it is none."""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ValueError(f"{field} must be a UUID") from None


def _clean_prompt(value: str) -> str:
    """Control characters become spaces and the ends are trimmed; a prompt with nothing visible is empty ("").
    Text that shows something keeps its joiners and marks (emoji ZWJ sequences, Arabic and Indic joiners).
    Raises ValueError for text that is not Unicode (a lone surrogate, which JSON's \\uD800 escapes can carry)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("a prompt must be valid Unicode text (it has a lone surrogate)") from None
    cleaned = _CONTROL_CHARACTERS.sub(" ", value).strip()
    if all(unicodedata.category(character) in _BLANK_CATEGORIES for character in cleaned):
        return ""
    return cleaned


class PredictRequest(PredictOptions):
    text_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="A noun phrase, e.g. 'red car'")

    @field_validator("text_prompt")
    @classmethod
    def _clean(cls, value: str | None) -> str | None:
        return _clean_prompt(value) or None if value is not None else None

    @model_validator(mode="after")
    def _has_a_prompt(self) -> PredictRequest:
        if not self.text_prompt and not self.boxes:
            raise ValueError(
                "send a text_prompt, boxes, or both (to segment the one object at a tap or inside a box, use "
                "POST /api/v1/predict/visual with points or box)"
            )
        return self


# A number in [0, 1]; strict: `true` or "0.3" are not numbers (422 invalid_option, as the request's own thresholds)
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False, strict=True)]


def _absent_is_not_shown(schema: dict) -> None:
    """An optional field whose absence means "the default": the schema shows its type and no null default."""
    schema.pop("default", None)


class BatchPrompt(BaseModel):
    """One batch prompt written as an object: a phrase and/or exemplar boxes, and its own options. Each option it
    leaves out is the request's (`boxes` included: an object without `boxes` gets the request's, `[]` none)."""

    model_config = ConfigDict(extra="ignore")

    text: str | SkipJsonSchema[None] = Field(
        None, description="A noun phrase, as predict's text_prompt", json_schema_extra=_absent_is_not_shown
    )
    boxes: Annotated[list[Box], Field(max_length=MAX_BOXES)] | SkipJsonSchema[None] = Field(
        None, description="Exemplar boxes, as predict's; absent: the request's", json_schema_extra=_absent_is_not_shown
    )
    threshold: Probability | SkipJsonSchema[None] = Field(
        None, description="As the request's; absent: the request's", json_schema_extra=_absent_is_not_shown
    )
    mask_threshold: Probability | SkipJsonSchema[None] = Field(
        None, description="As the request's; absent: the request's", json_schema_extra=_absent_is_not_shown
    )
    max_instances: Annotated[int, Field(ge=1, le=MAX_INSTANCES, strict=True)] | SkipJsonSchema[None] = Field(
        None, description="As the request's; absent: the request's", json_schema_extra=_absent_is_not_shown
    )

    @field_validator("text")
    @classmethod
    def _clean(cls, value: str | None) -> str | None:
        """As a string prompt (nothing visible counts as absent: the prompt then needs boxes)."""
        if value is None:
            return None
        cleaned = _clean_prompt(value)
        if len(cleaned) > MAX_PROMPT_CHARS:
            raise ValueError(f"each prompt must be at most {MAX_PROMPT_CHARS} characters")
        return cleaned or None


def _prompt_form(value) -> str | None:
    """Which form a batch prompt is written in: "string", "object" (BatchPrompt) or neither."""
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict | BatchPrompt):
        return "object"
    return None


BatchPromptEntry = Annotated[
    Annotated[str, Tag("string")] | Annotated[BatchPrompt, Tag("object")],
    Discriminator(
        _prompt_form,
        custom_error_type="invalid_prompt_form",
        custom_error_message="each prompt must be a string or an object {text, boxes, threshold, mask_threshold, "
        "max_instances}",
    ),
]


class BatchPredictRequest(PredictOptions):
    prompts: list[BatchPromptEntry] = Field(
        min_length=1,
        max_length=MAX_BATCH_PROMPTS,
        description="Phrases, or objects with a phrase and/or exemplar boxes and options of their own",
    )
    nms_iou_threshold: Probability | SkipJsonSchema[None] = Field(
        None,
        description="Remove an instance whose mask overlaps a better-scoring one (any prompt) with an IoU above this; "
        "absent: off",
        json_schema_extra=_absent_is_not_shown,
    )

    @field_validator("prompts")
    @classmethod
    def _clean(cls, values: list[str | BatchPrompt], info: ValidationInfo) -> list[str | BatchPrompt]:
        cleaned = [_clean_prompt(value) if isinstance(value, str) else value for value in values]
        if any(len(value) > MAX_PROMPT_CHARS for value in cleaned if isinstance(value, str)):
            raise ValueError(f"each prompt must be at most {MAX_PROMPT_CHARS} characters")
        if not all(cleaned):
            raise ValueError("every prompt must have some text")
        request_boxes = info.data.get("boxes")
        for index, value in enumerate(cleaned):
            if isinstance(value, BatchPrompt) and not value.text and not _own_or(value.boxes, request_boxes):
                raise ValueError(f"prompt {index} needs a text or boxes (its own or the request's)")
        return cleaned

    def prompt_options(self) -> list[BatchPrompt]:
        """Each prompt with every option given: an object's own where it has them, else the request's."""
        request_options = {
            "boxes": self.boxes,
            "threshold": self.threshold,
            "mask_threshold": self.mask_threshold,
            "max_instances": self.max_instances,
        }
        resolved = []
        for value in self.prompts:
            if isinstance(value, str):
                resolved.append(BatchPrompt.model_construct(text=value, **request_options))
            else:
                own = {name: _own_or(getattr(value, name), default) for name, default in request_options.items()}
                resolved.append(BatchPrompt.model_construct(text=value.text, **own))
        return resolved


def _own_or(own, default):
    """A batch prompt's own option, or the request's when it has none (None: absent)."""
    return default if own is None else own


class Point(BaseModel):
    """A tap on the object to segment, in pixels of the image as displayed (EXIF orientation applied), like boxes:
    `positive` means "this is the object", `negative` "this is not part of it"."""

    model_config = ConfigDict(extra="forbid")

    x: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False, strict=True)
    y: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False, strict=True)
    label: Literal["positive", "negative"] = "positive"


class ObjectBox(BaseModel):
    """A box around the one object to segment (xyxy, pixels of the image as displayed). Not an exemplar: it says
    "this thing", not "things like this" (that is `boxes` on predict)."""

    model_config = ConfigDict(extra="forbid")

    x1: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False, strict=True)
    y1: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False, strict=True)
    x2: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False, strict=True)
    y2: float = Field(ge=0, le=MAX_BOX_COORDINATE, allow_inf_nan=False, strict=True)

    @model_validator(mode="after")
    def _has_area(self) -> ObjectBox:
        if self.x2 <= self.x1 or self.y2 <= self.y1:
            raise ValueError("a box needs x2 > x1 and y2 > y1")
        return self


class VisualPredictRequest(TaskOptions):
    """One object, pointed at (SAM 3's visual prompts): points, a box, an earlier visual task's mask, or several."""

    points: list[Point] = Field(default_factory=list, max_length=MAX_POINTS)
    box: ObjectBox | None = None
    refine_task_id: str | None = Field(
        None,
        description="An earlier visual task on the same image (same user_id): its best mask is the starting point",
        json_schema_extra={"format": "uuid"},
    )
    # None (absent) until resolved below, so the schema shows a plain optional boolean
    multimask: StrictBool | SkipJsonSchema[None] = Field(
        None,
        description="3 candidate masks instead of 1; default: true for a single point and nothing else",
        json_schema_extra=lambda schema: schema.pop("default", None),
    )

    @field_validator("refine_task_id")
    @classmethod
    def _refine_task_id_is_an_earlier_uuid(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None:
            return None
        value = _uuid(value, "refine_task_id")
        if value == info.data.get("task_id"):
            raise ValueError("refine_task_id must name an earlier task, not this one")
        return value

    @model_validator(mode="after")
    def _has_a_prompt(self) -> VisualPredictRequest:
        if not self.points and self.box is None and self.refine_task_id is None:
            raise ValueError("send points, a box or a refine_task_id: a visual prompt needs at least one")
        if self.multimask is None:  # one point alone is ambiguous (a shirt or the person?): SAM answers 3 masks
            self.multimask = len(self.points) == 1 and self.box is None and self.refine_task_id is None
        return self


MAX_VIDEO_PROMPTS = 8
MAX_VIDEO_FPS = 120.0
MAX_VIDEO_FRAME_INDEX = 1_000_000
MAX_VIDEO_SECONDS_FIELD = 1_000_000.0  # far past MAX_VIDEO_SECONDS: a larger time is a mistake, refused at once
VideoOutputName = Literal["tracks", "overlay"]
Seconds = Annotated[float, Field(gt=0, le=MAX_VIDEO_SECONDS_FIELD, allow_inf_nan=False, strict=True)]


class VideoPredictRequest(JobOptions):
    """Track objects through a clip (async only). Either concept prompts (`prompts`: every instance of each noun
    phrase, found on every frame) or a visual prompt for one object (`points` and/or `box` on `frame_index`)."""

    video_url: str = Field(
        min_length=1, max_length=MAX_IMAGE_URL_CHARS, description="Object key, r2:// URL or R2 URL of the clip"
    )
    run_async: bool = Field(True, alias="async", strict=True, description="Always true here (may be omitted)")
    prompts: list[str] = Field(
        default_factory=list,
        max_length=MAX_VIDEO_PROMPTS,
        description="1-8 noun phrases to track (concept prompts); or send points/box instead",
    )
    points: list[Point] = Field(
        default_factory=list, max_length=MAX_POINTS, description="Taps on frame `frame_index` (one object)"
    )
    box: ObjectBox | None = Field(None, description="A box around one object on frame `frame_index`")
    frame_index: int = Field(
        0,
        ge=0,
        le=MAX_VIDEO_FRAME_INDEX,
        strict=True,
        description="The frame (0-based, of the frames processed: after start_s and fps) that points/box are on",
    )
    start_s: float = Field(
        0.0, ge=0, le=MAX_VIDEO_SECONDS_FIELD, allow_inf_nan=False, strict=True, description="Start here (seconds)"
    )
    end_s: Seconds | SkipJsonSchema[None] = Field(
        None,
        description="Stop before this time (seconds); absent: the clip's end",
        json_schema_extra=_absent_is_not_shown,
    )
    fps: Annotated[float, Field(gt=0, le=MAX_VIDEO_FPS, allow_inf_nan=False, strict=True)] | SkipJsonSchema[None] = (
        Field(
            None,
            description="Frames per second to process, at most the clip's own; absent: its own, capped (VIDEO_MAX_FPS)",
            json_schema_extra=_absent_is_not_shown,
        )
    )
    max_frames: Annotated[int, Field(ge=1, strict=True)] | SkipJsonSchema[None] = Field(
        None, description="Process at most this many frames", json_schema_extra=_absent_is_not_shown
    )
    threshold: Probability | SkipJsonSchema[None] = Field(
        None,
        description="Concept prompts: the detection score a new object needs; absent: SAM 3's own (0.7)",
        json_schema_extra=_absent_is_not_shown,
    )
    outputs: Annotated[list[VideoOutputName], Field(max_length=2)] | SkipJsonSchema[None] = Field(
        None,
        description='"tracks" (always) and "overlay" (an MP4 preview); absent: ["tracks"]',
        json_schema_extra=_absent_is_not_shown,
    )

    @field_validator("prompts")
    @classmethod
    def _clean(cls, values: list[str]) -> list[str]:
        cleaned = [_clean_prompt(value) for value in values]
        for index, value in enumerate(cleaned):
            if not value:
                raise ValueError(f"prompt {index} is empty")
            if len(value) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompt {index} is longer than {MAX_PROMPT_CHARS} characters")
        return cleaned

    @model_validator(mode="after")
    def _one_kind_of_prompt(self) -> VideoPredictRequest:
        visual = bool(self.points) or self.box is not None
        if not self.run_async:
            raise PydanticCustomError(
                "invalid_option", 'predict/video runs as an async job only: omit "async" or send true'
            )
        if not self.prompts and not visual:
            raise PydanticCustomError(
                "missing_prompt", "send prompts (noun phrases), or points and/or a box on frame_index for one object"
            )
        if self.prompts and visual:
            raise PydanticCustomError(
                "conflicting_prompts", "send either prompts (concepts) or points/box (one object), not both"
            )
        if visual and self.threshold is not None:
            raise PydanticCustomError("invalid_option", "threshold applies to concept prompts only")
        if self.prompts and "frame_index" in self.model_fields_set:
            raise PydanticCustomError("invalid_option", "frame_index applies to points/box (one object) only")
        if self.end_s is not None and self.end_s <= self.start_s:
            raise PydanticCustomError("invalid_option", "end_s must be after start_s")
        return self

    @property
    def source_url(self) -> str:
        """The object the task reads."""
        return self.video_url

    @property
    def wanted_outputs(self) -> frozenset[str]:
        return frozenset(self.outputs or ()) | {"tracks"}


class Polygon(BaseModel):
    """One separate part of an instance's mask (docs/api-contract.md, Outputs: pixel convention)."""

    exterior: list[tuple[int, int]] = Field(description="[[x, y], ...]: the part's outline, original-image pixels")
    holes: list[list[tuple[int, int]]] = Field(description="the outlines of the part's holes, as exterior")


class InstanceOut(BaseModel):
    label: str
    score: float
    box: list[float] = Field(description="xyxy in original-image pixels")
    area: int = Field(
        description="pixels in the instance's mask; at least 1 on predict (an empty mask is no instance); a visual "
        "candidate's may be 0"
    )
    # absent (not null) when the request says include_rle: false; the schema says so (optional, never null)
    rle: dict | SkipJsonSchema[None] = Field(
        None,
        description="COCO RLE {size: [h, w], counts: str}; absent when include_rle is false",
        json_schema_extra=lambda schema: schema.pop("default", None),
    )
    polygons: list[Polygon] | SkipJsonSchema[None] = Field(
        None,
        description='Present when outputs has "polygons": one per separate part of the mask',
        json_schema_extra=lambda schema: schema.pop("default", None),
    )


CACHE_MARKER = (
    "hit: the image was not encoded for this request: the model worker's image cache had its encoding (or a request "
    "batched with it on the same image encoded it), so model_preprocess and model_vision are 0, and model_decode "
    "is 0 when the cache had it on arrival; miss: the vision encoder ran for it"
)


class ImageSize(BaseModel):
    width: int
    height: int


class OutputFiles(BaseModel):
    """The files `outputs` asked for (each key only when asked), in R2 beside the mask PNG."""

    instance_map_url: str | SkipJsonSchema[None] = Field(
        None,
        description="PNG, the image's size: pixel value i is instance i (1-based), 0 background; 16-bit past 255",
        json_schema_extra=lambda schema: schema.pop("default", None),
    )
    cutout_url: str | SkipJsonSchema[None] = Field(
        None,
        description="RGBA PNG: the image cropped to the instances' union, alpha = the union",
        json_schema_extra=lambda schema: schema.pop("default", None),
    )
    overlay_url: str | SkipJsonSchema[None] = Field(
        None,
        description="JPEG preview, long side at most 1024 px: masks, outlines, boxes, captions",
        json_schema_extra=lambda schema: schema.pop("default", None),
    )


class PredictResponse(BaseModel):
    task_id: str
    mask_url: str
    mask_key: str
    labels: list[str]
    inference_time_ms: float
    confidence: float
    num_instances: int
    suppressed: int | SkipJsonSchema[None] = Field(
        None,
        description="Batch with nms_iou_threshold: how many of this prompt's instances were removed as overlapping a "
        "better-scoring instance (of any prompt); absent otherwise",
        json_schema_extra=_absent_is_not_shown,
    )
    image: ImageSize
    instances: list[InstanceOut]
    timings: dict[str, float]
    cache: Literal["hit", "miss"] = Field(description=CACHE_MARKER)
    outputs: OutputFiles | SkipJsonSchema[None] = Field(
        None,
        description="The files outputs asked for; absent when it asked for none (and in a batch's results)",
        json_schema_extra=lambda schema: schema.pop("default", None),
    )


class BatchPredictResponse(BaseModel):
    task_id: str
    mask_url: str
    mask_key: str
    results: list[PredictResponse]
    total_inference_time_ms: float
    timings: dict[str, float]
    cache: Literal["hit", "miss"] = Field(description=CACHE_MARKER)
    outputs: OutputFiles | SkipJsonSchema[None] = Field(
        None,
        description="The files outputs asked for, one set for all prompts; absent when it asked for none",
        json_schema_extra=lambda schema: schema.pop("default", None),
    )


class VideoInfo(BaseModel):
    width: int = Field(description="pixels, display orientation (rotation applied)")
    height: int = Field(description="pixels, display orientation (rotation applied)")
    rotation: int = Field(description="degrees clockwise the stored frames were turned for display: 0, 90, 180, 270")
    fps: float = Field(description="frames per second processed (the clip's own rate, or the request's fps)")
    frames: int = Field(description="frames processed")
    duration_s: float = Field(description="the whole clip's duration, seconds")


class VideoObject(BaseModel):
    object_id: int = Field(description="stable over the clip: the same object keeps it on every frame")
    label: str = Field(description='the noun phrase that found it, or "object" for a visual prompt')
    score: float = Field(description="its best score over the clip (concepts: detection score; visual: object score)")
    first_frame: int
    last_frame: int


class FrameObject(BaseModel):
    object_id: int
    box: list[float] = Field(description="xyxy in pixels of the frame, display orientation")
    area: int = Field(description="mask pixels")
    rle: dict = Field(description='COCO compressed RLE {"size": [height, width], "counts": str} of the mask')


class VideoFrame(BaseModel):
    frame_index: int = Field(description="0-based, of the frames processed")
    time_s: float = Field(description="the frame's presentation time in the clip, seconds")
    objects: list[FrameObject]


class VideoOutputFiles(BaseModel):
    overlay_url: str | SkipJsonSchema[None] = Field(
        None, description='"overlay": an MP4 preview (H.264) with coloured masks and object ids'
    )


class VideoResponse(BaseModel):
    """The result of POST /api/v1/predict/video (in the task status, the webhook, and as JSON at result_url)."""

    task_id: str
    result_url: str = Field(description="This result as a JSON object in R2 (also the row's mask_url)")
    result_key: str
    video: VideoInfo
    labels: list[str] = Field(description="one per object, in objects' order")
    objects: list[VideoObject]
    frames: list[VideoFrame]
    inference_time_ms: float = Field(description="model time over the whole clip")
    timings: dict[str, float] = Field(description="ms: download, probe, model, upload, render, total")
    outputs: VideoOutputFiles | SkipJsonSchema[None] = Field(None, description='Present when "overlay" was asked')


class Progress(BaseModel):
    frames_done: int
    frames_total: int = Field(description="frames the task will process (an estimate until it ends)")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class JobAccepted(BaseModel):
    """The 202 answer to `"async": true`."""

    task_id: str
    status: Literal["queued", "processing"] = Field(description="processing: this task was already running")
    status_url: str = Field(description="GET it (with the API key) for the task's status")


class WebhookStatus(BaseModel):
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    delivered_at: str | None = Field(description="ISO 8601 UTC")


class TaskStatus(BaseModel):
    """GET /api/v1/tasks/{task_id}, and the webhook's payload."""

    task_id: str
    status: Literal["queued", "processing", "completed", "failed"]
    result: PredictResponse | BatchPredictResponse | VideoResponse | None = Field(
        description="completed: exactly the body the synchronous call would have answered (video: the result)"
    )
    progress: Progress | None = Field(description="video tasks: frames processed so far; null for image tasks")
    error: ErrorDetail | None = Field(description="failed: the code and message the synchronous call would have given")
    submitted_at: str = Field(description="ISO 8601 UTC")
    started_at: str | None = Field(description="ISO 8601 UTC")
    finished_at: str | None = Field(description="ISO 8601 UTC")
    webhook: WebhookStatus | None
