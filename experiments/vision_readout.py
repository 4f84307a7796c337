"""Can a tiny generator's vision tower read a key at all? A direct readout, apart from the language model.

    python -m experiments.vision_readout --catalog outputs/probe-ink-p10/pretrain-corpus \
        --out outputs/vision-readout/scratch.json
    python -m experiments.vision_readout --catalog outputs/probe-ink-p10/pretrain-corpus \
        --from_model outputs/probe-ink-p10/generator-base --freeze true --out outputs/vision-readout/base-frozen.json

The fair test's fourth draft needs a generator that reads a fine key the embedder blurs (G1 and G2). On an
equal-ink corpus the pretrained generator base names the pattern at chance (docs/experiments/fair_test_plan.md),
which has two readings: its view cannot resolve the texture (too few image tokens, too small a tower), or its
caption objective never taught the tower to. This probe separates them. It takes the vision tower and merger of the
tiny generator (built with the same sizes as ``recipes/pretrain_tiny.py``, or loaded from a pretrained model with
``--from_model``), pools the image tokens (mean and max) and trains one linear head per key on the catalog's true
values, with the tower trained too (``--freeze false``: what this view can resolve with direct supervision) or frozen
(``--freeze true`` with ``--from_model``: what a pretrained tower already holds, a linear probe). Accuracy on the
catalog's eval split is written after every ``--eval_every`` steps, each key's chance beside it (the eval split's most
frequent value).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, get_cosine_schedule_with_warmup

from afmrl.catalog.load import load_catalog
from afmrl.embedded.tiny_models import build_tiny_mllm
from afmrl.encoder.crops import catalog_views
from afmrl.modeling import load_processor


def first_image(view, max_side: int = 0):
    """A listing's first photo, scaled down (bicubic, as the encoder's ``image_max_side``) when ``max_side`` > 0."""
    image = (view[0] if isinstance(view, list | tuple) else view).convert("RGB")
    if max_side and max(image.size) > max_side:
        scale = max_side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    return image


class Readout(torch.nn.Module):
    """The tower, its merger, and one linear head per key on the mean and max of the image tokens."""

    def __init__(self, visual, sizes: dict[str, int]):
        super().__init__()
        self.visual = visual
        width = visual.merger.mlp[-1].out_features if hasattr(visual.merger, "mlp") else visual.config.out_hidden_size
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(2 * width, n) for k, n in sizes.items()})

    def forward(self, pixel_values, grid_thw):
        tokens = self.visual(pixel_values, grid_thw=grid_thw).pooler_output
        per_image = tokens.reshape(grid_thw.shape[0], -1, tokens.shape[-1])
        pooled = torch.cat([per_image.mean(1), per_image.amax(1)], -1)
        return {k: head(pooled) for k, head in self.heads.items()}


def encode(processor, images):
    batch = processor.image_processor(images=images, return_tensors="pt")
    return batch["pixel_values"], batch["image_grid_thw"]


@torch.no_grad()
def accuracy(model, processor, images, labels, batch_size: int) -> dict[str, float]:
    model.eval()
    hits = {k: 0 for k in labels}
    for start in range(0, len(images), batch_size):
        logits = model(*encode(processor, images[start : start + batch_size]))
        for k, y in labels.items():
            hits[k] += int((logits[k].argmax(-1) == y[start : start + batch_size]).sum())
    model.train()
    return {k: hits[k] / len(images) for k in labels}


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
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--eval_every", type=int, default=150)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train = load_catalog(args.catalog, split=args.split, verify_images=False)
    train = train.select(range(min(args.max_train, len(train))))
    test = load_catalog(args.catalog, split=args.eval_split, verify_images=False)
    test = test.select(range(min(args.max_eval, len(test))))
    values = {k: sorted({str(a[k]) for a in train["true_attributes"]}) for k in args.keys}

    def labels(ds):
        return {k: torch.tensor([values[k].index(str(a[k])) for a in ds["true_attributes"]]) for k in args.keys}

    train_images = [first_image(v, args.image_max_side) for v in catalog_views(train)]
    test_images = [first_image(v, args.image_max_side) for v in catalog_views(test)]
    train_y, test_y = labels(train), labels(test)
    chance = {k: float(np.bincount(test_y[k].numpy()).max() / len(test_y[k])) for k in args.keys}

    if args.from_model:
        generator = AutoModelForImageTextToText.from_pretrained(args.from_model)
        processor = load_processor(args.from_model)
    else:
        generator, processor = build_tiny_mllm(
            hidden_size=args.hidden_size,
            num_layers=1,
            vision_hidden_size=args.vision_hidden_size,
            vision_depth=args.vision_depth,
            min_image_tokens=args.min_image_tokens,
            max_image_tokens=args.max_image_tokens,
            seed=args.seed,
        )
    visual = generator.model.visual
    model = Readout(visual, {k: len(values[k]) for k in args.keys})
    if args.freeze == "true":
        model.visual.requires_grad_(False)
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, args.steps // 10), args.steps)
    tokens = int(encode(processor, test_images[:1])[1].prod() // 4)
    start, curve, losses = time.time(), [], []
    order = rng.permutation(len(train_images))
    for step in tqdm(range(1, args.steps + 1), desc="readout"):
        idx = order[((step - 1) * args.batch_size + np.arange(args.batch_size)) % len(order)]
        logits = model(*encode(processor, [train_images[i] for i in idx]))
        loss = sum(torch.nn.functional.cross_entropy(logits[k], train_y[k][idx]) for k in args.keys)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(model, processor, test_images, test_y, args.batch_size)
            curve.append({"step": step, "loss": float(np.mean(losses[-50:])), "accuracy": acc})
            tqdm.write(json.dumps(curve[-1]))
    result = {
        "accuracy": curve[-1]["accuracy"],
        "chance": chance,
        "image_tokens": tokens,
        "minutes": round((time.time() - start) / 60, 1),
        "curve": curve,
        "args": vars(args),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
