"""Refinement, SAM's interactive loop (tap, look, tap again): a visual task keeps its best mask for the next one.

After a visual task succeeds, the best candidate's low-resolution mask logits are stored in the bucket at
`refine/{user_id}/{task_id}.npz`. A later visual task of the same user names that task as `refine_task_id`, and
the model gets the logits as its mask prompt (`mask_input` in Meta's SAM predictor, `input_masks` in transformers),
as SAM's own refinement does: the previous answer plus the new points.

The record is a NumPy .npz (`np.savez`, no pickled objects: `np.load(..., allow_pickle=False)` reads it) holding
  logits        float16 [h, w]  the best candidate's low-resolution mask logits, as the model returned them
  image_sha256  str             SHA-256 (hex) of the image's bytes: the record serves that image only
  created_at    float64         when it was written, epoch seconds; older than TASK_RETENTION_S it has expired
The keys start with `refine/` so that a bucket lifecycle rule can delete them (after TASK_RETENTION_S: they are
refused by then anyway) without touching the masks.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from backend.errors import ApiError
from storage import ObjectNotFound, ObjectStore, ObjectTooLarge

CONTENT_TYPE = "application/octet-stream"
MAX_RECORD_BYTES = 8 * 1024 * 1024  # a record of 288x288 float16 logits is ~166 KB


def refine_key(user_id: str, task_id: str) -> str:
    return f"refine/{user_id}/{task_id}.npz"


def image_sha256(image: bytes) -> str:
    """The image's identity for refinement: SHA-256 (hex) of its bytes, whatever its key."""
    return hashlib.sha256(image).hexdigest()


@dataclass(frozen=True)
class Refinement:
    task_id: str
    logits: np.ndarray  # float16 [h, w]: low-resolution mask logits
    image_sha256: str
    created_at: float  # epoch seconds

    def mask_input(self, image_sha256: str) -> np.ndarray:
        """The logits as the model's mask prompt (float32 [h, w]), for the same image only; else
        422 refine_image_mismatch."""
        if image_sha256 != self.image_sha256:
            raise ApiError(
                422,
                "refine_image_mismatch",
                f"refine_task_id {self.task_id} was made on another image: refine a task on the same image",
            )
        return self.logits.astype(np.float32)


def encode_record(logits: np.ndarray, image_sha256: str, created_at: float) -> bytes:
    buffer = io.BytesIO()
    np.savez(
        buffer,
        logits=logits.astype(np.float16),
        image_sha256=np.array(image_sha256),
        created_at=np.array(created_at, dtype=np.float64),
    )
    return buffer.getvalue()


def decode_record(task_id: str, data: bytes) -> Refinement:
    """A stored record; ValueError for bytes that are not one."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as record:
            logits = record["logits"]
            digest = str(record["image_sha256"])
            created_at = float(record["created_at"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ValueError(f"not a refinement record ({type(exc).__name__})") from None
    if logits.dtype != np.float16 or logits.ndim != 2:
        raise ValueError(f"not a refinement record (logits {logits.dtype} {logits.shape})")
    return Refinement(task_id, logits, digest, created_at)


class Refinements:
    """The records in the object store; `retention_s` (TASK_RETENTION_S) is how long one may be used."""

    def __init__(self, store: ObjectStore, retention_s: float) -> None:
        self.store = store
        self.retention_s = retention_s

    async def load(self, user_id: str, task_id: str) -> Refinement:
        """The record of the user's task; 404 refine_not_found when there is none (no such visual task, another
        user's, or one that failed), it cannot be read, or it has expired. Storage failures raise as they are."""
        key = refine_key(user_id, task_id)
        try:
            data = await asyncio.to_thread(self.store.get_object, key, MAX_RECORD_BYTES)
            record = decode_record(task_id, data)
        except ObjectNotFound:
            raise _not_found(
                f"no finished visual task {task_id} of this user_id to refine: it never ran, has not finished, failed, "
                "was not a visual task, or is another user's"
            ) from None
        except (ObjectTooLarge, ValueError) as exc:
            raise _not_found(f"the stored mask of task {task_id} cannot be read ({exc})") from None
        age_s = time.time() - record.created_at
        if age_s > self.retention_s:
            raise _not_found(
                f"the stored mask of task {task_id} has expired: it is {age_s:.0f} s old, "
                f"older than TASK_RETENTION_S ({self.retention_s:g} s)"
            )
        return record

    async def save(self, user_id: str, task_id: str, image_sha256: str, logits: np.ndarray) -> None:
        data = encode_record(logits, image_sha256, time.time())
        await asyncio.to_thread(self.store.put_object, refine_key(user_id, task_id), data, CONTENT_TYPE)

    async def forget(self, user_id: str, task_id: str) -> None:
        """Removes the task's record, if any: a task sent again (as a concept task, or failing this time) must not
        stay refinable with the mask of an earlier run. Storage failures raise as they are."""
        await asyncio.to_thread(self.store.delete_object, refine_key(user_id, task_id))


def _not_found(message: str) -> ApiError:
    return ApiError(404, "refine_not_found", message)
