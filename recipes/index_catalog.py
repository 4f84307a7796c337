"""Deployment, step 1: annotate, embed and index a catalog with the trained generator and encoder.

    python recipes/index_catalog.py --catalog embedded --encoder outputs/rar-demo/encoder \
        --generator outputs/rar-demo --output_dir outputs/index --calibration_split test
    python recipes/index_catalog.py --catalog data/my_catalog --encoder ENCODER --output_dir INDEX   # no generator:
        # the catalog's stored attributes with --attribute_column attributes, or none

    accelerate launch --num_processes 4 recipes/index_catalog.py --catalog DIR --encoder ENC --output_dir INDEX

Every listing is annotated once (greedy, batched), embedded as image + title + attributes by the frozen
encoder and indexed with faiss (exact up to 100k vectors, IVF tuned to --target_recall of the exact top-10
beyond, IVF-PQ re-ranked from disk once the float vectors exceed --max_memory_gb; ``deploy.ProductIndex``).
The work is cut into shards of --shard_size listings, spread over the processes of ``accelerate launch``
and saved as each finishes, so a killed run resumes where it stopped (``deploy.sharding``). With
``--calibration_split`` the "same product" score threshold is chosen there for --target_precision and saved
with the index (precision_recall.png beside it); ``recipes/search.py --same_product_only`` then uses it.
The generator's prompt is read from its ``attribute_prompt.json`` (written by rar_grpo.py / sft_attributes.py).
"""

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState

from afmrl.catalog.load import load_catalog
from afmrl.cli import end_launched_process, run_cli
from afmrl.embedded import resolve_catalog
from afmrl.encoder.model import read_encoder_config
from deploy import ProductIndex, plot_precision_recall
from deploy.milvus_store import INDEX_TYPES, connect
from deploy.product_index import check_listings
from deploy.sharding import encode_shards, merge_shards, remove_shards
from rar.prompts import PROMPT_FILE


@dataclass
class IndexArguments:
    catalog: str = field(metadata={"help": "Catalog directory, catalog.jsonl, saved dataset, hub id or 'embedded'."})
    encoder: str = field(metadata={"help": "The stage-1 encoder directory (recipes/agcl_train.py output)."})
    output_dir: str = field(metadata={"help": "Where the index goes (index.faiss, ids, attributes, fingerprints)."})
    generator: str | None = field(
        default=None,
        metadata={
            "help": "The attribute generator (rar_grpo.py or sft_attributes.py output); None = --attribute_column or "
            "none."
        },
    )
    attribute_column: str | None = field(
        default=None,
        metadata={
            "help": "Without --generator: index the catalog's stored attributes of this column (e.g. attributes)."
        },
    )
    backend: str = field(
        default="faiss",
        metadata={
            "help": "`faiss`: files in --output_dir; `milvus`: a Milvus collection at --uri (a local .db file runs "
            "Milvus Lite in-process; a URL reaches a server), updatable in place.",
            "choices": ["faiss", "milvus"],
        },
    )
    uri: str | None = field(default=None, metadata={"help": "With --backend milvus: a .db file path or a server URL."})
    collection: str = field(default="catalog", metadata={"help": "With --backend milvus: the collection's name."})
    milvus_index: str = field(
        default="FLAT", metadata={"help": "With --backend milvus: FLAT (exact), IVF_FLAT or HNSW (approximate)."}
    )
    split: str | None = field(default=None, metadata={"help": "Index only this split (default: every listing)."})
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "The generator's prompt (default: its attribute_prompt.json, else rar.prompts.DEFAULT_PROMPT)."
        },
    )
    attribute_keys: list[str] | None = field(
        default=None, metadata={"help": "Keys to ask for (default: attribute_prompt.json)."}
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Tokens per completion (default: attribute_prompt.json, else 64)."}
    )
    batch_size: int = field(default=32, metadata={"help": "Listings per generation / encoding batch."})
    index_type: str = field(
        default="auto",
        metadata={
            "help": "flat, ivf, ivfpq, hnsw or auto (flat up to 100k vectors, IVF beyond, IVF-PQ above "
            "--max_memory_gb)."
        },
    )
    target_recall: float = field(
        default=0.98, metadata={"help": "An approximate index is tuned to this recall of the exact top-10."}
    )
    max_memory_gb: float | None = field(
        default=None,
        metadata={
            "help": "With --index_type auto: IVF-PQ (codes in memory, vectors on disk) once the float32 vectors exceed "
            "this "
            "(default: half of this machine's memory)."
        },
    )
    shard_size: int = field(
        default=20_000,
        metadata={"help": "Listings per shard: the unit of work of each process and of resuming a killed run."},
    )
    keep_shards: bool = field(default=False, metadata={"help": "Keep <output_dir>/shards once the index is saved."})
    calibration_split: str | None = field(
        default=None,
        metadata={
            "help": "A labelled split (product ids) to choose the match threshold on; its listings are queried against "
            "the index."
        },
    )
    target_precision: float = field(default=0.95, metadata={"help": "Precision the match threshold must reach."})
    calibration_k: int = field(default=10, metadata={"help": "Results per calibration query whose pairs are scored."})
    embedded_val_fraction: float = field(
        default=0.0,
        metadata={
            "help": "With --catalog embedded: the fraction of train families relabelled 'val' (the demo's catalog: "
            "0.3)."
        },
    )
    cache_dir: str = field(default="outputs/embedded", metadata={"help": "Where 'embedded' is built."})


