"""Stage 2: Retrieval-aware Attribute Reinforcement (RAR) with TRL's GRPOTrainer (or RLOOTrainer).

    accelerate launch recipes/rar_grpo.py                                   # the embedded demo (rar_demo.yaml)
    accelerate launch recipes/rar_grpo.py --output_dir outputs/mine --max_steps 50   # flags override the demo
    accelerate launch recipes/rar_grpo.py --config recipes/configs/rar_qwen25vl_3b.yaml
    python recipes/rar_grpo.py --config recipes/configs/rar_qlora_7b.yaml --catalog data/my_catalog
    accelerate launch --config_file deepspeed_configs/zero3.yaml recipes/rar_grpo.py --config ...

A policy MLLM writes the attributes of a listing (image + title); the reward re-embeds the listing
with them through the frozen stage-1 encoder and scores how much they lift its identical products
in the gallery (``rewards.RetrievalRankReward``). Steps, in order:

1. check every input (catalog rows, encoder directory, reward names and weights, prompt template,
   batch divisibility) -- a user error ends here with one line and exit code 2, before any model loads;
2. train the stage-1 encoder with recipes/agcl_train.py if ``--encoder`` (default
   ``<output_dir>/encoder``) is missing and ``--encoder_recipe`` names a YAML (reused when present and
   trained on this catalog; one trained on another catalog is refused by name);
3. warm-start the policy with recipes/sft_attributes.py when ``--sft_recipe`` names a YAML
   (``<output_dir>/sft``, reused as the encoder is): the paper's distilled generator;
4. GRPO (or RLOO) with the rewards; ``--resume_from_checkpoint`` continues a run;
5. on ``--eval_split`` (held-out products): greedy attributes of the starting policy and of the RL
   policy, instance Recall@1/5/10 with no / SFT / RAR attributes, every listing annotated by the
   generator under test (the deployment protocol, ``metrics.json``'s top level) and on the queries
   only (``metrics.json["query_only"]``); writes ``metrics.json``, ``attributes.jsonl``,
   ``reward_curve.png`` and ``recall.png``.

Flags: the fields of rar.config.RARScriptArguments, trl.GRPOConfig and trl.ModelConfig; without
``--config`` they are layered over recipes/configs/rar_demo.yaml.
"""

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import set_seed
from trl import GRPOConfig, GRPOTrainer, ModelConfig, RLOOTrainer, TrlParser

from agcl.attributes import parse_attributes
from agcl.catalog import CatalogError, load_catalog
from agcl.cli import default_config_epilog, fail, given_flags, parse_recipe_args, with_default_config
from agcl.embedded import is_embedded_model, resolve_catalog
from agcl.encoder import EncoderLoadError, ProductEncoder, read_encoder_config
from agcl.evaluation import attribute_texts
from agcl.modeling import check_model_source, require_bitsandbytes
from rar.config import POLICY_COLUMN, RARScriptArguments, to_rloo_config
from rar.evaluation import (
    SOURCES,
    canonical_attributes,
    evaluate_attribute_sources,
    format_table,
    write_report,
)
from rar.generation import generate_attributes
from rar.policy import check_policy_processor, load_policy
from rar.prompts import build_prompt_dataset, save_prompt_settings
from rewards import get_reward_funcs, validate_reward_weights
from rewards.fingerprints import check_training_record
from rewards.rank_lookup import outside_zero3

logger = logging.getLogger("rar_grpo")

RECIPES = Path(__file__).resolve().parent
DEFAULT_CONFIG = RECIPES / "configs" / "rar_demo.yaml"
USER_ERRORS = (CatalogError, EncoderLoadError, ValueError, FileNotFoundError, NotADirectoryError)
# A child recipe must not join this run's process group.
_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "MASTER_ADDR", "MASTER_PORT")


