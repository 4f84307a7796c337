"""Annotate a catalog with an MLLM's attributes: the teacher step, and CIT's re-annotation with the RAR generator.

    python recipes/extract_attributes.py --model Qwen/Qwen2.5-VL-7B-Instruct --catalog data/catalog \
        --output_dir data/catalog-teacher
    python recipes/extract_attributes.py --model outputs/rar-demo --catalog embedded --output_dir outputs/cit/catalog \
        --prompt_template "Title: {title}\nAttributes:"
    python recipes/extract_attributes.py --task title --model Qwen/Qwen2.5-VL-7B-Instruct --catalog data/catalog \
        --output_dir data/catalog-titles      # enriched titles; then agcl_train.py --title_column enriched_title
    python recipes/extract_attributes.py --task bbox --model Qwen/Qwen3-VL-8B-Instruct --catalog data/catalog \
        --output_dir data/catalog-boxes       # product boxes; then agcl_train.py --crop_views

Each listing gets one greedy completion for the prompt GRPO uses (``rar.prompts``, image + title),
in batches with a progress bar. Completions are appended to ``<output_dir>/generations.jsonl``
(``generations-<task>.jsonl`` for ``--task title`` / ``bbox``) as
each batch finishes, so an interrupted run started again with the same arguments skips the
listings already done. At the end the completions are parsed (``afmrl.attributes.parse_attributes``)
into ``--column`` of a copy of the catalog in ``<output_dir>`` (``catalog.jsonl`` + ``images/``);
the source catalog is never modified. A completion that does not parse gets ``null`` there and is
counted in ``extraction_summary.json`` (nothing is dropped silently); a column that already
existed is kept as ``<column>_previous``.
"""

import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from PIL import Image
from trl import ModelConfig

from afmrl.attributes import parse_attributes
from afmrl.catalog.load import load_catalog
from afmrl.catalog.write import write_catalog_dir
from afmrl.cli import run_cli
from afmrl.embedded import resolve_catalog
from afmrl.modeling import require_bitsandbytes
from rar.annotate import annotate, load_generator, read_generation_log
from rar.prompts import DEFAULT_PROMPT

GENERATIONS = "generations.jsonl"


def first_image_sizes(catalog: datasets.Dataset):
    """(width, height) of each listing's first image, read from the file header: nothing is decoded."""
    column = "image" if "image" in catalog.column_names else "images"
    feature = datasets.Image(decode=False)
    raw = catalog.cast_column(column, feature if column == "image" else datasets.List(feature))
    for value in raw[column]:
        first = value if column == "image" else value[0]
        with Image.open(first["path"] if first.get("bytes") is None else io.BytesIO(first["bytes"])) as image:
            yield image.size


