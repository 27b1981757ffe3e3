"""Video tasks end to end: clips written with PyAV into the S3 stand-in, a real `bentoml serve` (tiny random
Sam3VideoModel, the demo), the PostgREST stand-in's rows, and kill -9 of the real process group mid-clip."""

from __future__ import annotations

import io
import json
import os
import signal
import tempfile
import time
import uuid
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from clips import truncate, write_audio_only, write_clip
from pycocotools import mask as mask_utils
from served import ServedBento
from stack import STACK_API_KEY, new_task_row, r2_settings, supabase_settings, task_row

pytestmark = pytest.mark.stack
HEADERS = {"X-API-Key": STACK_API_KEY}
MAX_FRAMES = 100  # MAX_VIDEO_FRAMES of the module's server


def serve_env(r2, supabase, **settings: str) -> dict[str, str]:
    return {**r2_settings(r2), **supabase_settings(supabase), "API_SECRET_KEY": STACK_API_KEY, **settings}


@pytest.fixture(scope="module")
def server(r2, supabase, bucket, tmp_path_factory):
    directory = tmp_path_factory.mktemp("video-server")
    env = serve_env(r2, supabase, MAX_VIDEO_FRAMES=str(MAX_FRAMES), VIDEO_PROGRESS_INTERVAL_S="0")
    bento = ServedBento(env, directory / "serve.log").start()
    yield bento
    bento.stop()


@pytest.fixture(scope="module")
def clips(r2, bucket, tmp_path_factory) -> dict[str, str]:
    """Object keys of the clips the tests send."""
    directory = tmp_path_factory.mktemp("clips")
    made = {
        "plain": write_clip(directory / "plain.mp4", width=64, height=48, fps=10, frames=12),
        "rotated": write_clip(directory / "rotated.mp4", width=64, height=48, fps=10, frames=6, rotation=90),
        "long": write_clip(directory / "long.mp4", width=32, height=24, fps=30, frames=MAX_FRAMES + 20),
        "audio": write_audio_only(directory / "audio.m4a"),
    }
    made["truncated"] = truncate(made["plain"], directory / "truncated.mp4", keep=0.4)
    keys = {}
    for name, path in made.items():
        keys[name] = f"videos/{name}{path.suffix}"
        bucket.put_object(Bucket=r2["R2_BUCKET"], Key=keys[name], Body=path.read_bytes())
    return keys


def submit(server, supabase, **body) -> tuple[httpx.Response, str, str]:
    task_id, user_id = new_task_row(supabase)
    response = httpx.post(
        f"{server.url}/api/v1/predict/video",
        json={"user_id": user_id, "task_id": task_id, **body},
        headers=HEADERS,
        timeout=60,
    )
    return response, task_id, user_id


def wait_for(server, task_id: str, done=lambda status: status["status"] in ("completed", "failed"), timeout=240):
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = httpx.get(f"{server.url}/api/v1/tasks/{task_id}", headers=HEADERS, timeout=30).json()
        if done(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} did not get there in {timeout} s: {status}")


def run(server, supabase, **body) -> tuple[dict, str, str]:
    response, task_id, user_id = submit(server, supabase, **body)
    assert response.status_code == 202, response.text
    assert response.json()["status"] == "queued"
    return wait_for(server, task_id), task_id, user_id


def stored_json(r2, bucket, key: str) -> dict:
    return json.loads(bucket.get_object(Bucket=r2["R2_BUCKET"], Key=key)["Body"].read())


