"""Shared fixtures: a tiny random-weight SAM 3 saved with save_pretrained and loaded like real weights."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file
from served import ServedBento
from stack import STACK_API_KEY, r2_settings, running, s3_client, supabase_settings

from backend.segmenter import Segmenter
from backend.settings import Settings
from sam3_runner import Sam3Engine, load_model
from sam3_runner.demo import build_demo_model, build_demo_video_model

WEIGHTS_FILE = "model.safetensors"


def save_like_the_hub(model, directory: Path) -> None:
    """save_pretrained, with a Sam3VideoModel's tracker keys as the hub's facebook/sam3 holds them: `tracker_model.*`.

    transformers 5.17's save_pretrained writes them as `tracker_model.tracker_model.*` (its `sam3_tracker` key
    renaming, applied in reverse within the tracker): Sam3VideoModel reads that back, Sam3TrackerModel does not. The
    hub's checkpoint (written by transformers' convert_sam3_video_to_hf.py; third-party readers of it name
    `tracker_model.mask_decoder.conv_s0`) has one prefix, which both read.
    """
    model.save_pretrained(directory)
    state = load_file(directory / WEIGHTS_FILE)
    hub = {key.replace("tracker_model.tracker_model.", "tracker_model.", 1): tensor for key, tensor in state.items()}
    save_file(hub, directory / WEIGHTS_FILE, metadata={"format": "pt"})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The demo model, detector + tracker (config `sam3_video`), laid out as the hub's facebook/sam3."""
    directory = tmp_path_factory.mktemp("tiny-sam3")
    model, processor = build_demo_video_model()
    save_like_the_hub(model, directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_detector_dir(tmp_path_factory) -> Path:
    """The demo's detector alone (config `sam3`): concept prompts only."""
    directory = tmp_path_factory.mktemp("tiny-sam3-detector")
    model, processor = build_demo_model()
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def engine(tiny_model_dir) -> Sam3Engine:
    return Sam3Engine(load_model(str(tiny_model_dir), device="cpu"))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def random_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encode(pixels: np.ndarray, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def segmenter():
    """The model service's worker with the demo model, loaded (in this process)."""
    segmenter = Segmenter(Settings(sam3_weights_path="demo", sam3_device="cpu", _env_file=None))
    deadline = time.monotonic() + 60
    while not segmenter.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    assert segmenter.ready
    return segmenter


@pytest.fixture(scope="session")
def r2(tmp_path_factory):
    """SeaweedFS standing in for R2, for the whole session."""
    with running("s3_server.sh", tmp_path_factory.mktemp("r2")) as env:
        yield env


@pytest.fixture(scope="session")
def supabase(tmp_path_factory):
    """PostgreSQL + PostgREST + nginx standing in for Supabase, for the whole session."""
    with running("supabase_stack.sh", tmp_path_factory.mktemp("supabase")) as env:
        yield env


@pytest.fixture(scope="session")
def bucket(r2):
    """The bucket, holding a photo-like JPEG and a corrupt PNG."""
    client = s3_client(r2)
    rng = np.random.default_rng(3)
    client.put_object(
        Bucket=r2["R2_BUCKET"],
        Key="images/in.jpg",
        Body=encode(random_image(rng, 90, 160), "JPEG"),
        ContentType="image/jpeg",
    )
    client.put_object(Bucket=r2["R2_BUCKET"], Key="images/corrupt.png", Body=b"\x89PNG\r\n\x1a\n garbage")
    return client


@pytest.fixture(scope="session")
def stack_server(r2, supabase, bucket, tmp_path_factory):
    """A real `bentoml serve` wired to both stand-ins, with an API key."""
    env = {**r2_settings(r2), **supabase_settings(supabase), "API_SECRET_KEY": STACK_API_KEY}
    bento = ServedBento(env, tmp_path_factory.mktemp("stack-logs") / "serve.log").start()
    yield bento
    bento.stop()
