"""The encoder exported to sentence-transformers (afmrl/encoder/st_export.py): ``SentenceTransformer(dir)``, with no
package code, encodes text-only, image-only and image + title + attributes listings as ``ProductEncoder.encode``
does (max abs difference <= 1e-5, LoRA merged), ranks a catalog's top-10 identically, and an encoder it could not
reproduce is refused with one line naming why."""

import importlib.util

import numpy as np
import pytest
import torch

pytest.importorskip("sentence_transformers")

from afmrl.catalog import load_catalog  # noqa: E402
from afmrl.encoder.model import EncoderConfig, ProductEncoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def torchvision_works() -> bool:
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        import torchvision.transforms.v2  # noqa: F401
    except Exception:  # a CUDA build beside a CPU torch fails here
        return False
    return True


@pytest.fixture(scope="module")
def st_loader():
    """``SentenceTransformer`` as a user calls it. Where torchvision is missing (as on the test machines: no CPU build
    of it matches this torch), transformers' AutoProcessor cannot build Qwen2-VL's video processor, so the stock
    processor is built the way the package builds it (same tokenizer, image processor and template); the model,
    modules, prompts and template still come from the exported directory alone."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoProcessor

    if torchvision_works():
        yield lambda path: SentenceTransformer(str(path), device="cpu")
        return
    from afmrl.modeling import load_processor

    original = AutoProcessor.from_pretrained

    def from_pretrained(path, *args, **kwargs):
        try:
            return original(path, *args, **kwargs)
        except OSError:
            AutoProcessor.from_pretrained = original  # load_processor tries AutoProcessor first itself
            try:
                return load_processor(path)
            finally:
                AutoProcessor.from_pretrained = from_pretrained

    AutoProcessor.from_pretrained = from_pretrained
    try:
        yield lambda path: SentenceTransformer(str(path), device="cpu")
    finally:
        AutoProcessor.from_pretrained = original


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    torch.manual_seed(0)
    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir)), trainable=False)
    with torch.no_grad():  # a fresh LoRA adds nothing (B = 0): random adapters make the merge count
        for name, param in encoder.model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    return encoder.eval()


@pytest.fixture(scope="module")
def exported(encoder, st_loader, tmp_path_factory):
    path = encoder.save_sentence_transformer(tmp_path_factory.mktemp("st") / "model")
    return st_loader(path)


def listing_text(encoder, title, attributes=None):
    return "\n".join([title, *([encoder.config.attribute_prefix + attributes] if attributes else [])])


def test_st_encodes_every_kind_of_listing_as_the_package(encoder, exported, small_catalog_dir):
    rows = load_catalog(small_catalog_dir, split="test").select(range(6))
    images, titles = list(rows["image"]), list(rows["title"])
    attributes = ["color: red; brand: acme", None, "size: s", "logo: star", None, "pattern: solid"]
    cases = {
        "text only": (([None] * 6, titles, None), titles),
        "image only": ((images, [None] * 6, None), images),
        "image + title + attributes": (
            (images, titles, attributes),
            [
                {"image": im, "text": listing_text(encoder, t, a)}
                for im, t, a in zip(images, titles, attributes, strict=True)
            ],  # fmt: skip
        ),
        "two photos + title": (
            ([[im, images[-1]] for im in images], titles, None),
            [{"image": [im, images[-1]], "text": t} for im, t in zip(images, titles, strict=True)],
        ),
    }
    for name, (package_args, st_inputs) in cases.items():
        want = encoder.encode(*package_args, batch_size=3)
        got = exported.encode(st_inputs, batch_size=3, convert_to_numpy=True)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-5, name
    assert np.abs(exported.encode_query(titles[:2]) - encoder.encode([None] * 2, titles[:2])).max() <= 1e-5


def test_the_exported_model_ranks_a_catalog_as_the_package(encoder, exported, small_catalog_dir):
    test = load_catalog(small_catalog_dir, split="test")
    inputs = [{"image": r["image"], "text": r["title"]} for r in test]
    package = encoder.encode(list(test["image"]), list(test["title"]), batch_size=16)
    st = exported.encode(inputs, batch_size=16, convert_to_numpy=True)
    top = [np.argsort(-(x @ x.T - 2 * np.eye(len(x))), axis=1, kind="stable")[:, :10] for x in (package, st)]
    assert (top[0] == top[1]).mean() > 0.99  # equal up to ties at 1e-7


def test_what_st_cannot_reproduce_is_refused(tiny_model_dir, load_recipe, tmp_path, capsys):
    from afmrl.encoder.st_export import check_exportable

    for options, fragment in [({"moe_experts": 2}, "moe_experts=2"), ({"image_max_side": 56}, "image_max_side=56")]:
        encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=0, **options),
                                               trainable=False)  # fmt: skip
        with pytest.raises(ValueError, match=fragment):
            check_exportable(encoder)
        encoder.save_pretrained(tmp_path / "enc")
        with pytest.raises(SystemExit) as info:
            load_recipe("export_sentence_transformer").cli(["--encoder", str(tmp_path / "enc"), "--output_dir",
                                                            str(tmp_path / "st")])  # fmt: skip
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert info.value.code == 2 and len(errors) == 1 and fragment in errors[0]
    with pytest.raises(SystemExit) as info:
        load_recipe("export_sentence_transformer").cli(["--encoder", str(tmp_path), "--output_dir", str(tmp_path)])
    assert info.value.code == 2 and "encoder_config.json" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["clip", "siglip"])
def test_a_dual_encoder_exports_as_sts_clip_style_model(family, small_catalog_dir, tmp_path):
    """Photos and texts encode as the package's image-only and text-only vectors; ``fuse_listing`` of them is the
    package's listing vector, and a catalog ranks the same top-10 both ways."""
    from sentence_transformers import SentenceTransformer

    from afmrl.embedded.tiny_models import tiny_dual_path
    from afmrl.encoder.st_export import fuse_listing

    torch.manual_seed(0)
    backbone = tiny_dual_path(tmp_path / "models", family=family)
    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(backbone), lora_r=4), trainable=False)
    with torch.no_grad():
        for name, param in encoder.model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    exported = SentenceTransformer(str(encoder.save_sentence_transformer(tmp_path / "st")), device="cpu")
    test = load_catalog(small_catalog_dir, split="test")
    images, titles = list(test["image"]), list(test["title"])
    texts = [listing_text(encoder, t, "color: red" if i % 2 else None) for i, t in enumerate(titles)]
    attributes = ["color: red" if i % 2 else None for i in range(len(titles))]
    assert np.abs(exported.encode(texts, batch_size=5) - encoder.encode([None] * len(texts), texts)).max() <= 1e-5
    photos = exported.encode(images, batch_size=5)
    assert np.abs(photos - encoder.encode(images, [None] * len(images))).max() <= 1e-5
    weight = encoder.config.image_weight
    fused = np.stack([fuse_listing(photos[i : i + 1], t, weight) for i, t in enumerate(exported.encode(texts))])
    package = encoder.encode(images, titles, attributes, batch_size=16)
    assert np.abs(fused - package).max() <= 1e-5
    top = [np.argsort(-(x @ x.T - 2 * np.eye(len(x))), axis=1, kind="stable")[:, :10] for x in (package, fused)]
    assert (top[0] == top[1]).mean() > 0.99
