"""Weights: demo, a transformers directory and Meta's .pt all load; a bad path says how to get weights."""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import WEIGHTS_FILE, random_image
from meta_checkpoints import CONFIG_AND_PROCESSOR, TRACKER_FIXTURE, meta_keys, write_meta_checkpoint
from runner_asserts import assert_same_result
from safetensors.torch import load_file
from transformers import Sam3Config, Sam3Model, Sam3VideoConfig, Sam3VideoModel

from sam3_runner import (
    BoxPrompt,
    Job,
    PointPrompt,
    Prompt,
    Sam3Engine,
    VisualPrompt,
    VisualPromptsUnavailable,
    WeightsError,
    load_model,
)
from sam3_runner.clip_tokenizer import clip_tokenizer
from sam3_runner.demo import build_demo_video_model
from sam3_runner.loading import check_weights_reference, meta_checkpoint_config, meta_checkpoint_processor
from sam3_runner.meta_checkpoint import convert_shape, convert_state_dict, image_model_state_dict, plan_key

ROOT = Path(__file__).resolve().parent.parent


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


PROMPTS = [Prompt("cat", score_threshold=0.0), Prompt(boxes=(), text="dog", score_threshold=0.0)]
VISUAL_PROMPTS = [
    VisualPrompt(points=(PointPrompt(30, 20),), multimask=True),
    VisualPrompt(box=BoxPrompt(8, 5, 40, 35)),
    VisualPrompt(points=(PointPrompt(20, 15), PointPrompt(44.5, 30.25, positive=False)), box=BoxPrompt(4, 2, 48, 38)),
]


def sam3_pt(directory: Path, files_from: Path | None = None) -> Path:
    """The tiny model of `tiny_model_dir` (the demo's detector + tracker) written as Meta's full sam3.pt."""
    return write_meta_checkpoint(directory, build_demo_video_model()[0], files_from=files_from)


def test_a_sam3_pt_loads_detector_and_tracker_and_answers_like_the_transformers_directory(
    tiny_model_dir, tmp_path, engine, rng
):
    """Meta's layout (`detector.*` with its SAM 2 neck, `tracker.*`) loads the same weights as the transformers
    directory in all three parts, and answers concept and visual prompts as it does: the same masks and boxes."""
    checkpoint = sam3_pt(tmp_path / "meta", files_from=tiny_model_dir)
    loaded = load_model(str(checkpoint), device="cpu")
    directory = load_model(str(tiny_model_dir), device="cpu")
    assert loaded.kind == "meta_checkpoint" and not loaded.random_weights
    assert loaded.info()["visual_prompts"] is True
    assert loaded.parameter_counts() == directory.parameter_counts() and loaded.parameters == directory.parameters
    for part in ("model", "tracker", "tracker_neck"):
        want = getattr(directory, part).state_dict()
        got = getattr(loaded, part).state_dict()
        assert got.keys() == want.keys()
        for key, tensor in want.items():
            assert torch.equal(got[key], tensor), (part, key)
    image = random_image(rng, 40, 50)
    ours = Sam3Engine(loaded)
    for got, want in zip(ours.run([Job(image, PROMPTS)])[0], engine.run([Job(image, PROMPTS)])[0], strict=True):
        assert_same_result(got, want, score_tol=1e-6)
    # The directory's tensors are views into its memory-mapped file, aligned otherwise: kernels round ~1e-6 apart.
    for visual in VISUAL_PROMPTS:
        [got] = ours.run([Job(image, [], visual=visual)])[0]
        [want] = engine.run([Job(image, [], visual=visual)])[0]
        assert len(got.instances) == len(want.instances) == (3 if visual.multimask else 1)
        for got_instance, want_instance in zip(got.instances, want.instances, strict=True):
            assert got_instance.score == pytest.approx(want_instance.score, abs=1e-6)
            assert (got_instance.box, got_instance.area, got_instance.rle) == (
                want_instance.box,
                want_instance.area,
                want_instance.rle,
            )
        np.testing.assert_allclose(got.mask_logits, want.mask_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["a detector-only file", "a sam3.pt under a `sam3` config"])
