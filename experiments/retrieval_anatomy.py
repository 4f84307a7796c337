"""Where a stage-1 encoder's top hit goes when it misses: its own product, a family-mate, or another family.

    python -m experiments.retrieval_anatomy --catalog outputs/embedded/world-paper-seed100-226f164b \
        --encoder outputs/paper-world-v4/encoder --out docs/experiments/preconditions/anatomy_v4.json

Every listing of ``--split`` queries every other (the gates' headline protocol: both sides carry the same kind of
line), once with no attribute line, once with the teacher's stored line and once with the true attributes. For a
near-duplicate world the telling row is the true one: true lines name what separates family-mates, so a top hit on a
family-mate there means the encoder does not read the words that differ (its text pathway is the bottleneck, not the
lines); a top hit in another family means it does not find the family. The fair test's fifth draft was decided on
it (docs/experiments/fair_test_plan.md).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from afmrl.attributes import format_attributes
from afmrl.catalog import load_catalog
from afmrl.encoder.model import ProductEncoder, encode_catalog

SOURCES = {"none": None, "teacher": "attributes", "true": "true_attributes"}


def anatomy(vectors: np.ndarray, product_ids, family_ids) -> dict[str, float]:
    """Shares of queries whose top hit (itself excluded) is the own product, a family-mate, another family; the own
    product's best rank (1-based) at the median and the 85th percentile."""
    pid, fam = np.asarray(product_ids), np.asarray(family_ids)
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)
    order = np.argsort(-scores, axis=1)
    top = order[:, 0]
    own = pid[top] == pid
    mate = (fam[top] == fam) & ~own
    same = pid[order[:, :-1]] == pid[:, None]  # each query's ranking (itself, scored -inf, last and left out)
    rank = np.where(same.any(axis=1), same.argmax(axis=1) + 1, len(pid))
    return {"R@1": float(own.mean()), "top1_family_mate": float(mate.mean()),
            "top1_other_family": float((~own & ~mate).mean()), "own_rank_median": float(np.median(rank)),
            "own_rank_p85": float(np.percentile(rank, 85))}  # fmt: skip


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", default=None, help="Write the figures here as JSON.")
    args = parser.parse_args(argv)
    ds = load_catalog(args.catalog)
    if "family_id" not in ds.column_names:
        parser.error(f"--catalog {args.catalog}: no 'family_id' column (the anatomy needs near-duplicate families)")
    ds = ds.filter(lambda s: s == args.split, input_columns="split")
    if len(ds) < 2:
        parser.error(f"--split {args.split!r}: {len(ds)} listings in {args.catalog} (at least 2 to query each other)")
    encoder = ProductEncoder.from_pretrained(args.encoder)
    result = {"catalog": args.catalog, "encoder": args.encoder, "split": args.split, "listings": len(ds)}
    for name, column in SOURCES.items():
        texts = None if column is None else [format_attributes(a) or None for a in ds[column]]
        vectors = encode_catalog(encoder, ds, texts, batch_size=args.batch_size, show_progress=False)
        result[name] = anatomy(vectors, ds["product_id"], ds["family_id"])
        print(name, {k: round(v, 3) for k, v in result[name].items()}, flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