def generation_settings(args: IndexArguments) -> dict:
    saved = {}
    if args.generator and (Path(args.generator) / PROMPT_FILE).is_file():
        saved = json.loads((Path(args.generator) / PROMPT_FILE).read_text(encoding="utf-8"))
    given = {
        "prompt_template": args.prompt_template,
        "attribute_keys": args.attribute_keys,
        "max_new_tokens": args.max_new_tokens,
    }
    return {**saved, **{k: v for k, v in given.items() if v is not None}}


def main(args: IndexArguments) -> ProductIndex | None:
    """Index the catalog; under ``accelerate launch`` every process encodes its shards and the main one
    builds and saves the index (it returns the index, the others None)."""
    started = time.time()
    # On a CPU-only machine accelerate must be told so, or every launched process sets itself up as the
    # only one (and all of them would encode every shard).
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.num_processes != int(os.environ.get("WORLD_SIZE", 1)):
        raise ValueError(
            f"launched as {os.environ['WORLD_SIZE']} processes, but accelerate set up "
            f"{state.num_processes}: check the accelerate config"
        )
    if args.generator and args.attribute_column:
        raise ValueError("pass --generator or --attribute_column, not both")
    if args.generator and not Path(args.generator).is_dir():
        raise FileNotFoundError(f"--generator {args.generator!r} is not a directory")
    if args.shard_size < 1:
        raise ValueError(f"--shard_size must be >= 1, got {args.shard_size}")
    read_encoder_config(args.encoder)  # not an AGCL encoder -> one clear line
    if args.backend == "milvus":
        if not args.uri:
            raise ValueError("--backend milvus needs --uri (a .db file for Milvus Lite, or a server URL)")
        if args.milvus_index not in INDEX_TYPES:
            raise ValueError(f"--milvus_index must be one of {', '.join(INDEX_TYPES)}, got {args.milvus_index!r}")
        if state.is_main_process and "://" in args.uri:  # a server that does not answer fails here, in seconds
            connect(args.uri).close()
    with state.main_process_first():  # the embedded catalog is built once
        catalog = resolve_catalog(args.catalog, args.cache_dir, val_fraction=args.embedded_val_fraction)
    listings = load_catalog(catalog, split=args.split)
    check_listings(listings, args.split, args.attribute_column)
    labelled = load_catalog(catalog, split=args.calibration_split) if args.calibration_split else None
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    index = ProductIndex.configure(
        args.encoder,
        generator=args.generator,
        attribute_column=args.attribute_column,
        generation=generation_settings(args),
        catalog=str(catalog),
        split=args.split,
    )
    encode_shards(
        listings,
        index,
        out,
        shard_size=args.shard_size,
        rank=state.process_index,
        world_size=state.num_processes,
        batch_size=args.batch_size,
    )
    if not state.is_main_process:
        return None
    vectors, attributes = merge_shards(listings, index, out, shard_size=args.shard_size)
    if args.backend == "milvus":
        index = index.to_milvus(listings, vectors, attributes, uri=args.uri, collection=args.collection,
                                index_type=args.milvus_index)  # fmt: skip
    else:
        budget = None if args.max_memory_gb is None else int(args.max_memory_gb * 2**30)
        index = index.from_vectors(listings, vectors, attributes, index_type=args.index_type,
                                   target_recall=args.target_recall, memory_budget=budget)  # fmt: skip
    kind = index.gallery.index_type if args.backend == "milvus" else index.gallery.index.index_type
    print(
        f"[index_catalog] indexed {index.gallery.size} listings ({kind}, {state.num_processes} process"
        f"{'es' if state.num_processes > 1 else ''}) in {time.time() - started:.0f} s",
        flush=True,
    )
    if labelled is not None:
        calibrate(index, labelled, args, out)
    index.save(out)
    del vectors
    if kind != "ivfpq":  # the index holds the vectors; IVF-PQ re-ranks from this file
        (out / "vectors.npy").unlink(missing_ok=True)
    if not args.keep_shards:
        remove_shards(out)
    print(f"[index_catalog] wrote {out} ({time.time() - started:.0f} s in all)")
    return index


def calibrate(index: ProductIndex, labelled, args: IndexArguments, out: Path) -> None:
    calibration = index.calibrate(
        labelled, k=args.calibration_k, target_precision=args.target_precision, batch_size=args.batch_size
    )
    plot_precision_recall(calibration, out / "precision_recall.png")
    (out / "calibration.json").write_text(json.dumps(calibration) + "\n", encoding="utf-8")
    if calibration["score"] is None:
        print(
            f"[index_catalog] no score threshold reaches precision {args.target_precision} on split "
            f"{args.calibration_split!r}: --same_product_only will be refused",
            flush=True,
        )
    else:
        print(
            f"[index_catalog] same product when score >= {calibration['score']:.4f}: precision "
            f"{calibration['precision']:.3f}, recall {calibration['recall']:.3f} on split "
            f"{args.calibration_split!r} ({out / 'precision_recall.png'})",
            flush=True,
        )


def cli(argv=None):
    return run_cli(IndexArguments, main, argv)


if __name__ == "__main__":
    cli(sys.argv[1:])
    end_launched_process()
