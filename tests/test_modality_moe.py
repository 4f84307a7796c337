"""Modality-aware experts (MOON2.0) on the encoder: routing by modality, identity at start, the entropy
regulariser against a reference, save/load, and a training step that moves the router."""

import math

import pytest
import torch
from PIL import Image

from afmrl.encoder.model import EncoderConfig, EncoderLoadError, ProductEncoder
from afmrl.encoder.moe import MODALITIES, ModalityMoE, routing_entropy_loss


@pytest.fixture(scope="module")
def moe_encoder(tiny_model_dir):
    torch.manual_seed(0)
    return ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=0, moe_experts=3))


def listings():
    red, blue = Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))
    return [red, None, blue, [red, blue]], ["red mug", "blue cup", None, "two mugs"]


def test_inputs_carry_each_listings_modality(moe_encoder, tiny_model_dir):
    images, titles = listings()
    batch = moe_encoder.build_inputs(images, titles)
    assert batch["listing_modality"].tolist() == [
        MODALITIES.index(m) for m in ("image+text", "text", "image", "image+text")
    ]
    cached = moe_encoder.build_inputs_cached(images, titles, None, ["a", "b", "c", "d"], moe_encoder.new_image_cache())
    assert torch.equal(cached.inputs["listing_modality"], batch["listing_modality"])
    plain = ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=0))
    assert "listing_modality" not in plain.build_inputs(images, titles)  # option off: inputs as before


def test_routing_depends_on_modality():
    torch.manual_seed(0)
    moe = ModalityMoE(8, num_experts=4)
    h = torch.randn(1, 8).repeat(3, 1)  # one content, three modality compositions
    _, gates = moe(h, torch.tensor([0, 1, 2]))
    assert torch.allclose(gates.sum(-1), torch.ones(3))
    assert not torch.allclose(gates[0], gates[1]) and not torch.allclose(gates[1], gates[2])


def test_a_new_moe_encoder_embeds_like_the_encoder_without_it(moe_encoder, tiny_model_dir):
    images, titles = listings()
    plain = ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=0))
    assert abs(plain.encode(images, titles) - moe_encoder.encode(images, titles)).max() < 1e-6
    assert moe_encoder.last_routing.shape == (4, 3)


def test_routing_entropy_loss_matches_a_reference():
    gates = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]])

    def entropy(p):
        return -sum(x * math.log(x) for x in p if x > 0)

    rows = gates.tolist()
    mean = [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    expected = sum(entropy(r) for r in rows) / len(rows) - entropy(mean)
    assert routing_entropy_loss(gates).item() == pytest.approx(expected, abs=1e-6)
    one_hot = torch.eye(3)  # committed inputs, balanced batch: the minimum, -log K
    assert routing_entropy_loss(one_hot).item() == pytest.approx(-math.log(3), abs=1e-6)


def test_experts_are_saved_and_loaded_with_the_encoder(moe_encoder, tmp_path):
    with torch.no_grad():
        for p in moe_encoder.moe.parameters():
            p.add_(0.01 * torch.randn_like(p))
    moe_encoder.save_pretrained(tmp_path / "enc")
    reloaded = ProductEncoder.from_pretrained(tmp_path / "enc")
    assert reloaded.config.moe_experts == 3
    for (name, a), b in zip(moe_encoder.moe.state_dict().items(), reloaded.moe.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    images, titles = listings()
    assert abs(moe_encoder.encode(images, titles) - reloaded.encode(images, titles)).max() < 1e-6
    assert not any(p.requires_grad for p in reloaded.moe.parameters())  # frozen unless trainable
    (tmp_path / "enc" / "moe.safetensors").unlink()
    with pytest.raises(EncoderLoadError, match="moe.safetensors"):
        ProductEncoder.from_pretrained(tmp_path / "enc")


def test_a_training_step_adds_the_regulariser_and_moves_the_router(tiny_model_dir, small_catalog_dir, tmp_path):
    from afmrl.catalog.load import load_catalog
    from agcl.config import AGCLConfig
    from agcl.trainer import AGCLTrainer

    torch.manual_seed(0)
    encoder = ProductEncoder.from_backbone(
        EncoderConfig(backbone=str(tiny_model_dir), lora_r=0, moe_experts=3, moe_entropy_weight=0.5)
    )
    router_before = encoder.moe.router.weight.detach().clone()
    args = AGCLConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        intra_product_weight=0.5,
    )
    trainer = AGCLTrainer(model=encoder, args=args, train_dataset=load_catalog(small_catalog_dir, split="train"))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    with torch.no_grad():
        with_term = trainer.compute_loss(encoder, batch).item()
        gates = encoder.last_routing  # the text-only pass of the intra-product term came last
        assert batch["query_text_only"]["listing_modality"].unique().tolist() == [0]
        encoder.config.moe_entropy_weight = 0.0
        without = trainer.compute_loss(encoder, batch).item()
        encoder.config.moe_entropy_weight = 0.5
    assert gates is not None and with_term != pytest.approx(without)
    trainer.train()
    assert not torch.allclose(encoder.moe.router.weight, router_before)

    with pytest.raises(ValueError, match="gradient_cache_chunk_size"):
        AGCLTrainer(
            model=encoder,
            args=AGCLConfig(output_dir=str(tmp_path), gradient_cache_chunk_size=4, report_to=[], use_cpu=True),
            train_dataset=load_catalog(small_catalog_dir, split="train"),
        )
