"""Mismatched pieces fail clearly and before weights load: an encoder over another backbone, a backbone
whose processor cannot serve the encoder."""

import json
import shutil

import pytest

from afmrl.embedded.tiny_models import tiny_mllm_path
from afmrl.encoder.model import EncoderConfig, EncoderLoadError, ProductEncoder


@pytest.fixture(scope="module")
def narrow_backbone(tmp_path_factory):
    """A tiny backbone of the same family with another hidden size."""
    return tiny_mllm_path(tmp_path_factory.mktemp("narrow"), hidden_size=32)


@pytest.fixture(scope="module")
def lora_encoder_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-encoder")
    ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=4)).save_pretrained(out)
    return out


def point_at(encoder_dir, backbone, tmp_path, drop_signature=False):
    """A copy of ``encoder_dir`` whose encoder_config.json names ``backbone``."""
    copy = tmp_path / "encoder"
    shutil.copytree(encoder_dir, copy)
    config = json.loads((copy / "encoder_config.json").read_text())
    config["backbone"] = str(backbone)
    if drop_signature:  # as written before the signature existed
        del config["backbone_signature"]
    (copy / "encoder_config.json").write_text(json.dumps(config))
    return copy


def test_saved_encoder_records_its_backbone_signature(lora_encoder_dir, tiny_model_dir):
    config = json.loads((lora_encoder_dir / "encoder_config.json").read_text())
    backbone = json.loads((tiny_model_dir / "config.json").read_text())
    text, vision = backbone.get("text_config", backbone), backbone["vision_config"]
    assert config["backbone_signature"] == {
        "model_type": "qwen2_vl",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "vocab_size": text["vocab_size"],
        "vision_hidden_size": vision.get("embed_dim") or vision.get("hidden_size"),
    }


@pytest.mark.usefixtures("no_weights")
def test_encoder_over_another_backbone_is_refused_before_weights_load(lora_encoder_dir, narrow_backbone, tmp_path):
    with pytest.raises(EncoderLoadError) as info:
        ProductEncoder.from_pretrained(point_at(lora_encoder_dir, narrow_backbone, tmp_path))
    message = str(info.value)
    assert "another backbone" in message and "hidden_size 64 (saved) vs 32 (found)" in message


def test_old_encoder_without_signature_over_another_backbone_fails_clearly(lora_encoder_dir, narrow_backbone, tmp_path):
    """Without a saved signature, the adapter's shapes still give the mismatch away, named, not as a traceback
    from deep inside peft."""
    with pytest.raises(EncoderLoadError) as info:
        ProductEncoder.from_pretrained(point_at(lora_encoder_dir, narrow_backbone, tmp_path, drop_signature=True))
    assert "does not fit backbone" in str(info.value) and str(narrow_backbone) in str(info.value)


def test_moved_backbone_with_the_same_signature_loads(lora_encoder_dir, tiny_model_dir, tmp_path):
    """The check compares shapes, not paths: a backbone copied elsewhere serves the encoder unchanged."""
    moved = tmp_path / "moved-backbone"
    shutil.copytree(tiny_model_dir, moved)
    from PIL import Image

    image, title = [Image.new("RGB", (32, 32), (200, 30, 30))], ["red mug"]
    original = ProductEncoder.from_pretrained(lora_encoder_dir).encode(image, title)
    reloaded = ProductEncoder.from_pretrained(point_at(lora_encoder_dir, moved, tmp_path)).encode(image, title)
    assert abs(original - reloaded).max() < 1e-6


@pytest.mark.usefixtures("no_weights")
@pytest.mark.parametrize(
    "remove,message", [("chat_template.jinja", "no chat template"), ("processor_config.json", "image processor")]
)
def test_encoder_backbone_that_cannot_serve_the_encoder(
    load_recipe, capsys, small_catalog_dir, tiny_model_dir, lora_encoder_dir, tmp_path, remove, message
):
    """Stage 1 over such a backbone (agcl_train) and evaluation of an encoder over it both stop with one
    error line naming the model, before any weights load."""
    backbone = tmp_path / "backbone"
    shutil.copytree(tiny_model_dir, backbone)
    (backbone / remove).unlink()
    runs = {
        "agcl_train": [
            "--config",
            "recipes/configs/agcl_demo.yaml",
            "--catalog",
            str(small_catalog_dir),
            "--model_name_or_path",
            str(backbone),
            "--output_dir",
            str(tmp_path / "out"),
        ],
        "evaluate": [
            "--encoder",
            str(point_at(lora_encoder_dir, backbone, tmp_path)),
            "--catalog",
            str(small_catalog_dir),
        ],
    }
    for name, argv in runs.items():
        with pytest.raises(SystemExit) as info:
            load_recipe(name).cli(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2, name
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0] and str(backbone) in errors[0], (name, err)
