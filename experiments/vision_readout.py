"""Can a tiny generator's vision tower read a key at all? A direct readout, apart from the language model.

    python -m experiments.vision_readout --catalog outputs/probe-ink-p10/pretrain-corpus \
        --out outputs/vision-readout/p10-generator-scratch.json
    python -m experiments.vision_readout --catalog outputs/probe-ink-p10/pretrain-corpus \
        --from_model outputs/probe-ink-p10/generator-base --freeze true \
        --out outputs/vision-readout/p10-base-frozen.json
    python -m experiments.vision_readout --catalog outputs/probe-ink-p10/pretrain-corpus --image_max_side 56 \
        --min_image_tokens 4 --vision_hidden_size 32 --vision_depth 2 --hidden_size 64 \
        --out outputs/vision-readout/p10-embedder-scratch.json

The fair test's fourth draft needs a generator that reads a fine key the embedder blurs (G1 and G2). On an
equal-ink corpus the pretrained generator base names the pattern at chance (docs/experiments/fair_test_plan.md),
which has two readings: its view cannot resolve the texture, or its caption objective never taught the tower to.
This probe separates them with ``afmrl.embedded.vision_stage``: a tiny generator's vision tower and merger (built
with the sizes below, or loaded from a pretrained model with ``--from_model``), one attention-pooled linear head per
key, trained on the catalog's true values with the tower trained too (``--freeze false``: what this view resolves
under direct supervision) or frozen (``--freeze true``: what a pretrained tower already holds). Accuracy on the
eval split is written every ``--eval_every`` steps, each key's most frequent value beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from transformers import AutoModelForImageTextToText

from afmrl.catalog.load import load_catalog
from afmrl.embedded.tiny_models import build_tiny_mllm
from afmrl.embedded.vision_stage import first_photo, readout_accuracy, train_vision_stage
from afmrl.modeling import load_processor


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalog", required=True, help="Catalog directory with true_attributes (a pretraining corpus).")
    p.add_argument("--keys", nargs="+", default=["pattern", "logo"], help="Keys to read out.")
    p.add_argument("--split", default="train")
    p.add_argument("--eval_split", default="test")
    p.add_argument("--max_train", type=int, default=12000, help="Training photos (the first, in catalog order).")
    p.add_argument("--max_eval", type=int, default=1000)
    p.add_argument("--from_model", default=None, help="A pretrained tiny generator; its tower and processor are used.")
    p.add_argument("--freeze", default="false", choices=["true", "false"], help="Train the heads only.")
    p.add_argument("--vision_hidden_size", type=int, default=64)
    p.add_argument("--vision_depth", type=int, default=4)
    p.add_argument("--hidden_size", type=int, default=128, help="The merger's output width (the LM's).")
    p.add_argument("--image_max_side", type=int, default=0, help="Scale photos down first (the embedder: 56).")
    p.add_argument("--min_image_tokens", type=int, default=16)
    p.add_argument("--max_image_tokens", type=int, default=16)
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--eval_every", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    train = load_catalog(args.catalog, split=args.split, verify_images=False)
    train = train.select(range(min(args.max_train, len(train))))
    test = load_catalog(args.catalog, split=args.eval_split, verify_images=False)
    test = test.select(range(min(args.max_eval, len(test))))
    chance = {}
    for key in args.keys:
        counts = np.unique([str(a[key]) for a in test["true_attributes"]], return_counts=True)[1]
        chance[key] = float(counts.max() / counts.sum())
    if args.from_model:
        model, processor = AutoModelForImageTextToText.from_pretrained(args.from_model), load_processor(args.from_model)
    else:
        model, processor = build_tiny_mllm(
            hidden_size=args.hidden_size,
            num_layers=1,
            vision_hidden_size=args.vision_hidden_size,
            vision_depth=args.vision_depth,
            min_image_tokens=args.min_image_tokens,
            max_image_tokens=args.max_image_tokens,
            seed=args.seed,
        )
    curve, start = [], time.time()

    def evaluate(step, readout):
        if step % args.eval_every and step != args.steps:
            return
        acc = readout_accuracy(readout, processor, test, image_max_side=args.image_max_side)
        curve.append({"step": step, "loss": float(np.mean(readout.losses[-50:])), "accuracy": acc})
        print(json.dumps(curve[-1]), flush=True)

    train_vision_stage(
        model,
        processor,
        train,
        args.keys,
        args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        train_tower=args.freeze == "false",
        image_max_side=args.image_max_side,
        on_step=evaluate,
    )
    result = {
        "accuracy": curve[-1]["accuracy"],
        "chance": chance,
        "image_tokens": int(
            processor.image_processor(images=[first_photo(test[0]["image"], args.image_max_side)], return_tensors="pt")[
                "image_grid_thw"
            ].prod()
            // 4
        ),
        "minutes": round((time.time() - start) / 60, 1),
        "curve": curve,
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
