"""Does an encoder read what a line says, or its form? Generated lines through several encoders, as written and with
some keys dropped.

    python -m experiments.encoder_line_form --catalog outputs/embedded/world-paper-seed100-8210b1d5 \
        --encoders outputs/paper-world-v2/encoder outputs/paper-world-v2/encoder-keyp07 \
        --attributes outputs/rar-seeds-pc1-paper/seed0/attributes.jsonl --drop condition shipping style

A policy that RL makes more correct can still lose retrieval if its lines leave the form the stage-1 encoder was
trained on (the fair test's PC1 on the paper world: perception up, R@1 down). For every encoder this embeds the test
split under each attribute source of ``--attributes`` (a run's ``attributes.jsonl``: listing_id plus one column per
generator) and each catalog column of ``--columns`` (the teacher's ``attributes``, ``true_attributes``), and each
source of ``--attributes`` with the ``--drop`` keys removed, on both sides (every listing annotated by the same
source, as deployed), and reports instance R@1/5 and each source's difference to the first. Lines are read the way the
reward and the evaluation read them (parsed, canonical). One run: a probe, not a result.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from afmrl.attributes import format_attributes, parse_attributes
from afmrl.catalog.load import load_catalog
from afmrl.encoder.model import ProductEncoder
from rar.evaluation import evaluate_attribute_sources


def sources_of(path: str, ids: list[str], drop: list[str]) -> dict[str, list[str | None]]:
    """Each generator column of ``path`` in ``ids`` order, canonical, and (with ``drop``) without those keys."""
    rows = {r["listing_id"]: r for r in map(json.loads, Path(path).read_text(encoding="utf-8").splitlines())}
    missing = [i for i in ids if i not in rows]
    if missing:
        raise SystemExit(f"error: --attributes {path} has no line for listing {missing[0]!r} ({len(missing)} missing)")
    columns = [c for c in next(iter(rows.values())) if c != "listing_id"]
    out: dict[str, list[str | None]] = {}
    for column in columns:
        parsed = [parse_attributes(rows[i][column]).attributes for i in ids]
        out[column] = [format_attributes(a) or None for a in parsed]
        if drop:
            out[f"{column} − {'/'.join(drop)}"] = [
                format_attributes({k: v for k, v in a.items() if k not in drop}) or None for a in parsed
            ]
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--encoders", nargs="+", required=True)
    parser.add_argument("--attributes", help="A run's attributes.jsonl (listing_id + a column each).")
    parser.add_argument(
        "--columns", nargs="*", default=[], help="Catalog columns read as sources too (attributes, true_attributes)."
    )
    parser.add_argument("--drop", nargs="*", default=[], help="Keys removed in the extra '− keys' sources.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--out", help="Also write the results here as JSON.")
    args = parser.parse_args(argv)
    if not args.attributes and not args.columns:
        parser.error("give --attributes, --columns or both")
    catalog = load_catalog(args.catalog, split=args.split)
    missing = [c for c in args.columns if c not in catalog.column_names]
    if missing:
        raise SystemExit(f"error: --columns {missing[0]!r}: the catalog has no such column")
    sources = {"none": None, **{c: [format_attributes(a) or None for a in catalog[c]] for c in args.columns}}
    if args.attributes:
        sources.update(sources_of(args.attributes, list(catalog["listing_id"]), args.drop))
    results = {}
    for path in args.encoders:
        encoder = ProductEncoder.from_pretrained(path)
        metrics = evaluate_attribute_sources(
            encoder, catalog, sources, protocol="both_sides", batch_size=args.batch_size, show_progress=False
        )
        results[path] = {name: {k: 100 * m[k] for k in ("recall@1", "recall@5")} for name, m in metrics.items()}
    first = next(name for name in sources if name != "none")
    print(f"| encoder | source | R@1 | R@5 | R@1 − {first} |\n|---|---|---|---|---|")
    for path, rows in results.items():
        for name, m in rows.items():
            print(f"| {path} | {name} | {m['recall@1']:.1f} | {m['recall@5']:.1f} | "
                  f"{m['recall@1'] - rows[first]['recall@1']:+.1f} |")  # fmt: skip
    if args.out:
        command = shlex.join(
            ["python", "-m", "experiments.encoder_line_form", *(sys.argv[1:] if argv is None else argv)]
        )
        record = {"command": command, "results": results}
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
