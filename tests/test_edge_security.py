"""Auth, production mode and secret redaction, in process."""

from __future__ import annotations

import logging

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from backend.auth import ApiKeyMiddleware
from backend.redaction import REDACTED, SecretRedactor
from backend.settings import Settings
from backend.wiring import check_auth


def guarded_app(key: str | None) -> TestClient:
    async def ok(request):
        return PlainTextResponse("ok")

    app = Starlette(routes=[Route("/api/v1/info", ok, methods=["GET", "OPTIONS"]), Route("/health", ok)])
    return TestClient(ApiKeyMiddleware(app, api_key=key))


def test_key_is_required_except_on_open_paths():
    client = guarded_app("s3cret-key")
    assert client.get("/api/v1/info").status_code == 401
    assert client.get("/api/v1/info").json()["error"]["code"] == "unauthorized"
    assert client.get("/api/v1/info", headers={"X-API-Key": "s3cret-kez"}).status_code == 401
    assert client.get("/api/v1/info", headers={"X-API-Key": "s3cret-key"}).status_code == 200
    assert client.get("/health").status_code == 200
    assert client.options("/api/v1/info").status_code == 200  # CORS preflight


def test_dev_mode_lets_everything_through_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        key = check_auth(Settings(api_secret_key=None, sam3_env="development", _env_file=None))
    assert key is None and "DEV MODE" in caplog.text
    assert guarded_app(key).get("/api/v1/info").status_code == 200


def test_production_refuses_to_start_without_a_key():
    with pytest.raises(RuntimeError, match="API_SECRET_KEY"):
        check_auth(Settings(api_secret_key=None, sam3_env="production", _env_file=None))
    assert check_auth(Settings(api_secret_key="k" * 16, sam3_env="production", _env_file=None)) == "k" * 16


def test_secrets_are_redacted_from_log_records():
    settings = Settings(
        api_secret_key="api-key-123456",
        r2_secret_access_key="r2-secret-abcdef",
        supabase_service_key="eyJsupabase.service.key",
        _env_file=None,
    )
    record = logging.LogRecord(
        "x", logging.ERROR, __file__, 1, "failed with %s and %s", ("r2-secret-abcdef", "eyJsupabase.service.key"), None
    )
    SecretRedactor(settings.secrets()).filter(record)
    assert record.getMessage() == f"failed with {REDACTED} and {REDACTED}"
