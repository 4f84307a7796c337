"""Real TRL GRPOTrainer runs with the registry's rewards on the tiny Qwen2-VL and the synthetic catalog.

The policy is the conftest's ``warm_policy_dir``: a few dozen SFT steps on the teacher's attribute
text, the way AFMRL warm-starts its generator, so that completions parse and rewards differ
inside a group.
"""

import math

import pytest
import torch

from afmrl.catalog.load import load_catalog
from afmrl.embedded.synthetic_catalog import ATTRIBUTE_KEYS
from afmrl.modeling import load_mllm
from rar.prompts import build_prompt_dataset
from rewards import get_reward_funcs, validate_reward_weights

trl = pytest.importorskip("trl")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prompt_dataset(small_catalog_dir):
    """RAR's conversational prompts (title + requested format), one image each, plus the reward columns."""
    return build_prompt_dataset(load_catalog(small_catalog_dir, split="train").select(range(8)))


def grpo_config(output_dir, **overrides):
    args = dict(
        output_dir=str(output_dir),
        num_generations=4,  # generation batch = per_device_train_batch_size * steps_per_generation * processes
        per_device_train_batch_size=4,  # counts completions: one prompt x 4 generations per step
        max_completion_length=16,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        # GRPOConfig defaults to gradient checkpointing on; this alias avoids a FutureWarning
        activation_checkpointing=False,
        use_cpu=True,
        report_to=[],
        seed=0,
    )
    args.update(overrides)
    return trl.GRPOConfig(**args)


def train(policy_dir, dataset, reward_funcs, output_dir, **overrides):
    model, processor = load_mllm(policy_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward_funcs,
        args=grpo_config(output_dir, **overrides),
        train_dataset=dataset,
        processing_class=processor,
    )
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(before[n], p.detach())]
    steps = [h for h in trainer.state.log_history if "step_time" in h]
    return steps, changed


def test_grpo_trains_with_attribute_rewards(warm_policy_dir, prompt_dataset, tmp_path):
    funcs = get_reward_funcs(["attribute_format", "conciseness", "attribute_f1"], known_keys=ATTRIBUTE_KEYS)
    weights = validate_reward_weights([1.0, 0.5, 1.0], funcs)
    steps, changed = train(warm_policy_dir, prompt_dataset, funcs, tmp_path, reward_weights=weights)

    assert len(steps) == 2
    for log in steps:
        for name in ("attribute_format", "conciseness", "attribute_f1"):
            assert math.isfinite(log[f"rewards/{name}/mean"]) and math.isfinite(log[f"rewards/{name}/std"])
        for metric in ("attribute_format/valid_fraction", "conciseness/num_attributes", "conciseness/num_chars"):
            assert math.isfinite(log[metric])  # the rewards' own log_metric calls reach the logs
        assert math.isfinite(log["reward"])
    # The warm policy writes parsable attribute lines, so the rewards differ within a group.
    assert max(log["rewards/attribute_format/mean"] for log in steps) > 0
    assert any(log["rewards/attribute_format/std"] > 0 for log in steps)
    assert any("attribute_f1/precision" in log for log in steps)
    assert changed, "GRPO did not change any trainable parameter"


def test_grpo_trains_with_retrieval_rank(warm_policy_dir, tiny_model_dir, small_catalog_dir, prompt_dataset, tmp_path):
    from afmrl.encoder.model import EncoderConfig, ProductEncoder

    encoder_dir = tmp_path / "encoder"
    ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=0)).save_pretrained(encoder_dir)
    funcs = get_reward_funcs(
        ["retrieval_rank", "attribute_format", {"name": "conciseness", "kwargs": {"target_attributes": 3}}],
        encoder=str(encoder_dir),
        catalog=str(small_catalog_dir),
        split="train",
        known_keys=ATTRIBUTE_KEYS,
    )
    assert funcs[0].__name__ == "retrieval_rank"
    steps, changed = train(
        warm_policy_dir,
        prompt_dataset,
        funcs,
        tmp_path / "run",
        reward_weights=validate_reward_weights([1.0, 0.2, 0.2], funcs),
    )

    assert len(steps) == 2
    for log in steps:
        assert math.isfinite(log["rewards/retrieval_rank/mean"])
        assert 0.0 <= log["retrieval_rank/invalid_rate"] <= 1.0
        assert log["retrieval_rank/unscorable_rate"] == 0.0  # every train product has >= 2 listings
    scored = [log for log in steps if "retrieval_rank/rank" in log]
    assert scored, "no completion was ranked in the gallery"
    for log in scored:
        assert log["retrieval_rank/rank"] >= 1 and log["retrieval_rank/rank_without_attributes"] >= 1
        assert 0.0 <= log["retrieval_rank/mrr"] <= 1.0 and 0.0 <= log["retrieval_rank/recall@50"] <= 1.0
    assert changed
