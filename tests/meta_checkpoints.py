"""Meta's sam3.pt layout for tests: the key fixtures and a tiny model written out as Meta's checkpoint holds it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import (
    Sam3Model,
    Sam3VideoModel,
)

from sam3_runner.demo import demo_video_config
from sam3_runner.meta_checkpoint import KeyPlan, plan_key, plan_video_key

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "sam3_meta_image_model_state_dict.json"  # sam3 0.1.4's image model, SAM 2 neck included
TRACKER_FIXTURE = FIXTURES / "sam3_meta_tracker_state_dict.json"  # sam3 0.1.4's tracker (`tracker.` stripped)


def meta_keys(fixture: Path = FIXTURE) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, (shape, _dtype) in json.loads(fixture.read_text()).items()}


CONFIG_AND_PROCESSOR = ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json")


def to_meta_checkpoint(model: Sam3Model) -> dict:
    """The inverse of the key plans: a transformers detector written out as Meta's image model (`detector.*`, its
    SAM 2 neck included), with no tracker: a detector-only checkpoint."""
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
        tensor = meta_layout(plan, [hf_state[target] for target in plan.targets])
        detector[f"detector.{key}"] = tensor
    for key, tensor in list(detector.items()):  # the SAM 2 neck: a copy of the detector's neck, as in the real file
        if ".vision_backbone.convs." in key:
            detector[key.replace(".convs.", ".sam2_convs.")] = torch.randn_like(tensor)
    detector["detector.geometry_encoder.points_direct_project.weight"] = torch.randn(32, 2)
    return {"model": detector}


def meta_layout(plan: KeyPlan, parts: list[torch.Tensor]) -> torch.Tensor:
    """The Meta tensor a plan turns into `parts` (its targets' tensors): the plan undone."""
    if plan.transform == "split_qkv":
        return torch.cat(parts, dim=0)
    if plan.transform == "drop_cls_position":
        return torch.cat([torch.randn_like(parts[0][:, :1]), parts[0]], dim=1)
    if plan.transform == "transpose":
        return parts[0].t().contiguous()
    if plan.transform == "row":
        return parts[0][plan.row : plan.row + 1].clone()
    assert all(torch.equal(part, parts[0]) for part in parts), plan  # "duplicate": every copy holds the same
    return parts[0]


def tiny_video_model(seed: int = 0) -> Sam3VideoModel:
    """A tiny `Sam3VideoModel` (the demo's architecture: sam3_runner.demo.demo_video_config) with every tensor
    random, zero-initialised embeddings included; the prompt encoder's two copies of its Fourier matrix agree, as
    in a converted sam3.pt."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Sam3VideoModel(demo_video_config()).eval()
        with torch.no_grad():
            for tensor in model.state_dict().values():
                tensor.copy_(torch.randn_like(tensor))
            fourier = model.tracker_model.prompt_encoder.shared_embedding.positional_embedding
            model.tracker_model.shared_image_embedding.positional_embedding.copy_(fourier)
    return model


def to_meta_video_checkpoint(model: Sam3VideoModel) -> dict:
    """The inverse of the video key plans: a `Sam3VideoModel` written out as Meta's full sam3.pt holds it
    (`detector.*` with the SAM 2 neck, `tracker.*`), keys with no counterpart included as small random tensors."""
    hf_state = model.state_dict()
    payload = {}
    for key in [f"detector.{k}" for k in meta_keys()] + [f"tracker.{k}" for k in meta_keys(TRACKER_FIXTURE)]:
        plan = plan_video_key(key)
        if plan is None:
            payload[key] = torch.randn(2)
        elif all(target in hf_state for target in plan.targets):  # else a deeper layer than the tiny model has
            payload[key] = meta_layout(plan, [hf_state[target] for target in plan.targets])
    return {"model": payload}


def write_meta_checkpoint(directory: Path, model: Sam3VideoModel | Sam3Model, files_from: Path | None = None) -> Path:
    """`directory/sam3.pt` in Meta's layout, with copies of `files_from`'s config and processor files beside it: a
    `Sam3VideoModel` as the released sam3.pt (detector + tracker), a `Sam3Model` as a detector-only file."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_AND_PROCESSOR if files_from else ():
        (directory / name).write_bytes((files_from / name).read_bytes())
    payload = to_meta_video_checkpoint(model) if isinstance(model, Sam3VideoModel) else to_meta_checkpoint(model)
    torch.save(payload, directory / "sam3.pt")
    return directory / "sam3.pt"
