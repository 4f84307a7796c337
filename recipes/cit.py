"""Cyclic iterative training (CIT): the RAR generator re-annotates the catalog, AGCL is retrained on it.

    python recipes/cit.py                                  # one round after the embedded demo (outputs/rar-demo)
    python recipes/cit.py --generator outputs/rar-qwen25vl-3b --encoder outputs/agcl-qwen2vl-2b \
        --catalog data/my_catalog --agcl_config recipes/configs/agcl_qwen2vl_2b.yaml --output_dir outputs/cit-1

One round, in order (each step is one of the other recipes, run as a child process):

1. ``extract_attributes.py``: the generator writes attributes for the ``--split`` listings into a
   catalog copy (``<output_dir>/catalog``; the old attributes stay beside as ``attributes_previous``);
2. ``agcl_train.py``: AGCL continues from ``--encoder`` on the copy (BM25 weighting, the attribute
   filter and query enrichment now read the generator's attributes) for ``--epochs`` epochs;
3. both encoders are evaluated on the held-out ``--eval_split`` of the original catalog, queries
   without attributes and with the generator's (greedy) attributes; the table is printed and written
   to ``<output_dir>/cit_metrics.json``.

Run it again with ``--encoder <output_dir>/encoder`` (and a generator trained against it) for
another round. The paper reports that one round on about 30% of the data helped; ``--fraction``
re-annotates and retrains on that share of the split's products.
"""

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from afmrl.attributes import canonical_attributes
from afmrl.catalog import group_by_product, load_catalog, write_catalog_dir
from afmrl.cli import run_cli
from afmrl.embedded import resolve_catalog
from afmrl.encoder.model import ProductEncoder, read_encoder_config
from rar.annotate import annotate, load_generator
from rar.evaluation import evaluate_attribute_sources, format_table

RECIPES = Path(__file__).resolve().parent


@dataclass
class CITArguments:
    generator: str = field(default="outputs/rar-demo", metadata={"help": "The RAR generator (rar_grpo.py output)."})
    encoder: str = field(default="outputs/rar-demo/encoder", metadata={"help": "The stage-1 encoder to continue from."})
    catalog: str = field(
        default="embedded", metadata={"help": "Catalog directory, saved dataset, hub id or 'embedded'."}
    )
    embedded_val_fraction: float = field(default=0.3, metadata={"help": "As in rar_demo.yaml (same embedded catalog)."})
    split: str = field(default="train", metadata={"help": "Split to re-annotate and retrain on."})
    eval_split: str = field(default="test", metadata={"help": "Held-out split for the before/after table."})
    fraction: float = field(
        default=1.0, metadata={"help": "Share of the split's products re-annotated and retrained on."}
    )
    agcl_config: str = field(default="recipes/configs/agcl_demo.yaml", metadata={"help": "AGCL recipe YAML."})
    epochs: float = field(default=10, metadata={"help": "AGCL epochs of the retraining round."})
    learning_rate: float = field(
        default=1e-4,
        metadata={
            "help": "AGCL learning rate of the round: it continues a trained encoder, so lower than from scratch."
        },
    )
    prompt_template: str = field(
        default="Title: {title}\nAttributes:",
        metadata={"help": "The prompt the generator was trained with (rar_demo.yaml's by default)."},
    )
    output_dir: str = field(default="outputs/cit-demo", metadata={"help": "Where the round writes its outputs."})
    cache_dir: str = field(default="outputs/embedded", metadata={"help": "Where 'embedded' is built."})
    batch_size: int = field(default=32, metadata={"help": "Generation and encoding batch size."})
    seed: int = field(default=42, metadata={"help": "Seed of the AGCL round."})


def run(recipe: str, *args: str):
    cmd = [sys.executable, str(RECIPES / recipe), *args]
    print(f"[cit] running {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True)


def main(args: CITArguments) -> dict:
    if not 0 < args.fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {args.fraction}")
    read_encoder_config(args.encoder)
    if not Path(args.generator).is_dir():
        raise FileNotFoundError(f"--generator {args.generator!r} is not a directory")
    catalog = resolve_catalog(args.catalog, args.cache_dir, val_fraction=args.embedded_val_fraction)
    rows = load_catalog(catalog, split=args.split)
    evaluation = load_catalog(catalog, split=args.eval_split)
    out = Path(args.output_dir)

    # 1. Re-annotate (the first `fraction` of the split's products, all their listings).
    products = list(group_by_product(rows).values())
    keep = sorted(i for group in products[: max(1, round(args.fraction * len(products)))] for i in group)
    source = out / "source"
    if len(keep) < len(rows):
        write_catalog_dir(rows.select(keep), source)
    run(
        "extract_attributes.py",
        "--model",
        args.generator,
        "--catalog",
        str(source if len(keep) < len(rows) else catalog),
        *(["--split", args.split] if len(keep) == len(rows) else []),
        "--output_dir",
        str(out / "catalog"),
        "--prompt_template",
        args.prompt_template,
        "--batch_size",
        str(args.batch_size),
    )
    # 2. Retrain AGCL on the re-annotated copy, from the current encoder.
    run(
        "agcl_train.py",
        "--config",
        args.agcl_config,
        "--catalog",
        str(out / "catalog"),
        "--train_split",
        args.split,
        "--eval_split",
        "none",
        "--init_encoder",
        args.encoder,
        "--num_train_epochs",
        str(args.epochs),
        "--learning_rate",
        str(args.learning_rate),
        "--output_dir",
        str(out / "encoder"),
        "--seed",
        str(args.seed),
        "--disable_tqdm",
        "true",
    )

    # 3. Before / after on held-out products, with and without the generator's attributes.
    generated = canonical_attributes(
        annotate(
            evaluation,
            lambda: load_generator(args.generator, cache_dir=args.cache_dir),
            prompt_template=args.prompt_template,
            batch_size=args.batch_size,
        )
    )
    results = {}
    for label, path in (("before CIT", args.encoder), ("after one CIT round", out / "encoder")):
        encoder = ProductEncoder.from_pretrained(path)
        scores = evaluate_attribute_sources(
            encoder, evaluation, {"no_attributes": None, "rar_attributes": generated}, batch_size=args.batch_size
        )
        for source_name, metrics in scores.items():
            results[f"{label}, {source_name.replace('_', ' ')}"] = metrics
    print(format_table(results))
    (out / "cit_metrics.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    run_cli(CITArguments, main)
