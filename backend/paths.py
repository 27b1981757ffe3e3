"""Request paths with a control character inside get the contract's 404 body.

Starlette's path patterns (`.*`) stop at a newline, so a path like `/api/v1/tasks/x%0Ay` matches no route, not
even the catch-all that answers unknown routes with the error shape: the router would answer a plain-text
"Not Found". No route of ours has a control character in it, so such a request is refused before routing.
"""

from __future__ import annotations

import re

from backend.errors import error_response

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