def test_a_clip_in_r2_becomes_tracked_objects_in_r2_and_the_row(server, supabase, r2, bucket, clips):
    status, task_id, user_id = run(server, supabase, video_url=clips["plain"], prompts=["red square", "blue square"])
    assert status["status"] == "completed", status
    result = status["result"]
    assert result["video"] == {"width": 64, "height": 48, "rotation": 0, "fps": 10.0, "frames": 12, "duration_s": 1.2}
    assert [frame["frame_index"] for frame in result["frames"]] == list(range(12))
    assert [frame["time_s"] for frame in result["frames"]] == pytest.approx([i / 10 for i in range(12)], abs=1e-3)
    assert status["progress"] == {"frames_done": 12, "frames_total": 12}

    # every object a frame shows is one of `objects`, whose first/last frames and labels agree with the frames
    seen: dict[int, list[int]] = {}
    for frame in result["frames"]:
        ids = [item["object_id"] for item in frame["objects"]]
        assert len(ids) == len(set(ids))
        for item in frame["objects"]:
            seen.setdefault(item["object_id"], []).append(frame["frame_index"])
            assert item["rle"]["size"] == [48, 64]
            mask = mask_utils.decode({"size": item["rle"]["size"], "counts": item["rle"]["counts"].encode()})
            assert int(mask.sum()) == item["area"] > 0
    assert seen, "the demo model tracks something"
    objects = {item["object_id"]: item for item in result["objects"]}
    assert set(objects) == set(seen)
    for object_id, frames in seen.items():
        assert (objects[object_id]["first_frame"], objects[object_id]["last_frame"]) == (frames[0], frames[-1])
        assert objects[object_id]["label"] in ("red square", "blue square")
    assert result["labels"] == [item["label"] for item in result["objects"]]

    # the same result in R2 at the row's mask_url; the row has the summary without frames
    assert result["result_key"] == f"masks/{user_id}/{task_id}.video.json"
    stored = stored_json(r2, bucket, result["result_key"])
    assert {key: value for key, value in stored.items() if key != "timings"} == {
        key: value for key, value in result.items() if key != "timings"
    }
    row = task_row(supabase, task_id)
    assert row["status"] == "completed" and row["mask_url"] == result["result_url"]
    assert row["labels"] == result["labels"]
    assert "frames" not in row["result"] and row["result"]["objects"] == result["objects"]
    assert info(server)["video"] is True


def test_a_rotated_phone_clip_is_tracked_upright(server, supabase, clips):
    status, _, _ = run(server, supabase, video_url=clips["rotated"], prompts=["red square"])
    assert status["status"] == "completed", status
    video = status["result"]["video"]
    assert (video["width"], video["height"], video["rotation"], video["frames"]) == (64, 48, 90, 6)
    for frame in status["result"]["frames"]:
        for item in frame["objects"]:
            assert item["rle"]["size"] == [48, 64]
            x1, y1, x2, y2 = item["box"]
            assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 48


def test_start_end_fps_and_max_frames_choose_the_frames(server, supabase, clips):
    status, _, _ = run(server, supabase, video_url=clips["plain"], prompts=["red square"], start_s=0.3, end_s=1.0)
    assert [round(frame["time_s"], 2) for frame in status["result"]["frames"]] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert [frame["frame_index"] for frame in status["result"]["frames"]] == list(range(7))
    status, _, _ = run(server, supabase, video_url=clips["plain"], prompts=["red square"], fps=5, max_frames=4)
    assert [round(frame["time_s"], 2) for frame in status["result"]["frames"]] == [0.0, 0.2, 0.4, 0.6]
    assert status["result"]["video"]["fps"] == 5.0 and status["result"]["video"]["frames"] == 4


def test_one_object_from_taps_is_tracked_from_its_frame_on(server, supabase, clips):
    status, _, _ = run(server, supabase, video_url=clips["plain"], points=[{"x": 8, "y": 16}], frame_index=3)
    assert status["status"] == "completed", status
    frames = status["result"]["frames"]
    assert len(frames) == 12 and all(not frame["objects"] for frame in frames[:3])
    assert {item["object_id"] for frame in frames for item in frame["objects"]} <= {0}
    assert all(item["label"] == "object" for item in status["result"]["objects"])


