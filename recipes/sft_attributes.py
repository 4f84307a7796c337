"""Stage 2 warm start: SFT of the attribute generator on the teacher's attributes (the "distilled generator").

    python recipes/sft_attributes.py                                # the embedded demo (sft_demo.yaml)
    python recipes/sft_attributes.py --output_dir outputs/my-sft --num_train_epochs 1   # flags override the demo
    python recipes/sft_attributes.py --config recipes/configs/sft_demo.yaml \
        --catalog data/my_catalog --model_name_or_path Qwen/Qwen2-VL-2B-Instruct \
        --use_peft --lora_r 16 --output_dir outputs/my-generator

Each listing becomes one conversation (``rar.prompts.build_sft_dataset``): the user turn is the
prompt GRPO will use (image + title), the assistant turn the canonical ``key: value; ...`` line of
the catalog's teacher attributes. TRL's ``SFTTrainer`` renders it with the processor's chat template,
turns the ``image`` column into ``images=[image]`` and processes images on the fly (vision datasets
skip dataset preparation). With ``assistant_only_loss`` (the demo config) only the answer and its
``<|im_end|>`` are trained, read from the template's ``{% generation %}`` markers.

Flags: the fields of SFTScriptArguments (below), trl.SFTConfig (all of transformers.TrainingArguments
plus SFT options) and trl.ModelConfig (policy, LoRA, 4-bit), layered over recipes/configs/sft_demo.yaml
without ``--config``. With ``--use_peft`` the LoRA adapters go
on the language model's linears only (default q/k/v/o/gate/up/down; ``--lora_target_modules`` names
others); the vision tower is left untouched. Without it, ``--freeze_vision`` keeps the vision tower as loaded.
"""

import logging
from dataclasses import dataclass, field
from pathlib import Path

from transformers import set_seed
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser, get_peft_config

from afmrl.catalog.load import load_catalog
from afmrl.cli import (
    USER_ERRORS,
    default_config_epilog,
    end_launched_process,
    fail,
    parse_recipe_args,
    with_default_config,
)
from afmrl.embedded import resolve_catalog, resolve_model
from afmrl.modeling import language_lora_targets, load_mllm
from afmrl.retrieval.fingerprints import write_training_record
from rar.policy import freeze_vision_tower
from rar.prompts import DEFAULT_PROMPT, build_sft_dataset, save_prompt_settings

logger = logging.getLogger("sft_attributes")

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sft_demo.yaml"
LM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class SFTScriptArguments:
    catalog: str = field(
        default="embedded",
        metadata={
            "help": "Catalog directory, catalog.jsonl, saved dataset or hub id; 'embedded' = the synthetic catalog."
        },
    )
    split: str = field(default="train", metadata={"help": "Catalog split to fine-tune on."})
    attribute_keys: list[str] | None = field(
        default=None,
        metadata={
            "help": "Keys the generator should write, in this order (named in the prompt); None = all the teacher's "
            "keys."
        },
    )
    cache_dir: str = field(
        default="outputs/embedded", metadata={"help": "Where the embedded catalog and tiny models are built."}
    )
    max_train_listings: int | None = field(
        default=None, metadata={"help": "Use only the first N listings of the split (None = all)."}
    )
    prompt_template: str = field(
        default=DEFAULT_PROMPT,
        metadata={"help": "User prompt with {title} and {keys} placeholders (the one GRPO will use)."},
    )
    freeze_vision: bool = field(
        default=False,
        metadata={
            "help": "Without --use_peft, keep the vision tower's weights as loaded and train the rest (the paper's "
            "LoRA "
            "SFT adapts the language model only; with --use_peft the vision tower is untouched anyway)."
        },
    )


def setup(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig):
    """Everything that can fail on user input, in order, before any training step."""
    set_seed(training_args.seed)
    # 1. Data first: a bad catalog fails here, before any model is loaded.
    source = resolve_catalog(script_args.catalog, script_args.cache_dir)
    catalog = load_catalog(source, split=script_args.split)
    trained_on = catalog  # the whole split, as loaded: what training_catalog.json fingerprints
    if script_args.max_train_listings is not None:
        if script_args.max_train_listings < 1:
            raise ValueError(f"--max_train_listings must be >= 1, got {script_args.max_train_listings}")
        catalog = catalog.select(range(min(script_args.max_train_listings, len(catalog))))
    dataset = build_sft_dataset(
        catalog, prompt_template=script_args.prompt_template, attribute_keys=script_args.attribute_keys
    )
    dataset = dataset.select_columns([c for c in ("messages", "image", "images") if c in dataset.column_names])
    logger.info("SFT on %d listings", len(dataset))

    # 2. The policy and its processor; LoRA on the language model only.
    name = resolve_model(model_args.model_name_or_path or "tiny-qwen2-vl", script_args.cache_dir)
    model, processor = load_mllm(
        name,
        dtype=model_args.dtype,
        load_in_4bit=model_args.load_in_4bit,
        trust_remote_code=training_args.trust_remote_code,
    )
    peft_config = get_peft_config(model_args)
    if peft_config is None and script_args.freeze_vision:
        frozen = freeze_vision_tower(model)
        if not frozen:  # a model whose vision tower is named otherwise: training it silently would mislead
            raise ValueError(f"--freeze_vision: found no vision-tower parameters in {name} to freeze")
        logger.info("vision tower frozen (%d tensors)", frozen)
    if peft_config is not None:
        # peft has no default targets for Qwen-VL, and short names would also hit the vision tower's linears.
        peft_config.target_modules = language_lora_targets(model, model_args.lora_target_modules or LM_LORA_TARGETS)
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=processor, peft_config=peft_config
    )
    return trainer, processor, (source, trained_on)


def main(script_args: SFTScriptArguments, training_args: SFTConfig, model_args: ModelConfig):
    try:
        trainer, processor, (source, trained_on) = setup(script_args, training_args, model_args)
    except USER_ERRORS as err:
        fail(err)

    # 3. Train and save model (or adapter) + processor. Errors from here on keep their traceback.
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(training_args.output_dir)
        write_training_record(training_args.output_dir, trained_on, catalog=source, split=script_args.split)
        save_prompt_settings(
            training_args.output_dir,
            prompt_template=script_args.prompt_template,
            attribute_keys=script_args.attribute_keys,
            max_new_tokens=64,
        )
    return trainer


def parse_args(argv=None):
    """``argv`` (default ``sys.argv[1:]``) over the demo YAML (or over ``--config``), parsed with TrlParser."""
    parser = TrlParser((SFTScriptArguments, SFTConfig, ModelConfig), epilog=default_config_epilog(DEFAULT_CONFIG))
    return parse_recipe_args(parser, with_default_config(argv, DEFAULT_CONFIG))


def cli(argv=None):
    """The command line: ``parse_args``, then ``main``."""
    try:
        args = parse_args(argv)
    except USER_ERRORS as err:
        fail(err)
    return main(*args)


if __name__ == "__main__":
    cli()
    end_launched_process()
