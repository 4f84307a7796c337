"""Why does pretraining learn pattern and logo so slowly? A plain-loop probe that separates data from objective.

    python recipes/make_catalog.py --output_dir outputs/pretrain-corpus ...   # docs/embedded.md, step 1
    OMP_NUM_THREADS=1 python -m experiments.perception_probe --data corpus --out outputs/perception-probe/corpus.json
    OMP_NUM_THREADS=1 python -m experiments.perception_probe --data uniform --out outputs/perception-probe/uniform.json
    python -m experiments.perception_probe --data corpus --trainer sft --out outputs/perception-probe/corpus-sft.json
    python -m experiments.perception_probe --score outputs/probe3/D --eval_photos 150 \
        --out outputs/perception-probe/D.json

The issue's first probe (a plain PyTorch loop, compact targets, photos with independently drawn
attributes) taught the generator-sized tiny model pattern and logo far faster than
``recipes/pretrain_tiny.py`` does on the pretraining corpus. This script is that loop, with the
generator's sizes: each photo's target is the values of its visible keys in a fixed order ("mug red
blue striped star"), the loss is on the target only, AdamW with warmup and cosine decay. ``--data``
chooses the photos: ``corpus`` (the pretraining corpus's train split, families of near-duplicates)
or ``uniform`` (freshly rendered photos whose visible attributes are drawn independently and
uniformly, the issue's setting). Both models are scored on the same two held-out sets (the
corpus's test split and uniform renders of another seed): for each key, is the true value the
likeliest of that key's values in its slot, the earlier slots given? ``--trainer sft`` trains the
same data through TRL's SFTTrainer instead, and ``--score DIR --format caption|describe`` scores a
model that ``recipes/pretrain_tiny.py`` made in the format of the task it was trained on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from afmrl.catalog.load import load_catalog
from afmrl.embedded.photos import render_product_image
from afmrl.embedded.pretraining import perception_accuracy
from afmrl.embedded.synthetic_catalog import ATTRIBUTE_VALUES, vocabulary_corpus
from afmrl.embedded.tiny_models import build_tiny_mllm
from afmrl.encoder.crops import catalog_views

KEYS = ("category", "color", "secondary_color", "pattern", "logo")
PROMPT = "Describe the product in the photo."


def uniform_photos(n: int, seed: int) -> tuple[list, list[dict]]:
    rng = np.random.default_rng(seed)
    attributes = [{k: str(rng.choice(ATTRIBUTE_VALUES[k])) for k in KEYS} for _ in range(n)]
    return [render_product_image(a, rng) for a in attributes], attributes


def prompt_text(processor) -> str:
    return processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
        tokenize=False,
        add_generation_prompt=True,
    )


def batch_with_labels(processor, prefix: str, images, targets: list[str]) -> dict:
    """Tokenised prompt + target per photo; labels are -100 except on the target and its end token."""
    tokenizer = processor.tokenizer
    ends = [t + "<|im_end|>" for t in targets]
    batch = processor(
        text=[prefix + t for t in ends], images=[im.convert("RGB") for im in images], padding=True, return_tensors="pt"
    )
    labels = torch.full_like(batch["input_ids"], -100)
    last = batch["attention_mask"].shape[1] - batch["attention_mask"].flip(1).argmax(1)  # one past the last token
    for row, text in enumerate(ends):
        n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        labels[row, last[row] - n : last[row]] = batch["input_ids"][row, last[row] - n : last[row]]
    batch["labels"] = labels
    return batch


@torch.no_grad()
def slot_accuracy(model, processor, images, attributes, batch_size: int = 64) -> dict[str, float]:
    """Per key: how often the true value has the highest summed log-probability in its slot (earlier slots true)."""
    prefix = prompt_text(processor)
    model.eval()
    result = {}
    for k_index, key in enumerate(KEYS):
        values = list(ATTRIBUTE_VALUES[key])
        pairs = [(i, v) for i in range(len(images)) for v in values]
        scores = []
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            heads = [" ".join(attributes[i][k] for k in KEYS[:k_index]) for i, _ in chunk]
            texts = [(h + " " + v).strip() for h, (_, v) in zip(heads, chunk, strict=True)]
            batch = processor(
                text=[prefix + t for t in texts],
                images=[images[i].convert("RGB") for i, _ in chunk],
                padding=True,
                return_tensors="pt",
            )
            logits = model(**batch).logits.float()
            logprobs = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
            last = batch["attention_mask"].shape[1] - batch["attention_mask"].flip(1).argmax(1)
            for row, (_, v) in enumerate(chunk):
                n = len(processor.tokenizer((" " + v) if k_index else v, add_special_tokens=False)["input_ids"])
                scores.append(logprobs[row, last[row] - 1 - n : last[row] - 1].sum().item())
        best = np.asarray(scores).reshape(len(images), len(values)).argmax(1)
        truth = np.asarray([values.index(a[key]) for a in attributes])
        result[key] = float(np.mean(best == truth))
    model.train()
    return result


@torch.no_grad()
def describe_accuracy(model, processor, images, attributes) -> dict[str, float]:
    """Per key: how often the true value makes a whole description (the keys in order, each key's first phrasing)
    likeliest, the other values true. For a model pretrained on descriptions only (--score DIR --format describe);
    the caption format is afmrl.embedded.pretraining.perception_accuracy(task="caption")."""
    from afmrl.embedded.pretraining import DESCRIBE_PROMPTS, _sentence, clause

    prefix = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DESCRIBE_PROMPTS[0]}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    model.eval()
    result = {}
    for key in KEYS:
        values, correct = list(ATTRIBUTE_VALUES[key]), 0
        for image, truth in zip(images, attributes, strict=True):
            replies = [_sentence([clause(k, {**truth, key: v}[k]) for k in KEYS]) + "<|im_end|>" for v in values]
            batch = processor(
                text=[prefix + r for r in replies],
                images=[image.convert("RGB")] * len(values),
                padding=True,
                return_tensors="pt",
            )
            logprobs = torch.log_softmax(model(**batch).logits.float()[:, :-1], -1).gather(
                -1, batch["input_ids"][:, 1:, None]
            )[..., 0]
            last = batch["attention_mask"].shape[1] - batch["attention_mask"].flip(1).argmax(1)
            scores = [
                logprobs[row, last[row] - 1 - n : last[row] - 1].sum().item()
                for row, n in enumerate(
                    len(processor.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies
                )
            ]
            correct += int(np.argmax(scores) == values.index(truth[key]))
        result[key] = correct / len(images)
    return result


def compact_target(attributes) -> str:
    return " ".join(str(attributes[k]) for k in KEYS)


def train_plain(model, processor, corpus, args, rng) -> float:
    """The issue's loop: AdamW, warmup and cosine decay, gradient clipping at 1; returns the last 50 steps' loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, args.steps // 10), args.steps)
    prefix = prompt_text(processor)
    order = rng.permutation(len(corpus))
    losses = []
    model.train()
    for step in tqdm(range(args.steps), desc=f"plain loop on {args.data} photos"):
        if args.data == "uniform":
            images, attributes = uniform_photos(args.batch_size, seed=int(rng.integers(2**31)))
        else:
            rows = corpus.select(order[(step * args.batch_size + np.arange(args.batch_size)) % len(corpus)])
            images, attributes = catalog_views(rows), rows["true_attributes"]
        batch = batch_with_labels(processor, prefix, images, [compact_target(a) for a in attributes])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return float(np.mean(losses[-50:]))


def train_with_sft_trainer(model, processor, corpus, args, rng) -> float:
    """The same photos, order and compact targets as conversations, trained by TRL's SFTTrainer with the
    generator YAML's settings (recipes/pretrain_tiny.py's path): separates the training path from the data."""
    from trl import SFTConfig, SFTTrainer

    order = rng.permutation(len(corpus))
    rows = corpus.select(order[np.arange(args.steps * args.batch_size) % len(corpus)])

    def as_conversation(attributes):
        return {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]},
                {"role": "assistant", "content": [{"type": "text", "text": compact_target(attributes)}]},
            ]
        }

    dataset = rows.select_columns(["image", "true_attributes"]).map(
        as_conversation, input_columns=["true_attributes"], remove_columns=["true_attributes"]
    )
    config = SFTConfig(
        output_dir=str(Path(args.out).with_suffix("")) + "-sft",
        assistant_only_loss=True,
        max_length=256,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, args.steps // 10),
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="no",
        bf16=False,
        use_cpu=True,
        report_to="none",
        dataloader_num_workers=0,
        seed=args.seed,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=processor)
    trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]  # each: the last 50 steps
    return float(logged[-1] if logged else trainer.state.log_history[-1]["train_loss"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("corpus", "uniform"))
    parser.add_argument(
        "--trainer",
        choices=("plain", "sft"),
        default="plain",
        help="plain: the loop above; sft: TRL's SFTTrainer, as recipes/pretrain_tiny.py trains.",
    )
    parser.add_argument(
        "--score",
        help="Only score this pretrained model (recipes/pretrain_tiny.py) in the format "
        "of --format on the corpus's test split.",
    )
    parser.add_argument(
        "--format",
        choices=("caption", "describe"),
        default="caption",
        help="The task whose replies --score compares (the model should have been trained on it).",
    )
    parser.add_argument("--catalog", default="outputs/pretrain-corpus")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=1.5e-3)
    parser.add_argument("--eval_photos", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.score:
        from afmrl.modeling import load_mllm

        model, processor = load_mllm(args.score)
        held_out = load_catalog(args.catalog, split="test").select(range(args.eval_photos))
        truth = [{k: str(a[k]) for k in KEYS} for a in held_out["true_attributes"]]
        images = catalog_views(held_out)
        if args.format == "caption":
            accuracy = perception_accuracy(model, processor, images, truth, KEYS, ATTRIBUTE_VALUES, task="caption")
        else:
            accuracy = describe_accuracy(model, processor, images, truth)
        result = {"model": args.score, "photos": args.eval_photos, f"{args.format}_accuracy": accuracy}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    if not args.data:
        parser.error("--data is required (or --score DIR)")
    if args.trainer == "sft" and args.data != "corpus":
        parser.error("--trainer sft trains on --data corpus only")
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    corpus = load_catalog(args.catalog, split="train")
    held_out = load_catalog(args.catalog, split="test").select(range(args.eval_photos))
    eval_sets = {
        "corpus test split": (
            catalog_views(held_out),
            [{k: str(a[k]) for k in KEYS} for a in held_out["true_attributes"]],
        ),
        "uniform renders": uniform_photos(args.eval_photos, seed=10_000 + args.seed),
    }
    texts = vocabulary_corpus() + [PROMPT] + [compact_target(a) for a in corpus["true_attributes"]]
    model, processor = build_tiny_mllm(
        "qwen2_vl",
        corpus=texts,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        vision_hidden_size=64,
        min_image_tokens=16,
        max_image_tokens=16,
        seed=args.seed,
    )
    started = time.time()
    loss_last_50 = (train_with_sft_trainer if args.trainer == "sft" else train_plain)(
        model, processor, corpus, args, rng
    )
    minutes = (time.time() - started) / 60
    result = {
        "data": args.data,
        "trainer": args.trainer,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "photos_seen": args.steps * args.batch_size,
        "minutes": round(minutes, 1),
        "loss_last_50": loss_last_50,
        "accuracy": {name: slot_accuracy(model, processor, *photos) for name, photos in eval_sets.items()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
