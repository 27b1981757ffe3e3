"""Async jobs ("async": true): accepted at once, recorded in a SQLite job store shared by the gateway workers of
one box, run in the background through the synchronous pipeline, and never lost across a crash."""

from jobs.queue import JobQueue
from jobs.runner import JobRunner, Pipelines, RunnerConfig
from jobs.status import accepted_body, status_body
from jobs.store import Job, JobStore
from jobs.sweeper import StaleRowSweeper

__all__ = [
    "Job",
    "JobQueue",
    "JobRunner",
    "JobStore",
    "Pipelines",
    "RunnerConfig",
    "StaleRowSweeper",
    "accepted_body",
    "status_body",
]
