"""Weights: demo, a transformers directory and Meta's .pt all load; a bad path says how to get weights."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_image
from runner_asserts import assert_same_result
from transformers import Sam3Config, Sam3Model

from sam3_runner import Job, Prompt, Sam3Engine, WeightsError, load_model
from sam3_runner.meta_checkpoint import convert_shape, convert_state_dict, image_model_state_dict, plan_key

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "sam3_meta_image_model_state_dict.json"  # sam3 0.1.4's image model, SAM 2 neck included
TRACKER_FIXTURE = FIXTURES / "sam3_meta_tracker_state_dict.json"  # sam3 0.1.4's tracker (`tracker.` stripped)


def meta_keys(fixture: Path = FIXTURE) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, (shape, _dtype) in json.loads(fixture.read_text()).items()}


def test_every_meta_key_maps_to_a_sam3model_key_of_the_same_shape():
    with torch.device("meta"):
        expected = {key: tuple(t.shape) for key, t in Sam3Model(Sam3Config()).state_dict().items()}
    covered, without_counterpart = set(), []
    for key, shape in meta_keys().items():
        plan = plan_key(key)
        if plan is None:
            without_counterpart.append(key)
            continue
        for target, target_shape in zip(plan.targets, convert_shape(plan, shape), strict=True):
            assert target in expected, f"{key} -> {target} is not a Sam3Model key"
            assert expected[target] == target_shape, f"{key} -> {target}: {target_shape} != {expected[target]}"
            assert target not in covered, f"{target} is fed twice"
            covered.add(target)
    assert covered == set(expected), f"not covered: {sorted(set(expected) - covered)[:5]}"
    rope = [k for k in without_counterpart if k.endswith("attn.freqs_cis")]
    points = [k for k in without_counterpart if k.startswith("geometry_encoder.points_")]
    sam2_neck = [k for k in without_counterpart if k.startswith("backbone.vision_backbone.sam2_convs.")]
    assert len(meta_keys()) == 1156
    assert len(rope) == 32 and len(points) == 6 and len(sam2_neck) == 22 and len(without_counterpart) == 60


def test_the_sam2_neck_is_laid_out_like_the_detector_neck():
    """The 22 `sam2_convs` keys the real sam3.pt holds are a copy of `convs`: same names, same shapes."""
    keys = meta_keys()
    sam2_neck = {k.replace("sam2_convs", "convs"): shape for k, shape in keys.items() if ".sam2_convs." in k}
    convs = {k: shape for k, shape in keys.items() if ".vision_backbone.convs." in k}
    assert sam2_neck == convs and len(convs) == 22


def to_meta_checkpoint(model: Sam3Model) -> dict:
    """The inverse of the key plans: a transformers model written out as Meta's sam3.pt would hold it."""
    hf_state = model.state_dict()
    layer_count = {"blocks": len(model.vision_encoder.backbone.layers)}
    detector = {}
    for key in meta_keys():
        plan = plan_key(key)
        if plan is None:
            block = re.search(r"blocks\.(\d+)\.", key)
            if block and int(block.group(1)) < layer_count["blocks"]:
                detector[f"detector.{key}"] = torch.randn(4, 2)  # a rope table: transformers recomputes it
            continue
        if not all(target in hf_state for target in plan.targets):
            continue  # a deeper layer than the tiny model has
        parts = [hf_state[target] for target in plan.targets]
        if plan.transform == "split_qkv":
            tensor = torch.cat(parts, dim=0)
        elif plan.transform == "drop_cls_position":
            tensor = torch.cat([torch.randn_like(parts[0][:, :1]), parts[0]], dim=1)
        elif plan.transform == "transpose":
            tensor = parts[0].t().contiguous()
        else:
            tensor = parts[0]
        detector[f"detector.{key}"] = tensor
    for key, tensor in list(detector.items()):  # the SAM 2 neck: a copy of the detector's neck, as in the real file
        if ".vision_backbone.convs." in key:
            detector[key.replace(".convs.", ".sam2_convs.")] = torch.randn_like(tensor)
    detector["detector.geometry_encoder.points_direct_project.weight"] = torch.randn(32, 2)
    for key in meta_keys(TRACKER_FIXTURE):  # the tracker's 309 keys, small: the image model ignores them
        detector[f"tracker.{key}"] = torch.randn(2)
    return {"model": detector}


