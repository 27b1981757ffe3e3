"""Settings -> the concrete storage and task store, with the startup announcements a deployer must see."""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable, Iterable

import psutil

from backend.errors import ApiError
from backend.settings import Settings
from jobs import JobQueue, JobRunner, JobStore, Pipelines, RunnerConfig, StaleRowSweeper
from storage import LocalStorage, ObjectStore, R2Storage
from tasks import DisabledTaskStore, SupabaseTaskStore, TaskStore
from webhooks import CallbackPolicy, UnsupportedCallbackUrl, WebhookSender

log = logging.getLogger(__name__)


def build_store(settings: Settings) -> ObjectStore:
    if settings.r2_configured:
        secret = settings.r2_secret_access_key.get_secret_value() if settings.r2_secret_access_key else None
        return R2Storage(
            endpoint_url=settings.r2_endpoint,
            bucket=settings.r2_bucket,
            access_key_id=settings.r2_access_key_id,
            secret_access_key=secret,
            public_base_url=settings.r2_public_base_url,
            presign_ttl_s=settings.r2_presign_ttl_s,
            timeout_s=settings.r2_timeout_s,
            max_attempts=settings.r2_max_attempts,
        )
    log.warning(
        "!!! R2 is not configured (R2_ENDPOINT, R2_BUCKET): images and masks use the local directory %s",
        settings.local_storage_dir,
    )
    return LocalStorage(settings.local_storage_dir, settings.r2_public_base_url)


def build_task_store(settings: Settings) -> TaskStore:
    if settings.supabase_configured:
        return SupabaseTaskStore(
            settings.supabase_url,
            settings.supabase_service_key.get_secret_value(),
            settings.supabase_table,
            settings.supabase_timeout_s,
        )
    log.warning("!!! Supabase is not configured (SUPABASE_URL, SUPABASE_SERVICE_KEY): task rows are NOT updated")
    return DisabledTaskStore()


def check_auth(settings: Settings) -> str | None:
    """The API key to enforce; refuses to start in production without one."""
    key = settings.api_secret_key.get_secret_value() if settings.api_secret_key else ""
    if key:
        return key
    if settings.production:
        raise RuntimeError("SAM3_ENV=production requires API_SECRET_KEY: refusing to start without authentication")
    log.warning("!!! API_SECRET_KEY is empty: DEV MODE, every request is accepted without X-API-Key")
    return None


def check_exposure(api_key: str | None, hosts: Iterable[str]) -> None:
    """Dev mode (no key) serves loopback only: refuses to start listening where another machine can connect.

    `hosts` are the IP addresses the server listens on; 0.0.0.0 and :: mean every interface. Raises RuntimeError.
    """
    exposed = sorted({host for host in hosts if not ipaddress.ip_address(host).is_loopback})
    if api_key is None and exposed:
        raise RuntimeError(
            f"DEV MODE (API_SECRET_KEY is empty) refuses to listen on {', '.join(exposed)}: anyone who can reach this "
            "machine could use the API without a key. Bind 127.0.0.1 (make serve; bentoml serve --host 127.0.0.1) "
            "or set API_SECRET_KEY"
        )


def listening_hosts() -> list[str]:
    """The IP addresses this process accepts TCP connections on: in a BentoML worker, the server socket that
    `bentoml serve --host/--port` bound (whatever set it: the flag, BENTOML_HOST, a config file)."""
    connections = psutil.Process().net_connections(kind="inet")
    return [connection.laddr.ip for connection in connections if connection.status == psutil.CONN_LISTEN]


def build_jobs(
    settings: Settings, pipelines: Pipelines, ready: Callable[[], Awaitable[bool]]
) -> tuple[JobQueue, JobRunner]:
    """This worker's side of the async jobs: its submissions and its runner, on the box's shared job store."""
    owner = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
    store = JobStore(settings.job_store_path, settings.job_store_synchronous)
    policy = CallbackPolicy(settings.webhook_allowed_origins)
    sender = None
    if policy.enabled:
        secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
        sender = WebhookSender(
            secret, settings.webhook_timeout_s, settings.webhook_max_attempts, settings.webhook_backoff_s
        )

    def check_callback(url: str) -> str:
        try:
            return policy.check(url)
        except UnsupportedCallbackUrl as exc:
            raise ApiError(400, "unsupported_callback_url", str(exc)) from None

    config = RunnerConfig(
        concurrency=settings.job_concurrency,
        lease_s=settings.job_lease_s,
        queue_timeout_s=settings.job_queue_timeout_s,
        run_timeout_s=settings.request_timeout_s,
        video_run_timeout_s=settings.video_timeout_s,
        video_concurrency=settings.video_sessions * settings.model_workers,
        shutdown_grace_s=settings.job_shutdown_grace_s,
        drain_on_shutdown=settings.job_drain_on_shutdown,
        retention_s=settings.task_retention_s,
        row_retry_s=settings.supabase_timeout_s + 5,
    )
    pipeline = pipelines.images
    sweeper = StaleRowSweeper(store, pipeline.tasks, settings.stale_processing_after_s, settings.job_sweep_interval_s)
    runner = JobRunner(store, pipelines, pipeline.tasks, ready, sender, sweeper, config, owner)
    queue = JobQueue(
        store,
        pipeline.tasks,
        pipeline.store,
        check_callback,
        settings.max_queued_jobs,
        settings.job_concurrency * settings.gateway_workers,
        settings.job_lease_s,
        owner,
        runner.wake,
    )
    return queue, runner
