"""Shared fixtures: the tiny model and a small synthetic catalog are built once per test session."""

import functools
import importlib.util
import tempfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from afmrl.embedded.synthetic_catalog import make_synthetic_catalog
from afmrl.embedded.tiny_models import tiny_mllm_path


@functools.cache
def image_files(n: int) -> list[str]:
    """Absolute paths of ``n`` tiny distinct PNG files (made once per session), for hand-built catalogs whose
    encoder never looks at the pixels: a catalog's images must exist to load."""
    folder = Path(tempfile.mkdtemp(prefix="test-images-"))
    paths = []
    for i in range(n):
        Image.new("RGB", (4, 4), (i % 256, i // 256 % 256, 0)).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return paths


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return tiny_mllm_path(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def small_catalog_dir(tmp_path_factory):
    return make_synthetic_catalog(tmp_path_factory.mktemp("catalog") / "c", num_products=80, seed=0)


def _load_recipe(name: str):
    """A fresh module object of recipes/<name>.py (recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, f"recipes/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def load_recipe():
    """``load_recipe("rar_grpo")`` -> the recipe's module (its main/cli and argument classes)."""
    return _load_recipe


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model weights load (checks that must come first, do)."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the inputs were checked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)


@pytest.fixture(scope="session")
def tiny_encoder_dir(tiny_model_dir, tmp_path_factory):
    """An (untrained) AGCL encoder over the tiny backbone, saved the way recipes/agcl_train.py saves one."""
    from afmrl.encoder.model import EncoderConfig, ProductEncoder

    out = tmp_path_factory.mktemp("tiny-encoder")
    ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=0)).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def warm_policy_dir(tiny_model_dir, small_catalog_dir, tmp_path_factory):
    """The tiny model after 40 SFT steps of recipes/sft_attributes.py on 8 listings' teacher attributes.

    A random policy writes unparsable text, every completion of a group scores the same, GRPO's
    advantages are zero and nothing trains; after this warm start completions parse and differ.
    """
    import trl

    recipe = _load_recipe("sft_attributes")
    out = tmp_path_factory.mktemp("warm-policy")
    parser = trl.TrlParser((recipe.SFTScriptArguments, trl.SFTConfig, trl.ModelConfig))
    args = parser.parse_args_and_config(
        [
            "--catalog",
            str(small_catalog_dir),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--max_train_listings",
            "8",
            "--output_dir",
            str(out),
            "--max_steps",
            "40",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-2",
            "--lr_scheduler_type",
            "constant",
            "--assistant_only_loss",
            "true",
            "--activation_checkpointing",
            "false",
            "--save_strategy",
            "no",
            "--bf16",
            "false",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--seed",
            "0",
            "--disable_tqdm",
            "true",
        ]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe.main(*args)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: OpenMP spin-waiting makes 2 threads ~50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
