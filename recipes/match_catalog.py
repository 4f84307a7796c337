"""Which listings of an indexed catalog are the same product: groups, and how good they are where the truth is known.

    python recipes/match_catalog.py --index outputs/index --output_dir outputs/matches
    python recipes/match_catalog.py --index outputs/index --output_dir outputs/matches --split test --guard none

Every indexed listing's top ``--k`` neighbours (``recipes/index_catalog.py`` built the index, with a calibrated
"same product" threshold: ``--calibration_split``) become edges when their score reaches the threshold of the
listing's category (the global one where its category had too few labelled pairs); groups are the connected
components, with mutual-kNN edges only by default against chaining (``deploy.matching``). Writes ``groups.jsonl``
(one row per listing: its group and the edges that joined it) and, where the catalog's product ids say which
listings are the same product, ``metrics.json`` (pairwise precision / recall / F1, B-cubed F1, the Shopee-style mean
F1, for both guards) and ``thresholds.png`` (the groups' precision and recall over thresholds).
"""

import json
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from afmrl.cli import run_cli
from deploy import ProductIndex
from deploy.matching import GUARDS, group_metrics, match_groups, metrics_over_thresholds, plot_thresholds


@dataclass
class MatchArguments:
    index: str = field(metadata={"help": "An index directory written by recipes/index_catalog.py."})
    output_dir: str = field(metadata={"help": "Where groups.jsonl, metrics.json and thresholds.png go."})
    split: str | None = field(default=None, metadata={"help": "Group only the indexed listings of this split."})
    k: int = field(default=10, metadata={"help": "Neighbours per listing in the graph."})
    guard: str = field(
        default="mutual",
        metadata={"help": "Against chaining: `mutual` keeps an edge only when both listings are in each other's top "
                          "k; `none` keeps every edge above the threshold.", "choices": list(GUARDS)},
    )  # fmt: skip
    threshold: float | None = field(
        default=None, metadata={"help": "A global score threshold instead of the calibrated ones."}
    )

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"--k must be >= 1, got {self.k}")
        if self.guard not in GUARDS:
            raise ValueError(f"--guard must be one of {GUARDS}, got {self.guard!r}")


def main(args: MatchArguments) -> dict:
    started = time.time()
    index = ProductIndex.load(args.index)
    match = index.match(k=args.k, guard=args.guard, split=args.split, threshold=args.threshold)
    ids, labels = match["listing_ids"], match["labels"]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    joined = defaultdict(list)
    for r, c, s in zip(*match["edges"], strict=True):
        joined[int(r)].append({"listing_id": ids[c], "score": round(float(s), 6)})
    size = np.bincount(labels)
    with (out / "groups.jsonl").open("w", encoding="utf-8") as f:
        for i, (lid, label) in enumerate(zip(ids, labels, strict=True)):
            row = {"listing_id": lid, "group_id": f"G{label:07d}", "group_size": int(size[label]), "edges": joined[i]}
            f.write(json.dumps(row) + "\n")
    seconds = time.time() - started
    summary = {"listings": len(ids), "groups": int(len(size)), "largest_group": int(size.max()), "k": args.k,
               "guard": args.guard, "split": args.split, "seconds": round(seconds, 1),
               "thresholds": "given" if args.threshold is not None else "calibrated"}  # fmt: skip
    products = match["product_ids"]
    if len(set(products)) < len(products):  # some listings share a product: the truth is known there
        rows, cols, scores = match["all_edges"]
        summary["metrics"] = {
            guard: group_metrics(match_groups(rows, cols, scores, len(ids), thresholds=match["thresholds"],
                                              guard=guard)[0], products)
            for guard in GUARDS
        }  # fmt: skip
        grid = np.quantile(scores, np.linspace(0.05, 0.999, 30)) if len(scores) else []
        curves = {
            guard: metrics_over_thresholds(rows, cols, scores, len(ids), products, grid, guard) for guard in GUARDS
        }
        plot_thresholds(curves, None if args.threshold is None else args.threshold, out / "thresholds.png")
        summary["over_thresholds"] = curves
        best = summary["metrics"][args.guard]
        print(f"[match_catalog] {len(ids)} listings -> {len(size)} groups (largest {size.max()}): pairwise F1 "
              f"{best['pairwise_f1']:.3f} (P {best['pairwise_precision']:.3f}, R {best['pairwise_recall']:.3f}), "
              f"B-cubed F1 {best['bcubed_f1']:.3f}, mean F1 {best['mean_f1']:.3f}; without the mutual guard "
              f"{summary['metrics']['none']['pairwise_f1']:.3f} / "
              f"{summary['metrics']['none']['mean_f1']:.3f}")  # fmt: skip
    else:
        print(f"[match_catalog] {len(ids)} listings -> {len(size)} groups (largest {size.max()}); no listing shares "
              "a product id with another: nothing to score them against")  # fmt: skip
    (out / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"[match_catalog] wrote {out / 'groups.jsonl'} in {seconds:.1f} s")
    return summary


def cli(argv=None):
    return run_cli(MatchArguments, main, argv)


if __name__ == "__main__":
    cli()
