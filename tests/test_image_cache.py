"""The image cache: a second request on the same stored image skips decoding and the ViT trunk, and answers exactly
what the first one answered; the cache never holds more bytes than its bound, and a new version is a new image."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from conftest import encode, random_image

import backend.segmenter as segmenter_module
from backend.protocol import make_item
from backend.segmenter import Segmenter
from backend.settings import Settings
from sam3_runner import BoxPrompt, Job, Prompt, PromptResult, Sam3Engine, load_model
from sam3_runner.engine import _StageClock
from sam3_runner.image_cache import EncodedImage, ImageCache
from storage import LocalStorage

ALL = {"score_threshold": 0.0, "max_instances": 200}
PROMPTS = [Prompt("cat", **ALL), Prompt("dog", boxes=(BoxPrompt(4, 6, 30, 40),), **ALL)]


@pytest.fixture(scope="module")
def cached_engine(tiny_model_dir) -> Sam3Engine:
    return Sam3Engine(load_model(str(tiny_model_dir), device="cpu"), image_cache_bytes=10**6)


@contextmanager
def trunk_images(engine: Sam3Engine):
    """Counts the images the ViT trunk encodes (one list entry per trunk call: its batch size)."""
    calls: list[int] = []
    handle = engine.model.vision_encoder.backbone.register_forward_hook(
        lambda module, args, output: calls.append(args[0].shape[0])
    )
    try:
        yield calls
    finally:
        handle.remove()


def assert_identical(got: list[PromptResult], want: list[PromptResult]) -> None:
    """Bit for bit: scores, boxes, areas, RLE and the union mask."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.instances == b.instances and a.image_size == b.image_size
        assert np.array_equal(a.union_mask, b.union_mask)


# One tiny-model image's trunk output: 16 tokens (56 / 14 squared) x 128 channels (sam3_runner/demo.py), fp32.
TINY_TRUNK_BYTES = 16 * 128 * 4


def trunk_of(height: int = 16, width: int = 32, tokens: int = 10) -> EncodedImage:
    return EncodedImage(torch.zeros(tokens, 8), height, width)  # 320 bytes in fp32


# The cache itself


def test_the_cache_never_holds_more_than_its_bound_and_evicts_the_least_recently_used():
    cache = ImageCache(1000)
    rng = np.random.default_rng(0)
    for index in range(200):
        cache.put(f"image-{index}", trunk_of(tokens=int(rng.integers(1, 20))))  # 32 to 608 bytes
        if index % 3 == 0:
            cache.get(f"image-{index // 2}")
        stats = cache.stats()
        assert stats["bytes"] <= 1000 and stats["max_bytes"] == 1000
        assert stats["entries"] == len(cache)
    assert cache.stats()["evictions"] == 200 - len(cache)

    cache = ImageCache(1000)
    for key in ("a", "b", "c"):
        cache.put(key, trunk_of())  # 320 bytes each: 960
    cache.get("a")  # "b" is now the least recently used
    cache.put("d", trunk_of())
    assert cache.get("b") is None and all(cache.get(key) for key in ("a", "c", "d"))
    assert cache.stats() == {"bytes": 960, "max_bytes": 1000, "entries": 3, "hits": 0, "misses": 0, "evictions": 1}


def test_an_entry_larger_than_the_bound_or_a_bound_of_zero_keeps_nothing():
    cache = ImageCache(100)
    cache.put("big", trunk_of())
    assert cache.get("big") is None and cache.stats()["bytes"] == 0
    off = ImageCache(0)
    off.put("any", trunk_of(tokens=1))
    assert off.get("any") is None and len(off) == 0


def test_the_cache_keeps_its_own_copy_of_a_row_not_the_whole_batch():
    batch = torch.zeros(16, 10, 8)
    cache = ImageCache(10**6)
    cache.put("row", EncodedImage(batch[3], 16, 32))
    kept = cache.get("row").trunk
    assert kept.untyped_storage().nbytes() == 320 and cache.nbytes == 320
    batch[3] += 1
    assert torch.equal(kept, torch.zeros(10, 8))


# The engine


def test_the_trunk_then_the_neck_is_transformers_vision_encoder_bit_for_bit(cached_engine, rng):
    """The image cache keeps the trunk's output and runs the neck apart: the features must not change."""
    engine = cached_engine
    jobs = [Job(random_image(rng, 48, 64), PROMPTS), Job(random_image(rng, 30, 70), PROMPTS)]
    with torch.inference_mode():
        pixel_values = engine._preprocess(jobs)
        want = engine.model.vision_encoder(pixel_values)
        got = engine._encode_images(jobs, _StageClock(engine.device)).vision
    assert torch.equal(got.last_hidden_state, want.last_hidden_state)
    ours = got.fpn_hidden_states + got.fpn_position_encoding
    for feature, expected in zip(ours, want.fpn_hidden_states + want.fpn_position_encoding, strict=True):
        assert torch.equal(feature, expected)


