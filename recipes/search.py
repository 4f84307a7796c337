"""Deployment, step 2: answer query listings with the same products from an index (recipes/index_catalog.py).

    python recipes/search.py --index outputs/index --catalog embedded --split test --top_k 10 \
        --output_jsonl outputs/index/test_results.jsonl
    python recipes/search.py --index outputs/index --catalog data/new_listings --same_product_only

Each query listing is annotated and embedded exactly as the index's listings were (the index remembers its
encoder, generator and prompt; a retrained encoder makes the index stale and is refused), and answered with
one JSON line ``{"listing_id", "attributes", "results": [{"listing_id", "product_id", "score"}, ...]}``,
best first; an indexed listing is left out of its own results. ``--same_product_only`` keeps the results at
or above the threshold calibrated at indexing time. When the queries carry product ids, instance
Recall@1/5/10 is printed (the both-sides protocol of rar.evaluation).
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from afmrl.catalog.load import load_catalog
from afmrl.cli import run_cli
from afmrl.embedded import resolve_catalog
from deploy import ProductIndex


@dataclass
class SearchArguments:
    index: str = field(metadata={"help": "An index directory written by recipes/index_catalog.py."})
    catalog: str = field(
        metadata={"help": "Catalog of the query listings (directory, saved dataset, hub id, 'embedded')."}
    )
    split: str | None = field(
        default=None, metadata={"help": "Query the listings of this split (default: every listing)."}
    )
    listing_ids: list[str] | None = field(default=None, metadata={"help": "Query only these listings."})
    top_k: int = field(default=10, metadata={"help": "Results per query."})
    same_product_only: bool = field(
        default=False, metadata={"help": "Keep only results above the calibrated threshold."}
    )
    output_jsonl: str | None = field(default=None, metadata={"help": "Where the answers go (default: stdout)."})
    batch_size: int = field(default=32, metadata={"help": "Listings per generation / encoding batch."})
    embedded_val_fraction: float = field(
        default=0.0,
        metadata={
            "help": "With --catalog embedded: the fraction of train families relabelled 'val' (the demo's catalog: "
            "0.3)."
        },
    )
    cache_dir: str = field(default="outputs/embedded", metadata={"help": "Where 'embedded' is built."})


def recall_at(answers: list[dict], products: list[str], positives: np.ndarray, ks=(1, 5, 10)) -> dict:
    """Instance Recall@k over the queries whose product has another indexed listing."""
    product_of = {a["listing_id"]: p for a, p in zip(answers, products, strict=True)}
    counted = [(a, product_of[a["listing_id"]]) for a, n in zip(answers, positives, strict=True) if n > 0]
    return {
        f"recall@{k}": sum(any(r["product_id"] == p for r in a["results"][:k]) for a, p in counted)
        / max(len(counted), 1)
        for k in ks
    } | {"n_queries": len(counted)}


def main(args: SearchArguments) -> list[dict]:
    started = time.time()
    if args.top_k < 1:
        raise ValueError(f"--top_k must be >= 1, got {args.top_k}")
    index = ProductIndex.load(args.index)
    queries = load_catalog(
        resolve_catalog(args.catalog, args.cache_dir, val_fraction=args.embedded_val_fraction), split=args.split
    )
    if args.listing_ids:
        row_of = {lid: i for i, lid in enumerate(queries["listing_id"])}
        missing = [lid for lid in args.listing_ids if lid not in row_of]
        if missing:
            raise ValueError(
                f"--listing_ids: {missing[:5]} are not listings of the "
                f"catalog{'' if not args.split else f' split {args.split!r}'}"
            )
        queries = queries.select([row_of[lid] for lid in args.listing_ids])
    answers = index.search(queries, args.top_k, batch_size=args.batch_size, same_product_only=args.same_product_only)
    lines = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
    if args.output_jsonl:
        Path(args.output_jsonl).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_jsonl).write_text(lines, encoding="utf-8")
    else:
        sys.stdout.write(lines)
    products = [str(p) for p in queries["product_id"]]
    positives = index.gallery.positives_count(
        index.gallery.codes_of(products), exclude_rows=index.gallery.rows_of([str(x) for x in queries["listing_id"]])
    )
    if not args.same_product_only and positives.any():
        scores = recall_at(answers, products, positives, ks=[k for k in (1, 5, 10) if k <= args.top_k])
        print(
            f"[search] instance retrieval of {scores['n_queries']} labelled queries: "
            + ", ".join(f"{k} {100 * v:.1f}" for k, v in scores.items() if k != "n_queries"),
            file=sys.stderr,
        )
    print(
        f"[search] {len(answers)} queries answered in {time.time() - started:.1f} s"
        + (f", wrote {args.output_jsonl}" if args.output_jsonl else ""),
        file=sys.stderr,
    )
    return answers


def cli(argv=None):
    return run_cli(SearchArguments, main, argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
