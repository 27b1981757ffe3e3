"""A job as the public sees it: the 202 body and the task status body (docs/api-contract.md, "Async jobs")."""

from __future__ import annotations

import datetime as dt

from jobs.store import COMPLETED, FAILED, RESERVED, RUNNING, Job

# reserved is a submission in progress: to anyone else asking, its task is queued
_PUBLIC_STATUS = {RESERVED: "queued", "queued": "queued", RUNNING: "processing", COMPLETED: COMPLETED, FAILED: FAILED}


def status_url(task_id: str) -> str:
    return f"/api/v1/tasks/{task_id}"


def accepted_body(job: Job) -> dict:
    """The 202 body: the task, where it stands (queued, or processing for a resubmission already running)."""
    return {"task_id": job.task_id, "status": _PUBLIC_STATUS[job.status], "status_url": status_url(job.task_id)}


def status_body(job: Job) -> dict:
    """GET /api/v1/tasks/{task_id}, and the webhook's payload. Times are ISO 8601 UTC strings, or null."""
    error = {"code": job.error_code, "message": job.error_message} if job.status == FAILED else None
    return {
        "task_id": job.task_id,
        "status": _PUBLIC_STATUS[job.status],
        "result": job.result if job.status == COMPLETED else None,
        "error": error,
        "submitted_at": iso_time(job.submitted_at),
        "started_at": iso_time(job.started_at),
        "finished_at": iso_time(job.finished_at),
        "webhook": job.webhook,
        "progress": job.progress,
    }


def iso_time(seconds: float | None) -> str | None:
    """Epoch seconds -> '2026-11-28T09:15:02.123+00:00' (as the webhook's delivered_at)."""
    if seconds is None:
        return None
    return dt.datetime.fromtimestamp(seconds, dt.UTC).isoformat(timespec="milliseconds")