def test_a_detector_only_checkpoint_or_config_loads_the_detector_alone(
    tiny_model_dir, tiny_detector_dir, tmp_path, engine, rng, case
):
    """A .pt with no `tracker.*` (even beside a `sam3_video` config), or a full sam3.pt under a detector-only
    config: concept prompts answer as the directory's, visual prompts are refused, /info says so."""
    if case == "a detector-only file":
        path, config = write_meta_checkpoint(tmp_path / "meta", engine.model, files_from=tiny_model_dir), None
    else:
        path, config = sam3_pt(tmp_path / "meta"), str(tiny_detector_dir)
    loaded = load_model(str(path), device="cpu", config=config)
    info = loaded.info()
    assert loaded.tracker is None and info["visual_prompts"] is False and info["parameter_counts"]["tracker"] == 0
    assert info["parameters"] == sum(p.numel() for p in engine.model.parameters())
    image = random_image(rng, 40, 50)
    ours = Sam3Engine(loaded)
    for got, want in zip(ours.run([Job(image, PROMPTS)])[0], engine.run([Job(image, PROMPTS)])[0], strict=True):
        assert_same_result(got, want, score_tol=1e-6)
    with pytest.raises(VisualPromptsUnavailable):
        ours.run([Job(image, [], visual=VISUAL_PROMPTS[0])])


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
        "tracker.some_new_head.weight",
        "memory_bank.weight",
    ],
)
def test_an_unknown_key_stops_the_start_naming_key_and_file(tiny_model_dir, tmp_path, unknown):
    path = sam3_pt(tmp_path / "meta", files_from=tiny_model_dir)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["model"][unknown] = torch.zeros(2)
    torch.save(checkpoint, path)
    with pytest.raises(WeightsError) as error:
        load_model(str(path), device="cpu")
    message = str(error.value)
    assert repr(unknown) in message and str(path) in message
    assert "Meta's original SAM 3 checkpoint" in message


# Phrases whose CLIP token ids open_clip's SimpleTokenizer (= OpenAI's = Meta's) gives; the first is CLIP's classic.
PHRASES = {
    "a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407],
    "A Yellow  School-Bus": None,
    "person's dog": None,
    "2 red cars, 1 truck": None,
    "café au lait": None,
    "t-shirt with 🙂": None,
}


def test_the_built_in_tokenizer_gives_clips_token_ids():
    from open_clip.tokenizer import SimpleTokenizer  # the reference, in the test only (its import is heavy)

    reference = SimpleTokenizer()
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408 == reference.vocab_size
    for phrase, known in PHRASES.items():
        expected = [reference.sot_token_id, *reference.encode(phrase), reference.eot_token_id]
        assert tokenizer(phrase).input_ids == expected, phrase
        assert known is None or expected == known
    padded = tokenizer(["a photo of a cat", "dog " * 40], padding="max_length", max_length=32, truncation=True)
    assert padded.input_ids[0] == PHRASES["a photo of a cat"] + [49407] * 25  # padded with <|endoftext|>
    assert padded.attention_mask[0] == [1] * 7 + [0] * 25
    assert len(padded.input_ids[1]) == 32 and padded.input_ids[1][-1] == 49407


def test_a_lone_checkpoint_gets_the_full_size_sam3_architecture_and_processor(tmp_path):
    lone = tmp_path / "weights" / "sam3.pt"
    lone.parent.mkdir()
    lone.write_bytes(b"")  # only its directory is looked at
    config, source = meta_checkpoint_config(lone)
    assert config.to_dict() == Sam3VideoConfig().to_dict() and "built-in" in source
    assert config.detector_config.to_dict() == Sam3Config().to_dict()
    with torch.device("meta"):  # the released SAM 3: detector + tracker, and the detector alone
        assert sum(p.numel() for p in Sam3VideoModel(config).parameters()) == 859_921_848
        assert sum(p.numel() for p in Sam3Model(config.detector_config).parameters()) == 840_376_374
    processor, source = meta_checkpoint_processor(lone, None, config.detector_config)
    image = processor.image_processor
    assert image.size == {"height": 1008, "width": 1008} and image.resample == PIL.Image.Resampling.BILINEAR
    assert image.do_rescale and image.rescale_factor == 1 / 255
    assert image.do_normalize and list(image.image_mean) == list(image.image_std) == [0.5, 0.5, 0.5]
    assert processor.tokenizer("a photo of a cat").input_ids == PHRASES["a photo of a cat"]
    assert "built-in" in source


