"""The stale-row sweep: rows left `processing` by a server that died and never came back.

Every accepted job ends within a bounded time (Settings.job_lifetime_s: the queue timeout, a run's limit, the
lease), and a synchronous request within REQUEST_TIMEOUT_S; a row still `processing` past their sum was left by
a server that is gone. Any replica may fail it: UPDATE only, through tasks/, at most `limit` rows per sweep, and
one worker per box per `interval_s` (the job store's turn).
"""

from __future__ import annotations

import logging

from jobs.store import INTERRUPTED, JobStore
from tasks import TaskStore, TaskStoreError

log = logging.getLogger(__name__)


class StaleRowSweeper:
    def __init__(self, store: JobStore, tasks: TaskStore, stale_after_s: float, interval_s: float, limit: int = 100):
        self._store = store
        self._tasks = tasks
        self.stale_after_s = stale_after_s
        self._interval_s = interval_s
        self._limit = limit

    @property
    def message(self) -> str:
        return (
            f"{INTERRUPTED}: no result after {self.stale_after_s:g} s; the server handling this task stopped; "
            "it may be resubmitted"
        )

    async def maybe_sweep(self) -> list[str]:
        """Fail the stale rows if it is this worker's turn; returns the task ids failed."""
        if not self._tasks.enabled or not await self._store.claim_turn("sweep", self._interval_s):
            return []
        try:
            failed = await self._tasks.fail_stale_processing(self.stale_after_s, self.message, self._limit)
        except TaskStoreError as exc:  # Supabase down: the next turn tries again
            log.warning("the stale-row sweep could not reach Supabase: %s", exc)
            return []
        if failed:
            log.warning("%d rows left processing by a stopped server were failed as interrupted", len(failed))
        return failed
