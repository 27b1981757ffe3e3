"""Accepting an async job: the checks a synchronous call makes before the row, a queue slot, the row marked
processing, then the job queued, recorded in the store (committed) before the 202 is sent."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable

from backend.api_models import TaskOptions, VideoPredictRequest
from backend.errors import ApiError, to_api_error
from jobs.store import RESERVED, JobStore
from storage import ObjectStore
from tasks import TaskStore

log = logging.getLogger(__name__)

RETRY_AFTER_S = (1, 60)  # bounds of the Retry-After a full queue answers with
RESERVED_POLL_S = 0.02  # how often a duplicate looks whether the submission it waits on has been answered


class JobQueue:
    """Submissions of one gateway worker.

    check_callback: the callback URL -> the URL to deliver to, or ApiError 400 unsupported_callback_url.
    parallelism: jobs the whole box runs at once (workers x per-worker concurrency), for Retry-After.
    on_queued: told when a job was queued here, so this worker's runner looks at once.
    """

    def __init__(
        self,
        store: JobStore,
        tasks: TaskStore,
        objects: ObjectStore,
        check_callback: Callable[[str], str],
        max_waiting: int,
        parallelism: int,
        lease_s: float,
        owner: str,
        on_queued: Callable[[], None],
    ) -> None:
        self.store = store
        self._tasks = tasks
        self._objects = objects
        self._check_callback = check_callback
        self._max_waiting = max_waiting
        self._parallelism = parallelism
        self._lease_s = lease_s
        self._owner = owner
        self._on_queued = on_queued

    async def submit(self, kind: str, request: TaskOptions | VideoPredictRequest):
        """The job for this task: a new one (queued), or the one already queued or running (nothing changes).

        Raises ApiError: 400 unsupported_callback_url / unsupported_image_url (nothing touched), 429 queue_full
        with Retry-After (nothing touched), or the error marking the row processing gave (404 task_not_found,
        502, 504), the slot given back.
        """
        callback_url = self._check_callback(request.callback_url) if request.callback_url else None
        try:
            self._objects.resolve_image_key(request.source_url)
        except Exception as exc:
            raise _api_error(exc) from None
        # Once a slot is reserved the submission runs to its end even if the client goes away meanwhile.
        return await asyncio.shield(self._submit(kind, request, callback_url))

    async def _submit(self, kind: str, request: TaskOptions | VideoPredictRequest, callback_url: str | None):
        while True:
            reservation = await self.store.reserve(
                request.task_id,
                kind,
                # only the fields sent: the job validates them again as it runs (a check on which fields were
                # sent, e.g. frame_index with concept prompts, must see the same request)
                request.model_dump_json(by_alias=True, exclude_unset=True),
                callback_url,
                self._max_waiting,
                self._owner,
                self._lease_s,
            )
            if reservation.outcome != "existing" or reservation.job.status != RESERVED:
                break
            # A concurrent submission of the task is still marking its row: its job may yet be given back (the
            # row missing, Supabase down), so wait for its answer, then try again: this one then gets the job it
            # queued, or marks the row itself and gets the same error.
            await self._wait_while_reserved(reservation.job.task_id, reservation.job.submission)
        if reservation.outcome == "existing":
            return reservation.job
        if reservation.outcome == "full":
            retry_after = self._retry_after(reservation.waiting, reservation.mean_run_s)
            raise ApiError(
                429,
                "queue_full",
                f"{reservation.waiting} jobs are waiting (MAX_QUEUED_JOBS); retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
        job = reservation.job
        try:
            await self._tasks.mark_processing(job.task_id)
        except Exception as exc:
            await self.store.release(job.task_id, job.submission)
            raise _api_error(exc) from None
        confirmed = await self.store.confirm(job.task_id, job.submission)
        self._on_queued()
        return confirmed

    async def _wait_while_reserved(self, task_id: str, submission: str) -> None:
        """Until the reservation is confirmed, given back, or failed as interrupted (its lease bounds the wait)."""
        while True:
            await asyncio.sleep(RESERVED_POLL_S)
            job = await self.store.get(task_id)
            if job is None or job.submission != submission or job.status != RESERVED:
                return

    def _retry_after(self, waiting: int, mean_run_s: float | None) -> int:
        """When a slot is likely free again: the waiting jobs x their recent mean run time / what runs at once."""
        estimate = math.ceil((mean_run_s or 1.0) * waiting / self._parallelism)
        return min(max(estimate, RETRY_AFTER_S[0]), RETRY_AFTER_S[1])


def _api_error(exc: Exception) -> ApiError:
    error = to_api_error(exc)
    if error is None:
        log.error("an async submission failed unexpectedly: %s", type(exc).__name__)
        return ApiError(500, "internal_error", "the server failed while accepting this task")
    return error
