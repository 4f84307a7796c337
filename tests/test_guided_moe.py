"""MOON's guided experts (afmrl/encoder/guided_moe.py): off is today's encoder, a new one embeds exactly like it,
each token goes to the expert of its kind (image, category, attribute) on every input path, training moves them,
and they are saved, resumed and refused where they cannot go."""

import numpy as np
import pytest
import torch
from PIL import Image

from afmrl.catalog.load import load_catalog
from afmrl.encoder.guided_moe import TOKEN_KINDS
from afmrl.encoder.model import EncoderConfig, EncoderLoadError, ProductEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

IMAGES = [Image.new("RGB", (64, 64), (200, 10, 10)), None, [Image.new("RGB", (64, 64), (10, 200, 10))] * 2]
TITLES = ["red shirt", "blue cotton shirt", "green"]
ATTRIBUTES = ["category: shirt; color: red", "color: blue; category: tee", None]


def _encoder(backbone, layers=1, **options):
    torch.manual_seed(0)
    return ProductEncoder.from_backbone(EncoderConfig(backbone=str(backbone), lora_r=0, guided_moe_layers=layers,
                                                      **options))  # fmt: skip


def test_a_new_guided_encoder_embeds_exactly_like_the_plain_one(tiny_model_dir):
    plain, guided = _encoder(tiny_model_dir, 0), _encoder(tiny_model_dir, 1)
    assert plain.guided is None and "guided_token_kinds" not in plain.build_inputs(IMAGES, TITLES, ATTRIBUTES)
    np.testing.assert_array_equal(plain.encode(IMAGES, TITLES, ATTRIBUTES), guided.encode(IMAGES, TITLES, ATTRIBUTES))


def test_each_token_goes_to_the_expert_of_its_kind_on_every_input_path(tiny_model_dir):
    encoder = _encoder(tiny_model_dir)
    batch = encoder.build_inputs(IMAGES, TITLES, ATTRIBUTES)
    tokenizer = encoder.processor.tokenizer
    image_pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    for row, attributes in enumerate(ATTRIBUTES):
        ids, kinds = batch["input_ids"][row].tolist(), batch["guided_token_kinds"][row].tolist()
        assert [k == 1 for k in kinds] == [i == image_pad for i in ids]  # every image token, nothing else
        words = {
            kind: "".join(
                tokenizer.decode([i]) for i, k in zip(ids, kinds, strict=True) if k == TOKEN_KINDS.index(kind)
            )
            for kind in ("category", "attribute")
        }
        if attributes is None:
            assert words == {"category": "", "attribute": ""}
            continue
        category = next(p.strip() for p in attributes.split(";") if p.strip().startswith("category"))
        assert words["category"].strip().rstrip(";") == category
        rest = attributes.replace(category, "")
        assert all(word in words["attribute"] for word in rest.replace(";", " ").split())
        assert words["attribute"].startswith("Attributes:")
    # the reward's cached inputs carry the same kinds
    cache = encoder.new_image_cache(8)
    cached = encoder.build_inputs_cached(IMAGES, TITLES, ATTRIBUTES, [1, 2, 3], cache)
    assert torch.equal(cached.inputs["guided_token_kinds"], batch["guided_token_kinds"])


def test_trained_experts_change_the_embedding_the_same_way_on_every_path_and_survive_saving(tiny_model_dir, tmp_path):
    encoder = _encoder(tiny_model_dir)
    with torch.no_grad():
        for param in encoder.guided.parameters():
            param.normal_(0, 0.1)
    vectors = encoder.encode(IMAGES, TITLES, ATTRIBUTES)
    assert np.abs(vectors - _encoder(tiny_model_dir, 0).encode(IMAGES, TITLES, ATTRIBUTES)).max() > 1e-3
    cache = encoder.new_image_cache(8)
    np.testing.assert_allclose(
        encoder.encode(IMAGES, TITLES, ATTRIBUTES, image_keys=[1, 2, 3], image_cache=cache), vectors, atol=1e-5
    )
    batch = encoder.build_inputs(IMAGES, TITLES, ATTRIBUTES)
    chunks = torch.cat([encoder(**chunk) for chunk in encoder.split_inputs(batch, 2)])
    torch.testing.assert_close(chunks, encoder(**batch), atol=1e-5, rtol=0)
    encoder.save_pretrained(tmp_path / "enc")
    np.testing.assert_array_equal(ProductEncoder.from_pretrained(tmp_path / "enc").encode(IMAGES, TITLES, ATTRIBUTES),
                                  vectors)  # fmt: skip
    (tmp_path / "enc" / "guided_moe.safetensors").unlink()
    with pytest.raises(EncoderLoadError, match="guided_moe.safetensors"):
        ProductEncoder.from_pretrained(tmp_path / "enc")


def test_agcl_trains_the_category_and_attribute_experts(tiny_model_dir, small_catalog_dir, tmp_path):
    from agcl.config import AGCLConfig
    from agcl.trainer import AGCLTrainer

    encoder = _encoder(tiny_model_dir)
    start = {k: v.clone() for k, v in encoder.guided.state_dict().items()}
    args = AGCLConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=16, max_steps=3,
                      learning_rate=1e-3, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                      query_attribute_probability=1.0, candidate_attribute_probability=1.0)  # fmt: skip
    AGCLTrainer(model=encoder, args=args, train_dataset=load_catalog(small_catalog_dir, split="train")).train()
    moved = {k for k, v in encoder.guided.state_dict().items() if not torch.equal(v, start[k])}
    for layer in range(len(encoder.guided.experts)):
        for kind in range(3):  # image, category, attribute: every expert of every guided layer learned
            assert f"experts.{layer}.{kind}.2.weight" in moved


def test_where_guided_experts_cannot_go_is_refused(tiny_model_dir, tmp_path):
    from afmrl.embedded.tiny_models import tiny_dual_path
    from afmrl.encoder.st_export import check_exportable

    with pytest.raises(ValueError, match="guided_moe_layers"):
        check_exportable(_encoder(tiny_model_dir))
    with pytest.raises(ValueError, match="guided_moe_layers"):
        _encoder(tiny_dual_path(tmp_path, family="clip"))
    with pytest.raises(ValueError, match="layers"):
        _encoder(tiny_model_dir, 99)
