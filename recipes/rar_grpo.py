"""Stage 2: Retrieval-aware Attribute Reinforcement (RAR) with TRL's GRPOTrainer (or RLOOTrainer).

    accelerate launch recipes/rar_grpo.py                                   # the embedded demo (rar_demo.yaml)
    accelerate launch recipes/rar_grpo.py --output_dir outputs/mine --max_steps 50   # flags override the demo
    accelerate launch recipes/rar_grpo.py --config recipes/configs/rar_qwen25vl_3b.yaml
    python recipes/rar_grpo.py --config recipes/configs/rar_qlora_7b.yaml --catalog data/my_catalog
    accelerate launch --config_file deepspeed_configs/zero3.yaml recipes/rar_grpo.py --config ...

A policy MLLM writes the attributes of a listing (image + title); the reward re-embeds the listing
with them through the frozen stage-1 encoder and scores how much they lift its identical products
in the gallery (``rewards.RetrievalRankReward``). ``main`` reads top to bottom: check every input (a user
error ends there with one ``error:`` line and exit code 2, before any model loads), build what the config
names but the output directory lacks (``rar.pipeline``: the stage-1 encoder, the SFT warm start, the reward
gallery's annotation -- the demo's steps), build the rewards, train with GRPO (or RLOO), save, and, with
``--eval_split``, compare no / SFT / RAR attributes on held-out products (``metrics.json``).

Flags: the fields of rar.config.RARScriptArguments, trl.GRPOConfig and trl.ModelConfig; without
``--config`` they are layered over recipes/configs/rar_demo.yaml.
"""

import json
import logging
import time
from pathlib import Path

from accelerate import PartialState
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer, ModelConfig, RLOOTrainer, TrlParser

from afmrl.catalog import load_catalog
from afmrl.cli import (
    USER_ERRORS,
    default_config_epilog,
    end_launched_process,
    fail,
    given_flags,
    parse_recipe_args,
    with_default_config,
)
from afmrl.embedded import is_embedded_model, resolve_catalog
from afmrl.encoder.config import read_encoder_config
from afmrl.modeling import check_model_source, require_bitsandbytes
from afmrl.retrieval.fingerprints import check_training_record
from afmrl.stats import format_summary, summarize, verdict
from rar.advantage_gate import SFTGatedGRPOTrainer
from rar.config import RARScriptArguments, to_rloo_config
from rar.pipeline import annotate_reward_gallery, policy_attributes, report_heldout, train_missing_stages
from rar.policy import check_policy_processor, load_policy, mask_placeholder_logits, placeholder_token_ids
from rar.prompts import build_prompt_dataset, save_prompt_settings
from rewards import get_reward_funcs, validate_reward_weights

logger = logging.getLogger("rar_grpo")

RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES / "configs" / "rar_demo.yaml"
PAPER_RAR_GAIN = 54.28 - 52.42  # the paper's RAR rung over its SFT rung, instance R@1 on M5Product
FAIR_TEST = RECIPES.parent / "docs" / "results" / "ladder_paper.json"  # the confirmatory ladder, in a repository


