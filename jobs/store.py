"""The job store: one SQLite database in WAL mode, shared by the gateway worker processes of one box.

Every change is one short transaction opened with BEGIN IMMEDIATE (SQLite's single writer lock), so the
processes coordinate through SQLite alone: a queued job is claimed by one UPDATE ... WHERE status = 'queued'
and no two workers ever run the same job. sqlite3 blocks, so every call runs on the store's own thread,
never on the event loop.

A job, by `status`:
  reserved   a submission holds a queue slot while the Supabase row is marked processing (not yet answered)
  queued     accepted (answered 202), waiting for a worker
  running    a worker runs it
  completed  `result` holds the body the synchronous call would have answered
  failed     `error_code` / `error_message`, as the synchronous call would have answered them
`progress` (video tasks) holds {"frames_done", "frames_total"}, written while the job runs.
A reserved or running job has an `owner` (one worker process) and a lease (`lease_until`, epoch seconds) that
its owner renews; a lease that expires means the owner died (kill -9), and the job is failed as `interrupted`.
A finished job with a webhook to deliver is leased the same way while one worker delivers it.
`row_pending` holds a failure the Supabase row still has to be told (an outbox: written, then cleared).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

RESERVED, QUEUED, RUNNING, COMPLETED, FAILED = "reserved", "queued", "running", "completed", "failed"
ACTIVE = (RESERVED, QUEUED, RUNNING)
FINISHED = (COMPLETED, FAILED)
INTERRUPTED, QUEUE_TIMEOUT = "interrupted", "queue_timeout"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    task_id        TEXT PRIMARY KEY,
    submission     TEXT NOT NULL,
    kind           TEXT NOT NULL,
    request        TEXT NOT NULL,
    callback_url   TEXT,
    status         TEXT NOT NULL,
    submitted_at   REAL NOT NULL,
    started_at     REAL,
    finished_at    REAL,
    owner          TEXT,
    lease_until    REAL,
    result         TEXT,
    error_code     TEXT,
    error_message  TEXT,
    row_pending    TEXT,
    row_attempt_at REAL,
    webhook        TEXT,
    progress       TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, submitted_at);
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value REAL NOT NULL);
"""
# A finished job with a callback URL starts its webhook as pending (the status body's `webhook` object).
_WEBHOOK_PENDING = (
    "CASE WHEN callback_url IS NULL THEN NULL ELSE json_object('url', callback_url, 'status', 'pending', "
    "'attempts', 0, 'last_status_code', NULL, 'last_error', NULL, 'delivered_at', NULL) END"
)
_FAIL = (
    "status = 'failed', error_code = :code, error_message = :message, row_pending = :row, row_attempt_at = NULL, "
    f"finished_at = :now, owner = NULL, lease_until = NULL, webhook = {_WEBHOOK_PENDING}"
)
_BATCH = 100  # rows one maintenance statement touches at most
T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    task_id: str
    submission: str  # unique per submission: compare-and-set key, and the webhook's message id
    kind: str  # "predict" | "predict_batch" | "predict_visual" | "predict_video"
    request: str  # the validated request, JSON
    callback_url: str | None
    status: str
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    result: dict | None
    error_code: str | None
    error_message: str | None
    webhook: dict | None
    progress: dict | None = None  # video tasks: {"frames_done", "frames_total"}

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            task_id=row["task_id"],
            submission=row["submission"],
            kind=row["kind"],
            request=row["request"],
            callback_url=row["callback_url"],
            status=row["status"],
            submitted_at=row["submitted_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            result=json.loads(row["result"]) if row["result"] else None,
            error_code=row["error_code"],
            error_message=row["error_message"],
            webhook=json.loads(row["webhook"]) if row["webhook"] else None,
            progress=json.loads(row["progress"]) if row["progress"] else None,
        )


@dataclass(frozen=True)
class Reservation:
    outcome: Literal["new", "existing", "full"]
    job: Job | None  # the new or the existing job; None when full
    waiting: int  # jobs reserved or queued, this one included when new
    mean_run_s: float | None  # mean run time of recently finished jobs (for Retry-After), when full


@dataclass(frozen=True)
class RowWrite:
    task_id: str
    submission: str
    message: str  # "code: message", for the row's error_message