def test_the_overlay_is_an_mp4_of_the_processed_frames(server, supabase, r2, bucket, clips):
    status, task_id, user_id = run(
        server, supabase, video_url=clips["plain"], prompts=["red square"], outputs=["overlay"]
    )
    assert status["status"] == "completed", status
    url = status["result"]["outputs"]["overlay_url"]
    assert url.endswith(f"masks/{user_id}/{task_id}.overlay.mp4")
    data = bucket.get_object(Bucket=r2["R2_BUCKET"], Key=f"masks/{user_id}/{task_id}.overlay.mp4")["Body"].read()
    with av.open(io.BytesIO(data)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 12 and decoded[0].shape[:2] == (48, 64)
    assert np.mean([image.std() for image in decoded]) > 0


@pytest.mark.parametrize(
    ("clip", "code", "words"),
    [
        ("audio", "invalid_video", "video stream"),
        ("truncated", "invalid_video", ""),
        ("long", "video_too_long", "frames"),
        ("missing", "video_not_found", "no object"),
        ("past the end", "invalid_option", "at or after the end of the video"),
        ("empty span", "invalid_option", "no frame of the clip lies in the span"),
    ],
)
def test_a_clip_that_cannot_be_tracked_fails_the_task_and_the_row_with_its_code(
    server, supabase, clips, clip, code, words
):
    key = clips.get(clip, "videos/none.mp4" if clip == "missing" else clips["plain"])
    span = {"past the end": {"start_s": 5.0}, "empty span": {"start_s": 1.15, "outputs": ["overlay"]}}.get(clip, {})
    status, task_id, _ = run(server, supabase, video_url=key, prompts=["thing"], **span)
    assert status["status"] == "failed" and status["error"]["code"] == code, status
    assert words in status["error"]["message"]
    row = task_row(supabase, task_id)
    assert row["status"] == "failed" and row["error_message"].startswith(f"{code}: ")


@pytest.mark.parametrize(
    ("body", "status_code", "code"),
    [
        ({"video_url": "videos/plain.mp4"}, 422, "missing_prompt"),
        ({"video_url": "videos/plain.mp4", "prompts": ["a"], "points": [{"x": 1, "y": 1}]}, 422, "conflicting_prompts"),
        ({"video_url": "videos/plain.mp4", "prompts": ["a"], "async": False}, 422, "invalid_option"),
        ({"video_url": "videos/plain.mp4", "prompts": [f"p{n}" for n in range(9)]}, 422, "too_many_prompts"),
        ({"video_url": "videos/plain.mp4", "prompts": ["a"], "fps": 0}, 422, "invalid_option"),
        ({"video_url": "videos/plain.mp4", "prompts": ["a"], "start_s": 2, "end_s": 1}, 422, "invalid_option"),
        ({"video_url": "file:///etc/passwd", "prompts": ["a"]}, 400, "unsupported_video_url"),
        ({"video_url": "videos/plain.mp4", "prompts": ["a"], "frame_index": 2}, 422, "invalid_option"),
    ],
)
def test_a_bad_video_request_is_refused_at_once_and_the_row_is_untouched(server, supabase, body, status_code, code):
    response, task_id, _ = submit(server, supabase, **body)
    assert response.status_code == status_code and response.json()["error"]["code"] == code, response.text
    assert task_row(supabase, task_id)["status"] == "pending"


def test_kill_9_mid_clip_ends_the_task_interrupted(r2, supabase, bucket, tmp_path):
    path = write_clip(tmp_path / "slow.mp4", width=64, height=48, fps=30, frames=600)
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key="videos/slow.mp4", Body=path.read_bytes())
    env = serve_env(r2, supabase, JOB_STORE_PATH=str(tmp_path / "jobs.sqlite3"), JOB_LEASE_S="3")
    bento = ServedBento(env, tmp_path / "serve.log").start()
    try:
        response, task_id, _ = submit(bento, supabase, video_url="videos/slow.mp4", prompts=["thing"])
        assert response.status_code == 202
        running = wait_for(bento, task_id, done=lambda status: (status["progress"] or {}).get("frames_done", 0) > 0)
        assert running["status"] == "processing" and running["progress"]["frames_total"] == 600
        assert task_row(supabase, task_id)["result"]["progress"]["frames_total"] == 600
        killed = bento.worker_pids("sam3-gateway")
        workdirs = [path for pid in killed for path in Path(tempfile.gettempdir()).glob(f"sam3-video-{pid}-*")]
        assert workdirs and all((path / "clip").exists() for path in workdirs)
        bento.kill()
    finally:
        bento.stop()
    restarted = ServedBento(env, tmp_path / "serve-again.log").start()
    try:
        status = wait_for(restarted, task_id)
    finally:
        restarted.stop()
    assert status["status"] == "failed" and status["error"]["code"] == "interrupted", status
    row = task_row(supabase, task_id)
    assert row["status"] == "failed" and row["error_message"].startswith("interrupted: ")
    assert not any(path.exists() for path in workdirs)  # the killed worker's copy of the clip is gone


