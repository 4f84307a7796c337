"""Deployment, step 1: annotate, embed and index a catalog with the trained generator and encoder.

    python recipes/index_catalog.py --catalog embedded --encoder outputs/rar-demo/encoder \
        --generator outputs/rar-demo --output_dir outputs/index --calibration_split test
    python recipes/index_catalog.py --catalog data/my_catalog --encoder ENCODER --output_dir INDEX   # no generator:
        # the catalog's stored attributes with --attribute_column attributes, or none

Every listing is annotated once (greedy, batched; the generations log makes a killed run resume), embedded
as image + title + attributes by the frozen encoder and indexed with faiss (exact up to --exact_max_size
vectors, IVF tuned to --target_recall of the exact top-k beyond; ``deploy.ProductIndex``). With
``--calibration_split`` the "same product" score threshold is chosen there for --target_precision and saved
with the index (precision_recall.png beside it); ``recipes/search.py --same_product_only`` then uses it.
The generator's prompt is read from its ``attribute_prompt.json`` (written by rar_grpo.py / sft_attributes.py).
"""

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from agcl.catalog import CatalogError, load_catalog
from agcl.cli import fail
from agcl.embedded import resolve_catalog
from agcl.encoder import EncoderLoadError, read_encoder_config
from deploy import ProductIndex, plot_precision_recall
from rar.prompts import PROMPT_FILE

USER_ERRORS = (CatalogError, EncoderLoadError, ValueError, FileNotFoundError, NotADirectoryError)


@dataclass
class IndexArguments:
    catalog: str = field(metadata={"help": "Catalog directory, catalog.jsonl, saved dataset, hub id or 'embedded'."})
    encoder: str = field(metadata={"help": "The stage-1 encoder directory (recipes/agcl_train.py output)."})
    output_dir: str = field(metadata={"help": "Where the index goes (index.faiss, ids, attributes, fingerprints)."})
    generator: str | None = field(default=None, metadata={
        "help": "The attribute generator (rar_grpo.py or sft_attributes.py output); None = --attribute_column or none."})
    attribute_column: str | None = field(default=None, metadata={
        "help": "Without --generator: index the catalog's stored attributes of this column (e.g. attributes)."})
    split: str | None = field(default=None, metadata={"help": "Index only this split (default: every listing)."})
    prompt_template: str | None = field(default=None, metadata={
        "help": "The generator's prompt (default: its attribute_prompt.json, else rar.prompts.DEFAULT_PROMPT)."})
    attribute_keys: list[str] | None = field(default=None, metadata={"help": "Keys to ask for (default: attribute_prompt.json)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Tokens per completion (default: attribute_prompt.json, else 64)."})
    batch_size: int = field(default=32, metadata={"help": "Listings per generation / encoding batch."})
    index_type: str = field(default="auto", metadata={"help": "flat, ivf, hnsw or auto (flat up to 100k vectors, IVF beyond)."})
    target_recall: float = field(default=0.98, metadata={"help": "An approximate index is tuned to this recall of the exact top-10."})
    calibration_split: str | None = field(default=None, metadata={
        "help": "A labelled split (product ids) to choose the match threshold on; its listings are queried against the index."})
    target_precision: float = field(default=0.95, metadata={"help": "Precision the match threshold must reach."})
    calibration_k: int = field(default=10, metadata={"help": "Results per calibration query whose pairs are scored."})
    embedded_val_fraction: float = field(default=0.0, metadata={
        "help": "With --catalog embedded: the fraction of train families relabelled 'val' (the demo's catalog: 0.3)."})
    cache_dir: str = field(default="outputs/embedded", metadata={"help": "Where 'embedded' is built."})


def generation_settings(args: IndexArguments) -> dict:
    saved = {}
    if args.generator and (Path(args.generator) / PROMPT_FILE).is_file():
        saved = json.loads((Path(args.generator) / PROMPT_FILE).read_text(encoding="utf-8"))
    given = {"prompt_template": args.prompt_template, "attribute_keys": args.attribute_keys,
             "max_new_tokens": args.max_new_tokens}
    return {**saved, **{k: v for k, v in given.items() if v is not None}}


def main(args: IndexArguments) -> ProductIndex:
    started = time.time()
    if args.generator and args.attribute_column:
        raise ValueError("pass --generator or --attribute_column, not both")
    if args.generator and not Path(args.generator).is_dir():
        raise FileNotFoundError(f"--generator {args.generator!r} is not a directory")
    read_encoder_config(args.encoder)  # not an AGCL encoder -> one clear line
    catalog = resolve_catalog(args.catalog, args.cache_dir, val_fraction=args.embedded_val_fraction)
    listings = load_catalog(catalog, split=args.split)
    labelled = load_catalog(catalog, split=args.calibration_split) if args.calibration_split else None
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = ProductIndex.build(listings, args.encoder, split=args.split, generator=args.generator,
                               attribute_column=args.attribute_column, generation=generation_settings(args),
                               log_path=out / "generations.jsonl" if args.generator else None,
                               batch_size=args.batch_size, index_type=args.index_type, target_recall=args.target_recall)
    index.config["catalog"] = str(catalog)
    print(f"[index_catalog] indexed {index.gallery.size} listings ({index.gallery.index.index_type}) in "
          f"{time.time() - started:.0f} s", flush=True)
    if labelled is not None:
        calibration = index.calibrate(labelled, k=args.calibration_k, target_precision=args.target_precision,
                                      batch_size=args.batch_size)
        plot_precision_recall(calibration, out / "precision_recall.png")
        (out / "calibration.json").write_text(json.dumps(calibration) + "\n", encoding="utf-8")
        if calibration["score"] is None:
            print(f"[index_catalog] no score threshold reaches precision {args.target_precision} on split "
                  f"{args.calibration_split!r}: --same_product_only will be refused", flush=True)
        else:
            print(f"[index_catalog] same product when score >= {calibration['score']:.4f}: precision "
                  f"{calibration['precision']:.3f}, recall {calibration['recall']:.3f} on split "
                  f"{args.calibration_split!r} ({out / 'precision_recall.png'})", flush=True)
    index.save(out)
    print(f"[index_catalog] wrote {out} ({time.time() - started:.0f} s in all)")
    return index


def cli(argv=None):
    try:
        (arguments,) = HfArgumentParser(IndexArguments).parse_args_into_dataclasses(args=argv)
        return main(arguments)
    except USER_ERRORS as err:
        fail(err)


if __name__ == "__main__":
    cli(sys.argv[1:])