def check_inputs(script_args: RARScriptArguments, training_args: GRPOConfig, model_args: ModelConfig):
    """Everything that can fail on user input, before any model is loaded; returns the catalog path, the prompt
    dataset and the held-out listings (or None)."""
    catalog = resolve_catalog(
        script_args.catalog, script_args.cache_dir, val_fraction=script_args.embedded_val_fraction
    )
    train = load_catalog(catalog, split=script_args.split)
    if script_args.max_train_listings:
        train = train.select(range(min(script_args.max_train_listings, len(train))))
    evaluation = None
    if script_args.eval_split:
        evaluation = load_catalog(catalog, split=script_args.eval_split)
        if script_args.max_eval_listings:
            evaluation = evaluation.select(range(min(script_args.max_eval_listings, len(evaluation))))
    if Path(script_args.encoder).exists() or not script_args.encoder_recipe:
        read_encoder_config(script_args.encoder)  # not an AGCL encoder -> EncoderLoadError
    # Stage outputs this recipe trains itself are reused only when they were trained on this catalog.
    stages = [
        ("--encoder", script_args.encoder, script_args.encoder_recipe),
        ("--sft_recipe's output", str(Path(training_args.output_dir) / "sft"), script_args.sft_recipe),
    ]
    for flag, directory, recipe in stages:
        if recipe and Path(directory).is_dir() and not check_training_record(directory, catalog, flag=flag):
            logger.warning(
                "%s %s has no training_catalog.json: reused without checking which catalog it was trained on",
                flag,
                directory,
            )
    if script_args.encoder_recipe and not Path(script_args.encoder_recipe).is_file():
        raise FileNotFoundError(f"--encoder_recipe {script_args.encoder_recipe!r} does not exist")
    backbone = script_args.encoder_model_name_or_path or model_args.model_name_or_path
    if (
        script_args.encoder_recipe
        and not Path(script_args.encoder).exists()
        and backbone
        and not is_embedded_model(backbone)
    ):
        check_model_source(backbone)  # the encoder this run will train: its base must be loadable
    if script_args.sft_recipe and not Path(script_args.sft_recipe).is_file():
        raise FileNotFoundError(f"--sft_recipe {script_args.sft_recipe!r} does not exist")
    if script_args.advantage_gate != "none" and training_args.beta == 0.0:
        raise ValueError(
            f"--advantage_gate {script_args.advantage_gate} reads the SFT reference's log-likelihoods, which GRPO "
            "computes only for its KL term: set --beta > 0"
        )
    if script_args.gallery and not Path(script_args.gallery).is_dir():
        raise FileNotFoundError(f"--gallery {script_args.gallery!r} is not a directory")
    prompts = build_prompt_dataset(
        train, prompt_template=script_args.prompt_template, attribute_keys=script_args.attribute_keys
    )
    if model_args.load_in_4bit:
        require_bitsandbytes()
    check_policy_processor(
        model_args.model_name_or_path or "tiny-qwen2-vl",
        cache_dir=script_args.cache_dir,
        trust_remote_code=training_args.trust_remote_code,
    )  # processor files only, no weights
    # Rewards resolve without loading anything heavy (the retrieval reward loads on its first call).
    column = script_args.gallery_attribute_column
    if script_args.gallery_attributes == "policy" and script_args.gallery:
        raise ValueError("--gallery_attributes policy annotates and encodes the gallery in this run: drop --gallery")
    gallery_rows = [
        ("--gallery_split", load_catalog(catalog, split=name))
        for name in script_args.gallery_splits
        if name != script_args.split and not script_args.gallery
    ]  # unknown split: CatalogError
    if column is not None and script_args.gallery_attributes != "policy":
        for name, ds in (("--split", train), *gallery_rows, ("--eval_split", evaluation)):
            if ds is not None and column not in ds.column_names:
                raise ValueError(
                    f"--gallery_attributes {script_args.gallery_attributes!r}: the {name} rows have no "
                    f"column {column!r}"
                )
    # The rewards resolve and check their arguments here, loading nothing (the retrieval reward loads on its first
    # call); main builds them again once the reward's gallery is annotated.
    validate_reward_weights(training_args.reward_weights, make_rewards(script_args, catalog))
    return catalog, prompts, evaluation


def make_rewards(script_args: RARScriptArguments, catalog):
    """The reward functions over ``catalog`` (a path, or the catalog with the policy's gallery attributes). The
    reward looks the prompts up in the rows of --split and the gallery splits, and indexes the gallery splits."""
    column = script_args.gallery_attribute_column
    splits = script_args.gallery_splits
    lookup = list(dict.fromkeys([script_args.split, *splits]))
    gallery_options = {"attribute_column": column, "key_order": script_args.attribute_keys} if column else {}
    if not script_args.gallery and lookup != splits:
        gallery_options["split"] = splits
    return get_reward_funcs(
        script_args.reward_entries(),
        encoder=script_args.encoder,
        catalog=catalog,
        gallery=script_args.gallery,
        split=lookup[0] if len(lookup) == 1 else lookup,
        known_keys=script_args.attribute_keys,
        key_order=script_args.attribute_keys,
        **({"gallery_options": gallery_options} if gallery_options else {}),
    )