class JobStore:
    """The async interface; `path` is created (with its directory) on `open()`.

    synchronous: "normal" (in WAL mode a commit survives the process being killed, not a power loss) or "full"
    (each commit is fsynced: it survives a power loss too, ~4.5 ms per commit on the 2-core dev box).
    """

    def __init__(self, path: str | Path, synchronous: Literal["normal", "full"] = "normal") -> None:
        self.path = Path(path)
        self._synchronous = synchronous.upper()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="job-store")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await self._call(self._open)

    async def close(self) -> None:
        await self._call(self._close)
        self._executor.shutdown(wait=True)

    # --- submissions -------------------------------------------------------------------------------------

    async def reserve(
        self,
        task_id: str,
        kind: str,
        request: str,
        callback_url: str | None,
        max_waiting: int,
        owner: str,
        lease_s: float,
    ) -> Reservation:
        """A queue slot for a new submission, unless the task already has an active job (then that job), or
        `max_waiting` jobs already wait (then nothing changes)."""
        return await self._call(self._reserve, task_id, kind, request, callback_url, max_waiting, owner, lease_s)

    async def confirm(self, task_id: str, submission: str) -> Job | None:
        """reserved -> queued, once the row says processing. Returns the job as it now stands."""
        return await self._call(self._confirm, task_id, submission)

    async def release(self, task_id: str, submission: str) -> None:
        """Give a reservation's slot back (the row could not be marked processing)."""
        await self._write(
            "DELETE FROM jobs WHERE task_id = ? AND submission = ? AND status = ?", (task_id, submission, RESERVED)
        )

    async def get(self, task_id: str) -> Job | None:
        return await self._call(self._get, task_id)

    # --- running -----------------------------------------------------------------------------------------

    async def claim(
        self, owner: str, lease_s: float, queue_timeout_s: float, skip_kinds: tuple[str, ...] = ()
    ) -> Job | None:
        """The oldest queued job that has not waited too long and is not of `skip_kinds`, now running under
        `owner`; None if there is none."""
        return await self._call(self._claim, owner, lease_s, queue_timeout_s, skip_kinds)

    async def renew(self, owner: str, lease_s: float) -> set[tuple[str, str]]:
        """Extend every lease `owner` holds; returns the (task_id, submission) it still holds."""
        return await self._call(self._renew, owner, lease_s)

    async def finish(
        self,
        job: Job,
        owner: str,
        result: dict | None = None,
        error: tuple[str, str] | None = None,
        row_pending: str | None = None,
    ) -> Literal["finished", "lost", "superseded"]:
        """Record a running job's outcome: `result` (completed) or `error` = (code, message) (failed).
        "lost": the job is no longer this owner's (its lease expired and it was failed as interrupted);
        "superseded": a newer submission of the task replaced it."""
        return await self._call(self._finish, job, owner, result, error, row_pending)

    async def set_progress(self, job: Job, owner: str, progress: dict) -> None:
        """A running job's progress (video tasks), while `owner` still holds it."""
        await self._write(
            "UPDATE jobs SET progress = ? WHERE task_id = ? AND submission = ? AND status = ? AND owner = ?",
            (json.dumps(progress), job.task_id, job.submission, RUNNING, owner),
        )

    async def requeue(self, job: Job, owner: str) -> Literal["requeued", "lost", "superseded"]:
        """running -> queued again (it keeps its `submitted_at`, so JOB_QUEUE_TIMEOUT_S still bounds its wait):
        the job could not run yet (the model reloading, Supabase down before it started). Verdicts as `finish`."""
        return await self._call(self._requeue, job, owner)

    # --- recovery and maintenance ------------------------------------------------------------------------

    async def interrupt_expired(self, message: str) -> int:
        """Reserved or running jobs whose lease expired (their process died) -> failed, `interrupted`."""
        return await self._fail_where(
            "status IN (:reserved, :running) AND lease_until < :now", INTERRUPTED, message, {}
        )

    async def expire_queued(self, queue_timeout_s: float, message: str) -> int:
        """Queued jobs that waited longer than `queue_timeout_s` -> failed, `queue_timeout`."""
        return await self._fail_where(
            "status = :queued AND submitted_at < :now - :timeout", QUEUE_TIMEOUT, message, {"timeout": queue_timeout_s}
        )

    async def drain_queued(self, message: str) -> int:
        """Every queued job -> failed, `interrupted` (a clean drain on shutdown)."""
        return await self._fail_where("status = :queued", INTERRUPTED, message, {})

    async def claim_row_writes(self, retry_after_s: float) -> list[RowWrite]:
        """Failures still to be written to their Supabase rows, not attempted in the last `retry_after_s`."""
        return await self._call(self._claim_row_writes, retry_after_s)

    async def row_written(self, write: RowWrite) -> None:
        await self._write(
            "UPDATE jobs SET row_pending = NULL, row_attempt_at = NULL WHERE task_id = ? AND submission = ?",
            (write.task_id, write.submission),
        )

    async def claim_delivery(self, owner: str, lease_s: float) -> Job | None:
        """A finished job whose webhook is pending, its row written, and nobody delivering it: now leased."""
        return await self._call(self._claim_delivery, owner, lease_s)

    async def record_webhook(self, job: Job, state: dict, final: bool) -> None:
        """The delivery's progress; `final` also gives the lease back."""
        release = ", owner = NULL, lease_until = NULL" if final else ""
        await self._write(
            f"UPDATE jobs SET webhook = ?{release} WHERE task_id = ? AND submission = ?",
            (json.dumps(state), job.task_id, job.submission),
        )

    async def release_lease(self, job: Job) -> None:
        await self._write(
            "UPDATE jobs SET owner = NULL, lease_until = NULL WHERE task_id = ? AND submission = ?",
            (job.task_id, job.submission),
        )

    async def delete_finished(self, retention_s: float) -> int:
        """Finished jobs older than `retention_s` that nobody works on any more."""
        return await self._write(
            "DELETE FROM jobs WHERE task_id IN (SELECT task_id FROM jobs WHERE status IN (?, ?) "
            "AND finished_at < ? AND lease_until IS NULL LIMIT ?)",
            (*FINISHED, time.time() - retention_s, _BATCH),
        )

    async def claim_turn(self, name: str, interval_s: float) -> bool:
        """True for at most one caller per `interval_s` across every process using this store."""
        return await self._call(self._claim_turn, name, interval_s)

    async def count(self, *statuses: str) -> int:
        return await self._call(self._count, statuses)

    # --- on the store's thread ---------------------------------------------------------------------------

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _write(self, sql: str, parameters: tuple | dict) -> int:
        return await self._call(self._execute_write, sql, parameters)

    async def _fail_where(self, condition: str, code: str, message: str, extra: dict) -> int:
        parameters = {
            "code": code,
            "message": message,
            "row": f"{code}: {message}",
            "now": time.time(),
            "reserved": RESERVED,
            "queued": QUEUED,
            "running": RUNNING,
            **extra,
        }
        return await self._write(f"UPDATE jobs SET {_FAIL} WHERE {condition}", parameters)

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 30000")
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {self._synchronous}")
        with _transaction(db):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
            if "progress" not in columns:  # a store written before video tasks
                db.execute("ALTER TABLE jobs ADD COLUMN progress TEXT")
        self._db = db

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the job store is not open")
        return self._db

    def _execute_write(self, sql: str, parameters: tuple | dict) -> int:
        with _transaction(self._conn) as db:
            return db.execute(sql, parameters).rowcount

    def _reserve(self, task_id, kind, request, callback_url, max_waiting, owner, lease_s) -> Reservation:
        now = time.time()
        with _transaction(self._conn) as db:
            row = db.execute("SELECT * FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
            if row is not None and row["status"] in ACTIVE:
                return Reservation("existing", Job.from_row(row), 0, None)
            waiting = db.execute("SELECT count(*) FROM jobs WHERE status IN (?, ?)", (RESERVED, QUEUED)).fetchone()[0]
            if waiting >= max_waiting:
                return Reservation("full", None, waiting, self._mean_run_s(db))
            db.execute("DELETE FROM jobs WHERE task_id = ?", (task_id,))
            inserted = db.execute(
                "INSERT INTO jobs (task_id, submission, kind, request, callback_url, status, submitted_at, owner, "
                "lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING *",
                (task_id, uuid.uuid4().hex, kind, request, callback_url, RESERVED, now, owner, now + lease_s),
            ).fetchone()
            return Reservation("new", Job.from_row(inserted), waiting + 1, None)

    @staticmethod
    def _mean_run_s(db: sqlite3.Connection) -> float | None:
        return db.execute(
            "SELECT avg(finished_at - started_at) FROM (SELECT finished_at, started_at FROM jobs "
            "WHERE status = ? AND started_at IS NOT NULL ORDER BY finished_at DESC LIMIT 100)",
            (COMPLETED,),
        ).fetchone()[0]

    def _confirm(self, task_id: str, submission: str) -> Job | None:
        with _transaction(self._conn) as db:
            db.execute(
                "UPDATE jobs SET status = ?, owner = NULL, lease_until = NULL "
                "WHERE task_id = ? AND submission = ? AND status = ?",
                (QUEUED, task_id, submission, RESERVED),
            )
            row = db.execute("SELECT * FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
        return Job.from_row(row) if row else None

    def _get(self, task_id: str) -> Job | None:
        row = self._conn.execute("SELECT * FROM jobs WHERE task_id = ?", (task_id,)).fetchone()
        return Job.from_row(row) if row else None

    def _claim(self, owner: str, lease_s: float, queue_timeout_s: float, skip_kinds: tuple[str, ...]) -> Job | None:
        now = time.time()
        skipped = f"AND kind NOT IN ({', '.join('?' * len(skip_kinds))}) " if skip_kinds else ""
        with _transaction(self._conn) as db:
            row = db.execute(
                "UPDATE jobs SET status = ?, owner = ?, lease_until = ?, started_at = ? WHERE task_id = "
                f"(SELECT task_id FROM jobs WHERE status = ? AND submitted_at >= ? {skipped}"
                "ORDER BY submitted_at LIMIT 1) AND status = ? RETURNING *",
                (RUNNING, owner, now + lease_s, now, QUEUED, now - queue_timeout_s, *skip_kinds, QUEUED),
            ).fetchone()
        return Job.from_row(row) if row else None

    def _renew(self, owner: str, lease_s: float) -> set[tuple[str, str]]:
        with _transaction(self._conn) as db:
            rows = db.execute(
                "UPDATE jobs SET lease_until = ? WHERE owner = ? AND lease_until IS NOT NULL "
                "RETURNING task_id, submission",
                (time.time() + lease_s, owner),
            ).fetchall()
        return {(row["task_id"], row["submission"]) for row in rows}

    def _finish(self, job, owner, result, error, row_pending) -> str:
        code, message = error if error else (None, None)
        with _transaction(self._conn) as db:
            updated = db.execute(
                "UPDATE jobs SET status = ?, result = ?, error_code = ?, error_message = ?, row_pending = ?, "
                f"finished_at = ?, owner = NULL, lease_until = NULL, webhook = {_WEBHOOK_PENDING} "
                "WHERE task_id = ? AND submission = ? AND status = ? AND owner = ?",
                (
                    FAILED if error else COMPLETED,
                    json.dumps(result) if result is not None else None,
                    code,
                    message,
                    row_pending,
                    time.time(),
                    job.task_id,
                    job.submission,
                    RUNNING,
                    owner,
                ),
            ).rowcount
            return "finished" if updated else _missed(db, job)

    def _requeue(self, job: Job, owner: str) -> str:
        with _transaction(self._conn) as db:
            updated = db.execute(
                "UPDATE jobs SET status = ?, owner = NULL, lease_until = NULL, started_at = NULL, progress = NULL "
                "WHERE task_id = ? AND submission = ? AND status = ? AND owner = ?",
                (QUEUED, job.task_id, job.submission, RUNNING, owner),
            ).rowcount
            return "requeued" if updated else _missed(db, job)

    def _claim_row_writes(self, retry_after_s: float) -> list[RowWrite]:
        now = time.time()
        with _transaction(self._conn) as db:
            rows = db.execute(
                "UPDATE jobs SET row_attempt_at = ? WHERE task_id IN (SELECT task_id FROM jobs "
                "WHERE row_pending IS NOT NULL AND (row_attempt_at IS NULL OR row_attempt_at < ?) LIMIT ?) "
                "RETURNING task_id, submission, row_pending",
                (now, now - retry_after_s, _BATCH),
            ).fetchall()
        return [RowWrite(row["task_id"], row["submission"], row["row_pending"]) for row in rows]

    def _claim_delivery(self, owner: str, lease_s: float) -> Job | None:
        now = time.time()
        with _transaction(self._conn) as db:
            row = db.execute(
                "UPDATE jobs SET owner = ?, lease_until = ? WHERE task_id = (SELECT task_id FROM jobs "
                "WHERE status IN (?, ?) AND json_extract(webhook, '$.status') = 'pending' AND row_pending IS NULL "
                "AND (lease_until IS NULL OR lease_until < ?) ORDER BY finished_at LIMIT 1) RETURNING *",
                (owner, now + lease_s, *FINISHED, now),
            ).fetchone()
        return Job.from_row(row) if row else None

    def _claim_turn(self, name: str, interval_s: float) -> bool:
        now = time.time()
        with _transaction(self._conn) as db:
            row = db.execute(
                "INSERT INTO store_meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                "SET value = excluded.value WHERE store_meta.value <= excluded.value - ? RETURNING value",
                (name, now, interval_s),
            ).fetchone()
        return row is not None

    def _count(self, statuses: tuple[str, ...]) -> int:
        marks = ", ".join("?" * len(statuses))
        return self._conn.execute(f"SELECT count(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0]


def _missed(db: sqlite3.Connection, job: Job) -> str:
    """Why an update of this submission of a running job matched nothing: "lost" (the job is still this submission,
    no longer this owner's: its lease ran out) or "superseded" (a newer submission replaced it, or it expired)."""
    current = db.execute("SELECT submission FROM jobs WHERE task_id = ?", (job.task_id,)).fetchone()
    return "lost" if current is not None and current["submission"] == job.submission else "superseded"


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on an exception): the write lock is taken up front, so two processes
    never both read and then fail to upgrade."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind, value, traceback) -> None:
        self.db.execute("ROLLBACK" if kind else "COMMIT")