def run_recipe(recipe: str, config: str, overrides: dict):
    """Run another recipe in a clean single-process child (the demo's stage 1 and SFT stages)."""
    cmd = [sys.executable, str(RECIPES / recipe), "--config", config]
    for key, value in overrides.items():
        if value is not None:
            cmd += [f"--{key}", *(map(str, value) if isinstance(value, list | tuple) else [str(value)])]
    env = {k: v for k, v in os.environ.items()
           if k not in _DISTRIBUTED_ENV and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))}
    print(f"[rar_grpo] running {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd, env=env).returncode
    if code:  # the stage printed its own error (one `error:` line for a user error): end with its exit code
        print(f"[rar_grpo] stage {recipe} failed (exit code {code})", file=sys.stderr, flush=True)
        sys.exit(code)


def check_inputs(script_args: RARScriptArguments, training_args: GRPOConfig, model_args: ModelConfig):
    """Everything that can fail on user input, before any model is loaded; returns the datasets."""
    catalog = resolve_catalog(script_args.catalog, script_args.cache_dir, val_fraction=script_args.embedded_val_fraction)
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
    stages = [("--encoder", script_args.encoder, script_args.encoder_recipe),
              ("--sft_recipe's output", str(Path(training_args.output_dir) / "sft"), script_args.sft_recipe)]
    for flag, directory, recipe in stages:
        if recipe and Path(directory).is_dir() and not check_training_record(directory, catalog, flag=flag):
            logger.warning("%s %s has no training_catalog.json: reused without checking which catalog it was trained on",
                           flag, directory)
    if script_args.encoder_recipe and not Path(script_args.encoder_recipe).is_file():
        raise FileNotFoundError(f"--encoder_recipe {script_args.encoder_recipe!r} does not exist")
    backbone = script_args.encoder_model_name_or_path or model_args.model_name_or_path
    if script_args.encoder_recipe and not Path(script_args.encoder).exists() and backbone and not is_embedded_model(backbone):
        check_model_source(backbone)  # the encoder this run will train: its base must be loadable
    if script_args.sft_recipe and not Path(script_args.sft_recipe).is_file():
        raise FileNotFoundError(f"--sft_recipe {script_args.sft_recipe!r} does not exist")
    if script_args.gallery and not Path(script_args.gallery).is_dir():
        raise FileNotFoundError(f"--gallery {script_args.gallery!r} is not a directory")
    prompts = build_prompt_dataset(train, prompt_template=script_args.prompt_template,
                                   attribute_keys=script_args.attribute_keys)
    if model_args.load_in_4bit:
        require_bitsandbytes()
    check_policy_processor(model_args.model_name_or_path or "tiny-qwen2-vl", cache_dir=script_args.cache_dir,
                           trust_remote_code=training_args.trust_remote_code)  # processor files only, no weights
    # Rewards resolve without loading anything heavy (the retrieval reward loads on its first call).
    column = script_args.gallery_attribute_column
    if script_args.gallery_attributes == "policy" and script_args.gallery:
        raise ValueError("--gallery_attributes policy annotates and encodes the gallery in this run: drop --gallery")
    gallery_rows = [("--gallery_split", load_catalog(catalog, split=name))
                    for name in script_args.gallery_splits
                    if name != script_args.split and not script_args.gallery]  # unknown split: CatalogError
    if column is not None and script_args.gallery_attributes != "policy":
        for name, ds in (("--split", train), *gallery_rows, ("--eval_split", evaluation)):
            if ds is not None and column not in ds.column_names:
                raise ValueError(f"--gallery_attributes {script_args.gallery_attributes!r}: the {name} rows have no "
                                 f"column {column!r}")
    reward_funcs = make_rewards(script_args, catalog)
    validate_reward_weights(training_args.reward_weights, reward_funcs)
    return catalog, prompts, evaluation, reward_funcs


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
        script_args.reward_entries(), encoder=script_args.encoder, catalog=catalog, gallery=script_args.gallery,
        split=lookup[0] if len(lookup) == 1 else lookup, known_keys=script_args.attribute_keys,
        key_order=script_args.attribute_keys, **({"gallery_options": gallery_options} if gallery_options else {}))


