"""The GPU speed paths, checked on the CPU: same answers as eager, one graph for the heads, a safe fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import random_image
from runner_asserts import assert_same_result
from transformers.modeling_outputs import BaseModelOutputWithPooling

import sam3_runner.engine as engine_module
from sam3_runner import BoxPrompt, Job, Prompt, Sam3Engine, load_model
from sam3_runner.acceleration import (
    CompileOptions,
    learn_decoder_grid,
    pair_buckets,
    pin_decoder_grid,
    pool_boxes_in_one_call,
)
from sam3_runner.demo import DEMO_IMAGE_SIZE, build_demo_model

ALL = {"score_threshold": 0.0, "max_instances": 200}


def _heads_inputs(model, processor, pairs: int = 2) -> dict:
    with torch.inference_mode():
        vision = model.vision_encoder(torch.randn(pairs, 3, DEMO_IMAGE_SIZE, DEMO_IMAGE_SIZE))
        text = processor.tokenizer(["cat"] * pairs, padding="max_length", max_length=32, return_tensors="pt")
        features = model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask)
    return {
        "vision_embeds": vision,
        "text_embeds": BaseModelOutputWithPooling(pooler_output=features.pooler_output),
        "attention_mask": text.attention_mask,
        "input_boxes": torch.zeros(pairs, 1, 4),
        "input_boxes_labels": torch.full((pairs, 1), -10),
    }


def test_pinned_decoder_grid_keeps_outputs_and_makes_the_heads_one_graph():
    """Unpinned, transformers reads the grid size back from the device in every decoder layer, which splits
    torch.compile's graph (and so the CUDA graphs) into pieces."""
    model, processor = build_demo_model()
    inputs = _heads_inputs(model, processor)
    with torch.inference_mode():
        before = model(**inputs)
        assert torch._dynamo.explain(model.forward)(**inputs).graph_break_count > 0
        pin_decoder_grid(model, learn_decoder_grid(model, lambda: model(**inputs)))
        after = model(**inputs)
        explained = torch._dynamo.explain(model.forward)(**inputs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    torch.testing.assert_close(after.pred_logits, before.pred_logits)
    torch.testing.assert_close(after.pred_masks, before.pred_masks)


def test_boxes_pooled_in_one_call_encode_like_transformers_and_keep_the_pair_count_symbolic():
    """transformers' per-pair box list made torch.compile trace the heads once per pair count."""
    model, processor = build_demo_model()
    generator = torch.Generator().manual_seed(0)
    boxes = torch.rand(3, 2, 4, generator=generator) * 0.5 + 0.2  # cxcywh, inside the image
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    features = torch.randn(3, model.config.geometry_encoder_config.hidden_size, 18, 18, generator=generator)
    mask = torch.ones(3, 2, dtype=torch.bool)
    with torch.inference_mode():
        want = model.geometry_encoder._encode_boxes(boxes, mask, labels, features)
        pool_boxes_in_one_call(model)
        got = model.geometry_encoder._encode_boxes(boxes, mask, labels, features)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    assert torch.equal(got[1], want[1])

    traced = []

    def counting_backend(graph, example_inputs):
        traced.append(graph)
        return graph.forward

    heads = torch.compile(model.forward, backend=counting_backend)
    with torch.inference_mode():
        pin_decoder_grid(model, learn_decoder_grid(model, lambda: model(**_heads_inputs(model, processor))))
        for pairs in (1, 2, 4, 8):
            heads(**_heads_inputs(model, processor, pairs))
    assert len(traced) == 2, "bucket 1, then one graph for every larger bucket"


def test_compile_modes_and_pair_buckets():
    assert CompileOptions.parse("all") == CompileOptions(vision=True, heads=True)
    assert CompileOptions.parse(" Vision ").mode == "vision"
    with pytest.raises(ValueError, match="SAM3_COMPILE"):
        CompileOptions.parse("fast")
    assert pair_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert pair_buckets(48) == [1, 2, 4, 8, 16, 32, 48]
    assert pair_buckets(1) == [1]


@pytest.mark.timeout(900)
def test_compiled_engine_answers_like_the_eager_one(tiny_model_dir, rng, tmp_path, monkeypatch):
    """Padded buckets, chunks, box prompts beside graphed text prompts and several images: same results."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "compile-cache"))
    eager = Sam3Engine(load_model(str(tiny_model_dir), device="cpu"), max_pairs_per_forward=4)
    options = CompileOptions.parse("all")
    loaded = load_model(str(tiny_model_dir), device="cpu")
    compiled = Sam3Engine(loaded, max_pairs_per_forward=4, compile_options=options)
    assert compiled.acceleration["compile"] == "all" and "compile_error" not in compiled.acceleration
    assert compiled.acceleration["pair_buckets"] == [1, 2, 4]
    texts = ["cat", "dog", "a red car", "tree", "person"]  # 5 text pairs: a chunk of 4 and one of 1
    jobs = [
        Job(random_image(rng, 40, 60), [Prompt(text, **ALL) for text in texts[:3]]),  # 3 pairs padded to 4
        Job(random_image(rng, 70, 30), [Prompt("cat", boxes=(BoxPrompt(2, 2, 20, 40),), **ALL), Prompt("dog", **ALL)]),
        Job(random_image(rng, 56, 56), [Prompt(text, **ALL) for text in texts]),
    ]
    for got_job, want_job in zip(compiled.run(jobs), eager.run(jobs), strict=True):
        assert len(got_job) == len(want_job)
        for got, want in zip(got_job, want_job, strict=True):
            assert_same_result(got, want)
    assert any((tmp_path / "compile-cache").rglob("*")), "compiled kernels are kept in the cache directory"


def test_a_compiler_failure_leaves_a_working_eager_engine(tiny_model_dir, rng, monkeypatch):
    def broken(_heads):
        raise RuntimeError("inductor exploded")

    monkeypatch.setattr(engine_module, "compiled_heads", broken)
    engine = Sam3Engine(load_model(str(tiny_model_dir), device="cpu"), compile_options=CompileOptions(heads=True))
    assert engine.acceleration["compile"] == "off"
    assert "inductor exploded" in engine.acceleration["compile_error"]
    result = engine.run([Job(random_image(rng, 48, 64), [Prompt("cat", **ALL)])])[0][0]
    assert len(result.instances) == 8


def test_a_grid_that_cannot_be_learned_leaves_the_decoder_as_it_is():
    model, _ = build_demo_model()
    assert learn_decoder_grid(model, lambda: None) is None  # the decoder never ran: nothing learned
    pin_decoder_grid(model, None)
    assert "_get_coords" not in vars(model.detr_decoder)


def test_a_compiled_path_failing_at_run_time_falls_back_to_eager_for_good(tiny_model_dir, rng, monkeypatch):
    calls = []

    def heads_that_break_after_warm_up(heads):
        def run(*args):
            calls.append(len(calls))
            if len(calls) > 1:  # the warm-up call (one bucket, one record call) passes
                raise RuntimeError("CUDA graph replay failed")
            return heads(*args)

        return run

    monkeypatch.setattr(engine_module, "compiled_heads", heads_that_break_after_warm_up)
    monkeypatch.setattr(engine_module, "GRAPH_RECORD_CALLS", 1)
    loaded = load_model(str(tiny_model_dir), device="cpu")
    engine = Sam3Engine(loaded, max_pairs_per_forward=1, compile_options=CompileOptions(heads=True))
    assert engine.acceleration["compile"] == "heads"
    job = Job(random_image(rng, 48, 64), [Prompt("cat", **ALL)])
    first, second = engine.run([job])[0][0], engine.run([job])[0][0]
    assert len(first.instances) == len(second.instances) == 8
    assert engine.acceleration["compile"] == "off" and "replay failed" in engine.acceleration["compile_error"]
    assert len(calls) == 2  # the failing path was not tried again


def test_a_compiler_failing_on_its_first_call_leaves_an_eager_engine(tiny_model_dir, rng, monkeypatch):
    """torch.compile is lazy: most compiler errors surface on the first call, during the warm-up."""

    def fails_when_called(_heads):
        def run(*args):
            raise RuntimeError("inductor: unsupported op")

        return run

    monkeypatch.setattr(engine_module, "compiled_heads", fails_when_called)
    engine = Sam3Engine(load_model(str(tiny_model_dir), device="cpu"), compile_options=CompileOptions(heads=True))
    assert engine.acceleration["compile"] == "off"
    assert "unsupported op" in engine.acceleration["compile_error"]
    assert len(engine.run([Job(random_image(rng, 48, 64), [Prompt("cat", **ALL)])])[0][0].instances) == 8


def test_without_compilation_a_model_failure_reaches_the_caller_unretried(engine, rng, monkeypatch):
    calls = []

    def broken_forward(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("vision encoder failed")

    monkeypatch.setattr(engine.model.vision_encoder.backbone, "forward", broken_forward)
    with pytest.raises(RuntimeError, match="vision encoder failed"):
        engine.run([Job(random_image(rng, 30, 40), [Prompt("cat", **ALL)])])
    assert len(calls) == 1 and "compile_error" not in engine.acceleration


def test_the_compiled_vision_traces_the_trunk_and_the_neck_twice_each_then_serves_hits_and_any_batch(
    tiny_model_dir, rng, monkeypatch
):
    """The warm-up's two batch sizes make the batch dimension dynamic: no trace on a request, cached image or not."""
    traced = []

    def counting_backend(graph, example_inputs):
        traced.append(graph)
        return graph.forward

    compile_eagerly = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, **options: compile_eagerly(module, backend=counting_backend))
    loaded = load_model(str(tiny_model_dir), device="cpu")
    engine = Sam3Engine(loaded, compile_options=CompileOptions(vision=True), image_cache_bytes=10**6)
    assert engine.acceleration["compile"] == "vision" and len(traced) == 4  # trunk and neck, at 1 and 2 images
    images = [random_image(rng, 40, 50) for _ in range(3)]
    engine.run([Job(image, [Prompt("cat", **ALL)], image_key=f"image-{i}") for i, image in enumerate(images)])
    hits = engine.run([Job(image, [Prompt("cat", **ALL)], image_key=f"image-{i}") for i, image in enumerate(images)])
    mixed = engine.run([Job(images[0], [Prompt("dog", **ALL)], image_key="image-0"), Job(images[1], [Prompt("cat")])])
    assert [result[0].cached_image for result in hits + mixed] == [True, True, True, True, False]
    assert len(traced) == 4
