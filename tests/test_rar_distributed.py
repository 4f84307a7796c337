"""recipes/rar_grpo.py with two real CPU processes (gloo): plain DDP, DeepSpeed ZeRO-2 and ZeRO-3.

The reward's frozen encoder is loaded whole in every process (outside ZeRO-3 partitioning); with
ZeRO-3 the saved policy must be whole again (gathered at save), and the held-out evaluation on the
main process must not wait for the other rank.
"""

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

LAUNCH = {
    "ddp": ["--config_file", "deepspeed_configs/cpu_2proc.yaml"],
    "zero2": ["--config_file", "deepspeed_configs/zero2.yaml", "--num_processes", "2"],
    "zero3": ["--config_file", "deepspeed_configs/zero3.yaml", "--num_processes", "2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(LAUNCH))
def test_grpo_with_two_processes(setup, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path):
    if setup.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        # README's DeepSpeed block, the line .ci/run runs (read, not copied, so the message cannot go stale)
        readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
        install = re.search(r"<!-- ci: deepspeed -->\s*```bash\n(.*?)\n```", readme, re.S).group(1).strip()
        if os.environ.get("CI") == "true":  # CI installs DeepSpeed: a skip there would hide a broken install
            pytest.fail(f"DeepSpeed is not installed in CI ({install})")
        pytest.skip(f"DeepSpeed is not installed; to run the ZeRO tests: {install}")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *LAUNCH[setup],
        "recipes/rar_grpo.py",
        "--config",
        "recipes/configs/rar_demo.yaml",
        "--gallery_attributes",
        "reference",
        "--beta",
        "0.0",
        "--catalog",
        str(small_catalog_dir),
        "--encoder",
        str(tiny_encoder_dir),
        "--encoder_recipe",
        "",
        "--sft_recipe",
        "",
        "--model_name_or_path",
        str(warm_policy_dir),
        "--output_dir",
        str(out),
        "--split",
        "train",
        "--max_train_listings",
        "8",
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--max_completion_length",
        "24",
        "--max_steps",
        "2",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
        *(["--max_eval_listings", "12", "--eval_batch_size", "6"] if setup == "zero3" else ["--eval_split", "none"]),
    ]
    # PYTHONFAULTHANDLER: a rank that aborts prints its Python stacks, so a failure here says where it happened
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    logs = [ast.literal_eval(m) for m in re.findall(r"\{'loss'[^}]*\}", proc.stdout)]
    assert len(logs) == 2
    # 8 prompts, 4 completions per device = one prompt per process and step: with 2 processes an
    # epoch is 4 steps (it would be 8 with one).
    assert float(logs[0]["epoch"]) == pytest.approx(0.25)
    for log in logs:
        assert float(log["retrieval_rank/rank_without_attributes"]) >= 1  # the encoder was whole in each rank
        assert abs(float(log["reward"])) < 10
    weights = load_file(out / "model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())  # gathered, not ZeRO-3 shards
    if setup == "zero3":
        assert (out / "metrics.json").is_file()
