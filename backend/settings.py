"""Every setting, read from the environment (and .env) in one place. `.env.example` documents each one."""

from __future__ import annotations

import logging
import math
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from webhooks import CallbackPolicy, check_secret

log = logging.getLogger(__name__)

GPU_IMAGE_CACHE_MB = 1024
CPU_IMAGE_CACHE_MB = 256


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore", case_sensitive=False)

    # Model
    sam3_weights_path: str = "facebook/sam3"
    # a Meta .pt only: its config.json (or a directory holding it and the processor files); else the files beside
    # the checkpoint, else the built-in full-size SAM 3
    sam3_config: str | None = None
    sam3_device: str = "auto"
    sam3_dtype: str = "auto"
    hf_token: SecretStr | None = None
    # model-service workers: one per GPU on a multi-GPU box (each loads the model on its own device)
    model_workers: int = Field(1, ge=1, le=16)
    # gateway processes: HTTP, validation, storage and PNG work is CPU; several feed the one model queue
    gateway_workers: int = Field(1, ge=1, le=64)
    text_cache_size: int = Field(1024, ge=0)
    max_batch_size: int = Field(16, ge=2, le=128)
    max_latency_ms: int = Field(30_000, ge=10)
    # bounded: box pooling numbers the pairs in float16 with bf16 weights (exact up to 2048)
    max_pairs_per_forward: int = Field(64, ge=1, le=1024)
    # Longest a call to the model service may take. BentoML's client keeps each call's timer (and with it the
    # request's context) alive for this long, so memory under load plateaus at about rate x timeout (bench/soak.py).
    model_timeout_s: int = Field(60, ge=1)
    # GPU speed levers (bench/NOTES.md); off until the GPU benchmark shows each one wins. Compiling happens
    # while the model loads (the service reports ready after it); its cache directory makes restarts fast.
    sam3_compile: Literal["off", "vision", "heads", "all"] = "off"
    sam3_compile_cache_dir: str | None = None
    sam3_jpeg_decode: Literal["cpu", "device"] = "cpu"
    # Each model worker keeps the vision trunk's output of recent images (by object identity and version) on its
    # device, so another prompt on the same photo skips decoding and the ViT. Bounded in MB; 0 turns it off; unset:
    # 1024 on a GPU (~100 full-size images in bf16 at 10.6 MB each), 256 on the CPU (~12 in fp32 at 21.2 MB each).
    image_cache_mb: int | None = Field(None, ge=0)

    # R2 (S3 API). With no endpoint and bucket, masks and images live under LOCAL_STORAGE_DIR.
    r2_endpoint: str | None = None
    r2_access_key_id: str | None = None
    r2_secret_access_key: SecretStr | None = None
    r2_bucket: str | None = None
    r2_public_base_url: str | None = None
    r2_presign_ttl_s: int = Field(0, ge=0, le=7 * 24 * 3600)
    r2_timeout_s: float = Field(10.0, gt=0)
    r2_max_attempts: int = Field(3, ge=1, le=10)
    local_storage_dir: str = "var/storage"

    # Supabase (service_role key; the backend only UPDATEs rows)
    supabase_url: str | None = None
    supabase_service_key: SecretStr | None = None
    supabase_table: str = "segmentation_results"
    supabase_timeout_s: float = Field(10.0, gt=0)

    # The edge
    api_secret_key: SecretStr | None = None
    sam3_env: str = "development"
    cors_origins: Annotated[list[str], NoDecode] = []
    request_timeout_s: int = Field(300, ge=1)
    max_concurrency: int = Field(256, ge=1)

    # Input limits
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_prompt_chars: int = Field(256, ge=1)
    max_batch_prompts: int = Field(32, ge=1)
    max_boxes: int = Field(16, ge=1)
    # The most mask megapixels (the sum of the prompts' max_instances x image megapixels: the full-resolution pixels
    # post-processing may render, backend/cost.py) one request may ask for; above it: 422 request_too_heavy.
    # 40,000 admits every everyday request up to 32 prompts x 100 instances on a 12 MP phone photo (4032x3024:
    # 39,000; full HD: 6,600; the 4000x3000 x 32 prompts: 38,400, served alone in slices), and refuses
    # e.g. 32 x 200 on that photo (78,000) or 32 x 100 on a 50 MP image (160,000). On the H100 post-processing
    # ran at ~20,000 MP/s with object-like masks (106 full-HD masks in 11 ms,
    # bench/results/2026-11-26-nvidia-h100-80gb-hbm3.json): 40,000 is ~2 s of GPU time, and ~53 s with the noisiest
    # masks measured (random weights, ~750 MP/s): still within MODEL_TIMEOUT_S. The 2-core CPU renders ~170 MP/s
    # idle and 15-60 MP/s when shared: lower it (or raise MODEL_TIMEOUT_S) on a CPU-only server.
    max_request_megapixels: float = Field(40_000, gt=0)
    # Above this many mask megapixels a request is served alone, through the model service's sliced API: its device
    # work runs in bounded units (post-processing in slices of one GPU pass) between which other batches run, so it
    # cannot hold the batch queue. At 2,500 every single-prompt request up to a 12 MP photo at 200 instances (2,440)
    # stays in the batches, and 32 prompts on full HD (6,600) go alone. Set it to MAX_REQUEST_MEGAPIXELS or more to
    # send everything through the batches (the old behaviour; bench/heavy_interleave.py compares the two).
    heavy_request_megapixels: float = Field(2_500, gt=0)

    # Webhooks (callback_url of async jobs): the origins a callback may target (empty = webhooks off) and the
    # Standard Webhooks signing secret (whsec_...), required when the list is not empty.
    webhook_allowed_origins: Annotated[list[str], NoDecode] = []
    webhook_secret: SecretStr | None = None
    webhook_timeout_s: float = Field(10.0, gt=0)
    webhook_max_attempts: int = Field(5, ge=1, le=20)
    webhook_backoff_s: float = Field(1.0, ge=0)

    # Video (POST /api/v1/predict/video, async only). The limits apply to what a task processes: the span between
    # start_s and end_s, at the sampled rate, after max_frames; a clip over a limit fails with video_too_long.
    max_video_bytes: int = Field(512 * 1024 * 1024, ge=1)  # the clip's file
    max_video_seconds: float = Field(600.0, gt=0)  # seconds of the clip processed
    max_video_frames: int = Field(3000, ge=1)  # frames processed
    max_video_pixels: int = Field(3840 * 2160, ge=1)  # pixels per frame
    video_max_fps: float = Field(30.0, gt=0)  # the default sample rate is the clip's own, capped at this
    video_timeout_s: int = Field(3600, ge=1)  # one video task's run, as REQUEST_TIMEOUT_S is an image task's
    video_progress_interval_s: float = Field(2.0, ge=0)  # the row's progress is written at most this often
    video_sessions: int = Field(2, ge=1, le=16)  # clips one model worker tracks at once; more wait their turn
    # the gateway renews a running clip every third of this; a clip not renewed (its gateway worker was killed)
    # stops in the model at its next frame
    video_lease_s: float = Field(30.0, ge=1)

    # Async jobs ("async": true): a SQLite (WAL) store shared by the gateway workers of one box (jobs/).
    job_store_path: str = "var/jobs.sqlite3"
    # normal: a commit survives the process being killed (kill -9), not a power loss; full: fsync every commit
    job_store_synchronous: Literal["normal", "full"] = "normal"
    max_queued_jobs: int = Field(1000, ge=1)
    job_concurrency: int = Field(16, ge=1, le=256)  # jobs one gateway worker runs at once
    job_queue_timeout_s: int = Field(600, ge=1)  # a job waiting longer fails with queue_timeout
    job_lease_s: int = Field(30, ge=2)  # a running job's lease, renewed every third of it; expired = interrupted
    job_shutdown_grace_s: int = Field(20, ge=0)  # on SIGTERM, running jobs get this long to finish
    job_drain_on_shutdown: bool = False  # on SIGTERM, fail queued jobs (interrupted) instead of keeping them
    task_retention_s: int = Field(86_400, ge=60)  # finished jobs stay readable at /api/v1/tasks/{id} this long
    job_sweep_interval_s: int = Field(60, ge=1)  # how often one worker per box fails rows left processing

    @field_validator("cors_origins", "webhook_allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("image_cache_mb", mode="before")
    @classmethod
    def _empty_is_the_default(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _check_webhooks(self) -> Settings:
        CallbackPolicy(self.webhook_allowed_origins)
        secret = self.webhook_secret.get_secret_value() if self.webhook_secret else ""
        if secret:
            try:
                check_secret(secret)
            except ValueError as exc:
                raise ValueError(f"WEBHOOK_SECRET: {exc}") from None
        elif self.webhook_allowed_origins:
            raise ValueError("WEBHOOK_ALLOWED_ORIGINS is set but WEBHOOK_SECRET is empty: webhooks must be signed")
        return self

    @property
    def production(self) -> bool:
        return self.sam3_env.lower() in ("production", "prod")

    @property
    def retry_after_s(self) -> int:
        """The Retry-After of a 429 model_busy: the batch queue sheds requests whose predicted wait exceeds
        MAX_LATENCY_MS, so about that long drains it."""
        return max(1, math.ceil(self.max_latency_ms / 1000))

    def image_cache_bytes(self, device_type: str) -> int:
        """IMAGE_CACHE_MB in bytes, or the default for a model on `device_type` ("cuda", "cpu")."""
        megabytes = self.image_cache_mb
        if megabytes is None:
            megabytes = GPU_IMAGE_CACHE_MB if device_type == "cuda" else CPU_IMAGE_CACHE_MB
        return megabytes * 1024 * 1024

    @property
    def r2_configured(self) -> bool:
        return bool(self.r2_endpoint and self.r2_bucket)

    @property
    def supabase_configured(self) -> bool:
        return bool(self.supabase_url and self.supabase_service_key)

    @property
    def job_lifetime_s(self) -> int:
        """The longest an accepted job can last: waiting, running (an image task's or a video task's limit, whichever
        is longer), then its lease expiring."""
        return self.job_queue_timeout_s + max(self.request_timeout_s, self.video_timeout_s) + self.job_lease_s

    @property
    def stale_processing_after_s(self) -> int:
        """A row `processing` for longer than this was left by a server that died: the sweeper fails it."""
        return self.job_lifetime_s + self.request_timeout_s

    def secrets(self) -> list[str]:
        """Values that must never appear in a log line or a response body."""
        values = [
            self.hf_token,
            self.r2_secret_access_key,
            self.supabase_service_key,
            self.api_secret_key,
            self.webhook_secret,
        ]
        return [value.get_secret_value() for value in values if value and value.get_secret_value()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