def test_a_clip_past_its_time_stops_in_the_model_at_its_next_frame(r2, supabase, bucket, tmp_path):
    """VIDEO_TIMEOUT_S: the job fails with job_timeout, and the model service stops the clip (it is told, and the
    clip's deadline has passed): no clip keeps running for nobody."""
    path = write_clip(tmp_path / "slow.mp4", width=64, height=48, fps=30, frames=600)
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key="videos/slow-timeout.mp4", Body=path.read_bytes())
    bento = ServedBento(serve_env(r2, supabase, VIDEO_TIMEOUT_S="4"), tmp_path / "serve.log").start()
    try:
        _, task_id, _ = submit(bento, supabase, video_url="videos/slow-timeout.mp4", prompts=["thing"])
        status = wait_for(bento, task_id)
        assert status["status"] == "failed" and status["error"]["code"] == "job_timeout", status
        assert "VIDEO_TIMEOUT_S" in status["error"]["message"]
        assert status["progress"]["frames_done"] < 600
        deadline = time.monotonic() + 30
        while (clips := info(bento)["video_clips"])["running"]:
            assert time.monotonic() < deadline, clips
            time.sleep(0.2)
        assert clips["stopped"] == 1 and clips["completed"] == 0
    finally:
        bento.stop()
    assert task_row(supabase, task_id)["status"] == "failed"


def test_a_clip_nobody_reads_any_more_stops_in_the_model(r2, supabase, bucket, tmp_path):
    """The gateway worker hangs (SIGSTOP; a partitioned or dead gateway pod whose connection lingers looks the
    same): no cancel comes and the stream stays open, but the clip's renewals stop, its lease in the model service
    (VIDEO_LEASE_S) runs out and the clip stops at its next frame instead of running on for nobody."""
    path = write_clip(tmp_path / "long.mp4", width=64, height=48, fps=30, frames=1200)
    bucket.put_object(Bucket=r2["R2_BUCKET"], Key="videos/orphan.mp4", Body=path.read_bytes())
    bento = ServedBento(serve_env(r2, supabase, VIDEO_LEASE_S="3"), tmp_path / "serve.log").start()
    try:
        _, task_id, _ = submit(bento, supabase, video_url="videos/orphan.mp4", prompts=["thing"])
        wait_for(bento, task_id, done=lambda status: (status["progress"] or {}).get("frames_done", 0) > 0)
        gateway = bento.worker_pids("sam3-gateway")
        for pid in gateway:
            os.kill(pid, signal.SIGSTOP)
        time.sleep(8)
        for pid in gateway:
            os.kill(pid, signal.SIGCONT)
        status = wait_for(bento, task_id, timeout=120)
        assert status["status"] == "failed" and status["error"]["code"] == "cancelled", status
        assert status["progress"]["frames_done"] < 1200
        clips = info(bento)["video_clips"]
        assert (clips["running"], clips["stopped"], clips["completed"]) == (0, 1, 0), clips
    finally:
        bento.stop()
    assert task_row(supabase, task_id)["error_message"].startswith("cancelled: ")


def info(server) -> dict:
    return httpx.get(f"{server.url}/api/v1/info", headers=HEADERS, timeout=30).json()


def test_uuid_of_a_video_task_is_idempotent_while_it_runs(server, supabase, clips):
    response, task_id, user_id = submit(server, supabase, video_url=clips["plain"], prompts=["red square"])
    again = httpx.post(
        f"{server.url}/api/v1/predict/video",
        json={"user_id": user_id, "task_id": task_id, "video_url": clips["plain"], "prompts": ["red square"]},
        headers=HEADERS,
        timeout=60,
    )
    assert response.status_code == again.status_code == 202
    assert again.json()["task_id"] == task_id == str(uuid.UUID(task_id))
    assert wait_for(server, task_id)["status"] == "completed"