def annotate_gallery(script_args, training_args, model_args, policy_path, catalog: str, write: bool):
    """``--gallery_attributes policy``: the reward's gallery split(s) annotated once by the starting policy (greedy),
    as a catalog is annotated by its generator in deployment; the whole catalog comes back with the parsed
    attributes in POLICY_COLUMN (None outside the gallery splits). The main process writes them (reused)."""
    path = Path(training_args.output_dir) / "gallery_attributes.jsonl"
    full = load_catalog(catalog)
    splits = set(script_args.gallery_splits)
    rows = list(range(len(full))) if "split" not in full.column_names else \
        [i for i, s in enumerate(full["split"]) if s in splits]

    def read():
        lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
        return {r["listing_id"]: r["completion"] for r in map(json.loads, lines)}

    ids, known = list(full["listing_id"]), read()  # a list: a Column reads arrow on every index
    missing = [i for i in rows if ids[i] not in known]  # a rerun with more gallery splits annotates just theirs
    if write and missing:
        gallery = full.select(missing)
        texts = generate_eval_attributes(script_args, training_args, model_args, policy_path, gallery)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps({"listing_id": lid, "completion": t}, ensure_ascii=False) + "\n"
                         for lid, t in zip(gallery["listing_id"], texts, strict=True))
    done = read()
    values = [parse_attributes(done[lid]).attributes or None if lid in done else None for lid in full["listing_id"]]
    return full.add_column(POLICY_COLUMN, values)


def generate_eval_attributes(script_args, training_args, model_args, policy_path, evaluation) -> list[str]:
    """Greedy attributes of a saved policy on the held-out prompts (a whole copy, outside ZeRO-3)."""
    with outside_zero3():
        model, processor, _ = load_policy(model_args, cache_dir=script_args.cache_dir, name_or_path=str(policy_path),
                                          trust_remote_code=training_args.trust_remote_code, for_training=False)
    prompts = build_prompt_dataset(evaluation, prompt_template=script_args.prompt_template,
                                   attribute_keys=script_args.attribute_keys)
    if getattr(model, "hf_quantizer", None) is None:  # 4-bit models are placed at load time and refuse .to()
        model = model.to(training_args.device)
    return generate_attributes(model, processor, prompts,
                               batch_size=script_args.eval_batch_size,
                               max_new_tokens=script_args.eval_max_new_tokens or training_args.max_completion_length)


