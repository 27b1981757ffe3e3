"""X-API-Key on every gateway route except health, metrics and the docs page's static assets, compared in constant
time."""

from __future__ import annotations

import hmac
import json

from fastapi.security import APIKeyHeader

OPEN_PATHS = frozenset({"/health", "/livez", "/healthz", "/readyz", "/metrics"})
# Swagger UI's own JS, CSS and icon: public static files, so the docs page renders in a browser (served from the
# installed fastapi-offline package; the page itself and openapi.json still need the key).
DOCS_ASSETS_PREFIX = "/api/v1/docs/assets"
# Declares the key in the OpenAPI schema (Swagger's "Authorize" button). It checks nothing: ApiKeyMiddleware does.
API_KEY_SCHEME = APIKeyHeader(
    name="X-API-Key", scheme_name="ApiKey", auto_error=False, description="The API_SECRET_KEY the Edge function sends"
)
_UNAUTHORIZED = json.dumps(
    {"error": {"code": "unauthorized", "message": "missing or invalid X-API-Key header"}}
).encode()


class ApiKeyMiddleware:
    """Plain ASGI, so it guards BentoML's own routes and the mounted API alike. No key configured = dev mode."""

    def __init__(self, app, api_key: str | None = None) -> None:
        self.app = app
        self._key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 401,
                "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"X-API-Key")],
            }
        )
        await send({"type": "http.response.body", "body": _UNAUTHORIZED})

    def _allowed(self, scope) -> bool:
        if self._key is None or scope["type"] != "http":
            return True
        if scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return True
        if scope["method"] in ("GET", "HEAD") and scope["path"].startswith(DOCS_ASSETS_PREFIX + "/"):
            return True
        supplied = next((value for name, value in scope["headers"] if name == b"x-api-key"), b"")
        return hmac.compare_digest(supplied, self._key)
