"""Evaluate a product encoder on a catalog split: the paper's retrieval task suite.

    python recipes/evaluate.py --encoder outputs/agcl-demo --catalog embedded --output_json outputs/eval.json
    python recipes/evaluate.py --encoder outputs/agcl-demo --catalog data/catalog --query_attributes reference

Prints a table and writes JSON shaped like
{"instance": {"recall@1": ..., "recall@5": ..., "recall@10": ..., "mAP@10": ..., "mrr": ...},
 "coarse": {"mAP@1": ...}, "image_to_text": {...}, "text_to_image": {...}, "image_to_multimodal": {...},
 "classification": {"accuracy": ...}} with values as fractions in [0, 1].
"""

import argparse
import json
import sys
from pathlib import Path

from afmrl.catalog.load import load_catalog
from afmrl.cli import USER_ERRORS
from afmrl.embedded import resolve_catalog
from afmrl.encoder.model import ProductEncoder
from afmrl.retrieval.evaluation import TASKS, attribute_texts, evaluate_encoder, format_results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a product encoder on a catalog split.")
    parser.add_argument("--encoder", required=True, help="Directory written by recipes/agcl_train.py.")
    parser.add_argument(
        "--catalog", required=True, help="Catalog directory, save_to_disk directory, hub id or `embedded`."
    )
    parser.add_argument("--split", default="test", help="Split to evaluate (`none`: the whole catalog).")
    parser.add_argument("--output_json", default=None, help="Write the metrics here.")
    parser.add_argument(
        "--query_attributes",
        default="none",
        help="Append attribute text to the queries: `none`, `reference` (the `attributes` column) "
        "or any column of attribute dicts (e.g. one written by extract_attributes.py).",
    )
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--mrr_depth", type=int, default=None, help="Rank only this deep for MRR (huge galleries).")
    parser.add_argument("--cache_dir", default="outputs/embedded", help="Where `embedded` builds its catalog.")
    parser.add_argument("--trust_remote_code", action="store_true", help="Allow the backbone's hub code to run.")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    split = None if args.split.lower() == "none" else args.split
    catalog = load_catalog(resolve_catalog(args.catalog, args.cache_dir), split=split)
    queries = attribute_texts(catalog, args.query_attributes)  # fails on a missing column before loading a model
    encoder = ProductEncoder.from_pretrained(args.encoder, trust_remote_code=args.trust_remote_code)
    results = evaluate_encoder(
        encoder,
        catalog,
        query_attributes=queries,
        tasks=args.tasks,
        batch_size=args.batch_size,
        mrr_depth=args.mrr_depth,
    )
    print(format_results(results))
    if args.output_json:
        Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output_json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def cli(argv=None) -> dict:
    """The command line: user errors end with one ``error:`` line and exit code 2."""
    try:
        return main(argv)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