def main(script_args: RARScriptArguments, training_args: GRPOConfig, model_args: ModelConfig):
    started = time.time()
    set_seed(training_args.seed)
    try:
        catalog, prompts, evaluation, reward_funcs = check_inputs(script_args, training_args, model_args)
    except USER_ERRORS as err:
        fail(err)
    state = PartialState()
    output_dir = Path(training_args.output_dir)

    # Stages that write to disk run in the main process first; the others then find and reuse them.
    with state.main_process_first():
        if not (Path(script_args.encoder) / "encoder_config.json").is_file():
            run_recipe("agcl_train.py", script_args.encoder_recipe,
                       {"catalog": catalog, "cache_dir": script_args.cache_dir, "output_dir": script_args.encoder,
                        "model_name_or_path": script_args.encoder_model_name_or_path or model_args.model_name_or_path,
                        "seed": training_args.seed})
        policy_path = model_args.model_name_or_path
        if script_args.sft_recipe:
            policy_path = str(output_dir / "sft")
            if not (Path(policy_path) / "config.json").is_file() and not (Path(policy_path) / "adapter_config.json").is_file():
                run_recipe("sft_attributes.py", script_args.sft_recipe,
                           {"catalog": catalog, "split": script_args.sft_split, "cache_dir": script_args.cache_dir,
                            "model_name_or_path": model_args.model_name_or_path, "output_dir": policy_path,
                            "prompt_template": script_args.prompt_template,
                            "attribute_keys": script_args.attribute_keys, "seed": training_args.seed})

        # every process: the reward's gallery carries the starting policy's attributes (the main one writes them)
        if script_args.gallery_attributes == "policy":
            reward_funcs = make_rewards(script_args, annotate_gallery(script_args, training_args, model_args,
                                                                      policy_path, catalog, write=state.is_main_process))

    # The starting policy's attributes on held-out products ("SFT attributes"), before RL touches it.
    generated = {}
    if evaluation is not None and state.is_main_process:
        generated["sft_attributes"] = generate_eval_attributes(script_args, training_args, model_args, policy_path,
                                                               evaluation)

    model, processor, peft_config = load_policy(model_args, cache_dir=script_args.cache_dir, name_or_path=policy_path,
                                                freeze_vision=script_args.freeze_vision,
                                                trust_remote_code=training_args.trust_remote_code)
    if script_args.rl_algorithm == "rloo":
        trainer = RLOOTrainer(model=model, reward_funcs=reward_funcs, args=to_rloo_config(training_args),
                              train_dataset=prompts, processing_class=processor, peft_config=peft_config)
    else:
        trainer = GRPOTrainer(model=model, reward_funcs=reward_funcs, args=training_args, train_dataset=prompts,
                              processing_class=processor, peft_config=peft_config)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(str(output_dir))
    if trainer.is_world_process_zero():
        processor.save_pretrained(str(output_dir))
        # the per-step log (reward std, KL, clipping) as a checkpoint's trainer_state.json holds it: save_strategy
        # "no" writes no checkpoint, and without it a finished run's training dynamics are lost
        trainer.state.save_to_json(str(output_dir / "trainer_state.json"))
        save_prompt_settings(output_dir, prompt_template=script_args.prompt_template,
                             attribute_keys=script_args.attribute_keys, max_new_tokens=training_args.max_completion_length)
    state.wait_for_everyone()

    if evaluation is None or not state.is_main_process:
        return trainer
    generated["rar_attributes"] = generate_eval_attributes(script_args, training_args, model_args, output_dir,
                                                           evaluation)
    with outside_zero3():  # only this process evaluates: a whole encoder, no collective partitioning
        encoder = ProductEncoder.from_pretrained(script_args.encoder).to(training_args.device)
    sources = {"no_attributes": None, **{k: canonical_attributes(v, script_args.attribute_keys)
                                         for k, v in generated.items()}}
    # The deployment protocol (every listing annotated by the generator under test) is the headline; the
    # reward's protocol (query only, against the --gallery_attributes gallery) sits beside it.
    results = evaluate_attribute_sources(encoder, evaluation, sources, protocol="both_sides",
                                         batch_size=script_args.eval_batch_size)
    gallery_texts = (sources["sft_attributes"] if script_args.gallery_attributes == "policy" else
                     attribute_texts(evaluation, script_args.gallery_attributes, script_args.attribute_keys))
    query_only = evaluate_attribute_sources(encoder, evaluation, sources, protocol="query_only",
                                            gallery_attributes=gallery_texts, batch_size=script_args.eval_batch_size)
    paths = write_report(output_dir, {k: results[k] for k in SOURCES}, log_history=trainer.state.log_history,
                         generated={"listing_id": evaluation["listing_id"], **generated},
                         extra={"protocol": "both_sides", "query_only": {k: query_only[k] for k in SOURCES},
                                "elapsed_s": round(time.time() - started, 1), "eval_split": script_args.eval_split,
                                "n_eval_listings": len(evaluation),
                                "gallery_attributes": script_args.gallery_attributes})
    print(f"\nHeld-out instance retrieval ({len(evaluation)} listings of split {script_args.eval_split!r}), every "
          "listing annotated by the generator (deployment):")
    print(format_table({k: results[k] for k in SOURCES}))
    print(f"Query-only attributes, gallery {script_args.gallery_attributes!r} (the reward's protocol):")
    print(format_table({k: query_only[k] for k in SOURCES}))
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({time.time() - started:.0f} s in all)")
    logger.info("metrics: %s", json.dumps(results))
    return trainer


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
    trainer = main(*args)
    # Each process shuts its process group down itself (a local call, no barrier: the other ranks may still be
    # evaluating). Left to interpreter exit, the backend's threads were once seen to abort a finished rank.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return trainer


if __name__ == "__main__":
    cli()
