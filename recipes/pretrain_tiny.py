"""Pretrain a tiny Qwen-VL-class MLLM so that it perceives, as the models AFMRL starts from do.

    python recipes/make_catalog.py --output_dir outputs/pretrain-corpus --seed 2026 --num_products 12000 \
        --test_fraction 0.03 --duplicate_sku_fraction 0 --exclude_products_of_seeds 0 1 2 3 4 5 6 7 8 9
    python recipes/pretrain_tiny.py --config recipes/configs/pretrain_tiny_generator.yaml \
        --catalog outputs/pretrain-corpus --output_dir outputs/pretrained/generator

The model is the tiny-model factory's architecture (``afmrl.embedded.tiny_models.build_tiny_mllm``, sizes from
the flags below) with a tokenizer trained on the corpus's words, randomly initialised with
``--seed``, then trained with TRL's ``SFTTrainer`` on ``afmrl.embedded.pretraining`` conversations (describe
the photo, answer a question about one visible attribute, read the title, or caption the photo;
loss on the answers only). The corpus is any catalog with a ``true_attributes`` column. The run
is deterministic per seed on CPU, shows a progress bar, resumes from the last checkpoint in
``--output_dir`` when one exists, and ends by printing (and saving in ``perception.json`` and the
model card ``README.md``) how often the model names each visible attribute of held-out photos
right, in the format of the task it trained on (``--perception_format``).

The models the embedded demo starts from were made with the two YAML files in recipes/configs
(commands, corpus, seed and times in docs/embedded.md).
"""

import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer, TrlParser

from afmrl.catalog.load import load_catalog
from afmrl.cli import USER_ERRORS, fail, parse_recipe_args
from afmrl.embedded.pretraining import (
    PERCEPTION_FORMATS,
    TASK_PROBABILITIES,
    build_pretraining_dataset,
    conversation,
    perception_accuracy,
    visible_keys,
)
from afmrl.embedded.synthetic_catalog import vocabulary_corpus
from afmrl.embedded.tiny_models import build_tiny_mllm
from afmrl.embedded.vision_stage import readout_accuracy, train_vision_stage
from afmrl.encoder.model import DEFAULT_INSTRUCTION
from afmrl.modeling import FAMILIES
from rar.prompts import DEFAULT_PROMPT

logger = logging.getLogger("pretrain_tiny")


@dataclass
class PretrainScriptArguments:
    catalog: str | None = field(
        default=None,
        metadata={
            "help": "The pretraining corpus: a catalog directory, catalog.jsonl, saved dataset or hub id with a "
            "true_attributes column (for the shipped models, a synthetic catalog disjoint from every demo, test "
            "and benchmark catalog: see the command at the top of this file)."
        },
    )
    split: str = field(default="train", metadata={"help": "Split to pretrain on."})
    eval_split: str | None = field(
        default="test", metadata={"help": "Held-out split whose photos measure perception at the end ('none' to skip)."}
    )
    max_eval_listings: int = field(default=500, metadata={"help": "Held-out photos scored at the end."})
    attribute_column: str = field(
        default="true_attributes", metadata={"help": "Column with each listing's attributes (an object key -> value)."}
    )
    hidden_keys: list[str] = field(
        default_factory=lambda: ["brand", "size"],
        metadata={
            "help": "Keys the photo does not show: described only where the title states them (the synthetic "
            "catalog's brand and size)."
        },
    )
    passes: int = field(
        default=3, metadata={"help": "Conversations per listing, each with a freshly drawn task and phrasing."}
    )
    task_probabilities: list[float] = field(
        default_factory=lambda: list(TASK_PROBABILITIES),
        metadata={
            "help": "How often each task is drawn: describe the photo, ask about one visible key, read the title, and "
            "(a 4th weight, default 0) a terse fixed-order caption."
        },
    )
    phrasing: str = field(
        default="natural",
        metadata={
            "help": "How descriptions are worded: 'natural' (values may come before their key: 'a striped surface') or "
            "'key_first' (every phrase names its key before the value: 'the pattern is striped')."
        },
    )
    shuffle_descriptions: bool = field(
        default=True,
        metadata={"help": "Name the keys of a description in a random order (false: the catalog's key order)."},
    )
    perception_format: str = field(
        default="auto",
        metadata={
            "help": "How the held-out photos are scored: 'ask' (the answer to a question about each key), 'caption' "
            "(the "
            "whole caption) or 'auto' (caption when captions outweigh questions in --task_probabilities)."
        },
    )
    family: str = field(default="qwen2_vl", metadata={"help": f"Architecture family, one of {FAMILIES}."})
    hidden_size: int = field(default=64, metadata={"help": "Language model width."})
    num_layers: int = field(default=2, metadata={"help": "Language model depth."})
    num_heads: int = field(default=4, metadata={"help": "Attention heads."})
    vision_hidden_size: int = field(default=32, metadata={"help": "Vision tower width."})
    vision_depth: int = field(default=2, metadata={"help": "Vision tower blocks."})
    min_image_tokens: int = field(
        default=4, metadata={"help": "Fewest LLM tokens per image (16 scales a 64 px photo up to 112 px)."}
    )
    max_image_tokens: int = field(default=16, metadata={"help": "Most LLM tokens per image."})
    vocab_size: int = field(default=2048, metadata={"help": "Tokenizer vocabulary size (trained on the corpus)."})
    vision_steps: int = field(
        default=0,
        metadata={
            "help": "Batches of a vision stage before the conversations: the tower learns to read every visible key "
            "of the corpus directly (afmrl.embedded.vision_stage; real MLLMs start from a pretrained tower). 0: none."
        },
    )
    vision_learning_rate: float = field(default=1e-3, metadata={"help": "The vision stage's peak learning rate."})
    vision_keys: list[str] | None = field(
        default=None,
        metadata={
            "help": "The keys the vision stage reads (default: every visible key). On an equal-ink corpus a stage "
            "on all five keys learnt the colours and left the pattern at chance; on pattern and logo alone it read "
            "the pattern (docs/experiments/fair_test_plan.md)."
        },
    )


