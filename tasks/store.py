"""Task rows in Supabase, written with the service_role key. UPDATE only, never insert or delete.

A row's UPDATE (every request and every async job, one of them before each 202) is a PATCH to PostgREST through
aiohttp; the stale-row sweep (once a minute) goes through supabase-py. Rows marked processing while several
PATCHes are already under way share one PATCH (tasks/coalesce.py). Why not supabase-py for both: it sends with
httpx, whose connection pool (httpcore) costs 0.9-1.6 ms of CPU per request at 32 concurrent requests on the
2-core dev box, against ~0.45 ms for aiohttp, with the same answers (bench/row_update.py, `*-row-update.json`); under
32 concurrent async submitters it was about half of the gateway's CPU per 202 (bench/NOTES.md).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from tasks.coalesce import Coalescer
from tasks.errors import TaskNotUpdated, TaskStoreTimeout, TaskStoreUnavailable

log = logging.getLogger(__name__)

PROCESSING, COMPLETED, FAILED = "processing", "completed", "failed"
_MISSING_COLUMN = "PGRST204"
_REFUSED_KEY = {"PGRST301", "PGRST302", "401", "42501"}
# Rows marked processing (tasks/coalesce.py): one PATCH marks at most MAX_ROWS_PER_UPDATE (its `id=in.(...)` filter
# stays ~2 KB, well inside any proxy's URL limit); the marks that arrive while MAX_UPDATES_IN_FLIGHT PATCHes are under
# way go together in the next one.
MAX_ROWS_PER_UPDATE = 50
MAX_UPDATES_IN_FLIGHT = 4


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

    async def mark_progress(self, task_id: str, progress: dict) -> None:
        """A running task's progress in the row's `result` ({"progress": {...}}), only while it is processing."""

    async def fail_stale_processing(self, older_than_s: float, message: str, limit: int) -> list[str]: ...

    async def close(self) -> None: ...


class DisabledTaskStore:
    """No Supabase configured (the embedded default): nothing is recorded, as announced at startup."""

    enabled = False

    async def mark_processing(self, task_id: str) -> None:
        return None

    async def mark_completed(self, task_id: str, result: TaskResult) -> None:
        return None

    async def mark_failed(self, task_id: str, message: str) -> None:
        return None

    async def mark_progress(self, task_id: str, progress: dict) -> None:
        return None

    async def fail_stale_processing(self, older_than_s: float, message: str, limit: int) -> list[str]:
        return []

    async def close(self) -> None:
        return None


class SupabaseTaskStore:
    enabled = True

    def __init__(self, url: str, service_key: str, table: str = "segmentation_results", timeout_s: float = 10.0):
        self._url = url
        self._key = service_key
        self._table = table
        self._timeout_s = timeout_s
        self._client: AsyncClient | None = None
        self._client_lock = asyncio.Lock()
        self._rows_url = f"{url.rstrip('/')}/rest/v1/{table}"
        self._session: aiohttp.ClientSession | None = None  # the row updates' connections...
        self._session_loop: asyncio.AbstractEventLoop | None = None  # ...on this event loop
        self._result_column = True  # dropped after the table says it has none
        self._processing = Coalescer(self._mark_rows_processing, MAX_ROWS_PER_UPDATE, MAX_UPDATES_IN_FLIGHT)

    async def mark_processing(self, task_id: str) -> None:
        """Raises TaskNotUpdated (no such row, or a key without service_role), TaskStoreUnavailable (refused,
        rejected, unreachable), TaskStoreTimeout. Under load concurrent calls share a PATCH; each gets its own row's
        answer."""
        try:  # the wait for a PATCH slot counts: a burst behind PATCHes that time out fails in time too
            async with asyncio.timeout(self._timeout_s):
                await self._processing(task_id)
        except TimeoutError:
            raise TaskStoreTimeout("Supabase did not answer in time") from None

    async def _mark_rows_processing(self, task_ids: list[str]) -> dict[str, Exception | None]:
        try:
            updated = await self._update_rows(task_ids, {"status": PROCESSING, "error_message": None})
        except _RowsRejected as rejected:
            if len(task_ids) == 1:
                return {task_ids[0]: rejected}
            # PostgreSQL rejects the whole statement for one row it refuses (a constraint, a trigger): each row
            # alone (MAX_UPDATES_IN_FLIGHT at a time), so that each gets its own answer
            slots = asyncio.Semaphore(MAX_UPDATES_IN_FLIGHT)

            async def one_row(task_id: str) -> dict[str, Exception | None]:
                async with slots:
                    return await self._mark_rows_processing([task_id])

            alone = await asyncio.gather(*(one_row(task_id) for task_id in task_ids), return_exceptions=True)
            return {
                task_id: outcome if isinstance(outcome, Exception) else outcome[task_id]
                for task_id, outcome in zip(task_ids, alone, strict=True)
            }
        return {task_id: None if task_id in updated else self._not_updated(task_id) for task_id in task_ids}

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

    async def mark_progress(self, task_id: str, progress: dict) -> None:
        """Best effort (progress is advisory): a table without a `result` column, or a row that moved on (completed
        or failed meanwhile: the filter on status leaves it alone), is not an error."""
        if not self._result_column:
            return
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._patch([task_id], {"result": {"progress": progress}}, status=PROCESSING)
        except _MissingResultColumn:
            self._result_column = False

    async def close(self) -> None:
        """Close the row updates' connections (on shutdown)."""
        if self._session is not None and self._session_loop is asyncio.get_running_loop():
            await self._session.close()
        self._session = self._session_loop = None

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
        if task_id not in await self._update_rows([task_id], values):
            raise self._not_updated(task_id)

    async def _update_rows(self, task_ids: list[str], values: dict) -> set[str]:
        """PATCH the rows (PostgREST, as supabase-py's `update().eq("id", ...)` / `.in_("id", ...)` sends it) and
        read back only their ids: the ids of `task_ids` updated."""
        try:
            async with asyncio.timeout(self._timeout_s):
                updated = await self._patch(task_ids, values)
        except TimeoutError:  # aiohttp's own timeouts are TimeoutErrors too
            raise TaskStoreTimeout("Supabase did not answer in time") from None
        except aiohttp.ClientError as exc:
            raise TaskStoreUnavailable(f"Supabase could not be reached ({type(exc).__name__})") from None
        ids = {str(row["id"]).lower() for row in updated}  # PostgreSQL writes a uuid in lower case
        return {task_id for task_id in task_ids if task_id.lower() in ids}

    def _not_updated(self, task_id: str) -> TaskNotUpdated:
        # PostgREST answers 200 [] both for a missing row and for one that RLS hides from a weak key.
        log.error("task %s: the UPDATE matched no row (missing row, or a key without service_role)", task_id)
        return TaskNotUpdated(
            f"no row {self._table}[{task_id}] could be updated: it does not exist, "
            "or SUPABASE_SERVICE_KEY is not the service_role key"
        )

    async def _patch(self, task_ids: list[str], values: dict, status: str | None = None) -> list:
        """status: only a row in this status is updated."""
        session = self._rows_session()
        params = {"id": _id_filter(task_ids), "select": "id"}
        if status is not None:
            params["status"] = f"eq.{status}"
        async with session.patch(
            self._rows_url,
            params=params,
            data=json.dumps(values, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode(),  # as httpx
            headers={"Prefer": "return=representation"},
        ) as response:
            body = await response.read()
        if 200 <= response.status < 300:
            return json.loads(body) if body else []
        try:
            error = json.loads(body)
        except ValueError:
            error = None
        if isinstance(error, dict):  # PostgREST's error object (or the API gateway's {"message"})
            # a 4xx of PostgREST's is about the statement (a constraint, a trigger, a type); a 5xx, 408 or 429
            # about the service (e.g. the API gateway's 502 while PostgREST restarts)
            about_rows = response.status < 500 and response.status not in (408, 429)
            raise _rejected(error.get("code"), error.get("message"), about_rows)
        # anything else, e.g. a proxy's error page: the status instead, as postgrest-py does
        raise _rejected(str(response.status), response.reason or f"Request failed with status {response.status}")

    def _rows_session(self) -> aiohttp.ClientSession:
        """Keep-alive connections for the row updates, on the running event loop (the served gateway has one;
        a test may run several in turn). Proxies and CA certificates as supabase-py (httpx) would use them."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session_loop is not loop:
            key = self._key
            self._session_loop = loop
            self._session = aiohttp.ClientSession(
                headers={"apikey": key, "Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                connector=aiohttp.TCPConnector(ssl=httpx.create_ssl_context()),
                trust_env=True,
            )
        return self._session

    async def _call(self, request):
        try:
            return await asyncio.wait_for(request, self._timeout_s)
        except APIError as exc:
            raise _rejected(exc.code, exc.message) from None
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


class _RowsRejected(TaskStoreUnavailable):
    """PostgreSQL (or PostgREST) refused the statement: a constraint, a trigger, a type."""


def _id_filter(task_ids: list[str]) -> str:
    """PostgREST's filter on the id column: `eq.ID` for one row, `in.("ID",...)` (values quoted) for several."""
    if len(task_ids) == 1:
        return f"eq.{task_ids[0]}"
    quoted = ('"' + task_id.replace("\\", "\\\\").replace('"', '\\"') + '"' for task_id in task_ids)
    return f"in.({','.join(quoted)})"


def _rejected(code: str | None, message: str | None, about_rows: bool = False) -> Exception:
    """What an error answer from PostgREST (its `code` and `message`) means here. about_rows: the statement was
    refused for the rows it touches (sent again row by row when it touched several), not for the service."""
    if code == _MISSING_COLUMN and "result" in (message or ""):
        return _MissingResultColumn()
    if str(code) in _REFUSED_KEY:
        return TaskStoreUnavailable("Supabase refused the key: check SUPABASE_SERVICE_KEY")
    rejected = _RowsRejected if about_rows else TaskStoreUnavailable
    return rejected(f"Supabase rejected the update ({code}: {message})")