def test_meta_checkpoint_loads_and_matches_the_transformers_directory(tiny_model_dir, tmp_path, engine, rng):
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    for name in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        if (tiny_model_dir / name).exists():
            (meta_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    torch.save(to_meta_checkpoint(engine.model), meta_dir / "sam3.pt")

    loaded = load_model(str(meta_dir / "sam3.pt"), device="cpu")
    assert loaded.kind == "meta_checkpoint" and not loaded.random_weights
    for key, tensor in engine.model.state_dict().items():
        if key in dict(loaded.model.named_parameters()):
            assert torch.equal(loaded.model.state_dict()[key], tensor), key
    image = random_image(rng, 40, 50)
    prompts = [Prompt("cat", score_threshold=0.0), Prompt(boxes=(), text="dog", score_threshold=0.0)]
    for got, want in zip(
        Sam3Engine(loaded).run([Job(image, prompts)])[0], engine.run([Job(image, prompts)])[0], strict=True
    ):
        assert_same_result(got, want, score_tol=1e-6)


def test_every_key_of_the_real_checkpoint_is_converted_or_ignored():
    """All 1465 keys a real sam3.pt holds (1156 `detector.*`, 309 `tracker.*`, shapes on the meta device)
    convert to exactly the full-size Sam3Model's state dict."""
    payload = {f"detector.{key}": torch.empty(shape, device="meta") for key, shape in meta_keys().items()}
    payload.update({f"tracker.{key}": torch.empty(s, device="meta") for key, s in meta_keys(TRACKER_FIXTURE).items()})
    assert len(payload) == 1465
    converted = convert_state_dict(image_model_state_dict({"model": payload}))
    with torch.device("meta"):
        expected = {key: tuple(t.shape) for key, t in Sam3Model(Sam3Config()).state_dict().items()}
    assert {key: tuple(t.shape) for key, t in converted.items()} == expected


@pytest.mark.parametrize(
    "unknown",
    [
        "detector.backbone.vision_backbone.sam2_convs.9.conv_5x5.weight",
        "detector.transformer.decoder.some_new_head.weight",
        "memory_bank.weight",
    ],
)
def test_an_unknown_key_stops_the_start_naming_key_and_file(tiny_model_dir, tmp_path, engine, unknown):
    meta_dir = tmp_path / "meta"
    meta_dir.mkdir()
    for name in ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"):
        (meta_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    checkpoint = to_meta_checkpoint(engine.model)
    checkpoint["model"][unknown] = torch.zeros(2)
    torch.save(checkpoint, meta_dir / "sam3.pt")
    with pytest.raises(WeightsError) as error:
        load_model(str(meta_dir / "sam3.pt"), device="cpu")
    message = str(error.value)
    assert repr(unknown) in message and str(meta_dir / "sam3.pt") in message
    assert "Meta's original SAM 3 checkpoint" in message


def test_directory_loads_with_info(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), device="cpu")
    info = loaded.info()
    assert info["weights_kind"] == "directory" and info["random_weights"] is False
    assert info["parameters"] == sum(p.numel() for p in loaded.model.parameters()) > 0
    assert info["device"] == "cpu" and info["dtype"] == "float32"


def test_demo_is_labelled_random(caplog):
    with caplog.at_level("WARNING"):
        loaded = load_model("demo", device="cpu")
    assert loaded.info()["random_weights"] is True
    assert "random" in loaded.info()["model_name"].lower()
    assert "RANDOM WEIGHTS" in caplog.text


@pytest.mark.parametrize("path", ["/no/such/dir", "./missing/sam3.pt", "not a repo id!"])
def test_bad_path_fails_with_how_to_get_weights(path):
    with pytest.raises(WeightsError, match="HF_TOKEN") as error:
        load_model(path, device="cpu")
    assert "demo" in str(error.value)


def test_unreadable_checkpoint_fails_clearly(tmp_path):
    broken = tmp_path / "sam3.pt"
    broken.write_bytes(b"this is not a checkpoint")
    with pytest.raises(WeightsError, match="could not read the Meta checkpoint"):
        load_model(str(broken), device="cpu")


def test_empty_directory_fails_clearly(tmp_path):
    with pytest.raises(WeightsError, match="could not load SAM 3 from the directory"):
        load_model(str(tmp_path), device="cpu")


def test_unreachable_hub_repo_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="Hugging Face repo facebook/sam3"):
        load_model("facebook/sam3", device="cpu")


def test_hub_repo_loads_offline_from_a_filled_cache(tiny_model_dir, tmp_path):
    """The hub path honours the Hugging Face cache: once downloaded, `facebook/sam3` loads with no network.

    Runs in a fresh interpreter because huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when imported.
    """
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_cache = tmp_path / "hub" / "models--facebook--sam3"
    snapshot = repo_cache / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_model_dir.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo_cache / "refs").mkdir()
    (repo_cache / "refs" / "main").write_text(commit)
    script = (
        "from sam3_runner import load_model\n"
        "loaded = load_model('facebook/sam3', device='cpu', hf_token='hf_not_needed_offline')\n"
        "print(loaded.kind, loaded.source, loaded.random_weights)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["hub", "facebook/sam3", "False"]
