"""Which near-duplicates does an encoder separate? Instance Recall@1 per family varying key, for several encoders.

    python -m experiments.errors_by_key --catalog outputs/embedded/catalog-600-seed0-val0.3 \
        --encoders outputs/run-all/ladder/seed0/infonce outputs/run-all/ladder/seed0/agcl

The synthetic catalog's families are products that differ in exactly one attribute (colour, secondary
colour, pattern, logo or size). Grouping the held-out queries by that key shows which differences an
encoder can see: AGCL's weighting can only sharpen a distinction the backbone can represent at all.
Needs a catalog with ``family_id`` and ``true_attributes`` (the synthetic one).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np
import torch

from afmrl.catalog.load import load_catalog
from afmrl.encoder.model import ProductEncoder, encode_catalog
from afmrl.retrieval.metrics import recall_at_k


def varying_keys(ds) -> list[str]:
    """Each listing's family varying key: the one attribute whose value differs inside its family."""
    values = defaultdict(lambda: defaultdict(set))
    for family, truth in zip(ds["family_id"], ds["true_attributes"], strict=True):
        for key, value in truth.items():
            values[family][key].add(value)
    keys = {}
    for family, by_key in values.items():
        differing = [k for k, v in by_key.items() if len(v) > 1]
        keys[family] = differing[0] if len(differing) == 1 else "single product"
    return [keys[f] for f in ds["family_id"]]


def recall_by_key(encoder, ds, keys: list[str]) -> dict[str, float]:
    with torch.no_grad():
        vectors = encode_catalog(encoder, ds, show_progress=False)
    vectors = np.asarray(vectors, dtype=np.float64)
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)  # the query is not in its own gallery
    products = np.asarray(ds["product_id"])
    positives = products[:, None] == products[None, :]
    np.fill_diagonal(positives, False)
    out = {"all": recall_at_k(scores, positives, 1)}
    for key in sorted(set(keys)):
        rows = np.flatnonzero(np.asarray(keys) == key)
        out[key] = recall_at_k(scores[rows], positives[rows], 1)
    return out


def family_chance(ds, keys: list[str]) -> dict[str, float]:
    """Recall@1 of an encoder that tells every family apart but orders each family's listings at random:
    a query's own-product listings over all other listings of its family."""
    _, product_of, product_size = np.unique(ds["product_id"], return_inverse=True, return_counts=True)
    _, family_of, family_size = np.unique(ds["family_id"], return_inverse=True, return_counts=True)
    chance = (product_size[product_of] - 1) / (family_size[family_of] - 1)
    out = {"all": float(chance.mean())}
    for key in sorted(set(keys)):
        out[key] = float(chance[np.asarray(keys) == key].mean())
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--encoders", nargs="+", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    ds = load_catalog(args.catalog, split=args.split)
    missing = [c for c in ("family_id", "true_attributes") if c not in ds.column_names]
    if missing:
        raise SystemExit(
            f"error: --catalog {args.catalog}: no {' / '.join(missing)} column; this diagnostic needs "
            "the synthetic catalog's families and true attributes (recipes/make_catalog.py)"
        )
    keys = varying_keys(ds)
    counts = {k: keys.count(k) for k in set(keys)}
    results = {path: recall_by_key(ProductEncoder.from_pretrained(path), ds, keys) for path in args.encoders}
    columns = ["all", *sorted(counts)]
    lines = [
        "| encoder | " + " | ".join(f"{c} ({counts.get(c, len(ds))})" for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for path, row in {"(chance inside the family)": family_chance(ds, keys), **results}.items():
        lines.append(f"| {path} | " + " | ".join(f"{100 * row[c]:.1f}" for c in columns) + " |")
    print(
        f"Instance Recall@1 on split {args.split!r} of {args.catalog}, by the key in which a query's product "
        "differs from its family (queries per column):\n\n" + "\n".join(lines)
    )
    return results


if __name__ == "__main__":
    main()
