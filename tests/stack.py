"""Real stand-ins for R2 (SeaweedFS) and Supabase (PostgreSQL + PostgREST + nginx), started by the project's
own scripts on 127.0.0.1 and free ports, and stopped by PID."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from contextlib import contextmanager
from pathlib import Path

import boto3
import psycopg
from botocore.config import Config

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts" / "local-stack"
STACK_API_KEY = "stack-test-key-9876543210"


def _exports(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            values[name] = value
    return values


@contextmanager
def running(script: str, workdir: Path):
    """Start a stack script, yield its exported variables, stop it (by the PIDs it recorded) afterwards."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    started = subprocess.run(
        [str(SCRIPTS / script), "start", str(workdir)], capture_output=True, text=True, timeout=180, env=env
    )
    try:
        if started.returncode != 0:
            raise RuntimeError(f"{script} failed ({started.returncode}):\n{started.stdout}\n{started.stderr}")
        yield _exports(started.stdout)
    finally:
        stop(script, workdir)


def stop(script: str, workdir: Path) -> None:
    subprocess.run([str(SCRIPTS / script), "stop", str(workdir), "--clean"], capture_output=True, timeout=120)


def r2_settings(r2: dict[str, str], **overrides: str) -> dict[str, str]:
    """The backend's environment for an S3 stand-in."""
    return {
        "R2_ENDPOINT": r2["R2_ENDPOINT_URL"],
        "R2_ACCESS_KEY_ID": r2["R2_ACCESS_KEY_ID"],
        "R2_SECRET_ACCESS_KEY": r2["R2_SECRET_ACCESS_KEY"],
        "R2_BUCKET": r2["R2_BUCKET"],
        **overrides,
    }


def supabase_settings(supabase: dict[str, str]) -> dict[str, str]:
    return {"SUPABASE_URL": supabase["SUPABASE_URL"], "SUPABASE_SERVICE_KEY": supabase["SUPABASE_SERVICE_ROLE_KEY"]}


def s3_client(r2: dict[str, str], secret: str | None = None):
    return boto3.client(
        "s3",
        endpoint_url=r2["R2_ENDPOINT_URL"],
        aws_access_key_id=r2["R2_ACCESS_KEY_ID"],
        aws_secret_access_key=secret or r2["R2_SECRET_ACCESS_KEY"],
        region_name="auto",
        config=Config(signature_version="s3v4", retries={"max_attempts": 1}),
    )


def new_task_row(supabase: dict[str, str], status: str = "pending") -> tuple[str, str]:
    """A fresh segmentation_results row as the Edge would create it: (task_id, user_id)."""
    task_id, user_id = str(uuid.uuid4()), str(uuid.uuid4())
    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        db.execute("insert into auth.users (id, email) values (%s, %s)", (user_id, f"{user_id}@example.com"))
        db.execute(
            "insert into segmentation_results (id, user_id, image_url, status) values (%s, %s, %s, %s)",
            (task_id, user_id, "images/in.png", status),
        )
    return task_id, user_id


def task_row(supabase: dict[str, str], task_id: str) -> dict:
    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        cursor = db.execute("select * from segmentation_results where id = %s", (task_id,))
        columns = [column.name for column in cursor.description]
        row = cursor.fetchone()
    return dict(zip(columns, row, strict=True)) if row else {}
