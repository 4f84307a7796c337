"""Stage 1: train a product encoder with Attribute-Guided Contrastive Learning (AGCL).

    python recipes/agcl_train.py                                   # the embedded demo (agcl_demo.yaml)
    python recipes/agcl_train.py --output_dir outputs/mine --num_train_epochs 2   # flags override the demo
    python recipes/agcl_train.py --model_name_or_path openai/clip-vit-base-patch32   # a dual encoder (CLIP/SigLIP)
    python recipes/agcl_train.py --config recipes/configs/agcl_demo.yaml \
        --catalog data/my_catalog --output_dir outputs/my-encoder \
        --hard_negative_weighting false --false_negative_filter relative
    accelerate launch recipes/agcl_train.py --config recipes/configs/agcl_qwen2vl_2b.yaml

Flags: the fields of agcl.config.AGCLScriptArguments, agcl.config.AGCLConfig (all of
transformers.TrainingArguments plus the loss options) and trl.ModelConfig (backbone, LoRA, 4-bit). Without
``--config`` they are layered over recipes/configs/agcl_demo.yaml.
"""

import json
import logging
from pathlib import Path

from transformers import set_seed
from trl import ModelConfig, TrlParser

from afmrl.catalog.load import load_catalog, use_title_column
from afmrl.cli import (
    USER_ERRORS,
    default_config_epilog,
    end_launched_process,
    fail,
    parse_recipe_args,
    with_default_config,
)
from afmrl.embedded import resolve_catalog, resolve_model
from afmrl.encoder.model import EncoderConfig, ProductEncoder, load_frozen_encoder, read_encoder_config
from afmrl.retrieval.evaluation import evaluate_encoder, format_results
from afmrl.retrieval.fingerprints import write_training_record
from agcl.config import AGCLConfig, AGCLScriptArguments
from agcl.trainer import AGCLTrainer, check_attribute_options

logger = logging.getLogger("agcl_train")


DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "agcl_demo.yaml"


def setup(script_args: AGCLScriptArguments, training_args: AGCLConfig, model_args: ModelConfig):
    """Everything that can fail on user input, in order, before any training step."""
    set_seed(training_args.seed)
    # 1. Data first: a bad catalog or option fails here, before any model is loaded.
    catalog = resolve_catalog(
        script_args.catalog,
        script_args.cache_dir,
        num_products=script_args.embedded_num_products,
        seed=script_args.embedded_seed,
        image_size=script_args.embedded_image_size,
    )
    train = load_catalog(catalog, split=script_args.train_split)
    trained_on = train  # as loaded: what training_catalog.json fingerprints
    train, kept = use_title_column(train, script_args.title_column)
    if kept:
        logger.warning(
            "%d of %d training rows have no %r: they keep their own title", kept, len(train), script_args.title_column
        )
    check_attribute_options(training_args, train)
    crop_views = script_args.crop_views
    if script_args.init_encoder:  # a continued encoder keeps the views and experts it was saved with
        saved = read_encoder_config(script_args.init_encoder)
        for flag, given, kept in (
            ("crop_views", script_args.crop_views, saved.crop_views),
            ("moe_experts", script_args.moe_experts, saved.moe_experts),
            ("guided_moe_layers", script_args.guided_moe_layers, saved.guided_moe_layers),
        ):
            if given and given != kept:
                raise ValueError(
                    f"--{flag} {given}: --init_encoder {script_args.init_encoder!r} was saved with "
                    f"{flag}={kept}, which a continued encoder keeps; drop --{flag}"
                )
        crop_views = saved.crop_views
    if crop_views and "bbox" not in train.column_names:
        origin = (
            f" (the --init_encoder {script_args.init_encoder!r} was saved with it)" if script_args.init_encoder else ""
        )
        raise ValueError(
            f"--crop_views{origin}: the catalog has no 'bbox' column to crop to (columns: {train.column_names}); "
            "write boxes with recipes/extract_attributes.py --task bbox"
        )
    eval_split = None if str(script_args.eval_split).lower() in ("", "none") else script_args.eval_split
    test = load_catalog(catalog, split=eval_split) if eval_split else None

    # 2. The encoder: continued from a saved one, or new over the backbone (LoRA when --use_peft,
    #    else full fine-tuning of the language model).
    if script_args.init_encoder:
        encoder = ProductEncoder.from_pretrained(
            script_args.init_encoder,
            dtype=model_args.dtype,
            trainable=True,
            load_in_4bit=model_args.load_in_4bit,
            trust_remote_code=script_args.trust_remote_code,
        )
    else:
        backbone = resolve_model(model_args.model_name_or_path or "tiny-qwen2-vl", script_args.cache_dir)
        encoder_config = EncoderConfig(
            backbone=backbone,
            lora_r=model_args.lora_r if model_args.use_peft else 0,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            freeze_vision=script_args.freeze_vision,
            image_weight=script_args.image_weight,
            crop_views=script_args.crop_views,
            image_max_side=script_args.image_max_side,
            moe_experts=script_args.moe_experts,
            guided_moe_layers=script_args.guided_moe_layers,
            moe_entropy_weight=script_args.moe_entropy_weight,
            **({"lora_target_modules": model_args.lora_target_modules} if model_args.lora_target_modules else {}),
            **({"instruction": script_args.instruction} if script_args.instruction else {}),
        )
        encoder = ProductEncoder.from_backbone(
            encoder_config,
            dtype=model_args.dtype,
            load_in_4bit=model_args.load_in_4bit,
            trust_remote_code=script_args.trust_remote_code,
        )
    if script_args.save_sentence_transformer:  # refused before training, not after
        from afmrl.encoder.st_export import check_exportable

        check_exportable(encoder)
    trainer = AGCLTrainer(model=encoder, args=training_args, train_dataset=train)
    return trainer, encoder, test, (catalog, trained_on)


