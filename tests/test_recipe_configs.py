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
        ["--config", str(config), *CPU]
    )
    assert training_args.output_dir and training_args.seed is not None
    if config.stem.startswith("rar"):
        assert training_args.generation_batch_size % training_args.num_generations == 0
        assert len(training_args.reward_weights or script_args.reward_funcs) == len(script_args.reward_funcs)
    if "qlora" in config.stem:
        assert model_args[0].load_in_4bit and model_args[0].use_peft


DEMOS = [("agcl_train", "agcl_demo.yaml"), ("sft_attributes", "sft_demo.yaml"), ("rar_grpo", "rar_demo.yaml")]


@pytest.mark.parametrize("recipe,demo", DEMOS, ids=[d for d, _ in DEMOS])
def test_flags_without_config_override_the_demo_yaml(recipe, demo, load_recipe, tmp_path):
    """`python recipes/X.py --output_dir D --seed 7` is the demo YAML plus those two flags, not TRL's defaults
    (which ask for bf16 and fail on a CPU-only machine)."""
    import dataclasses

    module = load_recipe(recipe)
    flags = ["--output_dir", str(tmp_path / "mine"), "--seed", "7"]
    layered = module.parse_args(flags)
    explicit = module.parse_args(["--config", f"recipes/configs/{demo}", *flags])
    assert [dataclasses.asdict(a) for a in layered] == [dataclasses.asdict(a) for a in explicit]
    training_args = layered[1]
    assert training_args.output_dir == str(tmp_path / "mine") and training_args.seed == 7
    assert training_args.use_cpu and not training_args.bf16  # the demo's values, kept under the flags
    demo_values = __import__("yaml").safe_load(open(f"recipes/configs/{demo}"))
    assert layered[-1].model_name_or_path == demo_values["model_name_or_path"]


def test_rar_demo_trains_its_stages_under_output_dir(load_recipe, tmp_path):
    script_args, training_args, _ = load_recipe("rar_grpo").parse_args(["--output_dir", str(tmp_path / "run")])
    assert script_args.encoder == str(tmp_path / "run" / "encoder") and script_args.encoder_recipe
    script_args, _, _ = load_recipe("rar_grpo").parse_args(["--encoder", "elsewhere"])
    assert script_args.encoder == "elsewhere"


@pytest.mark.parametrize("recipe", ["agcl_train", "sft_attributes", "rar_grpo"])
def test_help_names_the_demo_yaml(recipe, load_recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_recipe(recipe).parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "Without --config the recipe runs" in out and "_demo.yaml" in out


def test_gallery_split_from_a_yaml_string_or_a_list():
    from rar.config import RARScriptArguments

    assert RARScriptArguments(gallery_split="val").gallery_splits == ["val"]  # `gallery_split: val` in a YAML
    assert RARScriptArguments(split="val", gallery_split=["train", "val", "train"]).gallery_splits == ["train", "val"]
    assert RARScriptArguments(split="val").gallery_splits == ["val"]


@pytest.mark.parametrize("config", ["rar_qwen25vl_3b.yaml", "rar_qlora_7b.yaml"])
def test_paper_scale_recipes_use_the_papers_reward_and_loss(config, load_recipe):
    """The paper's RAR: GRPO as written (not TRL's default dapo) on Recall@50, junk at eta = -0.1 below its floor."""
    import json

    script_args, training_args, _ = parser_for(Path(f"recipes/configs/{config}"), load_recipe).parse_args_and_config(
        ["--config", f"recipes/configs/{config}", *CPU]
    )
    assert training_args.loss_type == "grpo" and training_args.num_generations == 8
    assert script_args.reward_funcs[0] == "retrieval_rank"
    kwargs = json.loads(script_args.reward_kwargs)["retrieval_rank"]
    assert kwargs["mode"] == "recall_at_k" and kwargs["k"] == 50 and "invalid_reward" not in kwargs  # default eta


def test_the_paper_world_recipe_is_the_plans_reward_with_k_from_the_pilots_rule(load_recipe):
    """The fair test's RAR: GRPO as written, G = 8, beta 0.04, Recall@k with k the recorded pilot's rule fixed, junk at
    the default eta, a train + RL gallery carrying the teacher's lines, 2,000 RL prompts each drawn once."""
    import json

    config = "recipes/configs/rar_paper_world.yaml"
    script_args, training_args, _ = parser_for(Path(config), load_recipe).parse_args_and_config(["--config", config])
    assert (training_args.loss_type, training_args.num_generations, training_args.beta) == ("grpo", 8, 0.04)
    assert training_args.num_train_epochs == 1 and training_args.max_steps == 1000
    assert training_args.learning_rate == 2e-5  # fixed on PC1, the control, before any RAR seed
    assert training_args.max_steps * training_args.per_device_train_batch_size // training_args.num_generations == 2000
    pilot = json.loads(Path("docs/experiments/preconditions/paper_v6_teacher.json").read_text())
    k = int(pilot["gates"]["G5"]["note"].split('"k": ')[1].split("}")[0])
    kwargs = json.loads(script_args.reward_kwargs)["retrieval_rank"]
    assert kwargs == {"mode": "recall_at_k", "k": k} and script_args.reward_funcs == ["retrieval_rank"]
    assert script_args.gallery_splits == ["train", "val"] and script_args.gallery_attributes == "reference"


def _argument_classes(load_recipe):
    """Every argument dataclass the package's command lines parse (recipes, experiments, benchmarks)."""
    import dataclasses
    import importlib

    modules = [load_recipe(path.stem) for path in sorted(Path("recipes").glob("*.py"))]
    for folder in ("experiments", "benchmarks"):
        modules += [importlib.import_module(f"{folder}.{p.stem}") for p in sorted(Path(folder).glob("[!_]*.py"))]
    seen = {}
    for module in modules:
        for value in vars(module).values():
            ours = getattr(value, "__module__", "").split(".")[0] in {"afmrl", "agcl", "rar", "rewards", "deploy"}
            if (
                dataclasses.is_dataclass(value)
                and isinstance(value, type)
                and (ours or value.__module__ == module.__name__)
            ):
                seen[f"{value.__module__}.{value.__qualname__}"] = value
    return seen


def test_every_command_line_prints_its_help(load_recipe):
    """argparse %-formats each help text: a bare '%' in one field's help broke `--help` of the whole command."""
    from transformers import HfArgumentParser

    classes = _argument_classes(load_recipe)
    assert len(classes) > 10  # the scan found the command lines
    for name, cls in classes.items():
        try:
            HfArgumentParser(cls).format_help()
        except Exception as error:  # noqa: BLE001 - name the class whose help breaks
            raise AssertionError(f"{name}: --help fails: {error!r}") from error
