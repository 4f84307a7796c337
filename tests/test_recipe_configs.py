"""Every YAML in recipes/configs parses with its recipe's TrlParser (a renamed or removed field fails here)."""

from pathlib import Path

import pytest
import trl

CONFIGS = sorted(Path("recipes/configs").glob("*.yaml"))
CPU = ["--bf16", "false", "--use_cpu", "true"]  # the paper-scale configs ask for bf16 GPUs


def parser_for(config: Path, load):
    name = config.stem
    if name.startswith("agcl"):
        m = load("agcl_train")
        return trl.TrlParser((m.AGCLScriptArguments, m.AGCLConfig, trl.ModelConfig))
    if name.startswith("sft"):
        m = load("sft_attributes")
        return trl.TrlParser((m.SFTScriptArguments, trl.SFTConfig, trl.ModelConfig))
    if name.startswith("rar"):
        return trl.TrlParser((load("rar_grpo").RARScriptArguments, trl.GRPOConfig, trl.ModelConfig))
    if name.startswith("pretrain"):
        return trl.TrlParser((load("pretrain_tiny").PretrainScriptArguments, trl.SFTConfig))
    raise AssertionError(f"{config}: no recipe known for this config name")


def test_there_are_configs_for_every_stage():
    names = {c.stem for c in CONFIGS}
    assert {"agcl_demo", "sft_demo", "rar_demo", "rar_qwen25vl_3b", "rar_qlora_7b"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_config_parses(config, load_recipe):
    script_args, training_args, *model_args = parser_for(config, load_recipe).parse_args_and_config(
        ["--config", str(config), *CPU])
    assert training_args.output_dir and training_args.seed is not None
    if config.stem.startswith("rar"):
        assert training_args.generation_batch_size % training_args.num_generations == 0
        assert len(training_args.reward_weights or script_args.reward_funcs) == len(script_args.reward_funcs)
    if "qlora" in config.stem:
        assert model_args[0].load_in_4bit and model_args[0].use_peft