def tokenizer_corpus(catalog, keys, column: str, phrasing: str = "natural") -> list[str]:
    """Texts the tokenizer is trained on: the corpus's titles and conversations, the synthetic vocabulary, and
    the prompts the later stages use (the encoder's instruction, the generator's prompt)."""
    import numpy as np

    all_keys = list(dict.fromkeys(k for a in catalog[column] for k in (a or {})))
    texts = [*vocabulary_corpus(), DEFAULT_INSTRUCTION, DEFAULT_PROMPT, "Title:", "Attributes:"]
    for i, (title, attributes) in enumerate(zip(catalog["title"], catalog[column], strict=True)):
        messages = conversation(
            title, attributes or {}, keys, all_keys, np.random.default_rng([0, 9, i]), phrasing=phrasing
        )
        texts += [title or ""] + [block["text"] for m in messages for block in m["content"] if "text" in block]
        texts += [f"{k}: {v}" for k, v in (attributes or {}).items()]
    return texts


def model_card(
    script_args,
    training_args,
    perception: dict,
    perception_format: str,
    elapsed: float,
    n_listings: int,
    corpus_note: str,
    command: list[str],
) -> str:
    sizes = {
        k: getattr(script_args, k)
        for k in (
            "family",
            "hidden_size",
            "num_layers",
            "num_heads",
            "vision_hidden_size",
            "vision_depth",
            "min_image_tokens",
            "max_image_tokens",
        )
    }
    lines = [
        "# A pretrained tiny Qwen-VL-class MLLM (afmrl embedded default)",
        "",
        "Made by `recipes/pretrain_tiny.py`: the tiny-model factory's architecture, random init with seed "
        f"{training_args.seed}, trained with TRL's SFTTrainer on conversations about the photos of a synthetic "
        "catalog (afmrl/embedded/pretraining.py; task mix describe / ask / read-the-title / caption = "
        f"{'/'.join(str(w) for w in script_args.task_probabilities)}).",
        "",
        f"- command: `{' '.join(['python recipes/pretrain_tiny.py', *command])}`",
        f"- sizes: {json.dumps(sizes)}",
        f"- corpus: {script_args.catalog} split {script_args.split!r}, {n_listings} photos x {script_args.passes} "
        f"conversations; {corpus_note}",
        f"- training: {training_args.num_train_epochs} epoch(s), batch {training_args.per_device_train_batch_size}, "
        f"lr {training_args.learning_rate}, {elapsed / 60:.1f} min on this machine",
        "",
        "Perception on held-out photos (the likeliest of each key's values, "
        "afmrl.embedded.pretraining.perception_accuracy "
        f"in the {perception_format!r} format):",
        "",
        "| key | accuracy |",
        "|---|---|",
    ]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in perception.items()]
    return "\n".join(lines) + "\n"


