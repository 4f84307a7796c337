"""ImageCache: ``encode(..., image_keys=, image_cache=)`` equals plain ``encode`` (1e-5), does each key's image
work once, and leaves the retrieval reward's outputs unchanged."""

import math
import pickle

import numpy as np
import pytest
import torch

from afmrl.catalog.load import load_catalog
from afmrl.embedded.tiny_models import tiny_mllm_path
from afmrl.encoder.model import EncoderConfig, ImageCache, ProductEncoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def listings(small_catalog_dir):
    ds = load_catalog(small_catalog_dir, split="test")
    images, titles = list(ds["image"][:6]), list(ds["title"][:6])
    images[4] = images[4].resize((96, 64))  # another image grid
    images[5] = [images[5], images[0].resize((64, 96))]  # a listing with two images
    return images, titles


def _encoder(backbone, **config) -> ProductEncoder:
    enc = ProductEncoder.from_backbone(
        EncoderConfig(backbone=str(backbone), lora_r=2, lora_alpha=4, **config), trainable=False
    ).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter, so that the language model's input matters
        for name, p in enc.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return enc


def _vision_counter(enc):
    counter = {"images": 0}

    def pre(module, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        counter["images"] += int(grid.shape[0])

    enc.backbone.base_model.visual.register_forward_pre_hook(pre, with_kwargs=True)
    return counter


def _rows(images, titles):
    """Several texts per image, repeated images, a text-only row, attribute-free rows."""
    picks = [0, 0, 1, 0, 2, 1, 3, 4, 4, 5, 5, 0]
    imgs = [images[i] for i in picks] + [None]
    tits = [titles[i] for i in picks] + [titles[2]]
    attrs = [
        "color: red",
        "color: blue; size: m",
        None,
        "brand: acme",
        "color: red",
        "material: wool",
        None,
        "color: red",
        "size: xl",
        "color: green",
        None,
        "pattern: striped; color: red",
        "color: red",
    ]
    keys = [f"L{i}" for i in picks] + ["text-only"]
    return imgs, tits, attrs, keys


@pytest.mark.parametrize("vision_features", [True, False])
def test_cached_embeddings_equal_plain_ones(tiny_model_dir, listings, vision_features):
    enc = _encoder(tiny_model_dir)
    images, titles = listings
    imgs, tits, attrs, keys = _rows(images, titles)
    ref = enc.encode(imgs, tits, attrs, batch_size=32)
    cache = enc.new_image_cache(64, vision_features=vision_features)
    calls = _vision_counter(enc)
    for batch_size in (32, 5, 1):  # one batch, mixed batches, one listing per batch
        got = enc.encode(imgs, tits, attrs, batch_size=batch_size, image_keys=keys, image_cache=cache)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert cache.level == ("vision" if vision_features else "processor")
    distinct_images = 1 + 1 + 1 + 1 + 1 + 2  # keys L0 L1 L2 L3 L4, L5 has two images
    assert len(cache) == 7 and cache.misses == 7
    if vision_features:  # each image through the vision tower once, over all three calls
        assert calls["images"] == distinct_images
    else:  # the vision tower runs on every forward; only the processor's work is kept
        assert calls["images"] > distinct_images
    # Cached keys: their images are not read at all.
    blind = enc.encode([None] * len(imgs), tits, attrs, image_keys=keys, image_cache=cache)
    np.testing.assert_allclose(blind, ref, atol=1e-5, rtol=0)


def test_mix_of_cached_new_and_unkeyed_listings(tiny_model_dir, listings):
    enc = _encoder(tiny_model_dir)
    images, titles = listings
    cache = enc.new_image_cache(64)
    calls = _vision_counter(enc)
    enc.encode(images[:2], titles[:2], image_keys=["a", "b"], image_cache=cache)
    assert calls["images"] == 2
    imgs = [images[0], images[3], images[1], images[3], images[2], images[0]]
    tits = [titles[0], titles[3], titles[1], titles[3], titles[2], "another title"]
    attrs = ["size: s", "color: red", None, "color: blue", "brand: x", "color: red"]
    keys = ["a", "d", "b", "d", None, "a"]  # cached, new (twice), cached, unkeyed, cached
    got = enc.encode(imgs, tits, attrs, batch_size=4, image_keys=keys, image_cache=cache)
    assert calls["images"] == 2 + 1 + 1  # "d" once, the unkeyed image once
    np.testing.assert_allclose(got, enc.encode(imgs, tits, attrs), atol=1e-5, rtol=0)
    assert "d" in cache and None not in cache and len(cache) == 3


def test_inputs_follow_the_processor(tiny_model_dir, listings):
    """Token ids, masks, mRoPE token types, grids (and, processor level, pixel values) equal ``build_inputs``'s."""
    images, titles = listings
    imgs, tits, attrs, keys = _rows(images, titles)
    for vision_features in (True, False):
        enc = _encoder(tiny_model_dir)
        ref = enc.build_inputs(imgs, tits, attrs)
        cache = enc.new_image_cache(64, vision_features=vision_features)
        for _ in range(2):  # a cold cache, then a warm one
            batch = enc.cached_model_inputs(enc.build_inputs_cached(imgs, tits, attrs, keys, cache))
            expected = set(ref) - ({"pixel_values"} if vision_features else set())
            assert expected <= set(batch) and ("mm_encoder_outputs" in batch) == vision_features
            for name in expected:
                assert batch[name].dtype == ref[name].dtype and torch.equal(batch[name], ref[name]), name


def test_bounded_lru_and_one_encoder_per_cache(tiny_model_dir, listings):
    enc = _encoder(tiny_model_dir)
    images, titles = listings
    cache = ImageCache(2)
    enc.encode(images[:3], titles[:3], image_keys=["a", "b", "c"], image_cache=cache)
    assert len(cache) == 2 and "a" not in cache and {"b", "c"} <= set(cache._entries)
    enc.encode(images[1:2], titles[1:2], image_keys=["b"], image_cache=cache)
    enc.encode(images[:1], titles[:1], image_keys=["a"], image_cache=cache)  # evicts "c", the least recently used
    assert set(cache._entries) == {"a", "b"} and cache.hits == 1 and cache.misses == 4
    # A batch larger than the bound still works: its listings stay alive for the batch.
    small = ImageCache(1)
    imgs, tits, attrs, keys = _rows(images, titles)
    np.testing.assert_allclose(
        enc.encode(imgs, tits, attrs, image_keys=keys, image_cache=small),
        enc.encode(imgs, tits, attrs),
        atol=1e-5,
        rtol=0,
    )
    other = _encoder(tiny_model_dir)
    with pytest.raises(ValueError, match="another encoder"):
        other.encode(images[:1], titles[:1], image_keys=["a"], image_cache=cache)
    cache.clear()
    other.encode(images[:1], titles[:1], image_keys=["a"], image_cache=cache)
    with pytest.raises(ValueError, match="together"):
        enc.encode(images[:1], titles[:1], image_keys=["a"])
    with pytest.raises(ValueError, match="image keys"):
        enc.encode(images[:2], titles[:2], image_keys=["a"], image_cache=enc.new_image_cache())
    with pytest.raises(ValueError, match="max_entries"):
        ImageCache(0)


def test_vision_level_only_for_a_frozen_vision_tower(tiny_model_dir, listings):
    images, titles = listings
    enc = _encoder(tiny_model_dir)
    cache = enc.new_image_cache()
    enc.encode(images[:2], titles[:2], image_keys=["a", "b"], image_cache=cache)
    assert cache.level == "vision"
    enc.backbone.base_model.visual.requires_grad_(True)  # the vision tower may now change: features would go stale
    with pytest.raises(ValueError, match="no longer frozen"):
        enc.encode(images[:2], titles[:2], image_keys=["a", "b"], image_cache=cache)
    # A fresh cache for such an encoder keeps only the processor's work, and is still exact.
    cache = enc.new_image_cache()
    got = enc.encode(images[:4], titles[:4], image_keys=list("abcd"), image_cache=cache)
    assert cache.level == "processor"
    np.testing.assert_allclose(got, enc.encode(images[:4], titles[:4]), atol=1e-5, rtol=0)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def other_family_dir(request, tmp_path_factory):
    return tiny_mllm_path(tmp_path_factory.mktemp(f"tiny-{request.param}"), family=request.param)


def test_other_qwen_families(other_family_dir, listings):
    """Qwen2.5-VL and Qwen3-VL (deepstack features cached with the merged output) give the plain embeddings."""
    enc = _encoder(other_family_dir)
    images, titles = listings
    imgs, tits, attrs, keys = _rows(images, titles)
    cache = enc.new_image_cache()
    calls = _vision_counter(enc)
    ref = enc.encode(imgs, tits, attrs)
    seen = calls["images"]
    for batch_size in (32, 4):
        got = enc.encode(imgs, tits, attrs, batch_size=batch_size, image_keys=keys, image_cache=cache)
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    assert cache.level == "vision" and calls["images"] - seen == 7
    if "qwen3" in str(other_family_dir):
        assert cache._entries["L0"].deepstack is not None and len(cache._entries["L0"].deepstack[0]) > 0


# ---------------------------------------------------------------------------------------------
def test_retrieval_reward_outputs_do_not_change(tmp_path, tiny_model_dir, small_catalog_dir):
    from afmrl.retrieval.gallery import ProductGallery
    from rewards.retrieval_rank import RetrievalRankReward

    torch.manual_seed(0)
    enc_dir = tmp_path / "encoder"
    _encoder(tiny_model_dir).save_pretrained(enc_dir)
    ds = load_catalog(small_catalog_dir, verify_images=False).select(range(40))
    ds.save_to_disk(str(tmp_path / "cat"))
    ProductGallery.build(str(tmp_path / "cat"), str(enc_dir)).save(tmp_path / "gallery")
    kwargs = dict(encoder=str(enc_dir), gallery=str(tmp_path / "gallery"), rank_depth=40, baseline_from_gallery=False)
    plain = RetrievalRankReward(image_cache_size=0, **kwargs)
    cached = RetrievalRankReward(**kwargs)
    ids = ds["listing_id"]
    texts = [
        "color: red; size: m",
        "color: blue",
        "nonsense",
        "brand: acme; color: red",
        "size: xl",
        "material: wool; pattern: plain",
        "color: red; size: m",
        "color: green",
    ]
    calls = [  # G = 4 completions per listing; later calls revisit listings (cross-call cache hits)
        ([ids[0]] * 4 + [ids[1]] * 4, texts),
        ([ids[1]] * 4 + [ids[2]] * 4, texts[::-1]),
        ([ids[0]] * 4 + [ids[3]] * 4, texts[2:] + texts[:2]),
    ]
    for listing_ids, completions in calls:
        a, b = plain.score(listing_ids, completions), cached.score(listing_ids, completions)
        assert a.rewards == b.rewards
        assert all(r is None or math.isfinite(r) for r in b.rewards) and b.scored.sum() >= 4
        for name in (
            "valid",
            "scorable",
            "rank",
            "rank_without_attributes",
            "reciprocal_rank",
            "reciprocal_rank_without_attributes",
            "recall_fraction",
            "hit_at_1",
            "hit_at_k",
        ):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert plain._state.image_cache is None
    cache = cached._state.image_cache
    assert cache.level == "vision" and cache.hits == 2 and cache.misses == 4
    assert len(pickle.dumps(cached)) < 10_000  # the cache lives in the loaded state, dropped on pickling
    with pytest.raises(ValueError, match="image_cache_size"):
        RetrievalRankReward(image_cache_size=-1, **kwargs)
