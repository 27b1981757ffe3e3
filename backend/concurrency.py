"""At most MAX_CONCURRENCY requests in one gateway worker at once; one more is answered `429 too_many_requests`
in the contract's error shape, with Retry-After, before anything is read or written (the row untouched).

BentoML's own `traffic.max_concurrency` would answer `{"error": "Too many requests"}` (not the contract's shape), so
the gateway leaves it unset and limits here. Probes and metrics (backend/paths.PROBE_PATHS) are never refused.
"""

from __future__ import annotations

from backend.errors import error_response
from backend.paths import PROBE_PATHS

RETRY_AFTER_S = 1


class ConcurrencyLimit:
    """Plain ASGI, outermost of the gateway's own middlewares: an overloaded worker refuses before checking keys."""

    def __init__(self, app, max_concurrency: int) -> None:
        self.app = app
        self._max = max_concurrency
        self._running = 0
        self._message = (
            f"this server already handles {max_concurrency} requests (MAX_CONCURRENCY); retry in {RETRY_AFTER_S} s"
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        if self._running >= self._max:
            refusal = error_response(429, "too_many_requests", self._message, {"Retry-After": str(RETRY_AFTER_S)})
            await refusal(scope, receive, send)
            return
        self._running += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._running -= 1
