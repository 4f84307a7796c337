"""How much does each stage-1 encoder gain from the same attribute lines? Groups of encoders (one per seed), one table.

    python -m experiments.encoder_attribute_use --catalog outputs/embedded/catalog-600-seed0-val0.3 \
        --generated outputs/rar-demo/attributes.jsonl \
        --group InfoNCE outputs/ladder/seed{0,1,2}/infonce --group AGCL outputs/ladder/seed{0,1,2}/agcl \
        --output docs/experiments/encoder_attribute_use.md

Stage 2 can only help through what the frozen encoder reads, so the rung "+ attributes" of the ladder is a
property of the encoder as much as of the generator. This script holds the attribute lines fixed (the
catalog's teacher attributes, the true attributes where the catalog has them, and every column of each
``--generated`` file, e.g. the SFT and RAR lines a ``rar_grpo.py`` run wrote for the test split) and
scores every encoder of every group on held-out instance Recall@1 with those lines on both sides (every
listing carries them, as deployed; ``rar.evaluation.evaluate_attribute_sources``). Each group is
reported as mean ± std over its encoders, with the gain over no attributes and its minimum over the
group, then per encoder.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from afmrl.catalog.load import load_catalog
from afmrl.encoder.model import ProductEncoder
from benchmarks._machine import describe_machine
from experiments.attribute_headroom import attribute_sources
from rar.evaluation import evaluate_attribute_sources


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--generated", nargs="*", default=[], help="attributes.jsonl files written by rar_grpo.py")
    parser.add_argument(
        "--columns",
        nargs="+",
        default=None,
        help="Read only these columns of the --generated files (default: all), e.g. rar_attributes.",
    )
    parser.add_argument(
        "--group",
        nargs="+",
        action="append",
        required=True,
        metavar=("LABEL", "ENCODER_DIR"),
        help="A label and the encoder directories of that group (one per seed); repeatable.",
    )
    parser.add_argument("--output", default=None, help="Write the markdown here (default: print only).")
    args = parser.parse_args(argv)
    for group in args.group:
        if len(group) < 2:
            parser.error(f"--group {group[0]!r} needs at least one encoder directory after its label")
        for path in group[1:]:
            if not (Path(path) / "encoder_config.json").is_file():
                parser.error(f"--group {group[0]!r}: {path} is not a saved encoder (no encoder_config.json)")
    started = time.time()
    machine = describe_machine()
    catalog = load_catalog(args.catalog, split=args.split)
    try:
        sources = attribute_sources(catalog, args.generated, args.columns)
    except ValueError as err:
        parser.error(str(err))
    r1 = {}  # (label, encoder) -> {source: R@1 in points}
    for label, *paths in args.group:
        for path in paths:
            encoder = ProductEncoder.from_pretrained(path)
            scores = evaluate_attribute_sources(encoder, catalog, sources, protocol="both_sides", show_progress=False)
            r1[label, path] = {name: 100 * scores[name]["recall@1"] for name in sources}
            print(f"{label} {path}: " + ", ".join(f"{k} {v:.1f}" for k, v in r1[label, path].items()), flush=True)

    names = list(sources)
    lines = [
        "# How much each stage-1 encoder gains from the same attribute lines",
        "",
        f"Made by `python -m experiments.encoder_attribute_use {' '.join(sys.argv[1:] if argv is None else argv)}` "
        f"in {time.time() - started:.0f} s on {machine}.",
        "",
        f"Instance Recall@1 (%) on the `{args.split}` split of `{args.catalog}` ({len(catalog)} listings), each "
        "source's attribute lines on both sides (every listing annotated, as deployed); mean ± std over a group's "
        "encoders, and in brackets the gain over no attributes: mean, and minimum over the group.",
        "",
        "| encoders | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for label, *paths in args.group:
        cells = []
        for name in names:
            values = np.array([r1[label, p][name] for p in paths])
            cell = f"{values.mean():.1f} ± {values.std(ddof=1) if len(values) > 1 else 0:.1f}"
            if name != "none":
                gain = values - np.array([r1[label, p]["none"] for p in paths])
                cell += f" ({gain.mean():+.1f}, min {gain.min():+.1f})"
            cells.append(cell)
        lines.append(f"| {label} ({len(paths)}) | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per encoder:",
        "",
        "| encoders | directory | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for (label, path), row in r1.items():
        lines.append(f"| {label} | `{path}` | " + " | ".join(f"{row[n]:.1f}" for n in names) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
