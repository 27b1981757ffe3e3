"""One error shape for every failure: {"error": {"code", "message"}} with a stable code and the right status."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from sam3_runner import ImageDecodeError, ImageTooLarge
from storage import ObjectNotFound, ObjectTooLarge, StorageTimeout, StorageUnavailable, UnsupportedImageUrl
from tasks import TaskNotUpdated, TaskStoreTimeout, TaskStoreUnavailable


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


class RowNotMarked(ApiError):
    """The task's row could not be marked processing (missing, Supabase down): nothing was done or recorded."""


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# Domain failure -> (HTTP status, stable code). Messages come from the exception, which never holds secrets.
_STATUS_AND_CODE: dict[type[Exception], tuple[int, str]] = {
    UnsupportedImageUrl: (400, "unsupported_image_url"),
    ObjectNotFound: (404, "image_not_found"),
    ObjectTooLarge: (422, "image_too_large"),
    ImageTooLarge: (422, "image_too_large"),
    ImageDecodeError: (400, "invalid_image"),
    StorageUnavailable: (502, "storage_unavailable"),
    StorageTimeout: (504, "storage_timeout"),
    TaskNotUpdated: (404, "task_not_found"),
    TaskStoreUnavailable: (502, "database_unavailable"),
    TaskStoreTimeout: (504, "database_timeout"),
}

# Codes the model service returns for one item -> HTTP status.
MODEL_ERROR_STATUS = {
    "invalid_image": 400,
    "image_too_large": 422,
    "invalid_box": 422,
    "invalid_point": 422,
    "visual_prompts_unavailable": 501,
    "invalid_video": 400,
    "video_too_long": 422,
    "video_unavailable": 501,
    "model_loading": 503,
    "model_unavailable": 503,
    "inference_failed": 500,
    "inference_timeout": 504,
}
# The codes (503) that mean only "the model is down or loading": the same task succeeds once it is ready.
MODEL_DOWN = ("model_loading", "model_unavailable")


def to_api_error(exc: Exception) -> ApiError | None:
    for kind, (status, code) in _STATUS_AND_CODE.items():
        if isinstance(exc, kind):
            return ApiError(status, code, str(exc))
    return None


# Pydantic validation failures -> stable codes, by the field that failed.
_FIELD_CODES = {
    "text_prompt": "prompt_too_long",
    "prompts": "invalid_prompts",
    "boxes": "invalid_box",
    "box": "invalid_box",
    "points": "invalid_point",
    "refine_task_id": "invalid_task_id",
    "task_id": "invalid_task_id",
    "user_id": "invalid_user_id",
    "image_url": "unsupported_image_url",
    "threshold": "invalid_option",
    "mask_threshold": "invalid_option",
    "max_instances": "invalid_option",
    "include_rle": "invalid_option",
    "multimask": "invalid_option",
    "outputs": "invalid_option",
    "polygon_tolerance": "invalid_option",
    "nms_iou_threshold": "invalid_option",
    "async": "invalid_option",
    "callback_url": "unsupported_callback_url",
    "video_url": "unsupported_video_url",
    "frame_index": "invalid_option",
    "start_s": "invalid_option",
    "end_s": "invalid_option",
    "fps": "invalid_option",
    "max_frames": "invalid_option",
}
# Request-level checks (a model validator, no field) that raise these pydantic error types keep them as codes.
_REQUEST_CODES = frozenset({"missing_prompt", "conflicting_prompts", "invalid_option"})

# An image task's storage errors, as a video task names them.
_VIDEO_CODES = {
    "unsupported_image_url": "unsupported_video_url",
    "image_not_found": "video_not_found",
    "image_too_large": "video_too_large",
}


def for_video(error: ApiError) -> ApiError:
    """The same error with a video's code (`image_not_found` -> `video_not_found`, ...) and message."""
    code = _VIDEO_CODES.get(error.code)
    if code is None:
        return error
    message = error.message.replace("the image", "the video").replace("image", "video")
    return ApiError(error.status, code, message, error.headers)


# How pydantic names the branch of a union it tried, in an error's location: a batch prompt's form (the tags of
# backend/api_models.py's BatchPromptEntry), or the member of an optional field (`none`, `str`, `constrained-float`,
# `list[...]`). They are not fields the caller wrote, so a message leaves them out.
_UNION_BRANCHES = frozenset({"string", "object", "none", "str"})


def _is_union_branch(part: str | int) -> bool:
    return isinstance(part, str) and (part in _UNION_BRANCHES or "-" in part or "[" in part)


def validation_error_code(errors: list[dict]) -> tuple[int, str, str]:
    """The status, code and message for the first validation error FastAPI reports."""
    if not errors:
        return 422, "invalid_request", "the request body is not valid"
    first = errors[0]
    location = [part for part in first.get("loc", ()) if part != "body" and not _is_union_branch(part)]
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    where = ".".join(str(part) for part in location)
    if first.get("type") == "json_invalid":
        return 400, "invalid_json", "the request body is not valid JSON"
    if not location and first.get("type") == "missing":  # FastAPI's word for an empty body
        return 400, "invalid_json", "the request body is empty: send a JSON object"
    if not location and isinstance(first.get("input"), bytes):  # not sent as JSON: FastAPI kept the raw bytes
        return 400, "invalid_json", "the request body is not JSON: send it with Content-Type: application/json"
    if not location:
        if first.get("type") in _REQUEST_CODES:
            return 422, first["type"], message
        if first.get("type") == "model_attributes_type":
            return 422, "invalid_request", "the body must be a JSON object sent with Content-Type: application/json"
        if "prompt" in message:
            return 422, "missing_prompt", message
        return 422, "invalid_request", message
    field = str(location[0])
    code = _FIELD_CODES.get(field, "invalid_request")
    if field == "prompts":
        error_type = first.get("type")
        if error_type == "too_long" and len(location) == 1:
            code = "too_many_prompts"
        elif "characters" in message:
            code = "prompt_too_long"
        elif len(location) > 2 and location[2] != "text":  # a prompt object's option: coded as the request's own
            code = _FIELD_CODES.get(str(location[2]), code)
    if field == "text_prompt" and first.get("type") != "string_too_long":
        code = "invalid_prompt"
    if first.get("type") == "missing" and len(location) == 1:
        code = "missing_field"
    return 422, code, f"{where}: {message}"
