"""The gateway's calls to the model service, and what a failed call means to the caller.

BentoML's clients fail in four ways; each gets its own answer, so that a 503 means only "the model is down or
loading" (tests/test_model_client.py serves a stand-in to produce each one, through both clients). The served
gateway's `bentoml.depends(...).to_async` is RemoteProxy's client (`_bentoml_impl/client/proxy2.py`, aiohttp in
1.4.40); BentoML's HTTP client (`_bentoml_impl/client/http.py`) is httpx.

- the service cannot be reached (down, restarting, its worker died mid-call): a connection error (aiohttp's
  ClientConnectionError, httpx's TransportError) -> 503 model_unavailable, retry;
- the service answered 503: its adaptive batcher dropped the request because the queue's predicted latency
  exceeds MAX_LATENCY_MS (the only 503 BentoML's service app gives an API call) -> 429 model_busy with Retry-After:
  the model is up but overloaded;
- the service answered 504 (its traffic timeout, MODEL_TIMEOUT_S) or the client's own timer ran out
  (TimeoutError from aiohttp, httpx.TimeoutException) -> 504 inference_timeout;
- the service answered another error: 500 when the API raised -> 500 inference_failed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from bentoml.exceptions import BentoMLException

from backend.errors import ApiError
from backend.protocol import addressed

log = logging.getLogger(__name__)


class ModelClient:
    """`remote` is BentoML's async client of the model service (`bentoml.depends(Sam3Model).to_async`)."""

    def __init__(self, remote: Any, timeout_s: float, retry_after_s: int, renew_every_s: float) -> None:
        """renew_every_s: how often a clip being read is renewed (VIDEO_LEASE_S / 3)."""
        self._remote = remote
        self._timeout_s = timeout_s
        self._retry_after_s = retry_after_s
        self._renew_every_s = renew_every_s
        self._cancels: set[asyncio.Task] = set()

    async def segment(self, item: dict, sliced: bool) -> dict:
        """One item through the batched API, or alone through the sliced one: the model service's outcome, or the
        contract's ApiError.

        The item goes with a request id and a deadline (now + MODEL_TIMEOUT_S); if this call is cancelled (the
        caller disconnected, the request timed out, shutdown), the model service is told to stop the item.
        """
        request_id = uuid.uuid4().hex
        sent = addressed(item, request_id, time.time() + self._timeout_s)
        try:
            # The model service's own traffic timeout is VIDEO_TIMEOUT_S (a clip streams for minutes): an image
            # item's limit is kept here.
            async with asyncio.timeout(self._timeout_s):
                if sliced:
                    return await self._remote.segment_sliced(sent)
                return (await self._remote.segment([sent]))[0]
        except asyncio.CancelledError:
            self._cancel_soon([request_id])
            raise
        except TimeoutError:  # its deadline has passed too: the model service stops it there (counted timed_out)
            raise self._timed_out() from None
        except Exception as exc:  # the client raises transport and HTTP errors of many kinds
            raise self._error(exc) from None

    async def track_video(self, clip: Path, request: dict, timeout_s: float) -> AsyncIterator[dict]:
        """The model service's messages for one clip (backend/video_worker.py), as they come: `frame` per frame
        processed, then `end`, or `error`. The request goes with a request id and a deadline (now + `timeout_s`);
        if this iteration is cancelled or abandoned, the model service is told to stop at its next frame."""
        request_id = uuid.uuid4().hex
        sent = addressed(request, request_id, time.time() + timeout_s)
        buffered = ""
        finished = False
        renewing = asyncio.get_running_loop().create_task(self._renew_while_read(request_id))
        try:
            async for chunk in self._remote.track_video(clip=clip, request=sent):
                buffered += chunk
                *lines, buffered = buffered.split("\n")
                for line in lines:
                    if line:
                        message = json.loads(line)
                        finished = message["type"] in ("end", "error")
                        yield message
        except (asyncio.CancelledError, GeneratorExit):
            self._cancel_soon([request_id])
            raise
        except Exception as exc:  # the client raises transport and HTTP errors of many kinds
            raise self._error(exc) from None
        finally:
            renewing.cancel()
        if not finished:  # the stream ended without its last message: the model worker went away mid-clip
            raise _unavailable()

    async def _renew_while_read(self, request_id: str) -> None:
        """The clip's lease in the model service (backend/cancellation.py, Leases): renewed while this process
        reads it; if this process dies, the renewals stop and so does the clip."""
        while True:
            await asyncio.sleep(self._renew_every_s)
            try:
                await self._remote.renew(request_ids=[request_id])
            except Exception as exc:  # a missed renewal is retried; the lease outlasts two of them
                log.warning("could not renew a clip's lease: %s", type(exc).__name__)

    def _cancel_soon(self, request_ids: list[str]) -> None:
        """Fire and forget, in a task of its own: the cancellation that brought us here must not stop it."""
        task = asyncio.get_running_loop().create_task(self._cancel(request_ids))
        self._cancels.add(task)
        task.add_done_callback(self._cancels.discard)

    async def _cancel(self, request_ids: list[str]) -> None:
        try:
            await self._remote.cancel(request_ids=request_ids)
        except Exception as exc:  # the item's deadline still bounds the work: log and move on
            log.warning("could not cancel %d model request(s): %s", len(request_ids), type(exc).__name__)

    def _error(self, exc: Exception) -> ApiError:
        """A failed call -> the contract's error (see the module docstring)."""
        log.error("the model service call failed: %s %s", type(exc).__name__, getattr(exc, "error_code", ""))
        if isinstance(exc, httpx.ConnectTimeout | aiohttp.ConnectionTimeoutError):
            return _unavailable()
        if isinstance(exc, httpx.TimeoutException | TimeoutError):
            return self._timed_out()
        if isinstance(exc, httpx.TransportError | aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
            return _unavailable()
        status = exc.error_code if isinstance(exc, BentoMLException) else None
        if status == HTTPStatus.SERVICE_UNAVAILABLE:
            return ApiError(
                429,
                "model_busy",
                f"the model is busy with other requests; retry in {self._retry_after_s} s",
                headers={"Retry-After": str(self._retry_after_s)},
            )
        if status == HTTPStatus.GATEWAY_TIMEOUT:
            return self._timed_out()
        return ApiError(500, "inference_failed", "the model service failed on this request")

    def _timed_out(self) -> ApiError:
        return ApiError(
            504,
            "inference_timeout",
            f"the model did not finish this request within {self._timeout_s:g} s (MODEL_TIMEOUT_S); "
            "fewer prompts, a lower max_instances or a smaller image make it faster",
        )


def _unavailable() -> ApiError:
    return ApiError(503, "model_unavailable", "the model service is unavailable; retry shortly")
