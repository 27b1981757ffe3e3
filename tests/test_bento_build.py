"""`bentoml build` (no Docker needed) produces a Bento a GPU box can containerize and run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SECRETS = ("API_SECRET_KEY", "R2_SECRET_ACCESS_KEY", "SUPABASE_SERVICE_KEY", "HF_TOKEN", "WEBHOOK_SECRET")


@pytest.fixture(scope="module")
def bento(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    for secret in SECRETS:
        env.pop(secret, None)
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", str(ROOT)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (bento_dir,) = [p for p in (home / "bentos" / "sam3-backend").iterdir() if p.is_dir()]
    return bento_dir


def test_bento_has_both_services(bento):
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    services = {service["name"]: service for service in manifest["services"]}
    assert set(services) == {"sam3-gateway", "sam3-model"}
    assert manifest["entry_service"] == "sam3-gateway"
    assert services["sam3-model"]["config"]["resources"] == {"gpu": 1}
    assert "gpu" not in services["sam3-gateway"]["config"].get("resources", {})
    assert services["sam3-model"]["config"]["runner_connection"]["max_requests"] >= 10**9


def test_bento_environment_has_safe_defaults_and_no_secrets(bento):
    manifest = yaml.safe_load((bento / "bento.yaml").read_text())
    envs = {env["name"]: env.get("value") for env in manifest["envs"]}
    assert envs["SAM3_ENV"] == "production"
    assert envs["SAM3_WEIGHTS_PATH"] == "facebook/sam3"
    assert envs["JOB_STORE_PATH"] == "/home/bentoml/jobs/jobs.sqlite3"  # a volume's mount point (README)
    assert not set(SECRETS) & set(envs)


def test_bento_image_is_cuda_capable_with_the_model_stack(bento):
    dockerfile = (bento / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM nvidia/cuda:" in dockerfile
    requirements = (bento / "env" / "python" / "requirements.txt").read_text()
    for package in (
        "torch",
        "torchvision",
        "transformers==5.17.0",
        "pycocotools",
        "boto3",
        "supabase",
        "fastapi-offline",
        "standardwebhooks",
        "opencv-python-headless",
        "supervision",
        "av==18.1.0",
    ):
        assert package in requirements


def test_bento_carries_the_code(bento):
    source = bento / "src"
    for path in (
        "service.py",
        "origins.py",
        "sam3_runner/engine.py",
        "storage/r2.py",
        "tasks/store.py",
        "backend/pipeline.py",
        "webhooks/sender.py",
        "jobs/runner.py",
        "renderers/render.py",
        "video/decode.py",
    ):
        assert (source / path).is_file(), path
    assert not (source / "tests").exists()
