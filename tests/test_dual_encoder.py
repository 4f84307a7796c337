"""Dual encoders (CLIP, SigLIP) as product encoders: the fusion against the towers' own features, batching,
GradCache chunks, the reward's image cache, saving, training, the reward, deploy, and the errors."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from afmrl.catalog.load import load_catalog
from afmrl.embedded.synthetic_catalog import make_synthetic_catalog
from afmrl.embedded.tiny_models import build_tiny_dual, tiny_dual_path
from afmrl.encoder.dual import DualEncoder
from afmrl.encoder.model import EncoderConfig, ProductEncoder
from afmrl.retrieval.evaluation import evaluate_encoder


@pytest.fixture(scope="module", params=["clip", "siglip"])
def dual_dir(request, tmp_path_factory):
    return tiny_dual_path(tmp_path_factory.mktemp("tiny-dual"), family=request.param)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_dual_path(tmp_path_factory.mktemp("tiny-clip"), family="clip")


def _photos():
    red, green, blue = (Image.new("RGB", (64, 64), c) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200)))
    return red, green, blue


def test_tiny_dual_models_are_deterministic():
    a, _ = build_tiny_dual("clip", seed=3)
    b, _ = build_tiny_dual("clip", seed=3)
    c, _ = build_tiny_dual("clip", seed=4)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))
    with pytest.raises(ValueError, match="clip, siglip|'clip', 'siglip'"):
        build_tiny_dual("blip")


def test_a_listing_is_the_weighted_fusion_of_the_towers_own_features(dual_dir):
    torch.manual_seed(0)
    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(dual_dir), lora_r=0, image_weight=0.3))
    assert isinstance(encoder, DualEncoder) and encoder.config.encoder_type == "dual"
    model, processor = encoder.backbone, encoder.processor
    red, green, blue = _photos()
    padding = "max_length" if model.config.model_type == "siglip" else True

    def text_vector(text):
        inputs = processor.tokenizer([text], padding=padding, max_length=64, truncation=True, return_tensors="pt")
        out = model.get_text_features(**inputs)
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)[0]

    def image_vector(photo):
        pixels = processor.image_processor(images=[photo], return_tensors="pt")["pixel_values"]
        out = model.get_image_features(pixel_values=pixels)
        return F.normalize(getattr(out, "pooler_output", out), dim=-1)[0]

    with torch.no_grad():
        title_and_line = text_vector("red shirt\nAttributes: color: red")
        expected = [
            F.normalize(0.3 * image_vector(red) + 0.7 * title_and_line, dim=0),  # photo + title + attributes
            text_vector("blue cotton shirt"),  # no photo: the text alone
            F.normalize(F.normalize(image_vector(green) + image_vector(blue), dim=0), dim=0),  # two photos, no text
        ]
    got = encoder.encode(
        [red, None, [green, blue]], ["red shirt", "blue cotton shirt", None], ["color: red", None, None]
    )
    np.testing.assert_allclose(got, torch.stack(expected).numpy(), atol=1e-5)
    assert got.shape[1] == encoder.embedding_dim


def test_vectors_do_not_depend_on_the_batch_chunks_or_the_image_cache(dual_dir):
    torch.manual_seed(0)
    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(dual_dir), lora_r=0))
    red, green, blue = _photos()
    images = [red, None, [green, blue], red, None]
    titles = ["red shirt", "a much longer title of a blue cotton shirt with a logo", "green", None, ""]
    alone = np.stack([encoder.encode([im], [t])[0] for im, t in zip(images, titles, strict=True)])
    np.testing.assert_allclose(encoder.encode(images, titles, batch_size=5), alone, atol=1e-5)
    # GradCache chunks (some without text, some without photos) give the whole batch's vectors
    batch = encoder.build_inputs(images, titles)
    chunks = torch.cat([encoder(**chunk) for chunk in encoder.split_inputs(batch, 2)])
    torch.testing.assert_close(chunks, encoder(**batch), atol=1e-5, rtol=0)
    # the reward's cache keeps each key's image vector: a second call does not read the photos
    cache = encoder.new_image_cache(8)
    keys = ["a", None, "b", "a", "c"]
    np.testing.assert_allclose(encoder.encode(images, titles, image_keys=keys, image_cache=cache), alone, atol=1e-5)
    unread = [None if k in cache else im for k, im in zip(keys, images, strict=True)]
    again = encoder.encode(unread, titles, ["color: red"] * 5, image_keys=keys, image_cache=cache)
    np.testing.assert_allclose(again, encoder.encode(images, titles, ["color: red"] * 5), atol=1e-5)
    assert cache.hits >= 3 and cache.level == "vision"


def test_lora_adapts_the_text_tower_and_saves_and_loads(clip_dir, tmp_path):
    torch.manual_seed(0)
    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(clip_dir), lora_r=4, lora_alpha=8))
    trainable = [n for n, p in encoder.named_parameters() if p.requires_grad]
    assert trainable and all("text_model" in n and "lora_" in n for n in trainable)
    assert any(".out_proj." in n for n in trainable) and any(".fc1." in n for n in trainable)  # MLLM names mapped
    with torch.no_grad():
        for name, param in encoder.named_parameters():
            if "lora_B" in name:
                param.normal_()  # a trained adapter, so that reloading it matters
    red, _, _ = _photos()
    expected = encoder.encode([red, None], ["red shirt", "blue shirt"], ["color: red", None])
    encoder.save_pretrained(tmp_path / "lora")
    reloaded = ProductEncoder.from_pretrained(tmp_path / "lora")
    assert isinstance(reloaded, DualEncoder)
    np.testing.assert_allclose(
        reloaded.encode([red, None], ["red shirt", "blue shirt"], ["color: red", None]), expected
    )
    # full fine-tuning with the image tower: the directory carries the weights ("backbone": ".")
    full = ProductEncoder.from_backbone(EncoderConfig(backbone=str(clip_dir), lora_r=0, freeze_vision=False))
    assert any(p.requires_grad for n, p in full.named_parameters() if "vision_model" in n)
    full.save_pretrained(tmp_path / "full")
    assert json.loads((tmp_path / "full" / "encoder_config.json").read_text())["backbone"] == "."
    np.testing.assert_allclose(
        ProductEncoder.from_pretrained(tmp_path / "full").encode([red], ["x"]), full.encode([red], ["x"]), atol=1e-6
    )


def test_a_short_agcl_run_improves_the_dual_encoder(clip_dir, tmp_path, one_thread):
    from agcl.config import AGCLConfig
    from agcl.trainer import AGCLTrainer

    catalog = make_synthetic_catalog(tmp_path / "catalog", num_products=120, seed=1)
    train, test = load_catalog(catalog, split="train"), load_catalog(catalog, split="test")
    torch.manual_seed(0)
    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(clip_dir), lora_r=0, freeze_vision=False))
    before = evaluate_encoder(encoder, test, tasks=["instance"])["instance"]["recall@1"]
    args = AGCLConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=32, num_train_epochs=6,
                      learning_rate=1e-3, temperature=0.05, save_strategy="no", report_to=[], use_cpu=True,
                      logging_steps=5, seed=0, disable_tqdm=True, false_negative_filter="attribute",
                      intra_product_weight=0.2, intra_product_text="attributes")  # fmt: skip
    trainer = AGCLTrainer(model=encoder, args=args, train_dataset=train)
    trainer.train()
    after = evaluate_encoder(encoder, test, tasks=["instance"])["instance"]["recall@1"]
    assert after > before + 0.05, (before, after)
    trainer.save_model()
    reloaded = ProductEncoder.from_pretrained(tmp_path / "out")
    assert evaluate_encoder(reloaded, test, tasks=["instance"])["instance"]["recall@1"] == pytest.approx(after)


def test_the_reward_and_the_index_take_a_dual_encoder(clip_dir, small_catalog_dir, tmp_path):
    from afmrl.retrieval.gallery import ProductGallery
    from deploy.product_index import ProductIndex
    from rewards.retrieval_rank import RetrievalRankReward

    torch.manual_seed(0)
    ProductEncoder.from_backbone(EncoderConfig(backbone=str(clip_dir), lora_r=2)).save_pretrained(tmp_path / "enc")
    listings = load_catalog(small_catalog_dir, split="test").select(range(24))
    listings.save_to_disk(str(tmp_path / "cat"))
    ProductGallery.build(str(tmp_path / "cat"), str(tmp_path / "enc")).save(tmp_path / "gallery")
    reward = RetrievalRankReward(encoder=str(tmp_path / "enc"), gallery=str(tmp_path / "gallery"))
    ids = listings["listing_id"][:4]
    out = reward(
        prompts=[None] * 4, completions=["color: red", "color: blue", "nonsense", "brand: acme"], listing_id=ids
    )
    assert out[2] == -1.1 and all(r is None or math.isfinite(r) for r in out)
    index = ProductIndex.build(listings, str(tmp_path / "enc"), batch_size=8)
    answers = index.search(listings.select(range(3)), k=3)
    assert [len(a["results"]) for a in answers] == [3, 3, 3]


def test_what_a_dual_encoder_cannot_be_is_refused_in_one_line(clip_dir, small_catalog_dir, tmp_path, load_recipe,
                                                               capsys):  # fmt: skip
    from safetensors.torch import load_file, save_file

    from afmrl.modeling import load_dual

    with pytest.raises(ValueError, match="moe_experts"):
        ProductEncoder.from_backbone(EncoderConfig(backbone=str(clip_dir), moe_experts=2))
    with pytest.raises(ValueError, match="image_weight"):
        ProductEncoder.from_backbone(EncoderConfig(backbone=str(clip_dir), image_weight=1.0))
    with pytest.raises(ValueError, match="4-bit"):
        ProductEncoder.from_backbone(EncoderConfig(backbone=str(clip_dir)), load_in_4bit=True)
    with pytest.raises(ValueError, match="encoder_type"):
        ProductEncoder.from_backbone(EncoderConfig(backbone=str(clip_dir), encoder_type="towers"))
    # a checkpoint without its image tower
    broken = tmp_path / "no-vision"
    broken.mkdir()
    for f in clip_dir.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    weights = load_file(str(clip_dir / "model.safetensors"))
    save_file(
        {k: v for k, v in weights.items() if not k.startswith("vision_model.")}, str(broken / "model.safetensors")
    )
    with pytest.raises(ValueError, match="vision_model"):
        load_dual(broken)
    # through stage 1's recipe: one error line, exit 2, before any training
    with pytest.raises(SystemExit) as info:
        argv = ["--catalog", str(small_catalog_dir), "--model_name_or_path", str(broken), "--output_dir", str(tmp_path)]
        load_recipe("agcl_train").cli(["--config", "recipes/configs/agcl_demo.yaml", *argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert info.value.code == 2 and len(errors) == 1 and "vision_model" in errors[0], errors


@pytest.mark.parametrize("kind", ["mllm", "dual"])
def test_lora_with_an_unfrozen_vision_tower_saves_the_trained_tower(kind, clip_dir, tiny_model_dir, tmp_path):
    """LoRA plus ``freeze_vision: false`` trains the vision tower whole: the saved encoder must carry it (it used to
    save the adapter alone, so a reloaded encoder silently lost the trained tower)."""
    torch.manual_seed(0)
    backbone = clip_dir if kind == "dual" else tiny_model_dir
    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(backbone), lora_r=4, freeze_vision=False))
    vision = [p for n, p in encoder.named_parameters() if p.requires_grad and encoder.is_vision_parameter(n)]
    assert vision
    with torch.no_grad():
        for param in encoder.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)  # a trained adapter and tower
    red, _, _ = _photos()
    expected = encoder.encode([red], ["red shirt"])
    encoder.save_pretrained(tmp_path / "enc")
    np.testing.assert_allclose(ProductEncoder.from_pretrained(tmp_path / "enc").encode([red], ["red shirt"]), expected,
                               atol=1e-6)  # fmt: skip
    again = ProductEncoder.from_pretrained(tmp_path / "enc", trainable=True)  # continued training: the tower trains
    assert any(p.requires_grad for n, p in again.named_parameters() if again.is_vision_parameter(n))
