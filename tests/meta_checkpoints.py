"""Meta's sam3.pt layout for tests: the key fixtures and a tiny model written out as Meta's checkpoint holds it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import Sam3Model

from sam3_runner.meta_checkpoint import plan_key

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE = FIXTURES / "sam3_meta_image_model_state_dict.json"  # sam3 0.1.4's image model, SAM 2 neck included
TRACKER_FIXTURE = FIXTURES / "sam3_meta_tracker_state_dict.json"  # sam3 0.1.4's tracker (`tracker.` stripped)


def meta_keys(fixture: Path = FIXTURE) -> dict[str, tuple[int, ...]]:
    return {key: tuple(shape) for key, (shape, _dtype) in json.loads(fixture.read_text()).items()}


CONFIG_AND_PROCESSOR = ("config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json")


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


def write_meta_checkpoint(directory: Path, model: Sam3Model, files_from: Path | None = None) -> Path:
    """`directory/sam3.pt` in Meta's layout, with copies of `files_from`'s config and processor files beside it."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in CONFIG_AND_PROCESSOR if files_from else ():
        (directory / name).write_bytes((files_from / name).read_bytes())
    torch.save(to_meta_checkpoint(model), directory / "sam3.pt")
    return directory / "sam3.pt"