def main(script_args: RARScriptArguments, training_args: GRPOConfig, model_args: ModelConfig):
    started = time.time()
    set_seed(training_args.seed)
    try:
        catalog, prompts, evaluation = check_inputs(script_args, training_args, model_args)
    except USER_ERRORS as err:
        fail(err)
    state = PartialState()
    output_dir = Path(training_args.output_dir)

    # What the config names but the output directory lacks; the main process builds it, the others reuse it.
    with state.main_process_first():
        policy_path = train_missing_stages(script_args, training_args, model_args, catalog, RECIPES)
        if script_args.gallery_attributes == "policy":  # the reward's gallery, annotated by the starting policy
            catalog = annotate_reward_gallery(script_args, training_args, model_args, policy_path, catalog)
    reward_funcs = make_rewards(script_args, catalog)
    generated = {}  # the starting policy's held-out attributes ("SFT attributes"), before RL touches it
    if evaluation is not None and state.is_main_process:
        generated["sft_attributes"] = policy_attributes(script_args, training_args, model_args, policy_path, evaluation)

    model, processor, peft_config = load_policy(
        model_args,
        cache_dir=script_args.cache_dir,
        name_or_path=policy_path,
        freeze_vision=script_args.freeze_vision,
        trust_remote_code=training_args.trust_remote_code,
    )
    # Placeholder tokens are never sampled (TRL masks only the image one) nor scored (the loss sees the distribution
    # that is sampled); the saved policy's generation config carries the mask for a user's plain model.generate.
    mask_placeholder_logits(model)
    placeholders = placeholder_token_ids(model)
    kwargs = training_args.generation_kwargs
    if placeholders and (kwargs is None or (isinstance(kwargs, dict) and "suppress_tokens" not in kwargs)):
        training_args.generation_kwargs = {**(kwargs or {}), "suppress_tokens": placeholders}
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.suppress_tokens = placeholders
    if script_args.rl_algorithm == "rloo":
        trainer = RLOOTrainer(
            model=model,
            reward_funcs=reward_funcs,
            args=to_rloo_config(training_args),
            train_dataset=prompts,
            processing_class=processor,
            peft_config=peft_config,
        )
    else:
        trainer_class = SFTGatedGRPOTrainer if script_args.advantage_gate == "sft_likelihood" else GRPOTrainer
        trainer = trainer_class(
            model=model,
            reward_funcs=reward_funcs,
            args=training_args,
            train_dataset=prompts,
            processing_class=processor,
            peft_config=peft_config,
        )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(output_dir))
        # the per-step log (reward std, KL, clipping) as a checkpoint's trainer_state.json holds it: save_strategy
        # "no" writes no checkpoint, and without it a finished run's training dynamics are lost
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        save_prompt_settings(
            output_dir,
            prompt_template=script_args.prompt_template,
            attribute_keys=script_args.attribute_keys,
            max_new_tokens=training_args.max_completion_length,
        )
    state.wait_for_everyone()

    if evaluation is not None and state.is_main_process:
        generated["rar_attributes"] = policy_attributes(script_args, training_args, model_args, output_dir, evaluation)
        report_heldout(script_args, training_args, evaluation, generated, trainer.state.log_history, started)
        line = fair_test_line() if str(script_args.catalog).startswith("embedded") else None
        if line:
            print(line)
    return trainer


def fair_test_line(path: Path = FAIR_TEST) -> str | None:
    """The confirmatory figure a demo's RAR − SFT is read against: the fair test's ladder (the paper's preconditions
    built in, thousands of test listings per seed), from the repository's results; None outside a repository."""
    try:
        seeds = json.loads(path.read_text(encoding="utf-8"))["seeds"]
        rar = "+ RAR attributes", "+ SFT (distilled) attributes"
        gains = [100 * (r[rar[0]]["instance"]["recall@1"] - r[rar[1]]["instance"]["recall@1"]) for r in seeds.values()]
        listings = min(r[rar[1]]["instance"]["n_queries"] for r in seeds.values())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    summary = summarize(gains)
    reading = (
        "one seed so far: an example, no verdict"
        if summary["n"] < 2
        else f"{verdict(summary, paper_delta=PAPER_RAR_GAIN)} against the paper's +{PAPER_RAR_GAIN:.2f}"
        + (" (interim: the verdict rests on 5 seeds)" if summary["n"] < 5 else "")
    )
    return (
        f"The fair test's RAR − SFT (docs/results/ladder_paper.md; the paper's preconditions built in, >= {listings} "
        f"test listings a seed): {format_summary(summary)} R@1, {reading}. This demo is one seed of a smaller world: "
        "read its RAR row against that."
    )


def parse_args(argv=None):
    """Flags over the demo YAML (or over ``--config``); derived defaults filled in."""
    argv = with_default_config(argv, DEFAULT_CONFIG)
    parser = TrlParser((RARScriptArguments, GRPOConfig, ModelConfig), epilog=default_config_epilog(DEFAULT_CONFIG))
    script_args, training_args, model_args = parse_recipe_args(parser, argv)
    given = given_flags(argv)
    if "--model_name_or_path" in given and "--encoder_model_name_or_path" not in given:
        script_args.encoder_model_name_or_path = model_args.model_name_or_path  # one flag sets every base model
    if script_args.encoder is None:  # the stages this run trains live under its --output_dir
        script_args.encoder = str(Path(training_args.output_dir) / "encoder")
    return script_args, training_args, model_args


def cli(argv=None):
    try:
        args = parse_args(argv)
    except USER_ERRORS as err:  # e.g. num_generations that does not divide the generation batch
        fail(err)
    return main(*args)


if __name__ == "__main__":
    cli()
    end_launched_process()
