"""AGCL in sentence-transformers' own trainer: a small ST model trained on a catalog's listing pairs.

    python recipes/agcl_sentence_transformers.py                  # embedded catalog, ~25 s on CPU
    python recipes/agcl_sentence_transformers.py --catalog data/my_catalog --model BAAI/bge-small-en-v1.5

Pairs are two train listings of one product (text: title; attributes: the catalog's ``attributes`` column as
text); the loss is ``agcl.st_loss.AGCLSentenceTransformerLoss`` (BM25 hard-negative weighting, the "attribute"
false-negative filter) inside ``SentenceTransformerTrainer``. Without ``--model`` the model is a
``StaticEmbedding`` over the embedded tiny model's tokenizer (trainable offline in a minute); with it, any ST model
by name or path. Prints and saves (``metrics.json``) held-out instance Recall@1/5 before and after training, text
only, every test listing querying the others.
"""

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from afmrl.attributes import format_attributes
from afmrl.catalog import group_by_product, load_catalog
from afmrl.cli import run_cli
from afmrl.embedded import resolve_catalog, resolve_model


@dataclass
class STArguments:
    catalog: str = field(default="embedded", metadata={"help": "Catalog (directory, saved dataset, hub id, embedded)."})
    model: str | None = field(default=None, metadata={"help": "An ST model name or path; default: a StaticEmbedding."})
    output_dir: str = field(default="outputs/agcl-st", metadata={"help": "Where the model and metrics.json go."})
    epochs: float = field(default=8, metadata={"help": "Training epochs over the pairs."})
    batch_size: int = field(default=64, metadata={"help": "Pairs per batch (the in-batch negatives)."})
    learning_rate: float = field(default=0.05, metadata={"help": "Learning rate (0.05 suits a StaticEmbedding)."})
    temperature: float = field(default=0.05, metadata={"help": "AGCL's temperature."})
    false_negative_filter: str = field(default="attribute", metadata={"help": "AGCL's false-negative filter."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    cache_dir: str = field(default="outputs/embedded", metadata={"help": "Where 'embedded' catalogs are built."})


def pairs_of(listings):
    """Consecutive listings of each product as (anchor, positive) pairs with their attribute texts."""
    from datasets import Dataset

    titles, attributes = list(listings["title"]), [format_attributes(a) for a in listings["attributes"]]
    rows = {"anchor": [], "positive": [], "anchor_attributes": [], "positive_attributes": [], "product_id": []}
    for product, members in group_by_product(listings).items():
        for a, b in zip(members, members[1:], strict=False):
            for key, value in (("anchor", titles[a]), ("positive", titles[b]), ("anchor_attributes", attributes[a]),
                               ("positive_attributes", attributes[b]), ("product_id", product)):  # fmt: skip
                rows[key].append(value)
    return Dataset.from_dict(rows)


def recall(model, listings, ks=(1, 5)) -> dict:
    vectors = model.encode(list(listings["title"]), batch_size=256, convert_to_numpy=True, normalize_embeddings=True)
    products = np.asarray(listings["product_id"])
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1, kind="stable")[:, : max(ks)]
    has_twin = np.asarray([(products == p).sum() > 1 for p in products])
    hit = products[order] == products[:, None]
    return {f"R@{k}": round(100 * float(hit[has_twin, :k].any(axis=1).mean()), 1) for k in ks}


def main(args: STArguments) -> dict:
    try:
        from sentence_transformers import (
            SentenceTransformer,
            SentenceTransformerTrainer,
            SentenceTransformerTrainingArguments,
        )
    except ImportError:
        raise ValueError('this example needs sentence-transformers: pip install -e ".[st]"') from None
    from agcl.loss import FILTERS
    from agcl.st_loss import AGCLSentenceTransformerLoss

    if args.false_negative_filter not in FILTERS:
        raise ValueError(f"--false_negative_filter must be one of {list(FILTERS)}, got {args.false_negative_filter!r}")
    catalog = resolve_catalog(args.catalog, args.cache_dir)
    train, test = load_catalog(catalog, split="train"), load_catalog(catalog, split="test")
    if "attributes" not in train.column_names:
        raise ValueError(f"--catalog {args.catalog!r} has no `attributes` column: AGCL weights negatives by them")
    pairs = pairs_of(train)
    if len(pairs) < args.batch_size:
        raise ValueError(f"{len(pairs)} pairs of same-product train listings: fewer than one batch ({args.batch_size})")
    if args.model is None:
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(resolve_model("pretrained-tiny-qwen2-vl", args.cache_dir))
                                            / "tokenizer.json"))  # fmt: skip
        import torch

        torch.manual_seed(args.seed)
        model = SentenceTransformer(modules=[StaticEmbedding(tokenizer, embedding_dim=64)], device="cpu")
    else:
        model = SentenceTransformer(args.model, device="cpu")
    before = recall(model, test)
    loss = AGCLSentenceTransformerLoss(model, pairs["anchor_attributes"], pairs["positive_attributes"],
                                       product_ids=pairs["product_id"], temperature=args.temperature,
                                       false_negative_filter=args.false_negative_filter)  # fmt: skip
    training_args = SentenceTransformerTrainingArguments(
        output_dir=args.output_dir, num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed, save_strategy="no", report_to="none", use_cpu=True,
        logging_steps=20, batch_sampler="no_duplicates",
    )  # fmt: skip
    trainer = SentenceTransformerTrainer(model=model, args=training_args, loss=loss,
                                         train_dataset=AGCLSentenceTransformerLoss.training_columns(pairs))  # fmt: skip
    trainer.train()
    after = recall(model, test)
    model.save(args.output_dir)
    metrics = {"pairs": len(pairs), "test_listings": len(test), "before": before, "after": after}
    Path(args.output_dir, "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    print(f"[agcl_sentence_transformers] held-out R@1 {before['R@1']} -> {after['R@1']}, R@5 {before['R@5']} -> "
          f"{after['R@5']} ({len(pairs)} pairs); saved {args.output_dir}")  # fmt: skip
    return metrics


def cli(argv=None):
    return run_cli(STArguments, main, argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