def test_a_hit_skips_the_trunk_and_answers_exactly_what_the_miss_answered(cached_engine, rng):
    engine = cached_engine
    image = random_image(rng, 48, 64)
    before = engine.image_cache.stats()
    with trunk_images(engine) as encoded:
        miss = engine.run([Job(image, PROMPTS, image_key="photo@v1")])[0]
        assert encoded == [1]
        hit = engine.run([Job(image, PROMPTS, image_key="photo@v1")])[0]
        assert encoded == [1], "the hit ran the trunk"
        sliced_hit = engine.run_sliced(Job(image, PROMPTS, image_key="photo@v1"))
        assert encoded == [1]
    assert_identical(hit, miss)
    assert_identical(sliced_hit, miss)
    assert_identical(engine.run([Job(image, PROMPTS)])[0], miss)  # and what an uncached request gets
    assert [r.cached_image for r in miss + hit + sliced_hit] == [False] * 2 + [True] * 4
    for result in hit + sliced_hit:
        assert result.timings_ms["vision"] == result.timings_ms["preprocess"] == 0.0
    assert all(result.timings_ms["vision"] > 0 for result in miss)
    after = engine.image_cache.stats()
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (2, 1)


def test_a_job_without_a_key_is_never_cached(cached_engine, rng):
    engine = cached_engine
    image = random_image(rng, 40, 40)
    entries = len(engine.image_cache)
    with trunk_images(engine) as encoded:
        engine.run([Job(image, PROMPTS)])
        engine.run([Job(image, PROMPTS)])
    assert encoded == [1, 1] and len(engine.image_cache) == entries


def test_an_entry_taken_before_its_eviction_still_answers_its_job(tiny_model_dir, rng):
    """The segmenter takes the entry before decoding; the cache may evict it before the job runs."""
    engine = Sam3Engine(load_model(str(tiny_model_dir), device="cpu"), image_cache_bytes=2 * TINY_TRUNK_BYTES)
    image = random_image(rng, 48, 64)
    miss = engine.run([Job(image, PROMPTS, image_key="taken")])[0]
    entry = engine.image_cache.get("taken")
    for index in range(2):
        engine.run([Job(random_image(rng, 20, 20), PROMPTS[:1], image_key=f"other-{index}")])
    assert engine.image_cache.get("taken") is None and engine.image_cache.stats()["evictions"] == 1
    with trunk_images(engine) as encoded:
        hit = engine.run([Job(None, PROMPTS, image_key="taken", encoded=entry)])[0]
    assert encoded == [] and [r.cached_image for r in hit] == [True, True]
    assert_identical(hit, miss)


def test_the_same_image_twice_in_one_batch_is_encoded_once(cached_engine, rng):
    engine = cached_engine
    image, other = random_image(rng, 48, 64), random_image(rng, 32, 32)
    with trunk_images(engine) as encoded:
        first, _, twin = engine.run(
            [Job(image, PROMPTS, image_key="twin"), Job(other, PROMPTS[:1]), Job(image, PROMPTS, image_key="twin")]
        )
    assert encoded == [2]  # the twin's image once, and the other image
    assert [r.cached_image for r in first + twin] == [False, False, True, True]
    assert_identical(twin, first)


def test_the_cache_never_exceeds_its_bound_through_the_engine(tiny_model_dir, rng):
    bound = 3 * TINY_TRUNK_BYTES
    engine = Sam3Engine(load_model(str(tiny_model_dir), device="cpu"), image_cache_bytes=bound)
    for index in range(7):
        engine.run([Job(random_image(rng, 20 + index, 30), PROMPTS[:1], image_key=f"image-{index}")])
        assert engine.image_cache.nbytes <= bound
    stats = engine.image_cache.stats()
    assert (stats["entries"], stats["bytes"], stats["evictions"], stats["misses"]) == (3, bound, 4, 7)


# The model service's worker


@contextmanager
def decodes(monkeypatch):
    calls: list[int] = []
    real = segmenter_module.decode_image

    def counting(data, **kwargs):
        calls.append(len(data))
        return real(data, **kwargs)

    monkeypatch.setattr(segmenter_module, "decode_image", counting)
    yield calls


def photo_item(seed: int, identity: str | None, prompts=PROMPTS, max_pixels: int = 10**8) -> dict:
    image = encode(random_image(np.random.default_rng(seed), 48, 64), "JPEG")
    return make_item(image, prompts, max_pixels, identity)


