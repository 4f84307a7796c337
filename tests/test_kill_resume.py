"""SIGKILL a tiny AGCL run and a tiny GRPO run after their first checkpoint, resume, and compare with
a run that was never interrupted: same step counter, same logged history, same final weights.

Each run is a child process started with a step budget it cannot finish before the test kills it
(``--max_steps 1000``); the learning rate is constant, so the budget does not change the updates.
The uninterrupted reference runs the same command with ``--max_steps 4``.
"""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from safetensors.torch import load_file


def complete_json(path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def run_until_checkpoint(cmd, checkpoint, timeout=300):
    """Start ``cmd``, SIGKILL its whole process group as soon as ``checkpoint`` is complete."""
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.monotonic() + timeout
    # trainer_state.json is written last in a checkpoint: once it reads as whole JSON, the checkpoint is whole (it
    # exists a moment before its text is written: a kill then would leave it empty).
    while not complete_json(checkpoint / "trainer_state.json"):
        if proc.poll() is not None:
            pytest.fail(
                f"the run ended (code {proc.returncode}) before {checkpoint.name}: {proc.stderr.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("no checkpoint within the timeout")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def start(cmd):
    """A child run whose stderr goes to a file (a pipe nobody reads while the test waits could fill and block it)."""
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=log, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    proc.log = log
    return proc


def finish(proc):
    proc.wait(timeout=600)
    proc.log.seek(0)
    assert proc.returncode == 0, proc.log.read()[-3000:]


def history(checkpoint, key):
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["global_step"], [(h["step"], h[key]) for h in state["log_history"] if key in h]


def assert_same_weights(a, b, atol):
    wa, wb = load_file(a), load_file(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def kill_resume_compare(base_cmd, tmp_path, weights_file, key, atol):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    save = ["--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1"]
    # The reference runs beside the killed run and its resumption (one thread each): most of each run is imports.
    uninterrupted = start([*base_cmd, "--output_dir", str(reference), *save, "--max_steps", "4"])
    try:
        run_until_checkpoint(
            [*base_cmd, "--output_dir", str(killed), *save, "--max_steps", "1000"], killed / "checkpoint-2"
        )
        finish(
            start(
                [
                    *base_cmd,
                    "--output_dir",
                    str(killed),
                    *save,
                    "--max_steps",
                    "4",
                    "--resume_from_checkpoint",
                    str(killed / "checkpoint-2"),
                ]
            )
        )
        finish(uninterrupted)
    finally:  # a failure above must not leave the reference run behind
        if uninterrupted.poll() is None:
            uninterrupted.kill()
            uninterrupted.wait()
        uninterrupted.log.close()

    steps, logged = history(killed / "checkpoint-4", key)
    ref_steps, ref_logged = history(reference / "checkpoint-4", key)
    assert steps == ref_steps == 4
    assert [s for s, _ in logged] == [1, 2, 3, 4]  # the history continues: no step lost, none repeated
    assert [s for s, _ in logged] == [s for s, _ in ref_logged]
    for (_, value), (_, ref) in zip(logged, ref_logged, strict=True):
        assert value == pytest.approx(ref, abs=atol)
    assert_same_weights(killed / "checkpoint-4" / weights_file, reference / "checkpoint-4" / weights_file, atol)
    # The optimizer state came back too: checkpoint-4's moments equal the reference's.
    opt, ref_opt = (torch.load(d / "checkpoint-4" / "optimizer.pt", weights_only=True) for d in (killed, reference))
    for k, state in opt["state"].items():
        for name, tensor in state.items():
            if torch.is_tensor(tensor):
                torch.testing.assert_close(tensor, ref_opt["state"][k][name], atol=atol, rtol=0)


@pytest.mark.slow
def test_agcl_run_survives_sigkill(small_catalog_dir, tiny_model_dir, tmp_path):
    cmd = [
        sys.executable,
        "recipes/agcl_train.py",
        "--config",
        "recipes/configs/agcl_demo.yaml",
        "--catalog",
        str(small_catalog_dir),
        "--model_name_or_path",
        str(tiny_model_dir),
        "--per_device_train_batch_size",
        "8",
        "--lr_scheduler_type",
        "constant",
        "--warmup_steps",
        "0",
        "--eval_split",
        "none",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
    ]
    kill_resume_compare(cmd, tmp_path, "model.safetensors", "loss", atol=1e-6)


@pytest.mark.slow
def test_grpo_run_survives_sigkill(small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path):
    cmd = [
        sys.executable,
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
        "--use_peft",
        "true",
        "--lora_r",
        "8",
        "--eval_split",
        "none",
        "--disable_tqdm",
        "true",
        "--seed",
        "0",
    ]
    kill_resume_compare(cmd, tmp_path, "adapter_model.safetensors", "reward", atol=1e-6)