@dataclass
class ExtractArguments:
    model: str = field(metadata={"help": "The MLLM: hub id, directory, a LoRA output directory, or tiny-qwen2-vl."})
    catalog: str = field(metadata={"help": "Catalog directory, saved dataset, hub id, or 'embedded'."})
    output_dir: str = field(metadata={"help": "Where the annotated catalog copy and the generations log go."})
    split: str | None = field(default=None, metadata={"help": "Annotate only this split (default: every listing)."})
    task: str = field(
        default="attributes",
        metadata={
            "help": "`attributes`: key: value pairs (the teacher and CIT step); `title`: an enriched title that states "
            "what the image shows (MOON2.0's title co-augmentation; train AGCL on it with --title_column); "
            "`bbox`: the product's box from a grounding-capable MLLM (MOON's crops; agcl_train --crop_views)."
        },
    )
    column: str | None = field(
        default=None,
        metadata={
            "help": "Column the result is written to (default: `attributes`, `enriched_title` or `bbox` by --task)."
        },
    )
    bbox_coordinates: str = field(
        default="per_mille",
        metadata={
            "help": "How the model states a box (--task bbox): `per_mille` (0-1000 of width and height, as Qwen2-VL "
            "and "
            "Qwen3-VL answer) or `pixels` of the original image. Qwen2.5-VL answers in pixels of its resized "
            "input: rescale, or prompt it for per-mille coordinates."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation batch."})
    max_new_tokens: int = field(default=64, metadata={"help": "New tokens per completion."})
    prompt_template: str | None = field(
        default=None,
        metadata={
            "help": "User prompt with {title} and {keys}; use the one the generator was trained with (default: "
            "rar.prompts.DEFAULT_PROMPT, or TITLE_PROMPT for --task title)."
        },
    )
    attribute_keys: list[str] | None = field(
        default=None, metadata={"help": "Keys to ask for (named in the prompt) and to order the written attributes by."}
    )
    limit: int | None = field(default=None, metadata={"help": "Annotate only the first N listings (a dry run)."})
    dtype: str | None = field(default=None, metadata={"help": "Model dtype (e.g. bfloat16); default: transformers'."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the model in 4-bit nf4 (bitsandbytes)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the model's hub code to run."})
    cache_dir: str = field(default="outputs/embedded", metadata={"help": "Where 'embedded' and tiny models are built."})


TITLE_PROMPT = (
    "Product title: {title}\nRewrite the title so that it also states what the image shows (category, "
    "colours, pattern, logo) and keeps every fact of the original. Answer with the new title only."
)
BBOX_PROMPT = (
    "Product title: {title}\nLocate the product in the image. Answer with its bounding box as "
    "[x0, y0, x1, y1], coordinates from 0 to 1000."
)
TASKS = ("attributes", "title", "bbox")
DEFAULT_COLUMN = {"attributes": "attributes", "title": "enriched_title", "bbox": "bbox"}
DEFAULT_TEMPLATE = {"attributes": DEFAULT_PROMPT, "title": TITLE_PROMPT, "bbox": BBOX_PROMPT}


def parse_bbox(completion: str, width: int, height: int, coordinates: str = "per_mille") -> list[int] | None:
    """The first four numbers of a completion as a pixel box [x0, y0, x1, y1] of a width x height image,
    clipped to the image; None when there are fewer than four or the box is empty after clipping."""
    numbers = [float(x) for x in re.findall(r"(?<![\w.])-?\d+(?:\.\d+)?", completion)[:4]]  # not the 2 of bbox_2d
    if len(numbers) < 4:
        return None
    if coordinates == "per_mille":
        numbers = [v / 1000 * (width if i % 2 == 0 else height) for i, v in enumerate(numbers)]
    x0, y0, x1, y1 = (round(v) for v in numbers)
    x0, x1 = sorted((min(max(x0, 0), width), min(max(x1, 0), width)))
    y0, y1 = sorted((min(max(y0, 0), height), min(max(y1, 0), height)))
    return [x0, y0, x1, y1] if x0 < x1 and y0 < y1 else None


def parse_title(completion: str) -> str | None:
    """The enriched title in a completion: its first non-empty line, whitespace collapsed; None if empty."""
    for line in completion.splitlines():
        line = " ".join(line.split()).strip("\"'` ")
        if line:
            return line
    return None


def main(args: ExtractArguments) -> dict:
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch_size, --max_new_tokens and --limit must be >= 1")
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {args.task!r}")
    if args.bbox_coordinates not in ("per_mille", "pixels"):
        raise ValueError(f"--bbox_coordinates must be per_mille or pixels, got {args.bbox_coordinates!r}")
    if args.load_in_4bit:
        require_bitsandbytes()
    column = args.column or DEFAULT_COLUMN[args.task]
    template = args.prompt_template or DEFAULT_TEMPLATE[args.task]
    catalog = load_catalog(resolve_catalog(args.catalog, args.cache_dir), split=args.split)
    if args.limit:
        catalog = catalog.select(range(min(args.limit, len(catalog))))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    # One log per task: a rerun with another --task in the same directory must not resume the other's answers.
    log_path = out / (GENERATIONS if args.task == "attributes" else f"generations-{args.task}.jsonl")
    listing_ids = list(catalog["listing_id"])  # read the column once
    resumed = len(read_generation_log(log_path).keys() & set(listing_ids))
    print(
        f"[extract_attributes] {len(catalog)} listings, {resumed} already done, {len(catalog) - resumed} to generate",
        flush=True,
    )
    model_args = ModelConfig(
        model_name_or_path=args.model,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        load_in_4bit=args.load_in_4bit,
    )
    texts = annotate(
        catalog,
        lambda: load_generator(
            args.model, model_args=model_args, cache_dir=args.cache_dir, trust_remote_code=args.trust_remote_code
        ),
        prompt_template=template,
        attribute_keys=args.attribute_keys,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        log_path=log_path,
        desc="generating attributes",
    )

    if args.task == "title":
        values = [parse_title(text) for text in texts]
    elif args.task == "bbox":  # boxes are in pixels of each listing's first image
        values = [
            parse_bbox(text, *size, coordinates=args.bbox_coordinates)
            for text, size in zip(texts, first_image_sizes(catalog), strict=True)
        ]
    else:
        parsed = [parse_attributes(text).attributes for text in texts]
        if args.attribute_keys:
            order = {k: i for i, k in enumerate(args.attribute_keys)}
            parsed = [dict(sorted(a.items(), key=lambda kv: order.get(kv[0], len(order)))) for a in parsed]
        values = [a or None for a in parsed]
    if column in catalog.column_names:
        catalog = catalog.rename_column(column, f"{column}_previous")
    write_catalog_dir(catalog, out, extra_columns={column: values})
    summary = {
        "model": args.model,
        "source_catalog": args.catalog,
        "split": args.split,
        "task": args.task,
        "column": column,
        "n_listings": len(catalog),
        "n_resumed": resumed,
        "n_generated": len(catalog) - resumed,
        "n_unparsable": sum(v is None for v in values),
    }
    (out / "extraction_summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(
        f"[extract_attributes] wrote {out / 'catalog.jsonl'}: {summary['n_unparsable']} of {len(catalog)} "
        f"completions did not parse (column {column!r} is null there)"
    )
    return summary


def cli(argv=None):
    """The command line: ``argv`` (default ``sys.argv[1:]``) parsed into ExtractArguments, then ``main``."""
    return run_cli(ExtractArguments, main, argv)


if __name__ == "__main__":
    cli()
