"""Auth, production mode, secret redaction and exposure, in process; and the Makefile's `make serve`."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from backend.auth import ApiKeyMiddleware
from backend.redaction import REDACTED, SecretRedactor
from backend.settings import Settings
from backend.wiring import check_auth, check_exposure

ROOT = Path(__file__).resolve().parent.parent


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


SECRETS = {
    "API_SECRET_KEY": "s3cret-api-key-1",
    "HF_TOKEN": "hf_s3cretTokenValue",
    "R2_SECRET_ACCESS_KEY": "r2-s3cret-access-key",
    "SUPABASE_SERVICE_KEY": "eyJs3cret.service.key",
}


def make_serve(tmp_path: Path, *make_args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """The real `make serve` recipe, with a stand-in virtualenv whose `python` records its arguments and exits."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    argv_file = tmp_path / "argv"
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{argv_file}'\n")
    python.chmod(0o755)
    (venv / ".installed").touch()  # newer than requirements.txt and pyproject.toml: setup has nothing to do
    run = subprocess.run(
        ["make", "--no-print-directory", "serve", f"VENV={venv}", *make_args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run, argv_file.read_text().splitlines()


def test_make_serve_prints_no_secret(tmp_path):
    run, _ = make_serve(tmp_path, env=SECRETS)
    output = run.stdout + run.stderr
    assert "auth    : X-API-Key required" in output
    for name, value in SECRETS.items():
        assert value not in output, f"make serve printed {name}"


def test_make_serve_says_dev_mode_without_a_key(tmp_path):
    run, _ = make_serve(tmp_path, env={"API_SECRET_KEY": ""})
    assert "auth    : none (dev mode)" in run.stdout


def test_make_serve_binds_loopback_unless_told_otherwise(tmp_path):
    run, argv = make_serve(tmp_path / "default", env={"HOST": "my-laptop"})  # some shells export HOST
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "on http://127.0.0.1:3000" in run.stdout
    run, argv = make_serve(tmp_path / "all", "HOST=0.0.0.0", "PORT=3100", env={})
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "3100"
    assert "on http://0.0.0.0:3100" in run.stdout


def test_dev_mode_refuses_to_listen_beyond_loopback():
    for hosts in (["127.0.0.1"], ["::1"], ["127.0.0.2"], []):
        check_exposure(None, hosts)
    for hosts in (["0.0.0.0"], ["::"], ["192.168.1.20"], ["127.0.0.1", "10.0.0.5"]):
        with pytest.raises(RuntimeError, match="DEV MODE.*API_SECRET_KEY"):
            check_exposure(None, hosts)
        check_exposure("a-key", hosts)  # with a key, any address
