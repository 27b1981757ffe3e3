"""Signed webhook delivery with bounded retries (Standard Webhooks, https://www.standardwebhooks.com).

Each attempt is one POST of the same bytes: the payload as compact JSON, serialized once. Headers per the spec:
`webhook-id` (the message id, the same on every retry so the receiver can deduplicate), `webhook-timestamp`
(integer Unix seconds of this attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256 of
"{id}.{timestamp}.{body}">`, made by the `standardwebhooks` package). A fresh timestamp, and with it a fresh
signature, per attempt is what the spec prescribes: receivers reject timestamps older than a few minutes.

Outcome of one attempt (the spec's "Delivery success and failure"): 2xx delivered; 3xx failed, the redirect is not
followed; 408, 429 and 5xx, timeouts and connection errors are retried after an exponential backoff with jitter
(at least the server's Retry-After, both capped at MAX_DELAY_S); any other 4xx failed at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import math
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
from standardwebhooks import Webhook

# The longest wait between two attempts, whatever the backoff or the receiver's Retry-After say.
MAX_DELAY_S = 60.0
SECRET_PREFIX = "whsec_"
# The spec: a symmetric key is random, at least 24 bytes (192 bits), at most 64 bytes (512 bits).
SECRET_BYTES = (24, 64)
# The signed content is "{id}.{timestamp}.{body}": an id with a '.' would make it ambiguous (the spec).
_MESSAGE_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")
_RETRIED_STATUS = frozenset({408, 429})


@dataclass
class DeliveryState:
    """Where one webhook delivery stands; `as_dict()` is the `webhook` object of the task status body.

    status: "pending" until the last attempt, then "delivered" (a 2xx) or "failed". last_status_code and
    last_error describe the latest attempt (None when it got a 2xx, or no response at all for the status code).
    delivered_at: ISO 8601 UTC time of the 2xx, else None.
    """

    url: str
    status: Literal["pending", "delivered", "failed"] = "pending"
    attempts: int = 0
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_secret(secret: str) -> None:
    """Raise ValueError unless `secret` is `whsec_` + base64 of 24 to 64 bytes (the spec's secret format)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"the webhook secret must start with {SECRET_PREFIX!r}")
    encoded = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"the webhook secret must be {SECRET_PREFIX!r} followed by base64") from None
    if not SECRET_BYTES[0] <= len(key) <= SECRET_BYTES[1]:
        raise ValueError(f"the webhook secret must encode {SECRET_BYTES[0]} to {SECRET_BYTES[1]} random bytes")


class WebhookSender:
    """Delivers one payload to one URL, retrying as the module docstring says.

    secret: `whsec_<base64>` (check_secret; ValueError otherwise). timeout_s: limit on one attempt, from connecting
    to the response headers (the body is not read). max_attempts: attempts per delivery, >= 1. backoff_s: the wait
    before the first retry; it doubles for each further one, with jitter (a random 50-100 % of it).
    """

    def __init__(self, secret: str, timeout_s: float, max_attempts: int, backoff_s: float) -> None:
        check_secret(secret)
        if timeout_s <= 0 or max_attempts < 1 or backoff_s < 0:
            raise ValueError("timeout_s must be > 0, max_attempts >= 1 and backoff_s >= 0")
        self._webhook = Webhook(secret)
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._ssl = httpx.create_ssl_context()

    async def deliver(
        self,
        url: str,
        payload: dict[str, Any],
        message_id: str,
        on_attempt: Callable[[DeliveryState], Awaitable[None]] | None = None,
    ) -> DeliveryState:
        """POST `payload` to `url` (already checked by CallbackPolicy) until delivered or out of attempts.

        message_id: the `webhook-id`, letters, digits, '_' and '-' (ValueError otherwise); keep it the same for
        every delivery of one event. on_attempt gets a copy of the state after each attempt; the last call carries
        the final status. Returns the final state; delivery failures never raise (exceptions from on_attempt and
        a payload that is not JSON-serializable do).
        """
        if not _MESSAGE_ID.fullmatch(message_id):
            raise ValueError("message_id must be 1-256 letters, digits, '_' or '-'")
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        state = DeliveryState(url=url)
        async with httpx.AsyncClient(verify=self._ssl, follow_redirects=False, timeout=self._timeout_s) as client:
            while True:
                retry, retry_after_s = await self._attempt(client, body, message_id, state)
                if state.status == "pending" and (not retry or state.attempts >= self._max_attempts):
                    state.status = "failed"
                if on_attempt is not None:
                    await on_attempt(replace(state))
                if state.status != "pending":
                    return state
                await asyncio.sleep(self._delay_s(state.attempts, retry_after_s))

    async def _attempt(
        self, client: httpx.AsyncClient, body: str, message_id: str, state: DeliveryState
    ) -> tuple[bool, float | None]:
        """One signed POST; records it in `state`. Returns (worth retrying, the receiver's Retry-After in s)."""
        state.attempts += 1
        state.last_status_code = state.last_error = None
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "webhook-id": message_id,
            "webhook-timestamp": str(math.floor(now.timestamp())),
            "webhook-signature": self._webhook.sign(message_id, now, body),
        }
        try:
            async with (
                asyncio.timeout(self._timeout_s),
                client.stream("POST", state.url, content=body.encode(), headers=headers) as response,
            ):
                status, retry_after = response.status_code, response.headers.get("retry-after")
        except (TimeoutError, httpx.TimeoutException):
            state.last_error = f"no response within {self._timeout_s:g} s"
            return True, None
        except httpx.TransportError as exc:
            state.last_error = f"connection failed: {exc or type(exc).__name__}"
            return True, None
        state.last_status_code = status
        if 200 <= status < 300:
            state.status = "delivered"
            state.delivered_at = datetime.now(UTC).isoformat(timespec="milliseconds")
            return False, None
        if 300 <= status < 400:
            state.last_error = f"HTTP {status}: redirects are not followed"
            return False, None
        state.last_error = f"HTTP {status}"
        if status in _RETRIED_STATUS or status >= 500:
            return True, _retry_after_s(retry_after)
        return False, None

    def _delay_s(self, attempts: int, retry_after_s: float | None) -> float:
        backoff = min(MAX_DELAY_S, self._backoff_s * 2 ** (attempts - 1))
        return max(random.uniform(backoff / 2, backoff), min(retry_after_s or 0.0, MAX_DELAY_S))


def _retry_after_s(value: str | None) -> float | None:
    """Retry-After (RFC 9110 section 10.2.3) in seconds from now: delay-seconds or an HTTP-date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
