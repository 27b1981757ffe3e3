"""Request paths the gateway's own middlewares treat apart: the probes, and paths with a control character.

The probes (BentoML's /livez, /readyz, /healthz, /metrics, and our /health) answer without an API key and are never
refused for MAX_CONCURRENCY (backend/auth.py, backend/concurrency.py), as BentoML's own limit skips them.

A path with a control character inside gets the contract's 404 body.

Starlette's path patterns (`.*`) stop at a newline, so a path like `/api/v1/tasks/x%0Ay` matches no route, not
even the catch-all that answers unknown routes with the error shape: the router would answer a plain-text
"Not Found". No route of ours has a control character in it, so such a request is refused before routing.
"""

from __future__ import annotations

import re

from backend.errors import error_response

PROBE_PATHS = frozenset({"/health", "/livez", "/healthz", "/readyz", "/metrics"})
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


class ControlCharacterPaths:
    """Plain ASGI middleware: 404 not_found for any path holding a control character."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not _CONTROL_CHARACTERS.search(scope["path"]):
            await self.app(scope, receive, send)
            return
        await error_response(404, "not_found", "no such route")(scope, receive, send)
