"""Meta's full sam3.pt (detector + tracker) -> transformers' Sam3VideoModel: every key placed, every model key fed."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from meta_checkpoints import FIXTURES, TRACKER_FIXTURE, meta_keys, tiny_video_model, to_meta_video_checkpoint
from transformers import Sam3VideoConfig, Sam3VideoModel

from sam3_runner.meta_checkpoint import (
    UnknownKeyError,
    convert_shape,
    no_counterpart,
    plan_video_key,
    video_model_state_dict,
)

TRANSFORMERS_NAMES = FIXTURES / "sam3_pt_to_sam3_video_model_keys.json"


def full_size_video_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of transformers' default `Sam3VideoModel(Sam3VideoConfig())`, the released sam3.pt's."""
    with torch.device("meta"):
        return {key: tuple(t.shape) for key, t in Sam3VideoModel(Sam3VideoConfig()).state_dict().items()}


def sam3_pt_shapes() -> dict[str, tuple[int, ...]]:
    """The 1465 keys of a real sam3.pt (sam3 0.1.4's video model: 1156 `detector.*`, 309 `tracker.*`)."""
    shapes = {f"detector.{key}": shape for key, shape in meta_keys().items()}
    shapes.update({f"tracker.{key}": shape for key, shape in meta_keys(TRACKER_FIXTURE).items()})
    assert len(shapes) == 1465
    return shapes


def test_every_sam3_pt_key_feeds_a_sam3videomodel_key_of_the_same_shape_or_says_why_not():
    expected = full_size_video_shapes()
    fed: Counter[str] = Counter()
    rows: dict[str, list[tuple[int, tuple[int, ...]]]] = {}
    reasons: Counter[str] = Counter()
    for key, shape in sam3_pt_shapes().items():
        plan = plan_video_key(key)
        if plan is None:
            reasons[no_counterpart(key)] += 1
            continue
        if plan.transform == "row":
            rows.setdefault(plan.targets[0], []).append((plan.row, shape))
            continue
        for target, target_shape in zip(plan.targets, convert_shape(plan, shape), strict=True):
            assert target in expected, f"{key} -> {target} is not a Sam3VideoModel key"
            assert expected[target] == target_shape, f"{key} -> {target}: {target_shape} != {expected[target]}"
            fed[target] += 1
    for target, pieces in rows.items():  # the prompt encoder's 4 point embeddings, one (1, 256) row each
        assert sorted(row for row, _ in pieces) == list(range(len(pieces))) == [0, 1, 2, 3]
        stacked = (sum(shape[0] for _, shape in pieces), *pieces[0][1][1:])
        assert expected[target] == stacked, f"{target}: {stacked} != {expected[target]}"
        fed[target] += 1
    assert [target for target, count in fed.items() if count > 1] == []
    assert set(fed) == set(expected), f"not fed: {sorted(set(expected) - set(fed))[:5]}"
    assert len(expected) == 1797  # 1468 detector_model + 22 tracker_neck + 307 tracker_model
    assert reasons == {
        "the ViT's precomputed rope table: transformers recomputes it": 32,
        "a point-prompt projection of the detector: transformers' Sam3Model takes no point prompts": 6,
    }


def test_a_full_sam3_pt_converts_to_exactly_the_full_size_sam3videomodel_state_dict():
    payload = {key: torch.empty(shape, device="meta") for key, shape in sam3_pt_shapes().items()}
    converted = video_model_state_dict({"model": payload})
    assert {key: tuple(t.shape) for key, t in converted.items()} == full_size_video_shapes()


def test_every_key_lands_where_transformers_own_converter_puts_it():
    """Names, not only shapes (many neighbours share one: layer norms, MLP layers, neck levels, q/k/v). The fixture
    holds, for each of the 1465 sam3.pt keys, the Sam3VideoModel key(s) transformers' converter gives it
    (models/sam3_video/convert_sam3_video_to_hf.py: its renames, q/k/v split, point-embedding concatenation and
    Fourier-matrix copy, run on these keys with its internal prefixes `sam3_model.` / `sam2_predictor.model.` read
    as `detector.` / `tracker.`); [] where its name is no model key (it loads non-strictly and leaves those out)."""
    expected = json.loads(TRANSFORMERS_NAMES.read_text())
    assert set(expected) == set(sam3_pt_shapes())
    for key, targets in expected.items():
        plan = plan_video_key(key)
        assert (list(plan.targets) if plan else []) == targets, key


