"""How much can attributes help this encoder, and how good are the generated ones? Two diagnostics for stage 2.

    python -m experiments.attribute_headroom --encoder DIR --catalog DIR [--generated RUN/attributes.jsonl]

1. **Headroom**: instance Recall@1/5 on the split with no attributes, the catalog's own (teacher)
   attributes, the true attributes (synthetic catalogs have ``true_attributes``) and each generated
   column: on both sides (every listing carries that source's attributes, as deployed), and on the
   queries only, against the image + title gallery and against a gallery that carries the teacher's
   attributes (``--gallery_attributes reference`` in rar_grpo, the reward's gallery). Attributes the
   encoder cannot use cannot be rewarded: the "true" row bounds what any generator can add through it.
2. **Generated attributes per key** (with ``--generated``, the ``attributes.jsonl`` rar_grpo writes):
   how often each key is emitted, how often its value is right (against ``true_attributes``, else the
   teacher's), and how often it is right when the listing's title does not state it (the value's words
   do not occur in the title, an approximation): what the generator perceives rather than copies.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path

import torch

from afmrl.attributes import canonical_attributes, parse_attributes
from afmrl.catalog.load import load_catalog
from afmrl.encoder.model import ProductEncoder
from afmrl.retrieval.evaluation import attribute_texts, instance_retrieval


def _states(title: str, value: object) -> bool:
    words = re.findall(r"\w+", str(value).lower())
    return bool(words) and re.search(r"\b" + r"\W+".join(map(re.escape, words)) + r"\b", title.lower()) is not None


def key_accuracy(ds, generated: list[str | None]) -> dict[str, dict[str, float]]:
    """Per key: emitted fraction, right fraction of the emitted, right fraction when the title does not state it."""
    reference = ds["true_attributes"] if "true_attributes" in ds.column_names else ds["attributes"]
    emitted, right, unstated, right_unstated = Counter(), Counter(), Counter(), Counter()
    for title, truth, text in zip(ds["title"], reference, generated, strict=True):
        truth = truth or {}
        for key, value in parse_attributes(text).attributes.items():
            emitted[key] += 1
            if key not in truth:
                continue  # a key the reference does not have (e.g. the teacher's redundant ones): never right
            ok = str(value).strip().lower() == str(truth[key]).strip().lower()
            right[key] += ok
            if not _states(title, truth[key]):
                unstated[key] += 1
                right_unstated[key] += ok
    return {
        key: {
            "emitted": emitted[key] / len(ds),
            "right": right[key] / emitted[key],
            "right_when_not_in_title": right_unstated[key] / unstated[key] if unstated[key] else float("nan"),
        }
        for key in sorted(emitted)
    }


def attribute_sources(
    catalog, generated_files: list[str], columns: list[str] | None = None
) -> dict[str, list[str | None] | None]:
    """{name: attribute line per listing of ``catalog``}: none, teacher, true (if the catalog has it), and each
    column (those in ``columns``, default all) of each ``attributes.jsonl`` that rar_grpo.py wrote, named
    ``<run dir>/<column>`` and parsed and re-written canonically, as rar_grpo's evaluation and the deployed index do.
    A missing file, a listing without a row or a run given twice raises ValueError naming it (main turns it into
    one ``error:`` line, exit 2)."""
    sources = {"none": None, "teacher": attribute_texts(catalog, "reference")}
    if "true_attributes" in catalog.column_names:
        sources["true"] = attribute_texts(catalog, "true_attributes")
    ids = list(catalog["listing_id"])
    for path in generated_files:
        if not Path(path).is_file():
            raise ValueError(f"--generated {path}: no such file (rar_grpo.py writes attributes.jsonl)")
        rows = {r["listing_id"]: r for r in map(json.loads, Path(path).read_text().splitlines())}
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ValueError(
                f"--generated {path}: no row for listing {missing[0]!r} ({len(missing)} of {len(ids)} listings missing)"
            )
        run = str(Path(path).parent).removeprefix("outputs/")  # the run's directory names its columns
        for column in dict.fromkeys(k for r in rows.values() for k in r if k != "listing_id"):  # file order
            if columns is not None and column not in columns:
                continue
            if f"{run}/{column}" in sources:
                raise ValueError(f"--generated {path}: {run}/{column} is given twice")
            sources[f"{run}/{column}"] = canonical_attributes([rows[i].get(column) or "" for i in ids])
    return sources


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--generated", nargs="*", default=[], help="attributes.jsonl files written by rar_grpo.py")
    parser.add_argument("--output", default=None, help="Write the markdown here (default: print only).")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    ds = load_catalog(args.catalog, split=args.split)
    try:
        sources = attribute_sources(ds, args.generated)  # read and checked before the encoder loads
    except ValueError as err:
        parser.error(str(err))
    encoder = ProductEncoder.from_pretrained(args.encoder)

    lines = [
        f"Encoder `{args.encoder}`, catalog `{args.catalog}` split `{args.split}` ({len(ds)} listings).",
        "",
        "| attributes | both sides (deployment) R@1 | R@5 | queries annotated, plain gallery R@1 | R@5 | "
        "queries annotated, teacher gallery R@1 | R@5 |",
        "|---|---|---|---|---|---|---|",
    ]
    with torch.no_grad():
        plain = instance_retrieval(encoder, ds, sources, show_progress=False)
        annotated = instance_retrieval(encoder, ds, sources, gallery_attributes=sources["teacher"], show_progress=False)
        both = {
            name: instance_retrieval(encoder, ds, {name: texts}, gallery_attributes=texts, show_progress=False)[name]
            for name, texts in sources.items()
        }
    for name in sources:
        cells = [
            f"{100 * r[k]:.1f}" for r in (both[name], plain[name], annotated[name]) for k in ("recall@1", "recall@5")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, texts in sources.items():
        if "/" not in name:
            continue
        lines += [
            "",
            f"`{name}` per key: emitted / right / right when the title does not state it (%)",
            "",
            "| key | emitted | right | right, not in title |",
            "|---|---|---|---|",
        ]
        for key, row in key_accuracy(ds, texts).items():
            lines.append(
                f"| {key} | {100 * row['emitted']:.0f} | {100 * row['right']:.0f} | "
                f"{100 * row['right_when_not_in_title']:.0f} |"
            )
    text = "\n".join(lines) + "\n"
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    print(text)
    return plain, annotated, both


if __name__ == "__main__":
    main()
