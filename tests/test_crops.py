"""Product-region crops (MOON): the bbox column is checked, the cluttered synthetic catalog places products
where its boxes say, and an encoder with crop_views sees [image, crop] in training, evaluation and the reward."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from afmrl.catalog.load import CatalogError, load_catalog
from afmrl.embedded.synthetic_catalog import make_synthetic_catalog
from afmrl.encoder.crops import catalog_views, listing_views
from afmrl.encoder.model import EncoderConfig, ProductEncoder


@pytest.fixture(scope="module")
def cluttered(tmp_path_factory):
    root = tmp_path_factory.mktemp("clutter")
    return make_synthetic_catalog(root / "plain", num_products=40, seed=3), make_synthetic_catalog(
        root / "cluttered", num_products=40, seed=3, clutter=True
    )


def rewrite(catalog, tmp_path, change):
    copy = tmp_path / "c"
    shutil.copytree(catalog, copy)
    rows = [json.loads(line) for line in (copy / "catalog.jsonl").read_text().splitlines()]
    change(rows)
    (copy / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return copy


def test_clutter_moves_only_the_pixels_and_the_box_finds_the_product(cluttered):
    plain, busy = (load_catalog(c) for c in cluttered)
    assert "bbox" not in plain.column_names
    for column in ("listing_id", "title", "attributes", "split"):
        assert plain[column] == busy[column]  # its own random stream: everything but the images is the same
    for i in range(0, len(busy), 17):
        x0, y0, x1, y1 = map(int, busy[i]["bbox"])
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64 and (x1 - x0) < 40
        reference = np.asarray(plain[i]["image"].resize((x1 - x0, y1 - y0)), dtype=float)
        crop = np.asarray(busy[i]["image"].crop((x0, y0, x1, y1)), dtype=float)
        elsewhere = np.asarray(
            busy[i]["image"].crop((0, 0, x1 - x0, y1 - y0))
            if x0 or y0
            else busy[i]["image"].crop((64 - (x1 - x0), 64 - (y1 - y0), 64, 64)),
            dtype=float,
        )
        assert np.abs(crop - reference).mean() < 0.5 * np.abs(elsewhere - reference).mean()


@pytest.mark.parametrize(
    "box,message",
    [
        ([1, 2, 3], "must be [x0, y0, x1, y1]"),
        ([10, 5, 4, 20], "x0 < x1"),
        ([-1, 0, 5, 5], "0 <= x0"),
        ([0, 0, True, 5], "must be"),
        ([0, 0, 65, 20], "outside the 64x64 image"),
    ],
)
def test_bad_boxes_are_named_by_line_and_field(cluttered, tmp_path, box, message):
    def change(rows):
        rows[2]["bbox"] = box

    with pytest.raises(CatalogError) as info:
        load_catalog(rewrite(cluttered[1], tmp_path, change))
    text = str(info.value)
    assert "line 3" in text and "field 'bbox'" in text and message in text


def test_listing_views_append_the_crop_of_the_first_image():
    red = Image.new("RGB", (40, 30), (200, 0, 0))
    assert listing_views(red, None) is red and listing_views(red, [0, 0, 10, 10], crop=False) is red
    views = listing_views([red, red], [4, 5, 24, 15])
    assert len(views) == 3 and views[2].size == (20, 10)


@pytest.fixture(scope="module")
def encoders(tiny_model_dir):
    make = lambda crop: ProductEncoder.from_backbone(  # noqa: E731
        EncoderConfig(backbone=str(tiny_model_dir), lora_r=0, crop_views=crop)
    )
    return make(False), make(True)


def test_an_encoder_with_crop_views_sees_image_and_crop_everywhere(encoders, cluttered, small_catalog_dir, caplog):
    from afmrl.retrieval.evaluation import evaluate_encoder
    from agcl.data import AGCLCollator
    from rewards import RetrievalRankReward

    plain_encoder, crop_encoder = encoders
    ds = load_catalog(cluttered[1], split="test")
    vision_start = crop_encoder.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    # training batches: two images per listing
    for encoder, images in ((plain_encoder, 1), (crop_encoder, 2)):
        batch = AGCLCollator(encoder, ds, attribute_column=None)(
            [{"query": 0, "positive": 1}, {"query": 2, "positive": 3}]
        )
        assert (batch["query"]["input_ids"] == vision_start).sum(dim=1).tolist() == [images, images]
    # evaluation: every listing of the gallery and the queries goes in as [image, crop]
    seen = []
    encode = crop_encoder.encode
    crop_encoder.encode = lambda images, *a, **k: seen.extend(images) or encode(images, *a, **k)
    try:
        with_crops = evaluate_encoder(crop_encoder, ds, tasks=("instance",))
    finally:
        del crop_encoder.encode
    assert seen and all(isinstance(v, list) and len(v) == 2 for v in seen)
    assert with_crops["instance"] != evaluate_encoder(plain_encoder, ds, tasks=("instance",))["instance"]
    # the reward's queries: image and crop
    reward = RetrievalRankReward(encoder=crop_encoder, catalog=ds)
    state = reward._ensure_loaded()
    fetched = state.fetch_images([0, 0, 5])
    assert [len(f) for f in fetched] == [2, 2, 2] and fetched[2][1].size == tuple(
        np.subtract(ds[5]["bbox"][2:], ds[5]["bbox"][:2]).astype(int)
    )
    # once a listing's image work is cached, its photo is neither decoded nor cropped again; the rewards equal
    # those of a reward without the cache (every query encoded from [image, crop])
    ids, completions = [ds[i]["listing_id"] for i in (0, 0, 5)], ["color: red", "color: blue", "color: red"]
    cached = reward.score(ids, completions).rewards
    assert all(lid in state.image_cache for lid in ids)
    again = state.fetch_images([0, 7])
    assert isinstance(again[0], Image.Image) and len(again[1]) == 2  # cached: not read; new: image and crop
    uncached = RetrievalRankReward(encoder=crop_encoder, catalog=ds, image_cache_size=0).score(ids, completions)
    assert np.allclose(cached, uncached.rewards, atol=1e-5)
    # also once the cache is full: a new listing evicts another entry, never one this call reads from the cache
    full = RetrievalRankReward(encoder=crop_encoder, catalog=ds, image_cache_size=2)
    full.score([ds[i]["listing_id"] for i in (0, 5)], ["color: red", "color: red"])
    state = full._ensure_loaded()
    assert len(state.image_cache) == 2
    again = state.fetch_images([5, 7])
    assert isinstance(again[0], Image.Image) and len(again[1]) == 2
    ids, completions = [ds[i]["listing_id"] for i in (5, 7, 0)], ["color: red", "color: blue", "logo: star"]
    assert np.allclose(
        full.score(ids, completions).rewards,
        RetrievalRankReward(encoder=crop_encoder, catalog=ds, image_cache_size=0).score(ids, completions).rewards,
        atol=1e-5,
    )
    # a catalog without boxes is seen as before, crops or not, and a crop encoder says so
    with caplog.at_level("WARNING", logger="afmrl.encoder.crops"):
        assert all(isinstance(v, Image.Image) for v in catalog_views(load_catalog(small_catalog_dir), crop_encoder))
    assert "no 'bbox' column" in caplog.text


def test_crop_views_is_saved_and_needs_boxes(
    encoders, tmp_path, load_recipe, capsys, small_catalog_dir, tiny_model_dir
):
    encoders[1].save_pretrained(tmp_path / "enc")
    assert ProductEncoder.from_pretrained(tmp_path / "enc").config.crop_views is True
    with pytest.raises(SystemExit) as info:
        load_recipe("agcl_train").cli(
            [
                "--config",
                "recipes/configs/agcl_demo.yaml",
                "--catalog",
                str(small_catalog_dir),
                "--model_name_or_path",
                str(tiny_model_dir),
                "--output_dir",
                str(tmp_path / "o"),
                "--crop_views",
                "true",
            ]
        )
    assert info.value.code == 2 and "--crop_views" in capsys.readouterr().err
    # a continued encoder keeps its crops: no boxes is an error without the flag, and flags it was not saved with
    # are refused by name (they would be ignored); so is a negative expert count
    common = [
        "--config",
        "recipes/configs/agcl_demo.yaml",
        "--catalog",
        str(small_catalog_dir),
        "--output_dir",
        str(tmp_path / "o"),
    ]
    plain = tmp_path / "plain"
    encoders[0].save_pretrained(plain)
    for argv, needle in (
        (["--init_encoder", str(tmp_path / "enc")], "--crop_views (the --init_encoder"),
        (["--init_encoder", str(plain), "--crop_views", "true"], "was saved with crop_views=False"),
        (["--init_encoder", str(plain), "--moe_experts", "2"], "was saved with moe_experts=0"),
        (["--moe_experts", "-1"], "--moe_experts must be >= 0"),
    ):
        with pytest.raises(SystemExit) as info:
            load_recipe("agcl_train").cli(common + argv)
        assert info.value.code == 2 and needle in capsys.readouterr().err


def test_extract_bbox_task_writes_pixel_boxes(load_recipe, small_catalog_dir, tmp_path, monkeypatch):
    recipe = load_recipe("extract_attributes")
    completions = iter(
        ["[100, 200, 500, 750]", "no box here", '{"bbox_2d": [900, 900, 1200, 1000]}', "[500, 500, 500, 600]"]
    )
    monkeypatch.setattr(recipe, "load_generator", lambda *a, **k: (None, None))
    monkeypatch.setattr(
        "rar.annotate.generate_attributes",
        lambda model, processor, prompts, *, on_batch, **options: on_batch(
            0, [next(completions) for _ in range(len(prompts))]
        ),
    )
    args = recipe.ExtractArguments(
        model="tiny-qwen2-vl", catalog=str(small_catalog_dir), output_dir=str(tmp_path / "boxes"), limit=4, task="bbox"
    )
    summary = recipe.main(args)
    copy = load_catalog(tmp_path / "boxes")
    side = copy[0]["image"].size[0]
    assert copy["bbox"][0] == [round(0.1 * side), round(0.2 * side), round(0.5 * side), round(0.75 * side)]
    assert copy["bbox"][1] is None and copy["bbox"][3] is None  # no numbers; an empty box
    assert copy["bbox"][2] == [round(0.9 * side), round(0.9 * side), side, side]  # clipped to the image
    assert summary["n_unparsable"] == 2
    # another task in the same directory starts its own log instead of resuming the boxes as its answers
    completions = iter(["red mug"] * 4)
    summary = recipe.main(
        recipe.ExtractArguments(
            model="tiny-qwen2-vl",
            catalog=str(small_catalog_dir),
            output_dir=str(tmp_path / "boxes"),
            limit=4,
            task="title",
        )
    )
    assert summary["n_resumed"] == 0 and load_catalog(tmp_path / "boxes")["enriched_title"] == ["red mug"] * 4