def test_the_fourier_matrix_feeds_both_copies_and_the_point_embeddings_stack_in_order():
    matrix = torch.randn(2, 128)
    rows = [torch.full((1, 256), float(i)) for i in range(4)]
    payload = {"detector.transformer.decoder.norm.weight": torch.ones(256)}
    payload["tracker.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] = matrix
    payload.update({f"tracker.sam_prompt_encoder.point_embeddings.{i}.weight": rows[i] for i in (2, 0, 3, 1)})
    converted = video_model_state_dict(payload)
    assert torch.equal(converted["tracker_model.prompt_encoder.shared_embedding.positional_embedding"], matrix)
    assert torch.equal(converted["tracker_model.shared_image_embedding.positional_embedding"], matrix)
    assert torch.equal(converted["tracker_model.prompt_encoder.point_embed.weight"], torch.cat(rows))
    del payload["tracker.sam_prompt_encoder.point_embeddings.2.weight"]
    with pytest.raises(ValueError, match=r"rows \[0, 1, 3\] of tracker_model.prompt_encoder.point_embed.weight"):
        video_model_state_dict(payload)


@pytest.mark.parametrize(
    ("extra", "missing", "error"),
    [
        ("tracker.memory_bank.weight", None, "no conversion rule for the key 'tracker.memory_bank.weight'"),
        ("detector.backbone.vision_backbone.sam2_convs.9.conv_5x5.weight", None, "sam2_convs.9.conv_5x5"),
        ("memory_bank.weight", None, "no conversion rule for the key 'memory_bank.weight'"),
        (None, "tracker.", r"holds no tracker \(no `tracker\.\*` keys\)"),
        (None, "detector.", r"holds no image model \(no `detector\.\*` keys\)"),
    ],
)
def test_a_checkpoint_that_is_not_a_full_sam3_pt_is_refused_by_name(extra, missing, error):
    payload = {key: torch.empty(shape, device="meta") for key, shape in sam3_pt_shapes().items()}
    if extra:
        payload[extra] = torch.zeros(2)
    payload = {key: value for key, value in payload.items() if not (missing and key.startswith(missing))}
    with pytest.raises(UnknownKeyError if extra else ValueError, match=error):
        video_model_state_dict(payload)


def tracker_answer(model: Sam3VideoModel, pixel_values: torch.Tensor, points: torch.Tensor) -> list[torch.Tensor]:
    """One positive point through the shared trunk, the tracker neck, the prompt encoder and the mask decoder."""
    vision = model.detector_model.get_vision_features(pixel_values)
    feature_maps, _ = model.get_vision_features_for_tracker(vision)
    feature_maps[-1] = feature_maps[-1] + model.tracker_model.no_memory_embedding
    sizes = model.tracker_model.backbone_feature_sizes
    embeddings = [f.permute(1, 2, 0).view(1, -1, *size) for f, size in zip(feature_maps, sizes, strict=True)]
    out = model.tracker_model._single_frame_forward(
        image_embeddings=embeddings, input_points=points, input_labels=torch.ones(1, 1, 1, dtype=torch.int)
    )
    return [out.pred_masks, out.iou_scores, out.object_score_logits]


def test_a_tiny_video_model_written_as_sam3_pt_loads_back_strictly_and_answers_the_same(tmp_path):
    """Through torch.save / torch.load (mmap, weights only) as the loader reads a file: every tensor comes back
    equal, and the detector and the tracker (point prompt) answer bit for bit as before."""
    original = tiny_video_model()
    path = tmp_path / "sam3.pt"
    torch.save(to_meta_video_checkpoint(original), path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    assert {key.split(".")[0] for key in checkpoint["model"]} == {"detector", "tracker"}

    loaded = Sam3VideoModel(original.config).eval()
    loaded.load_state_dict(video_model_state_dict(checkpoint), strict=True)
    for key, tensor in original.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key

    pixel_values = torch.randn(1, 3, 56, 56)
    text = {"input_ids": torch.randint(0, 512, (1, 6)), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.no_grad():
        detections = [model.detector_model(pixel_values=pixel_values, **text) for model in (original, loaded)]
        assert torch.equal(detections[0].pred_masks, detections[1].pred_masks)
        assert torch.equal(detections[0].pred_logits, detections[1].pred_logits)
        point = torch.tensor([[[[20.0, 30.0]]]])
        for got, want in zip(
            tracker_answer(loaded, pixel_values, point), tracker_answer(original, pixel_values, point), strict=True
        ):
            assert torch.isfinite(want).all() and torch.equal(got, want)
