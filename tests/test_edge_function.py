"""The example Supabase Edge Function (examples/edge-function) run for real under Deno, between a user and the served
Bento, with PostgREST standing in for Supabase and SeaweedFS for R2: the user's JWT creates the row, the backend
gets the job with "async": true, the row reaches `completed` and the mask is in the bucket."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from urllib.parse import urlsplit

import httpx
import jwt
import numpy as np
import psycopg
import pytest
from clips import write_clip
from PIL import Image
from served import free_port
from stack import ROOT, STACK_API_KEY, task_row

pytestmark = pytest.mark.stack

EDGE = ROOT / "examples" / "edge-function"
FUNCTION = EDGE / "supabase" / "functions" / "segment"
DENO = EDGE / "node_modules" / ".bin" / "deno"


@pytest.fixture(scope="module")
def edge_function(stack_server, supabase, tmp_path_factory):
    """`deno run` of the function with only the network hosts and variables it needs, on a free port."""
    assert DENO.exists(), "Deno is missing: run scripts/install-test-deps.sh"
    port = free_port()
    hosts = [f"127.0.0.1:{port}", urlsplit(supabase["SUPABASE_URL"]).netloc, urlsplit(stack_server.url).netloc]
    variables = {
        "SUPABASE_URL": supabase["SUPABASE_URL"],
        "SUPABASE_ANON_KEY": supabase["SUPABASE_ANON_KEY"],
        "SAM3_URL": stack_server.url,
        "SAM3_API_KEY": STACK_API_KEY,
    }
    command = [
        str(DENO),
        "run",
        "--check",
        "--cached-only",
        f"--allow-net={','.join(hosts)}",
        f"--allow-env={','.join(variables)}",
        "index.ts",
    ]
    env = {"DENO_DIR": str(EDGE / ".deno"), "DENO_SERVE_ADDRESS": f"tcp:127.0.0.1:{port}", "NO_COLOR": "1", **variables}
    log_path = tmp_path_factory.mktemp("edge-function") / "deno.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=FUNCTION, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert process.poll() is None, f"deno exited with {process.returncode}:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"the function did not listen:\n{log_path.read_text()}"
        try:
            httpx.get(url, timeout=2)
            break
        except httpx.TransportError:
            time.sleep(0.2)
    yield url
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=20)


def new_user(supabase: dict[str, str]) -> tuple[str, str]:
    """A signed-up user and their access token, as Supabase Auth would issue it: (user_id, jwt)."""
    user_id = str(uuid.uuid4())
    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        db.execute("insert into auth.users (id, email) values (%s, %s)", (user_id, f"{user_id}@example.com"))
    claims = {"sub": user_id, "role": "authenticated", "aud": "authenticated", "exp": int(time.time()) + 3600}
    return user_id, jwt.encode(claims, supabase["SUPABASE_JWT_SECRET"], algorithm="HS256")


def rows_of(supabase: dict[str, str], user_id: str) -> list[dict]:
    with psycopg.connect(supabase["SUPABASE_DB_URL"], autocommit=True) as db:
        cursor = db.execute("select * from segmentation_results where user_id = %s", (user_id,))
        columns = [column.name for column in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def segment(edge_function: str, token: str | None, body: dict) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(edge_function, json=body, headers=headers, timeout=60)


def finished_row(supabase: dict[str, str], task_id: str) -> dict:
    """The row once the backend has finished with it (what the app's Realtime subscription waits for)."""
    deadline = time.monotonic() + 120
    while (row := task_row(supabase, task_id))["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, f"the row stayed {row['status']}"
        time.sleep(0.2)
    return row


def test_the_app_gets_202_and_the_row_reaches_completed_with_the_mask_in_the_bucket(
    edge_function, supabase, r2, bucket
):
    user_id, token = new_user(supabase)
    response = segment(edge_function, token, {"image_key": "images/in.jpg", "prompt": "car"})
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued"
    (created,) = rows_of(supabase, user_id)
    assert created["id"] == uuid.UUID(accepted["task_id"]) and created["image_url"] == "images/in.jpg"

    row = finished_row(supabase, accepted["task_id"])
    assert row["status"] == "completed" and row["error_message"] is None
    found = row["result"]["results"][0]["num_instances"]
    assert row["labels"] == ["car"] * found
    key = f"masks/{user_id}/{accepted['task_id']}.png"
    assert row["mask_url"].endswith(key)
    mask = np.array(Image.open(io.BytesIO(bucket.get_object(Bucket=r2["R2_BUCKET"], Key=key)["Body"].read())))
    assert mask.shape == (90, 160) and set(np.unique(mask)) <= {0, 255}
    assert ((mask == 255).sum() > 0) == (found > 0)


def test_a_clip_goes_through_the_same_function_and_its_row_completes_with_the_tracks(
    edge_function, supabase, r2, bucket, tmp_path
):
    clip = write_clip(tmp_path / "clip.mp4", width=64, height=48, fps=10, frames=8)
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key="videos/edge.mp4", Body=clip.read_bytes())
    user_id, token = new_user(supabase)
    response = segment(edge_function, token, {"video_key": "videos/edge.mp4", "prompt": "square"})
    assert response.status_code == 202, response.text
    row = finished_row(supabase, response.json()["task_id"])
    assert row["status"] == "completed", row["error_message"]
    assert row["result"]["video"]["frames"] == 8 and "frames" not in row["result"]
    key = f"masks/{user_id}/{response.json()['task_id']}.video.json"
    assert row["mask_url"].endswith(key)
    stored = json.loads(bucket.get_object(Bucket=r2["R2_BUCKET"], Key=key)["Body"].read())
    assert [frame["frame_index"] for frame in stored["frames"]] == list(range(8))


def test_a_missing_image_marks_the_row_failed(edge_function, supabase):
    user_id, token = new_user(supabase)
    response = segment(edge_function, token, {"image_key": "images/nope.jpg", "prompt": "car"})
    assert response.status_code == 202, response.text
    row = finished_row(supabase, response.json()["task_id"])
    assert row["status"] == "failed" and row["error_message"].startswith("image_not_found")


def test_a_refused_request_reaches_the_app_with_the_backends_status_and_code(edge_function, supabase):
    user_id, token = new_user(supabase)
    response = segment(edge_function, token, {"image_key": "images/in.jpg", "prompt": "x" * 257})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "prompt_too_long"
    (row,) = rows_of(supabase, user_id)
    assert row["status"] == "pending"


@pytest.mark.parametrize("token", [None, "not-a-jwt", "forged"])
def test_without_the_users_valid_jwt_no_row_is_created(edge_function, supabase, token):
    user_id, _ = new_user(supabase)
    if token == "forged":
        claims = {"sub": user_id, "role": "authenticated", "exp": int(time.time()) + 3600}
        token = jwt.encode(claims, "another-secret-of-at-least-32-characters", algorithm="HS256")
    response = segment(edge_function, token, {"image_key": "images/in.jpg", "prompt": "car"})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert rows_of(supabase, user_id) == []


def test_the_function_is_lint_and_format_clean():
    for check in (["lint"], ["fmt", "--check"]):
        result = subprocess.run(
            [str(DENO), *check],
            cwd=FUNCTION,
            env={"DENO_DIR": str(EDGE / ".deno"), "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"deno {' '.join(check)}:\n{result.stdout}{result.stderr}"


def test_a_request_field_the_schema_lacks_is_a_type_error(tmp_path):
    """If the backend renamed `async`, the regenerated types would make the function fail to type-check."""
    copy = tmp_path / "segment"
    shutil.copytree(FUNCTION, copy)
    source = (copy / "index.ts").read_text()
    assert "    async: true,\n" in source
    (copy / "index.ts").write_text(source.replace("    async: true,\n", "    run_in_background: true,\n"))
    checked = subprocess.run(
        [str(DENO), "check", "--cached-only", "index.ts"],
        cwd=copy,
        env={"DENO_DIR": str(EDGE / ".deno"), "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode != 0 and "'run_in_background' does not exist" in checked.stdout + checked.stderr


def test_the_committed_types_are_what_the_served_schema_generates(stack_server):
    checked = subprocess.run(
        [str(EDGE / "generate-types.sh"), "--check", stack_server.url],
        env={**os.environ, "SAM3_API_KEY": STACK_API_KEY, "NO_COLOR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, f"run examples/edge-function/generate-types.sh:\n{checked.stdout}{checked.stderr}"


def test_the_insert_policy_lets_a_user_create_only_their_own_pending_row(supabase):
    user_id, token = new_user(supabase)
    someone_else, _ = new_user(supabase)
    rest = f"{supabase['SUPABASE_URL']}/rest/v1/segmentation_results"
    headers = {"apikey": supabase["SUPABASE_ANON_KEY"], "Authorization": f"Bearer {token}"}

    for refused in ({"user_id": someone_else}, {"status": "completed"}):
        response = httpx.post(rest, json={"image_url": "images/in.jpg", **refused}, headers=headers)
        assert response.status_code == 403, response.text
    created = httpx.post(
        rest, json={"image_url": "images/in.jpg"}, headers={**headers, "Prefer": "return=representation"}
    )
    assert created.status_code == 201 and created.json()[0]["user_id"] == user_id
    task_id = created.json()[0]["id"]
    updated = httpx.patch(f"{rest}?id=eq.{task_id}", json={"status": "completed"}, headers=headers)
    assert updated.status_code in (200, 204)
    assert task_row(supabase, task_id)["status"] == "pending"
    assert rows_of(supabase, someone_else) == []
