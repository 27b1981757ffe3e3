"""When the model service stops an item early: the gateway cancelled it, or its deadline passed.

Each item carries a `request_id` and an absolute `deadline` (wall clock, the gateway's send time + MODEL_TIMEOUT_S;
the gateway's and model service's clocks must agree, as NTP keeps them). The gateway sends `cancel(request_ids)`
when its caller has gone; the model service remembers those ids for a bounded time and stops the items at their
next stage boundary. With several model workers a cancel may reach a worker other than the one running the item:
that worker remembers it in vain, and the item's deadline still bounds the work spent on it.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

CANCELLED = "cancelled"
TIMED_OUT = "inference_timeout"
MESSAGES = {
    CANCELLED: "cancelled: the gateway gave up on this request",
    TIMED_OUT: "the model did not finish this request before its deadline (MODEL_TIMEOUT_S); it was stopped",
}
MAX_REMEMBERED = 100_000  # ~10 MB of ids; far more than a worker sees within one TTL


class CancelledRequests:
    """Request ids the gateway gave up on, each remembered for `ttl_s` (by then its deadline has passed too)."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._expiry: OrderedDict[str, float] = OrderedDict()  # in expiry order: the TTL is the same for all
        self._lock = threading.Lock()

    def add(self, request_ids: list[str]) -> None:
        now = time.monotonic()
        with self._lock:
            for request_id in request_ids:
                self._expiry[request_id] = now + self._ttl_s
                self._expiry.move_to_end(request_id)
            while self._expiry and (len(self._expiry) > MAX_REMEMBERED or next(iter(self._expiry.values())) < now):
                self._expiry.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        with self._lock:
            expiry = self._expiry.get(request_id)
        return expiry is not None and expiry >= time.monotonic()


class Leases:
    """Long requests (a clip) their caller keeps alive: each is held for `ttl_s` from its start and from each
    renewal; one not renewed in time was left by a caller that died without a word (kill -9, out of memory), which
    no `cancel` will ever report."""

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def hold(self, request_id: str) -> None:
        with self._lock:
            self._expiry[request_id] = time.monotonic() + self._ttl_s

    def renew(self, request_ids: list[str]) -> None:
        """Only requests still held: a renewal that arrives after the request ended holds nothing."""
        now = time.monotonic()
        with self._lock:
            for request_id in request_ids:
                if request_id in self._expiry:
                    self._expiry[request_id] = now + self._ttl_s

    def release(self, request_id: str) -> None:
        with self._lock:
            self._expiry.pop(request_id, None)

    def expired(self, request_id: str) -> bool:
        with self._lock:
            expiry = self._expiry.get(request_id)
        return expiry is not None and expiry < time.monotonic()


def abandoned(item: dict, cancelled: CancelledRequests) -> str | None:
    """Why nobody wants this item's result any more (CANCELLED or TIMED_OUT), or None while it is wanted."""
    if item.get("request_id") in cancelled:
        return CANCELLED
    deadline = item.get("deadline")
    if deadline is not None and time.time() > deadline:
        return TIMED_OUT
    return None
