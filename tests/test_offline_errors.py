"""The front door without network: a hub model or catalog id that is not cached, and the paper recipes' bf16
on a machine without a GPU, each end with one `error:` line that says what to do, exit code 2, in seconds
(not after a minute of retries inside transformers or datasets)."""

import os
import subprocess
import sys
import time

import pytest
import torch


def run(argv, tmp_path, **env):
    environment = {**os.environ, "HF_HOME": str(tmp_path / "empty-hf-cache"), **env}  # nothing cached
    started = time.time()
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=environment, timeout=300)
    return proc, time.time() - started


def assert_one_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_paper_recipe_with_an_uncached_model_offline(small_catalog_dir, tmp_path):
    proc, _ = run(
        [
            "recipes/agcl_train.py",
            "--config",
            "recipes/configs/agcl_qwen2vl_2b.yaml",
            "--catalog",
            str(small_catalog_dir),
            "--bf16",
            "false",
            "--use_cpu",
            "true",
            "--output_dir",
            str(tmp_path / "o"),
        ],
        tmp_path,
        HF_HUB_OFFLINE="1",
    )
    assert_one_error(
        proc,
        "Qwen/Qwen2-VL-2B-Instruct is neither a local directory nor in the local Hugging Face cache",
        "HF_HUB_OFFLINE=1",
        "hf download Qwen/Qwen2-VL-2B-Instruct",
    )


@pytest.fixture
def hub_offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty cache, in this process (the subprocess test above sets the variable)."""
    import datasets.config
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))


def expect_exit(recipe, argv, capsys, *fragments):
    started = time.time()
    with pytest.raises(SystemExit) as info:
        recipe.cli(argv)
    assert info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return time.time() - started


@pytest.mark.usefixtures("hub_offline")
def test_uncached_hub_catalog_offline(tmp_path, load_recipe, capsys):
    elapsed = expect_exit(
        load_recipe("agcl_train"),
        ["--catalog", "someorg/products", "--output_dir", str(tmp_path)],
        capsys,
        "someorg/products",
        "not in the local cache",
        "HF_HUB_OFFLINE=1",
        "hf download someorg/products --repo-type dataset",
    )
    assert elapsed < 30


def test_unreachable_hub_fails_at_once_without_retries(small_catalog_dir, tmp_path, load_recipe, capsys):
    """Network on, hub unreachable (an address nothing listens on): one request, no minute of retries."""
    import huggingface_hub.constants as constants

    recipe = load_recipe("rar_grpo")
    old = constants.ENDPOINT
    constants.ENDPOINT = "http://127.0.0.1:9"  # discard port: connection refused at once
    try:
        started = time.time()
        with pytest.raises(SystemExit) as info:
            recipe.cli(
                [
                    "--catalog",
                    str(small_catalog_dir),
                    "--split",
                    "train",
                    "--model_name_or_path",
                    "someorg/some-vl-model",
                    "--encoder",
                    "nowhere",
                    "--encoder_recipe",
                    "recipes/configs/agcl_demo.yaml",
                    "--output_dir",
                    str(tmp_path / "o"),
                ]
            )
        elapsed = time.time() - started
    finally:
        constants.ENDPOINT = old
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "someorg/some-vl-model is neither a local directory nor in the local Hugging Face cache" in err
    assert "cannot be reached" in err and "hf download someorg/some-vl-model" in err
    assert elapsed < 30  # transformers' own path retries for about a minute; this is one refused connection


@pytest.mark.skipif(torch.cuda.is_available(), reason="the bf16 refusal only happens without a CUDA GPU")
def test_paper_recipe_on_cpu_names_the_two_flags(small_catalog_dir, tmp_path, load_recipe, capsys):
    expect_exit(
        load_recipe("agcl_train"),
        [
            "--config",
            "recipes/configs/agcl_qwen2vl_2b.yaml",
            "--catalog",
            str(small_catalog_dir),
            "--output_dir",
            str(tmp_path / "o"),
        ],
        capsys,
        "recipes/configs/agcl_qwen2vl_2b.yaml trains in bf16 on GPUs",
        "--bf16 false --use_cpu true",
    )
