"""Does GRPO improve the generator's attributes, or only how it samples them?

The retrieval-rank reward scores completions *sampled* at GRPO's temperature; the demo and the ladder
deploy *greedy* attributes. This benchmark scores both decodings of the starting (SFT) policy and of the
RL policy of finished ``rar_grpo.py`` runs, in the reward's own protocol (queries carry the attributes;
the gallery carries the starting policy's greedy attributes, as ``--gallery_attributes policy`` builds
it), on the split RL trained on (``val``: its prompts) and on held-out products (``test``). If RL's
sampled completions gain while its greedy ones do not, the rising reward measures sharper sampling,
not better attributes.

    python -m experiments.rl_sharpening --runs outputs/ladder/seed0/rar outputs/ladder/seed1/rar \\
        outputs/ladder/seed2/rar --encoders outputs/ladder/seed0/agcl outputs/ladder/seed1/agcl \\
        outputs/ladder/seed2/agcl --output docs/experiments/rl_sharpening.md
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from afmrl.attributes import canonical_attributes
from afmrl.catalog.load import load_catalog
from afmrl.encoder.model import ProductEncoder
from afmrl.modeling import load_mllm
from benchmarks._machine import describe_machine
from rar.annotate import generate_attributes, sample_attributes
from rar.evaluation import evaluate_attribute_sources
from rar.prompts import build_prompt_dataset

DECODINGS = ("greedy", "sampled")


def annotate(policy_dir: Path, prompts, temperature: float, draws: int) -> dict[str, list[list]]:
    """Canonical attribute texts of ``policy_dir`` for every prompt: {"greedy": [texts], "sampled": [texts] * draws}
    (draw d seeded with d), the policy loaded once."""
    model, processor = load_mllm(str(policy_dir))
    model.eval()
    torch.manual_seed(0)
    greedy = [generate_attributes(model, processor, prompts, batch_size=32, show_progress=False)]
    sampled = sample_attributes(model, processor, prompts, draws=draws, temperature=temperature, show_progress=False)
    return {"greedy": [canonical_attributes(t) for t in greedy], "sampled": [canonical_attributes(t) for t in sampled]}


def score_run(run: Path, encoder_dir: Path, catalog_dir: str, split: str, temperature: float, draws: int) -> dict:
    """{decoding: {"none"|"sft"|"rar": (R@1, MRR)}} on ``split``, against the reward's gallery."""
    catalog = load_catalog(catalog_dir, split=split)
    template = json.loads((run / "attribute_prompt.json").read_text())["prompt_template"]
    prompts = build_prompt_dataset(catalog, prompt_template=template)
    texts = {
        "sft": annotate(run / "sft", prompts, temperature, draws),
        "rar": annotate(run, prompts, temperature, draws),
    }
    stored = {}
    for line in (run / "gallery_attributes.jsonl").read_text().splitlines():
        row = json.loads(line)
        stored[row["listing_id"]] = row["completion"]
    ids = list(catalog["listing_id"])
    # The reward's gallery for the split it annotated; elsewhere the same starting policy's greedy attributes.
    gallery = (
        canonical_attributes([stored[i] for i in ids]) if all(i in stored for i in ids) else texts["sft"]["greedy"][0]
    )
    # Every source of the split in one call: the gallery is encoded once.
    sources = {"none": None} | {
        f"{name}/{decoding}/{d}": draw
        for name, by_decoding in texts.items()
        for decoding, draws_texts in by_decoding.items()
        for d, draw in enumerate(draws_texts)
    }
    scores = evaluate_attribute_sources(
        ProductEncoder.from_pretrained(encoder_dir),
        catalog,
        sources,
        protocol="query_side",
        gallery_attributes=gallery,
        show_progress=False,
    )
    results = {}
    for decoding in DECODINGS:
        row = {"none": (scores["none"]["recall@1"], scores["none"]["mrr"])}
        for name in texts:
            metrics = [scores[key] for key in sources if key.startswith(f"{name}/{decoding}/")]
            row[name] = (float(np.mean([m["recall@1"] for m in metrics])), float(np.mean([m["mrr"] for m in metrics])))
        results[decoding] = row
    return results


def write_report(path: Path, per_run: dict, args, seconds: float):
    lines = [
        "# Does GRPO improve the attributes, or how it samples them?",
        "",
        f"Made by `python -m experiments.rl_sharpening {' '.join(sys.argv[1:])}` in {seconds:.0f} s on: "
        f"{describe_machine()}.",
        f"Protocol: the module docstring of `experiments/rl_sharpening.py`. Sampled = temperature "
        f"{args.temperature}, {args.draws} draws averaged. R@1 in percent; MRR of the true product.",
        "",
        "| run | split | decoding | none R@1 / MRR | SFT R@1 / MRR | RAR R@1 / MRR | RAR − SFT MRR |",
        "|---|---|---|---|---|---|---|",
    ]
    deltas = {}
    for run, by_split in per_run.items():
        for split, by_decoding in by_split.items():
            for decoding, row in by_decoding.items():
                cells = " | ".join(f"{100 * row[k][0]:.1f} / {row[k][1]:.3f}" for k in ("none", "sft", "rar"))
                delta = row["rar"][1] - row["sft"][1]
                deltas.setdefault((split, decoding), []).append(delta)
                lines.append(f"| {run} | {split} | {decoding} | {cells} | {delta:+.3f} |")
    lines += ["", "Mean over runs (± std), RAR − SFT in MRR:", "", "| split | greedy | sampled |", "|---|---|---|"]
    for split in args.splits:
        cells = [f"{np.mean(deltas[(split, d)]):+.3f} ± {np.std(deltas[(split, d)], ddof=1):.3f}" for d in DECODINGS]
        lines.append(f"| {split} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--runs",
        nargs="+",
        required=True,
        help="rar_grpo.py output dirs (policy, sft/, gallery_attributes.jsonl, attribute_prompt.json).",
    )
    parser.add_argument("--encoders", nargs="+", required=True, help="The frozen encoder of each run, in order.")
    parser.add_argument("--catalog", default="outputs/embedded/catalog-600-seed0-val0.3")
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--temperature", type=float, default=1.0, help="GRPO's sampling temperature (rar_demo.yaml).")
    parser.add_argument("--draws", type=int, default=3, help="Sampled annotations per listing, averaged.")
    parser.add_argument("--output", default="docs/experiments/rl_sharpening.md")
    args = parser.parse_args(argv)
    if len(args.runs) != len(args.encoders):
        parser.error(f"--runs has {len(args.runs)} dirs but --encoders {len(args.encoders)}: give one encoder per run")
    for run, encoder in zip(args.runs, args.encoders, strict=True):
        needs = [
            Path(run) / n
            for n in ("config.json", "sft/config.json", "gallery_attributes.jsonl", "attribute_prompt.json")
        ] + [Path(encoder) / "encoder_config.json"]
        if missing := [str(n) for n in needs if not n.is_file()]:
            parser.error(f"not a finished rar_grpo.py run with its encoder: missing {', '.join(missing)}")
    started = time.time()
    per_run = {}
    for run, encoder in zip(args.runs, args.encoders, strict=True):
        per_run[run] = {
            split: score_run(Path(run), Path(encoder), args.catalog, split, args.temperature, args.draws)
            for split in args.splits
        }
        print(run, json.dumps(per_run[run]), flush=True)
    write_report(Path(args.output), per_run, args, time.time() - started)


if __name__ == "__main__":
    main()
