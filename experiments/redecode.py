"""Decode a saved policy's lines again and compare them with lines stored before a decoding fix.

    python -m experiments.redecode --policy outputs/rar-seeds-pc1-paper/seed0 \
        --catalog outputs/embedded/world-paper-seed100-8210b1d5 \
        --stored outputs/rar-seeds-pc1-paper/seed0/attributes.jsonl --column rar_attributes \
        --out docs/experiments/controls/redecode_pc1_paper.json

Greedy decoding masks the image and video placeholders since 2026-12-07 (TRL's GRPO masks the image one while it
samples, so a policy can rank it first unmasked, and its runs vanish when special tokens are skipped: a line cut
short). Every RL figure measured before the fix decoded without the mask; this says which of them the fix touches:
the share of stored lines the masked decoding reproduces, and the keys per line before and after. A figure whose lines
are all reproduced stands as it was; one whose lines change is measured again before it is cited.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from afmrl.attributes import parse_attributes
from afmrl.catalog import load_catalog
from rar.annotate import annotate
from rar.prompts import DEFAULT_PROMPT, PROMPT_FILE


def keys_per_line(lines: list[str]) -> float:
    return float(np.mean([len(parse_attributes(line or "").attributes) for line in lines])) if lines else 0.0


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="A saved policy directory (rar_grpo.py's output).")
    parser.add_argument("--catalog", required=True, help="The catalog its lines were written for.")
    parser.add_argument("--stored", required=True, help="attributes.jsonl: listing_id and the stored line columns.")
    parser.add_argument("--column", default="rar_attributes", help="The stored column this policy wrote.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N stored listings (a budget).")
    parser.add_argument("--out", default=None, help="Where the JSON goes (default: printed only).")
    args = parser.parse_args(argv)

    stored = {}
    for line in Path(args.stored).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if args.column not in row:
            parser.error(f"--column {args.column!r}: not a field of {args.stored} (its fields: {', '.join(row)})")
        stored[row["listing_id"]] = row[args.column] or ""
    listings = load_catalog(args.catalog, split=args.split, verify_images=False)
    keep = [i for i, lid in enumerate(listings["listing_id"]) if lid in stored][: args.limit]
    if not keep:
        parser.error(f"--stored {args.stored}: no listing of the {args.split!r} split")
    listings = listings.select(keep)
    settings = Path(args.policy) / PROMPT_FILE
    prompt = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
    new = annotate(
        listings,
        args.policy,
        prompt_template=prompt.get("prompt_template") or DEFAULT_PROMPT,
        attribute_keys=prompt.get("attribute_keys"),
        max_new_tokens=prompt.get("max_new_tokens") or 64,
        batch_size=32,
    )
    old = [stored[lid] for lid in listings["listing_id"]]
    result = {
        "policy": args.policy,
        "column": args.column,
        "listings": len(old),
        "reproduced": float(np.mean([a.strip() == b.strip() for a, b in zip(old, new, strict=True)])),
        "keys_per_line_stored": keys_per_line(old),
        "keys_per_line_masked": keys_per_line(new),
        "examples": [{"stored": a, "masked": b} for a, b in zip(old, new, strict=True) if a.strip() != b.strip()][:3],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