def test_a_lone_tiny_checkpoint_fails_on_shapes_never_on_the_hub(tmp_path, monkeypatch):
    """With nothing beside it and no SAM3_CONFIG, a .pt is taken as full-size SAM 3: a tiny one does not fit,
    and the error says so (the hub is not asked for a config)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = sam3_pt(tmp_path / "lone")
    with pytest.raises(WeightsError) as error:
        load_model(str(path), device="cpu")
    message = str(error.value)
    assert "built-in full-size SAM 3 config" in message and "tensors of another shape" in message
    assert "in the file" in message and "SAM3_CONFIG" in message
    assert "facebook/sam3" not in message and "HF_TOKEN" not in message


def test_a_lone_checkpoint_with_sam3_config_loads_offline_and_matches_the_directory(
    tiny_model_dir, tmp_path, engine, rng
):
    """The .pt alone in its directory, SAM3_CONFIG naming the tiny config (with its processor files): it loads in a
    fresh interpreter with the hub offline and unreachable, and answers exactly like the transformers directory."""
    path = sam3_pt(tmp_path / "lone")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name in CONFIG_AND_PROCESSOR:
        (config_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    image = random_image(rng, 40, 50)
    np.save(tmp_path / "image.npy", image)
    script = (
        "import pickle, sys\n"
        "import numpy as np\n"
        "from sam3_runner import Job, Prompt, Sam3Engine, load_model\n"
        "loaded = load_model(sys.argv[1], device='cpu', config=sys.argv[2])\n"
        "prompts = [Prompt('cat', score_threshold=0.0), Prompt(boxes=(), text='dog', score_threshold=0.0)]\n"
        "results = Sam3Engine(loaded).run([Job(np.load(sys.argv[3]), prompts)])[0]\n"
        "pickle.dump((loaded.kind, loaded.visual_prompts, results), open(sys.argv[4], 'wb'))\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "empty-hf-home"), HF_ENDPOINT="http://127.0.0.1:9")
    out = tmp_path / "results.pkl"
    argv = [str(path), str(config_dir), str(tmp_path / "image.npy"), str(out)]
    result = subprocess.run(
        [sys.executable, "-c", script, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    kind, visual_prompts, results = pickle.loads(out.read_bytes())
    assert kind == "meta_checkpoint" and visual_prompts is True
    for got, want in zip(results, engine.run([Job(image, PROMPTS)])[0], strict=True):
        assert_same_result(got, want, score_tol=1e-6)


def test_sam3_config_wins_over_the_files_beside_the_checkpoint(tiny_model_dir, tmp_path):
    path = sam3_pt(tmp_path / "meta")
    Sam3VideoConfig().to_json_file(path.parent / "config.json")  # full size: the tiny weights do not fit it
    assert load_model(str(path), device="cpu", config=str(tiny_model_dir / "config.json")).parameters == sum(
        p.numel() for p in build_demo_video_model()[0].parameters()
    )
    with pytest.raises(WeightsError, match=re.escape(str(path.parent / "config.json"))):
        load_model(str(path), device="cpu")


@pytest.mark.parametrize(
    ("weights", "config", "message"),
    [
        ("meta", "/no/such/config.json", "is not a config.json or a directory holding one"),
        ("meta", "empty-dir", "is not a config.json or a directory holding one"),
        ("demo", "tiny", "Unset SAM3_CONFIG"),
        ("tiny", "tiny", "Unset SAM3_CONFIG"),
    ],
)
def test_a_sam3_config_that_cannot_work_fails_the_start(tiny_model_dir, tmp_path, weights, config, message):
    meta = tmp_path / "sam3.pt"
    meta.write_bytes(b"")
    (tmp_path / "empty-dir").mkdir()
    names = {"meta": str(meta), "demo": "demo", "tiny": str(tiny_model_dir), "empty-dir": str(tmp_path / "empty-dir")}
    with pytest.raises(WeightsError, match=message):
        check_weights_reference(names[weights], names.get(config, config))


def test_directory_loads_with_info(tiny_model_dir):
    """The parameter count is the whole model's (the trunk once), and per part; no GPU memory on the CPU."""
    loaded = load_model(str(tiny_model_dir), device="cpu")
    info = loaded.info()
    assert info["weights_kind"] == "directory" and info["random_weights"] is False
    video = Sam3VideoModel.from_pretrained(str(tiny_model_dir))
    assert info["parameters"] == sum(p.numel() for p in video.parameters()) > 0
    parts = info["parameter_counts"]
    assert sum(parts.values()) == info["parameters"]
    assert parts["trunk"] == sum(p.numel() for p in video.detector_model.vision_encoder.backbone.parameters())
    tracker = [*video.tracker_model.parameters(), *video.tracker_neck.parameters()]
    assert parts["tracker"] == sum(p.numel() for p in tracker)
    assert parts["text"] > 0 and parts["detector_heads"] > 0
    assert info["visual_prompts"] is True and "gpu_memory_gb" not in info
    assert info["device"] == "cpu" and info["dtype"] == "float32"


def test_a_detector_only_directory_loads_without_visual_prompts(tiny_detector_dir):
    loaded = load_model(str(tiny_detector_dir), device="cpu")
    info = loaded.info()
    assert info["visual_prompts"] is False and loaded.tracker is None
    assert info["parameter_counts"]["tracker"] == 0
    assert info["parameters"] == sum(p.numel() for p in loaded.model.parameters())


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


def test_the_tracker_loads_from_the_hubs_layout_and_from_save_pretrained(tiny_model_dir, tmp_path):
    """The hub holds the tracker as `tracker_model.*`; transformers 5.17's save_pretrained writes
    `tracker_model.tracker_model.*`. Both directories load the same weights, the ones the demo builds."""
    model, processor = build_demo_video_model()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert any(key.startswith("tracker_model.tracker_model.") for key in load_file(tmp_path / "model.safetensors"))
    assert not any(key.startswith("tracker_model.tracker_model.") for key in load_file(tiny_model_dir / WEIGHTS_FILE))
    built = model.state_dict()
    for directory in (tiny_model_dir, tmp_path):
        loaded = load_model(str(directory), device="cpu")
        parts = {"detector_model": loaded.model, "tracker_model": loaded.tracker, "tracker_neck": loaded.tracker_neck}
        for prefix, part in parts.items():
            for key, tensor in part.state_dict().items():
                assert torch.equal(tensor, built[f"{prefix}.{key}"]), (directory, prefix, key)
