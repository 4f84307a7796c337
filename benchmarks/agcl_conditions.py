"""When does AGCL beat InfoNCE? The stage-1 ablation's two end points under several conditions.

    python benchmarks/agcl_conditions.py                  # writes docs/agcl_conditions.md (+ .json)
    python benchmarks/agcl_conditions.py --seeds 0 --conditions default "112 px photos"   # a quick look

`benchmarks/agcl_ablation.py` measures InfoNCE vs AGCL on the default embedded catalog. This script
asks whether the gap depends on that catalog or on a knob: each condition changes one thing —
the photos' resolution (fine details such as the logo cover more pixels and 16 image tokens
instead of 4), the share of duplicate SKUs (false negatives, what AGCL's filter removes), how
batches are formed (same-category products together, so near-duplicates meet as in-batch hard
negatives) or the weighting's scale λ — and trains InfoNCE and full AGCL from the same recipe
(`recipes/configs/agcl_demo.yaml`) with the same seeds. The InfoNCE runs of a condition that only
changes AGCL's own flags are shared with the default's (the flags do not reach InfoNCE).

Instance Recall@1 on each catalog's test split (held-out products); the catalog is generated with
seed 0 for every condition, the training seed varies. Deterministic on CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe_machine  # noqa: E402
from agcl_ablation import VARIANTS, run, write_report  # noqa: E402
from moon_ablation import slug  # noqa: E402

from agcl.embedded import resolve_catalog  # noqa: E402
from agcl.synthetic_catalog import make_synthetic_catalog  # noqa: E402


@dataclass
class Condition:
    name: str
    catalog: dict = field(default_factory=dict)  # SyntheticCatalogConfig fields that differ from the default
    flags: list[str] = field(default_factory=list)  # agcl_train flags for both losses
    agcl_flags: list[str] = field(default_factory=list)  # flags that only change AGCL's loss


CONDITIONS = [
    Condition("default"),
    Condition("112 px photos", catalog={"image_size": 112}),
    Condition("20% duplicate SKUs", catalog={"duplicate_sku_fraction": 0.2}),
    Condition("batches grouped by category", flags=["--batch_grouping", "category"]),
    Condition("weighting scale λ = 3", agcl_flags=["--weighting_scale", "3"]),
]


def catalog_for(condition: Condition, work_dir: Path) -> str:
    if not condition.catalog:
        return resolve_catalog("embedded", "outputs/embedded")
    if set(condition.catalog) == {"image_size"}:  # the embedded cache names this one
        return resolve_catalog("embedded", "outputs/embedded", image_size=condition.catalog["image_size"])
    out = work_dir / f"catalog-{slug(condition.name)}"
    if not (out / "catalog.jsonl").is_file():
        make_synthetic_catalog(out, seed=0, **condition.catalog)
    return str(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", default=[c.name for c in CONDITIONS],
                        choices=[c.name for c in CONDITIONS], metavar="NAME",
                        help=f"Subset of: {', '.join(repr(c.name) for c in CONDITIONS)}.".replace("%", "%%"))
    parser.add_argument("--output", default="docs/agcl_conditions.md")
    parser.add_argument("--work_dir", default="outputs/agcl-conditions")
    args = parser.parse_args(argv)
    work_dir = Path(args.work_dir)
    machine, start = describe_machine(), time.time()

    conditions = [c for c in CONDITIONS if c.name in args.conditions]
    cache: dict[tuple, float] = {}  # (catalog, flags, seed) -> InfoNCE R@1, shared across conditions
    rows = {}
    for condition in conditions:
        catalog = catalog_for(condition, work_dir)
        rows[condition.name] = {"InfoNCE": [], "AGCL": []}
        for seed in args.seeds:
            key = (catalog, tuple(condition.flags), seed)
            for name, variant in (("InfoNCE", VARIANTS["InfoNCE"]), ("AGCL", VARIANTS["AGCL (both)"])):
                if name == "InfoNCE" and key in cache:
                    rows[condition.name][name].append(cache[key])
                    continue
                extra = ["--catalog", catalog, *condition.flags] + (condition.agcl_flags if name == "AGCL" else [])
                results, _ = run(variant, seed, extra, str(work_dir / slug(condition.name) / f"seed{seed}-{name}"))
                r1 = 100 * results["instance"]["recall@1"]
                rows[condition.name][name].append(r1)
                if name == "InfoNCE":
                    cache[key] = r1
                print(f"{condition.name} seed {seed} {name}: R@1 {r1:.1f}", flush=True)

    seeds = " ".join(map(str, args.seeds))
    lines = [
        "# When does AGCL beat InfoNCE? Stage 1 under several conditions",
        "",
        f"Generated by `python benchmarks/agcl_conditions.py --seeds {seeds}` in {(time.time() - start) / 60:.1f} min on: "
        f"{machine}.",
        "Protocol: the module docstring of `benchmarks/agcl_conditions.py`. Instance R@1 on the test split, percent, "
        f"mean ± std over training seeds {seeds}; Δ is AGCL minus InfoNCE with the same seed.",
        "",
        "| condition | InfoNCE R@1 | AGCL R@1 | Δ R@1 (pts) | Δ per seed |",
        "|---|---|---|---|---|",
    ]
    summary = {}
    for name, runs in rows.items():
        base, agcl = np.array(runs["InfoNCE"]), np.array(runs["AGCL"])
        delta = agcl - base
        lines.append(f"| {name} | {base.mean():.1f} ± {base.std():.1f} | {agcl.mean():.1f} ± {agcl.std():.1f} | "
                     f"{delta.mean():+.1f} (min {delta.min():+.1f}) | {', '.join(f'{d:+.1f}' for d in delta)} |")
        summary[name] = {"seeds": args.seeds, "infonce_recall@1": base.tolist(), "agcl_recall@1": agcl.tolist()}
    write_report(args.output, lines, summary)


if __name__ == "__main__":
    main()
