"""The runner: in each gateway worker, background loops that claim queued jobs, run them through the same
pipeline a synchronous call uses, record the outcome, deliver webhooks, and recover what dead workers left.

- claiming: one job at a time by one atomic UPDATE (jobs/store.py), at most `concurrency` running here, only
  while the model service is ready (after a restart, queued jobs wait for the model instead of failing with
  model_loading); a running job that meets the model reloading (503 model_loading / model_unavailable) is put
  back to queued, its row still processing.
- heartbeat: every lease/3 the worker renews the leases of what it holds; a job whose lease it lost (another
  worker failed it as interrupted after the lease expired) is cancelled here.
- maintenance (any worker, about every second): jobs whose lease expired -> failed `interrupted`; queued jobs
  older than the queue timeout -> failed `queue_timeout`; failures the Supabase rows still have to be told are
  written; pending webhooks are delivered; finished jobs past their retention are deleted; the stale-row sweep.
- stopping (SIGTERM): no new claims from the signal on; running jobs get the grace period, then are cancelled
  and failed `interrupted`; queued jobs stay in the store for the next start, or with `drain_on_shutdown` are
  failed `interrupted` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from backend.api_models import BatchPredictRequest, PredictRequest, VideoPredictRequest, VisualPredictRequest
from backend.errors import MODEL_DOWN, ApiError, RowNotMarked
from backend.pipeline import PredictPipeline
from backend.video_pipeline import Progress, VideoPipeline
from jobs.status import status_body
from jobs.store import INTERRUPTED, Job, JobStore, RowWrite
from jobs.sweeper import StaleRowSweeper
from tasks import TaskNotUpdated, TaskStore

log = logging.getLogger(__name__)

INTERRUPTED_MESSAGE = "the server stopped while this task was running; it may be resubmitted"
DRAINED_MESSAGE = "the server was stopped (JOB_DRAIN_ON_SHUTDOWN) before this task ran; it may be resubmitted"
JOB_TIMEOUT = "job_timeout"
TASK_STORE_DOWN = ("database_unavailable", "database_timeout")  # Supabase unreachable or too slow
RETENTION_EVERY_S = 60.0


@dataclass(frozen=True)
class Pipelines:
    images: PredictPipeline
    video: VideoPipeline | None = None  # None: this server takes no video tasks (tests of the image kinds)


# kind -> (the request model, how it runs): the same entry points as the synchronous routes (True: the runner
# queues the task again when the model is down), and the video pipeline, which reports progress.
_KINDS: dict[str, tuple[type, Callable[[Pipelines, Any, Progress], Awaitable[dict]]]] = {
    "predict": (PredictRequest, lambda run, request, _: run.images.predict(request, True)),
    "predict_batch": (BatchPredictRequest, lambda run, request, _: run.images.predict_batch(request, True)),
    "predict_visual": (VisualPredictRequest, lambda run, request, _: run.images.predict_visual(request, True)),
    "predict_video": (VideoPredictRequest, lambda run, request, progress: run.video.track(request, progress)),
}
VIDEO_KINDS = frozenset({"predict_video"})


class DeliveryState(Protocol):
    status: str

    def as_dict(self) -> dict: ...


class WebhookSender(Protocol):
    async def deliver(
        self,
        url: str,
        payload: dict,
        message_id: str,
        on_attempt: Callable[[Any], Awaitable[None]] | None = None,
    ) -> DeliveryState: ...


@dataclass(frozen=True)
class RunnerConfig:
    concurrency: int  # jobs (and, separately, webhook deliveries) in flight in this worker
    lease_s: float
    queue_timeout_s: float
    run_timeout_s: float  # one image job's run, as long as a synchronous request may take (REQUEST_TIMEOUT_S)
    video_run_timeout_s: float  # one video job's run (VIDEO_TIMEOUT_S)
    shutdown_grace_s: float
    drain_on_shutdown: bool
    retention_s: float
    row_retry_s: float  # a failed row write is tried again after this long
    video_concurrency: int = 1  # video jobs running at once in this worker (at most `concurrency` jobs in all)
    poll_interval_s: float = 0.25  # how often an idle worker looks for jobs other workers queued
    maintenance_interval_s: float = 1.0
    not_ready_interval_s: float = 1.0  # how often the model service's readiness is asked while it loads


@dataclass
class _Work:
    job: Job
    task: asyncio.Task | None = None
    finishing: bool = False  # recording its outcome: never cancelled then
    shutdown: bool = False  # cancelled because the server stops (not because its lease was lost)


@dataclass(frozen=True)
class _Outcome:
    result: dict | None = None
    error: tuple[str, str] | None = None
    row: str | None = None  # what the row still has to be told (None: the pipeline already wrote it)
    requeue: bool = False  # it could not run yet: back to queued, the row still processing


def _interrupted() -> _Outcome:
    return _Outcome(error=(INTERRUPTED, INTERRUPTED_MESSAGE), row=f"{INTERRUPTED}: {INTERRUPTED_MESSAGE}")


class JobRunner:
    """ready: whether the model service can take work now. sender: None when webhooks are off."""

    def __init__(
        self,
        store: JobStore,
        pipelines: Pipelines,
        tasks: TaskStore,
        ready: Callable[[], Awaitable[bool]],
        sender: WebhookSender | None,
        sweeper: StaleRowSweeper,
        config: RunnerConfig,
        owner: str,
    ) -> None:
        self.store = store
        self.owner = owner
        self._pipelines = pipelines
        self._tasks = tasks
        self._ready = ready
        self._sender = sender
        self._sweeper = sweeper
        self.config = config
        self._running: dict[str, _Work] = {}
        self._delivering: dict[str, _Work] = {}
        self._claim_wake = asyncio.Event()
        self._maintain_wake = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self._stopping = False
        self._model_ready = False
        self._claim_paused_until = 0.0  # loop time: Supabase was down when a job started

    async def start(self) -> None:
        await self.store.open()
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="jobs-claim"),
            asyncio.create_task(self._heartbeat_loop(), name="jobs-heartbeat"),
            asyncio.create_task(self._maintenance_loop(), name="jobs-maintenance"),
        ]
        log.info("job runner %s started (store %s)", self.owner, self.store.path)

    def wake(self) -> None:
        """A job was queued here: look now instead of at the next poll."""
        self._claim_wake.set()

    def request_stop(self) -> None:
        """Claim nothing more (safe to call from a signal handler through the loop)."""
        self._stopping = True
        self._claim_wake.set()

    def stop_claiming_on_signals(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
        """Stop claiming the moment the process is told to stop. uvicorn (BentoML's server) answers SIGTERM by
        draining the open HTTP requests first and runs the lifespan shutdown (BentoML's on_shutdown hooks, where
        `stop` runs) only after them, up to REQUEST_TIMEOUT_S later: no job should start meanwhile. The handler
        installed before (uvicorn's) still runs."""
        if threading.current_thread() is not threading.main_thread():
            return
        loop = asyncio.get_running_loop()
        for number in signals:
            previous = signal.getsignal(number)

            def handler(signum, frame, previous=previous):
                loop.call_soon_threadsafe(self.request_stop)
                if callable(previous):
                    previous(signum, frame)
                elif previous == signal.SIG_DFL:
                    signal.signal(signum, signal.SIG_DFL)
                    signal.raise_signal(signum)

            signal.signal(number, handler)

    async def stop(self) -> None:
        """Shutdown: the grace period for running jobs and then their webhooks; what is left is cancelled."""
        self.request_stop()
        deadline = asyncio.get_running_loop().time() + self.config.shutdown_grace_s
        claim, heartbeat, maintenance = self._loops
        await _wait_until([claim], deadline)  # it ends at once; a claim in flight still starts its job
        await _cancel(claim)
        if self.config.drain_on_shutdown:
            drained = await self.store.drain_queued(DRAINED_MESSAGE)
            log.warning("shutdown: %d queued jobs failed as interrupted (JOB_DRAIN_ON_SHUTDOWN)", drained)
        log.info("shutdown: %d jobs running, %g s of grace", len(self._running), self.config.shutdown_grace_s)
        await _wait_until([work.task for work in self._running.values()], deadline)
        await _cancel(maintenance)
        await self._write_rows()
        await self._claim_deliveries()
        await _wait_until([work.task for work in self._delivering.values()], deadline)
        left = [work for work in [*self._running.values(), *self._delivering.values()] if not work.finishing]
        for work in left:
            work.shutdown = True
            work.task.cancel()
        if left:
            log.warning("shutdown: grace over, %d jobs or webhook deliveries cancelled", len(left))
        in_flight = [work.task for work in [*self._running.values(), *self._delivering.values()]]
        await asyncio.gather(*in_flight, return_exceptions=True)
        await _cancel(heartbeat)
        await self._write_rows()
        await self.store.close()

    # --- claiming and running ----------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        while not self._stopping:
            pause = self.config.poll_interval_s
            try:
                paused_s = self._claim_paused_until - asyncio.get_running_loop().time()
                if paused_s > 0:
                    pause = paused_s
                elif len(self._running) < self.config.concurrency:
                    if not self._model_ready:
                        self._model_ready = await self._ready()
                    if self._model_ready:
                        job = await self.store.claim(
                            self.owner, self.config.lease_s, self.config.queue_timeout_s, self._skipped_kinds()
                        )
                        if job is not None:
                            self._start(job)
                            continue
                    else:
                        pause = self.config.not_ready_interval_s
            except Exception:
                log.exception("claiming a job failed")
            await _wait(self._claim_wake, pause)

    def _skipped_kinds(self) -> tuple[str, ...]:
        """Video jobs are not claimed while `video_concurrency` run here: the model tracks only so many clips at
        once, and clips waiting for their turn must not hold every slot image jobs need."""
        videos = sum(work.job.kind in VIDEO_KINDS for work in self._running.values())
        return tuple(sorted(VIDEO_KINDS)) if videos >= self.config.video_concurrency else ()

    def _start(self, job: Job) -> None:
        work = _Work(job)
        work.task = asyncio.create_task(self._run(work), name=f"job-{job.task_id}")
        self._running[job.submission] = work

    async def _run(self, work: _Work) -> None:
        job = work.job
        try:
            outcome = await self._execute(job)
            work.finishing = True
            if outcome.requeue:
                verdict = await self.store.requeue(job, self.owner)
            else:
                verdict = await self.store.finish(job, self.owner, outcome.result, outcome.error, outcome.row)
            if verdict == "lost":
                # Failed as interrupted meanwhile (its lease expired): the row must end saying so too, after
                # whatever this run wrote to it.
                await self._write_row(RowWrite(job.task_id, job.submission, f"{INTERRUPTED}: {INTERRUPTED_MESSAGE}"))
        except Exception:
            log.exception("task %s: recording the job's outcome failed", job.task_id)
        finally:
            self._running.pop(job.submission, None)
            self._claim_wake.set()
            self._maintain_wake.set()

    async def _execute(self, job: Job) -> _Outcome:
        """Run the job as the synchronous route would; its outcome as that call would have answered it."""
        model, call = _KINDS[job.kind]
        video = job.kind in VIDEO_KINDS
        timeout_s = self.config.video_run_timeout_s if video else self.config.run_timeout_s

        async def progress(done: int, total: int) -> None:
            await self.store.set_progress(job, self.owner, {"frames_done": done, "frames_total": total})

        try:
            request = model.model_validate_json(job.request)
            async with asyncio.timeout(timeout_s):
                return _Outcome(result=await call(self._pipelines, request, progress))
        except RowNotMarked as error:
            if error.code in TASK_STORE_DOWN:
                # Nothing started and the row still says processing: the job runs again once Supabase is back
                # (claims pause for row_retry_s meanwhile), within JOB_QUEUE_TIMEOUT_S of its submission.
                self._claim_paused_until = asyncio.get_running_loop().time() + self.config.row_retry_s
                return _Outcome(requeue=True)
            return _Outcome(error=(error.code, error.message))  # the row is gone: nothing to tell it
        except ApiError as error:
            if error.code in MODEL_DOWN:  # the row still says processing
                self._model_ready = False
                if self._stopping:  # the model service is stopping with this server: not this job's failure
                    return _interrupted()
                # Its worker restarted (an out-of-memory kill): the job waits for the model again, as a queued
                # job does, within JOB_QUEUE_TIMEOUT_S of its submission.
                return _Outcome(requeue=True)
            if error.code in TASK_STORE_DOWN:  # the pipeline could not write the row: written when Supabase is back
                return _Outcome(error=(error.code, error.message), row=f"{error.code}: {error.message}")
            return _Outcome(error=(error.code, error.message))  # the pipeline has written it to the row
        except TimeoutError:
            limit = "VIDEO_TIMEOUT_S" if video else "REQUEST_TIMEOUT_S"
            message = f"the job ran longer than {limit} ({timeout_s:g} s)"
            return _Outcome(error=(JOB_TIMEOUT, message), row=f"{JOB_TIMEOUT}: {message}")
        except asyncio.CancelledError:  # the grace period is over, or the lease was lost
            return _interrupted()
        except Exception:
            log.exception("task %s failed unexpectedly", job.task_id)
            message = "the server failed while processing this task"
            return _Outcome(error=("internal_error", message), row=f"internal_error: {message}")

    # --- leases ------------------------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.lease_s / 3)
            try:
                held = await self.store.renew(self.owner, self.config.lease_s)
            except Exception:
                log.exception("renewing the job leases failed")
                continue
            for work in [*self._running.values(), *self._delivering.values()]:
                if (work.job.task_id, work.job.submission) not in held and not work.finishing:
                    log.error("task %s: its lease was lost (the worker stalled); cancelling it", work.job.task_id)
                    work.task.cancel()

    # --- maintenance -------------------------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                await self._maintain()
            except Exception:
                log.exception("job maintenance failed")
            await _wait(self._maintain_wake, self.config.maintenance_interval_s)

    async def _maintain(self) -> None:
        interrupted = await self.store.interrupt_expired(INTERRUPTED_MESSAGE)
        if interrupted:
            log.warning("%d jobs whose worker died were failed as interrupted", interrupted)
        expired = await self.store.expire_queued(
            self.config.queue_timeout_s,
            f"the task waited longer than JOB_QUEUE_TIMEOUT_S ({self.config.queue_timeout_s:g} s); "
            "it may be resubmitted",
        )
        if expired:
            log.warning("%d queued jobs timed out", expired)
        await self._write_rows()
        await self._claim_deliveries()
        if await self.store.claim_turn("retention", RETENTION_EVERY_S):
            await self.store.delete_finished(self.config.retention_s)
        await self._sweeper.maybe_sweep()

    async def _write_rows(self) -> None:
        writes = await self.store.claim_row_writes(self.config.row_retry_s)
        await asyncio.gather(*(self._write_row(write) for write in writes))

    async def _write_row(self, write: RowWrite) -> None:
        try:
            await self._tasks.mark_failed(write.task_id, write.message)
        except TaskNotUpdated:
            log.warning("task %s: its row is gone; nothing to record", write.task_id)
        except Exception as exc:  # Supabase down: tried again later
            log.warning("task %s: the row could not be marked failed yet (%s)", write.task_id, type(exc).__name__)
            return
        await self.store.row_written(write)

    # --- webhooks ----------------------------------------------------------------------------------------

    async def _claim_deliveries(self) -> None:
        while len(self._delivering) < self.config.concurrency:
            job = await self.store.claim_delivery(self.owner, self.config.lease_s)
            if job is None:
                return
            work = _Work(job)
            work.task = asyncio.create_task(self._deliver(work), name=f"webhook-{job.task_id}")
            self._delivering[job.submission] = work

    async def _deliver(self, work: _Work) -> None:
        job = work.job
        earlier = job.webhook["attempts"]  # attempts made before a restart
        try:
            if self._sender is None:
                state = {**job.webhook, "status": "failed", "last_error": "webhooks are off on this server"}
                await self.store.record_webhook(job, state, final=True)
                return

            async def on_attempt(state: DeliveryState) -> None:
                await self.store.record_webhook(job, _counted(state, earlier), final=False)

            final = await self._sender.deliver(job.callback_url, status_body(job), job.submission, on_attempt)
            work.finishing = True
            await self.store.record_webhook(job, _counted(final, earlier), final=True)
        except asyncio.CancelledError:
            if work.shutdown:  # the next start resumes it at once (the same webhook-id)
                await self.store.release_lease(job)
        except Exception:
            log.exception("task %s: webhook delivery failed unexpectedly", job.task_id)
        finally:
            self._delivering.pop(job.submission, None)


def _counted(state: DeliveryState, earlier: int) -> dict:
    values = state.as_dict()
    return {**values, "attempts": values["attempts"] + earlier}


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Until `event` is set or `timeout` passes. Not asyncio.wait_for: on Python 3.11 it can swallow a
    cancellation that arrives as the event is set, and a loop waiting so would never stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()
    event.clear()


async def _cancel(*tasks: asyncio.Task) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _wait_until(tasks: list[asyncio.Task], deadline: float) -> None:
    remaining = deadline - asyncio.get_running_loop().time()
    if tasks and remaining > 0:
        await asyncio.wait(tasks, timeout=remaining)
