"""Task rows in Supabase, written through supabase-py with the service_role key. UPDATE only, never insert or delete."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Protocol

import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from tasks.errors import TaskNotUpdated, TaskStoreTimeout, TaskStoreUnavailable

log = logging.getLogger(__name__)

PROCESSING, COMPLETED, FAILED = "processing", "completed", "failed"
_MISSING_COLUMN = "PGRST204"
_REFUSED_KEY = {"PGRST301", "PGRST302", "401", "42501"}


@dataclass(frozen=True)
class TaskResult:
    mask_url: str
    labels: list[str]
    confidence: float
    inference_time_ms: int
    result: dict  # the whole response body, for tables with a `result` jsonb column


class TaskStore(Protocol):
    enabled: bool

    async def mark_processing(self, task_id: str) -> None: ...

    async def mark_completed(self, task_id: str, result: TaskResult) -> None: ...

    async def mark_failed(self, task_id: str, message: str) -> None: ...

    async def fail_stale_processing(self, older_than_s: float, message: str, limit: int) -> list[str]: ...


class DisabledTaskStore:
    """No Supabase configured (the embedded default): nothing is recorded, as announced at startup."""

    enabled = False

    async def mark_processing(self, task_id: str) -> None:
        return None

    async def mark_completed(self, task_id: str, result: TaskResult) -> None:
        return None

    async def mark_failed(self, task_id: str, message: str) -> None:
        return None

    async def fail_stale_processing(self, older_than_s: float, message: str, limit: int) -> list[str]:
        return []


class SupabaseTaskStore:
    enabled = True

    def __init__(self, url: str, service_key: str, table: str = "segmentation_results", timeout_s: float = 10.0):
        self._url = url
        self._key = service_key
        self._table = table
        self._timeout_s = timeout_s
        self._client: AsyncClient | None = None
        self._client_lock = asyncio.Lock()
        self._result_column = True  # dropped after the table says it has none

    async def mark_processing(self, task_id: str) -> None:
        await self._update(task_id, {"status": PROCESSING, "error_message": None})

    async def mark_completed(self, task_id: str, result: TaskResult) -> None:
        values = {
            "status": COMPLETED,
            "mask_url": result.mask_url,
            "labels": result.labels,
            "confidence": result.confidence,
            "inference_time_ms": result.inference_time_ms,
            "error_message": None,
        }
        if self._result_column:
            try:
                await self._update(task_id, {**values, "result": result.result})
                return
            except _MissingResultColumn:
                self._result_column = False
                log.info("table %s has no result column; writing the summary columns only", self._table)
        await self._update(task_id, values)

    async def mark_failed(self, task_id: str, message: str) -> None:
        await self._update(task_id, {"status": FAILED, "error_message": message[:2000]})

    async def fail_stale_processing(self, older_than_s: float, message: str, limit: int) -> list[str]:
        """Mark failed at most `limit` rows still `processing` whose `updated_at` (the table's trigger) is more
        than `older_than_s` seconds old: rows a server that died left behind. The ids are read first (bounded),
        then UPDATEd with the same filters, so a row that moved on meanwhile is left alone. Returns the ids failed.
        """
        cutoff = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_s)).isoformat()
        client = await self._get_client()
        table = self._table
        stale = await self._call(
            client.table(table)
            .select("id")
            .eq("status", PROCESSING)
            .lt("updated_at", cutoff)
            .order("updated_at")
            .limit(limit)
            .execute()
        )
        ids = [row["id"] for row in stale.data]
        if not ids:
            return []
        failed = await self._call(
            client.table(table)
            .update({"status": FAILED, "error_message": message[:2000]})
            .in_("id", ids)
            .eq("status", PROCESSING)
            .lt("updated_at", cutoff)
            .execute()
        )
        return [row["id"] for row in failed.data]

    async def _update(self, task_id: str, values: dict) -> None:
        client = await self._get_client()
        response = await self._call(client.table(self._table).update(values).eq("id", task_id).execute())
        if not response.data:
            # PostgREST answers 200 [] both for a missing row and for one that RLS hides from a weak key.
            log.error("task %s: the UPDATE matched no row (missing row, or a key without service_role)", task_id)
            raise TaskNotUpdated(
                f"no row {self._table}[{task_id}] could be updated: it does not exist, "
                "or SUPABASE_SERVICE_KEY is not the service_role key"
            )

    async def _call(self, request):
        try:
            return await asyncio.wait_for(request, self._timeout_s)
        except APIError as exc:
            if exc.code == _MISSING_COLUMN and "result" in (exc.message or ""):
                raise _MissingResultColumn from None
            if str(exc.code) in _REFUSED_KEY:
                raise TaskStoreUnavailable("Supabase refused the key: check SUPABASE_SERVICE_KEY") from None
            raise TaskStoreUnavailable(f"Supabase rejected the update ({exc.code}: {exc.message})") from None
        except (TimeoutError, httpx.TimeoutException):
            raise TaskStoreTimeout("Supabase did not answer in time") from None
        except httpx.HTTPError as exc:
            raise TaskStoreUnavailable(f"Supabase could not be reached ({type(exc).__name__})") from None

    async def _get_client(self) -> AsyncClient:
        async with self._client_lock:
            if self._client is None:
                options = AsyncClientOptions(auto_refresh_token=False)  # timeouts: asyncio.wait_for in _call
                self._client = await acreate_client(self._url, self._key, options=options)
            return self._client


class _MissingResultColumn(Exception):
    pass
