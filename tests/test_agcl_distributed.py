"""AGCL under accelerate with two real CPU processes (gloo), as PLATFORM.md says to start them."""

import ast
import math
import re
import subprocess
import sys

import pytest

from afmrl.catalog.load import group_by_product, load_catalog


@pytest.mark.slow
def test_agcl_trains_with_two_processes(small_catalog_dir, tiny_model_dir, tmp_path):
    out = tmp_path / "enc"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "deepspeed_configs/cpu_2proc.yaml",
        "recipes/agcl_train.py",
        "--config",
        "recipes/configs/agcl_demo.yaml",
        "--catalog",
        str(small_catalog_dir),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--logging_steps",
        "1",
        "--eval_split",
        "none",
        "--output_dir",
        str(out),
        "--disable_tqdm",
        "true",
        # the intra-product term adds passes without the vision tower: DDP must still see every parameter once
        "--intra_product_weight",
        "0.2",
        "--intra_product_text",
        "attributes",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [ast.literal_eval(m) for m in re.findall(r"\{'loss'[^}]*\}", proc.stdout)]
    assert len(logs) == 2
    # One epoch = ceil(products / (per-device batch × 2 processes)) steps: the global batch spans both ranks.
    products = sum(len(rows) >= 2 for rows in group_by_product(load_catalog(small_catalog_dir, split="train")).values())
    steps_per_epoch = math.ceil(products / (4 * 2))
    assert float(logs[0]["epoch"]) == pytest.approx(1 / steps_per_epoch, abs=1e-3)
    assert (out / "encoder_config.json").is_file() and (out / "bm25_idf.json").is_file()
