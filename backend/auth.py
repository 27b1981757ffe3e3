"""X-API-Key on every gateway route except health, metrics and the API's documentation, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi.security import APIKeyHeader

from backend.errors import error_response
from backend.paths import PROBE_PATHS

# The documentation is public (GET/HEAD only), so a browser can open Swagger UI and send the key through its
# "Authorize" button: the page, the schema (it holds no secret) and Swagger UI's own JS, CSS and icon, served from
# the installed fastapi-offline package. Every operation the page calls still needs the key.
DOCS_PATHS = frozenset({"/api/v1/docs", "/api/v1/openapi.json"})
DOCS_ASSETS_PREFIX = "/api/v1/docs/assets"
# Declares the key in the OpenAPI schema (Swagger's "Authorize" button). It checks nothing: ApiKeyMiddleware does.
API_KEY_SCHEME = APIKeyHeader(
    name="X-API-Key", scheme_name="ApiKey", auto_error=False, description="The API_SECRET_KEY the Edge function sends"
)


class ApiKeyMiddleware:
    """Plain ASGI, so it guards BentoML's own routes and the mounted API alike. No key configured = dev mode."""

    def __init__(self, app, api_key: str | None = None) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if self._allowed(scope):
            await self.app(scope, receive, send)
            return
        refusal = error_response(
            401, "unauthorized", "missing or invalid X-API-Key header", {"WWW-Authenticate": "X-API-Key"}
        )
        await refusal(scope, receive, send)

    def _allowed(self, scope) -> bool:
        if self._key is None or scope["type"] != "http":
            return True
        if scope["method"] == "OPTIONS" or scope["path"] in PROBE_PATHS:
            return True
        if scope["method"] in ("GET", "HEAD") and (
            scope["path"] in DOCS_PATHS or scope["path"].startswith(DOCS_ASSETS_PREFIX + "/")
        ):
            return True
        supplied = next((value for name, value in scope["headers"] if name == b"x-api-key"), b"")
        return hmac.compare_digest(supplied, self._key)