def test_a_hit_is_neither_decoded_nor_encoded_and_answers_like_the_miss(segmenter, monkeypatch):
    assert segmenter.status()["image_cache"]["max_bytes"] == 256 * 1024 * 1024  # the CPU default
    with decodes(monkeypatch) as decoded, trunk_images(segmenter._engine) as encoded:
        (miss,) = segmenter.segment([photo_item(1, "r2:bucket/photo.jpg#etag-1")])
        (hit,) = segmenter.segment([photo_item(1, "r2:bucket/photo.jpg#etag-1")])
        sliced = segmenter.segment_sliced(photo_item(1, "r2:bucket/photo.jpg#etag-1"))
    assert len(decoded) == 1 and encoded == [1]
    for outcome in (hit, sliced):
        assert outcome["ok"]
        for got, want in zip(outcome["results"], miss["results"], strict=True):
            assert (got["instances"], got["mask_bits"], got["image_size"]) == (
                want["instances"],
                want["mask_bits"],
                want["image_size"],
            )
            assert got["cache"] == "hit" and want["cache"] == "miss"
            assert got["timings"]["decode"] == got["timings"]["vision"] == got["timings"]["preprocess"] == 0.0
            assert want["timings"]["vision"] > 0


def test_an_item_without_an_identity_is_decoded_and_encoded_every_time(segmenter, monkeypatch):
    with decodes(monkeypatch) as decoded, trunk_images(segmenter._engine) as encoded:
        outcomes = [segmenter.segment([photo_item(2, None)])[0] for _ in range(2)]
    assert len(decoded) == 2 and encoded == [1, 1]
    assert [outcome["results"][0]["cache"] for outcome in outcomes] == ["miss", "miss"]


def test_two_requests_for_one_uncached_image_at_once_encode_it_once(segmenter):
    before = segmenter.status()["image_cache"]
    with trunk_images(segmenter._engine) as encoded:
        in_one_batch = segmenter.segment([photo_item(3, "r2:bucket/a.jpg#1"), photo_item(3, "r2:bucket/a.jpg#1")])
        outcomes: list[dict] = []
        threads = [
            threading.Thread(target=lambda: outcomes.extend(segmenter.segment([photo_item(4, "r2:bucket/b.jpg#1")])))
            for _ in range(2)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert encoded == [1, 1], "one trunk pass for each image, whatever the batches"
    assert sorted(outcome["results"][0]["cache"] for outcome in in_one_batch) == ["hit", "miss"]
    assert sorted(outcome["results"][0]["cache"] for outcome in outcomes) == ["hit", "miss"]
    assert outcomes[0]["results"][0]["instances"] == outcomes[1]["results"][0]["instances"]
    after = segmenter.status()["image_cache"]
    assert (after["hits"] - before["hits"], after["misses"] - before["misses"]) == (2, 2)


def test_a_hit_still_gets_its_own_pixel_limit_and_box_checks(segmenter):
    identity = "r2:bucket/checked.jpg#1"
    assert segmenter.segment([photo_item(5, identity)])[0]["ok"]
    outside = [Prompt("cat", boxes=(BoxPrompt(64, 0, 80, 10),))]
    too_large, bad_box = segmenter.segment(
        [photo_item(5, identity, max_pixels=48 * 64 - 1), photo_item(5, identity, prompts=outside)]
    )
    assert too_large["error"] == {
        "code": "image_too_large",
        "message": "the image is 64x48 = 3072 pixels; the limit is 3071",
    }
    assert bad_box["error"]["code"] == "invalid_box"


def test_image_cache_mb_0_turns_the_cache_off():
    segmenter = Segmenter(Settings(sam3_weights_path="demo", sam3_device="cpu", image_cache_mb=0, _env_file=None))
    deadline = time.monotonic() + 60
    while not segmenter.ready and time.monotonic() < deadline:
        time.sleep(0.05)
    outcomes = [segmenter.segment([photo_item(6, "r2:bucket/off.jpg#1")])[0] for _ in range(2)]
    assert [outcome["results"][0]["cache"] for outcome in outcomes] == ["miss", "miss"]
    assert segmenter.status()["image_cache"] == {
        "bytes": 0,
        "max_bytes": 0,
        "entries": 0,
        "hits": 0,
        "misses": 2,
        "evictions": 0,
    }


# The object's version


def test_a_local_file_is_named_by_its_content(tmp_path, rng):
    store = LocalStorage(tmp_path)
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "a.png"
    first, second = encode(random_image(rng, 10, 10)), encode(random_image(rng, 10, 10))
    path.write_bytes(first)
    one = store.get_image("images/a.png", 10**6)
    assert one.data == first and store.get_image("images/a.png", 10**6).identity == one.identity
    path.write_bytes(second)
    two = store.get_image("images/a.png", 10**6)
    assert two.data == second and two.identity != one.identity
    (tmp_path / "images" / "b.png").write_bytes(first)
    assert store.get_image("images/b.png", 10**6).identity != one.identity  # another object, even with equal bytes
