"""MOON-family options of stage 1, each on/off over seeds on the embedded catalog. Writes docs/results/moon_ablation.md.

    python -m benchmarks.moon_ablation                                  # seeds 0 1 2
    python -m benchmarks.moon_ablation --reuse outputs/run-all/ladder   # "off" = the ladder's AGCL encoders
    python -m benchmarks.moon_ablation --seeds 0 --quick                # smoke test, nothing written
    python -m benchmarks.moon_ablation --only off "modality MoE (4 experts)" "guided MoE (1 layer)" \
        --output docs/results/moon_guided_moe.md                        # some rows only

Every run is ``recipes/agcl_train.py --config recipes/configs/agcl_demo.yaml`` on the catalog of
``rar_demo.yaml`` with ``--seed`` s; "off" is that run as it is (the ladder's AGCL rung, reused
when ``--reuse`` points at a finished ladder), "on" adds one option:

* **title enrichment** (MOON2.0's title co-augmentation): AGCL trains with ``--title_column
  enriched_title``. The embedded catalog has no MLLM to write enriched titles, so they are simulated
  the way its ``attributes`` column simulates a teacher: the seller's title followed by the teacher's
  (noisy) visible attribute values it does not already mention. A real run writes them with
  ``recipes/extract_attributes.py --task title``. Evaluation reads the original titles.
* **product-region crops** (MOON): the catalog rebuilt with ``clutter`` (every photo shrunk onto a busy
  scene of coloured shapes, its box in ``bbox``; titles and attributes unchanged), trained and tested
  without crops ("off" for this pair) and with ``--crop_views`` (image + crop to the box).
* **guided MoE** (MOON): ``--guided_moe_layers 1``, dedicated feed-forward experts for image, category and
  attribute tokens in the decoder layer before the last (``afmrl.encoder.guided_moe``); with attribute lines on
  half the queries and candidates (``agcl_demo.yaml``) the category and attribute experts see those tokens.
* **modality MoE** (MOON2.0): ``--moe_experts 4``, residual experts on the embedding routed by content
  and modality composition (``afmrl.encoder.moe``). Every training and test input of this catalog
  is image + text, so here the router can only split by content; the image-only and text-only
  inputs of ``--intra_product_weight`` are where modality routing matters.

Instance retrieval on the test split, percent, mean ± sample sd over seeds; Δ against "off" with the same seed
(mean, sd, 95% t-interval and n of the paired differences).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from afmrl.stats import format_summary, summarize
from benchmarks._machine import describe_machine
from benchmarks.ladder import Task, schedule

ROOT = Path(__file__).resolve().parents[1]
VISIBLE_KEYS = ("category", "color", "secondary_color", "pattern", "logo")
OPTIONS = {
    "title enrichment": ["--title_column", "enriched_title"],
    "modality MoE (4 experts)": ["--moe_experts", "4"],
    # the demo backbone has 2 decoder layers: experts in the one before the last (afmrl.encoder.guided_moe)
    "guided MoE (1 layer)": ["--guided_moe_layers", "1"],
}
# Crops need products on busy scenes: both of their rows train and test on the cluttered catalog.
CLUTTER_OPTIONS = {
    "cluttered photos, no crops": [],
    "cluttered photos + product-region crops": ["--crop_views", "true"],
}
METRICS = ("recall@1", "recall@5", "recall@10", "mAP@10")


def slug(name: str) -> str:
    """A directory name for a row label: ASCII letters and digits, the rest turned into dashes."""
    return "".join(c if c.isascii() and c.isalnum() else "-" for c in name.lower()).strip("-")


def simulated_enriched_title(title: str, teacher: dict | None) -> str:
    """The seller's title plus the teacher's visible attribute values that it does not mention yet."""
    words = set(title.lower().split())
    extra = []
    for key in VISIBLE_KEYS:
        value = (teacher or {}).get(key)
        if value and value != "none" and value.lower() not in words:
            extra.append(f"{value} {key.replace('secondary_color', 'trim')}" if key != "category" else value)
    return " ".join([title, *extra])


def enriched_catalog(source: str, out: Path) -> Path:
    """A copy of the catalog at ``source`` with an ``enriched_title`` column (images hard-linked)."""
    from afmrl.catalog.load import load_catalog
    from afmrl.catalog.write import write_catalog_dir

    if (out / "catalog.jsonl").is_file():
        return out
    ds = load_catalog(source, verify_images=False)
    titles = [simulated_enriched_title(t, a) for t, a in zip(ds["title"], ds["attributes"], strict=True)]
    write_catalog_dir(ds, out, extra_columns={"enriched_title": titles})
    return out


def evaluate(encoder_dir: Path, catalog: str) -> dict:
    from afmrl.catalog.load import load_catalog
    from afmrl.encoder.model import ProductEncoder
    from afmrl.retrieval.evaluation import evaluate_encoder

    test = load_catalog(catalog, split="test")
    return evaluate_encoder(
        ProductEncoder.from_pretrained(encoder_dir), test, tasks=("instance",), show_progress=False
    )["instance"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work_dir", default=str(ROOT / "outputs" / "moon-ablation"))
    parser.add_argument("--reuse", default=None, help="A finished ladder work dir: its seed<s>/agcl is the 'off' run.")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "moon_ablation.md"))
    parser.add_argument("--quick", action="store_true", help="One epoch per run; nothing written to docs/.")
    parser.add_argument("--only", nargs="+", default=None, help="Run and report these rows only (with their base).")
    args = parser.parse_args(argv)
    from afmrl.embedded import resolve_catalog

    started = time.time()
    machine = describe_machine()
    work = Path(tempfile.mkdtemp(prefix="moon-quick-")) if args.quick else Path(args.work_dir)
    catalog = str(resolve_catalog("embedded", "outputs/embedded", val_fraction=0.3))
    rows = {"off": [], **OPTIONS, **CLUTTER_OPTIONS}
    if args.only:
        unknown = sorted(set(args.only) - set(rows))
        if unknown:
            parser.error(f"--only: unknown row(s) {unknown}; rows: {list(rows)}")
        wanted = set(args.only) | {"off" for n in args.only if n in OPTIONS}
        wanted |= {"cluttered photos, no crops" for n in args.only if n in CLUTTER_OPTIONS}
        rows = {name: flags for name, flags in rows.items() if name in wanted}
    catalogs = {name: catalog for name in ("off", *OPTIONS)}
    if "title enrichment" in rows:
        catalogs["title enrichment"] = str(enriched_catalog(catalog, work / "catalog-enriched-titles"))
    cluttered = work / "catalog-clutter"
    if set(CLUTTER_OPTIONS) & set(rows) and not (cluttered / "catalog.jsonl").is_file():
        from afmrl.embedded.synthetic_catalog import make_synthetic_catalog

        make_synthetic_catalog(cluttered, num_products=600, seed=0, val_fraction=0.3, clutter=True)
    catalogs.update({name: str(cluttered) for name in CLUTTER_OPTIONS})
    runs, tasks = {}, []
    for seed in args.seeds:
        for name, flags in rows.items():
            out = work / f"seed{seed}" / slug(name)
            reused = Path(args.reuse) / f"seed{seed}" / "agcl" if args.reuse and name == "off" else None
            if reused is not None and (reused / "encoder_config.json").is_file():
                runs[seed, name] = reused
                continue
            runs[seed, name] = out
            tasks.append(
                Task(
                    f"seed{seed}/{slug(name)}",
                    [
                        sys.executable,
                        str(ROOT / "recipes" / "agcl_train.py"),
                        "--config",
                        "recipes/configs/agcl_demo.yaml",
                        "--catalog",
                        catalogs[name],
                        "--output_dir",
                        str(out),
                        "--eval_split",
                        "none",
                        "--seed",
                        str(seed),
                        "--disable_tqdm",
                        "true",
                        *flags,
                        *(["--num_train_epochs", "1"] if args.quick else []),
                    ],
                    out / "encoder_config.json",
                )
            )
    (work / "logs").mkdir(parents=True, exist_ok=True)
    # The slowest runs (two images per listing) first, so that the last minutes do not leave a core idle.
    tasks.sort(key=lambda t: "crops" not in t.name)
    schedule(tasks, args.jobs, work / "logs", started, label="moon")
    results = {f"{seed}/{name}": evaluate(path, catalogs[name]) for (seed, name), path in runs.items()}

    lines = [
        "# MOON-family options of stage 1, on and off",
        "",
        f"Generated by `python -m benchmarks.moon_ablation --seeds {' '.join(map(str, args.seeds))}"
        f"{' --only ' + ' '.join(repr(n) for n in args.only) if args.only else ''}"
        f"{' --reuse ' + os.path.relpath(Path(args.reuse).resolve(), ROOT) if args.reuse else ''}` in "
        f"{(time.time() - started) / 60:.1f} min on: {machine}.",
        "Protocol: the module docstring of `benchmarks/moon_ablation.py`. Instance retrieval on the test split, "
        "percent, mean ± sample sd over seeds; Δ R@1 against off with the same seed (for the crops: against the "
        "cluttered catalog without crops): mean ± sd, 95% t-interval and n of the paired differences.",
        "",
        "| option | R@1 | R@5 | R@10 | mAP@10 | Δ R@1 (pts) |",
        "|---|---|---|---|---|---|",
    ]
    base_of = {name: "off" for name in ("off", *OPTIONS)} | {
        name: "cluttered photos, no crops" for name in CLUTTER_OPTIONS
    }
    for name in [n for n in base_of if n in rows]:
        per_seed = [results[f"{s}/{name}"] for s in args.seeds]
        sd = {k: np.std([r[k] for r in per_seed], ddof=1) if len(per_seed) > 1 else 0.0 for k in METRICS}  # sample sd
        cells = [f"{100 * np.mean([r[k] for r in per_seed]):.1f} ± {100 * sd[k]:.1f}" for k in METRICS]
        delta = 100 * np.array(
            [results[f"{s}/{name}"]["recall@1"] - results[f"{s}/{base_of[name]}"]["recall@1"] for s in args.seeds]
        )
        paired = f"{format_summary(summarize(delta))} (min {delta.min():+.1f})" if name != base_of[name] else "the base"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {paired} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.quick:
        shutil.rmtree(work, ignore_errors=True)
        return results
    Path(args.output).write_text(text, encoding="utf-8")
    Path(args.output).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