def main(script_args: PretrainScriptArguments, training_args: SFTConfig, command: list[str] | None = None):
    started = time.time()
    set_seed(training_args.seed)
    try:  # every input check, before any model is built
        if not script_args.catalog:
            raise ValueError("--catalog is required: the pretraining corpus (a catalog with a true_attributes column)")
        if script_args.family not in FAMILIES:
            raise ValueError(f"--family {script_args.family!r}: choose one of {', '.join(FAMILIES)}")
        if (
            len(script_args.task_probabilities) not in (3, 4)
            or min(script_args.task_probabilities) < 0
            or not sum(script_args.task_probabilities)
        ):
            raise ValueError(
                "--task_probabilities takes 3 or 4 weights >= 0 (describe, ask, title[, caption]), not all 0"
            )
        perception_format = script_args.perception_format
        if perception_format == "auto":
            weights = [*script_args.task_probabilities, 0.0]
            perception_format = "caption" if weights[3] > weights[1] else "ask"
        if script_args.vision_steps < 0:
            raise ValueError(f"--vision_steps must be >= 0, got {script_args.vision_steps}")
        if perception_format not in PERCEPTION_FORMATS:
            raise ValueError(f"--perception_format {perception_format!r}: choose auto, {', '.join(PERCEPTION_FORMATS)}")
        catalog = load_catalog(script_args.catalog, split=script_args.split)
        keys = visible_keys(catalog, script_args.hidden_keys, script_args.attribute_column)
        vision_keys = script_args.vision_keys or keys
        if set(vision_keys) - set(keys):
            raise ValueError(f"--vision_keys {sorted(set(vision_keys) - set(keys))}: not visible keys of the corpus "
                             f"(its visible keys: {', '.join(keys)})")  # fmt: skip
        held_out = None
        if script_args.eval_split not in (None, "", "none"):
            held_out = load_catalog(script_args.catalog, split=script_args.eval_split)
            held_out = held_out.select(range(min(script_args.max_eval_listings, len(held_out))))
        dataset = build_pretraining_dataset(
            catalog,
            keys,
            passes=script_args.passes,
            seed=training_args.seed,
            column=script_args.attribute_column,
            task_probabilities=script_args.task_probabilities,
            phrasing=script_args.phrasing,
            shuffle=script_args.shuffle_descriptions,
        )
        model, processor = build_tiny_mllm(
            script_args.family,
            corpus=tokenizer_corpus(catalog, keys, script_args.attribute_column, script_args.phrasing),
            hidden_size=script_args.hidden_size,
            num_layers=script_args.num_layers,
            num_heads=script_args.num_heads,
            vocab_size=script_args.vocab_size,
            max_image_tokens=script_args.max_image_tokens,
            min_image_tokens=script_args.min_image_tokens,
            vision_hidden_size=script_args.vision_hidden_size,
            vision_depth=script_args.vision_depth,
            seed=training_args.seed,
        )
    except USER_ERRORS as err:
        fail(err)
    logger.info("pretraining on %d conversations about %d photos; visible keys %s", len(dataset), len(catalog), keys)

    resume = training_args.resume_from_checkpoint
    if resume is None and Path(training_args.output_dir).is_dir():
        resume = get_last_checkpoint(training_args.output_dir)  # open-r1's convention: pick up where it stopped
        if resume:
            logger.info("resuming from %s", resume)
    vision = {}
    if script_args.vision_steps and not resume:  # a checkpoint already holds the trained tower
        readout = train_vision_stage(
            model,
            processor,
            catalog,
            vision_keys,
            script_args.vision_steps,
            batch_size=training_args.per_device_train_batch_size,
            learning_rate=script_args.vision_learning_rate,
            seed=training_args.seed,
            column=script_args.attribute_column,
        )
        if held_out is not None:
            vision = readout_accuracy(readout, processor, held_out, column=script_args.attribute_column)
            logger.info("vision stage readout on held-out photos: %s", vision)
        model.train()
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=processor)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)
    elapsed = time.time() - started

    perception = {}
    if held_out is not None:
        from afmrl.encoder.crops import catalog_views

        values = {
            k: sorted({str(a[k]) for a in catalog[script_args.attribute_column] if a and a.get(k) is not None})
            for k in keys
        }
        images = [im[0] if isinstance(im, list) else im for im in catalog_views(held_out)]
        perception = perception_accuracy(
            trainer.model,
            processor,
            images,
            held_out[script_args.attribute_column],
            keys,
            values,
            task=perception_format,
        )
        print(
            f"\nPerception on {len(held_out)} held-out photos (split {script_args.eval_split!r}, "
            f"{perception_format} format):"
        )
        for key, accuracy in perception.items():
            chance = 1 / max(len(values[key]), 1)
            print(f"  {key:>16}: {100 * accuracy:5.1f}%  (chance {100 * chance:.0f}%)")
    out = Path(training_args.output_dir)
    generation = Path(script_args.catalog) / "generation.json"
    corpus_note = (
        "synthetic generator settings: " + json.dumps(json.loads(generation.read_text()), sort_keys=True)
        if generation.is_file()
        else "not a synthetic catalog"
    )
    (out / "perception.json").write_text(
        json.dumps(
            {
                "perception": perception,
                "perception_format": perception_format,
                "vision_stage_readout": vision,
                "minutes": round(elapsed / 60, 1),
                "script_args": asdict(script_args),
            },
            indent=2,
        )
        + "\n"
    )
    (out / "README.md").write_text(
        model_card(
            script_args,
            training_args,
            perception,
            perception_format,
            elapsed,
            len(catalog),
            corpus_note,
            sys.argv[1:] if command is None else command,
        )
    )
    print(f"wrote {out} ({elapsed / 60:.1f} min)")
    return trainer, perception


def cli(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = TrlParser((PretrainScriptArguments, SFTConfig))
    try:
        args = parse_recipe_args(parser, argv)
    except USER_ERRORS as err:
        fail(err)
    return main(*args, command=argv)


if __name__ == "__main__":
    cli()