def main(script_args: AGCLScriptArguments, training_args: AGCLConfig, model_args: ModelConfig):
    try:
        trainer, encoder, test, (catalog, trained_on) = setup(script_args, training_args, model_args)
    except USER_ERRORS as err:
        fail(err)

    # 3. Train and save (encoder_config.json + adapter or backbone, BM25 IDF table). Errors from here
    #    on are not user input errors: they keep their traceback.
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.is_world_process_zero():
        write_training_record(training_args.output_dir, trained_on, catalog=catalog, split=script_args.train_split)
        if script_args.save_sentence_transformer:
            saved = load_frozen_encoder(training_args.output_dir, device="cpu")  # whole, also after ZeRO-3
            path = saved.save_sentence_transformer(Path(training_args.output_dir) / "sentence-transformer")
            logger.info("wrote %s (SentenceTransformer(%r) loads it)", path, str(path))

    # 4. Evaluate on the held-out split.
    if test is not None and trainer.is_world_process_zero():
        results = evaluate_encoder(encoder, test, batch_size=training_args.per_device_eval_batch_size)
        print(format_results(results))
        path = Path(training_args.output_dir) / "eval_results.json"
        path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        logger.info("wrote %s", path)
    return trainer


def parse_args(argv=None):
    """``argv`` (default ``sys.argv[1:]``) over the demo YAML (or over ``--config``), parsed with TrlParser."""
    parser = TrlParser((AGCLScriptArguments, AGCLConfig, ModelConfig), epilog=default_config_epilog(DEFAULT_CONFIG))
    return parse_recipe_args(parser, with_default_config(argv, DEFAULT_CONFIG))


def cli(argv=None):
    """The command line: ``parse_args``, then ``main``."""
    try:
        args = parse_args(argv)
    except USER_ERRORS as err:  # e.g. AGCLConfig rejecting --false_negative_filter fuzzy
        fail(err)
    return main(*args)


if __name__ == "__main__":
    cli()
    end_launched_process()
