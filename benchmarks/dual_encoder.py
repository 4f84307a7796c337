"""Stage 1 over a dual encoder (CLIP) beside the MLLM encoder: the ladder's first two rungs over seeds, with step
time and vectors/s. Writes docs/results/dual_encoder.md (+ .json).

    python -m benchmarks.dual_encoder                     # seeds 0 1 2, tiny-clip and the demo's MLLM encoder
    python -m benchmarks.dual_encoder --seeds 0 --quick   # smoke test: one epoch per run, nothing written

Every run is ``recipes/agcl_train.py --config recipes/configs/agcl_demo.yaml`` on the ladder's catalog (that of
``rar_demo.yaml``) with ``--seed`` s and ``--model_name_or_path`` the backbone, as InfoNCE (no weighting, no
filter) and as AGCL, evaluated by the recipe on the test split (instance Recall@1 over held-out products). Each
run's result is kept in its own directory: a killed benchmark resumes at the run it stopped in. Speed is measured
afterwards in this process, the backbones back to back (compare their ratio, not the absolute figures: the cores
are shared): one training step of 64 listings with attributes (forward and backward of query and candidate
sides) and encoding 256 test listings (frozen, batch 64).

The dual encoder starts from random weights (``tiny-clip``: the package ships no pretrained tiny CLIP), the MLLM
from the shipped pretrained tiny Qwen2-VL: absolute R@1 compares a pretrained and an untrained backbone, the
rungs' difference within each backbone is what AGCL adds there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from afmrl.stats import format_summary, summarize
from benchmarks._machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = {"MLLM": "pretrained-tiny-qwen2-vl", "CLIP": "tiny-clip", "SigLIP": "tiny-siglip"}
RUNGS = {
    "InfoNCE": ["--hard_negative_weighting", "false", "--false_negative_filter", "none"],
    "AGCL": ["--hard_negative_weighting", "true", "--false_negative_filter", "attribute"],
}


def train_run(backbone: str, rung: str, seed: int, out: Path, catalog: str, quick: bool) -> dict:
    """One ``agcl_train.py`` run (skipped when its result exists): instance metrics and wall seconds."""
    result = out / "result.json"
    if result.is_file():
        return json.loads(result.read_text())
    cmd = [sys.executable, "recipes/agcl_train.py", "--config", "recipes/configs/agcl_demo.yaml", "--catalog", catalog,
           "--model_name_or_path", BACKBONES[backbone], "--output_dir", str(out), "--eval_split", "test",
           "--seed", str(seed), "--disable_tqdm", "true", *RUNGS[rung],
           *(["--num_train_epochs", "1"] if quick else [])]  # fmt: skip
    started = time.time()
    print(f"[dual_encoder] {backbone} {rung} seed {seed}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    evaluation = json.loads((out / "eval_results.json").read_text())
    data = {"instance": evaluation["instance"], "seconds": round(time.time() - started, 1)}
    result.write_text(json.dumps(data, indent=2) + "\n")
    return data


def speed(backbone: str, catalog: str, repeats: int = 5) -> dict:
    """Median seconds of one training step (64 listings with attributes, both sides) and vectors/s encoding."""
    import torch

    from afmrl.attributes import format_attributes
    from afmrl.catalog.load import load_catalog
    from afmrl.embedded import resolve_model
    from afmrl.encoder.model import EncoderConfig, ProductEncoder

    encoder = ProductEncoder.from_backbone(
        EncoderConfig(backbone=resolve_model(BACKBONES[backbone], "outputs/embedded"), lora_r=0, freeze_vision=False)
    )
    optimizer = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-4)
    train = load_catalog(catalog, split="train").select(range(64))
    images, titles = list(train["image"]), list(train["title"])
    lines = [format_attributes(a) or None for a in train["attributes"]]
    steps = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        query = encoder(**encoder.build_inputs(images, titles, lines))
        candidate = encoder(**encoder.build_inputs(images, titles))
        loss = torch.nn.functional.cross_entropy(query @ candidate.T / 0.05, torch.arange(len(titles)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        steps.append(time.perf_counter() - started)
    test = load_catalog(catalog, split="test").select(range(256))
    encoder.encode(list(test["image"])[:64], list(test["title"])[:64])  # warm-up
    started = time.perf_counter()
    encoder.encode(list(test["image"]), list(test["title"]), batch_size=64)
    return {
        "parameters": sum(p.numel() for p in encoder.parameters()),
        "step_seconds": statistics.median(steps[1:]),
        "vectors_per_second": 256 / (time.perf_counter() - started),
    }


def write_report(path: Path, runs: dict, speeds: dict, seeds: list[int], machine: str) -> None:
    lines = [
        "# Stage 1 over a dual encoder beside the MLLM encoder",
        "",
        "Regenerated by `python -m benchmarks.dual_encoder` (docstring: what runs). Instance Recall@1 (%) on the "
        "held-out test products of the ladder's catalog; mean ± sample sd with the 95% t-interval over seeds; "
        "AGCL − InfoNCE is paired by seed.",
        "",
        f"Machine: {machine}",
        "",
        "| backbone | parameters | InfoNCE R@1 | AGCL R@1 | AGCL − InfoNCE | step (s, 64 listings) | vectors/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for backbone, per_rung in runs.items():
        r1 = {rung: [100 * per_rung[rung][s]["instance"]["recall@1"] for s in seeds] for rung in RUNGS}
        diff = [a - b for a, b in zip(r1["AGCL"], r1["InfoNCE"], strict=True)]
        sp = speeds[backbone]
        lines.append(
            f"| {backbone} (`{BACKBONES[backbone]}`) | {sp['parameters'] / 1e6:.2f}M "
            f"| {format_summary(summarize(r1['InfoNCE']), signed=False)} "
            f"| {format_summary(summarize(r1['AGCL']), signed=False)} | {format_summary(summarize(diff))} "
            f"| {sp['step_seconds']:.2f} | {sp['vectors_per_second']:.0f} |"
        )
    lines += ["", "Per seed (InfoNCE / AGCL R@1):", ""]
    for backbone, per_rung in runs.items():
        cells = ", ".join(
            f"seed {s}: {100 * per_rung['InfoNCE'][s]['instance']['recall@1']:.1f} / "
            f"{100 * per_rung['AGCL'][s]['instance']['recall@1']:.1f}"
            for s in seeds
        )
        lines.append(f"- {backbone}: {cells}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--backbones", nargs="+", default=["CLIP", "MLLM"], choices=list(BACKBONES))
    parser.add_argument("--work_dir", default="outputs/dual-encoder")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "dual_encoder.md"))
    parser.add_argument("--quick", action="store_true", help="One epoch per run; nothing written to docs/.")
    args = parser.parse_args(argv)
    from afmrl.embedded import resolve_catalog

    machine = describe_machine()
    catalog = str(resolve_catalog("embedded", "outputs/embedded", val_fraction=0.3))  # the ladder's catalog
    work = Path(args.work_dir) / ("quick" if args.quick else "full")
    runs = {
        backbone: {
            rung: {
                seed: train_run(backbone, rung, seed, work / backbone / rung / f"seed{seed}", catalog, args.quick)
                for seed in args.seeds
            }
            for rung in RUNGS
        }
        for backbone in args.backbones
    }
    speeds = {backbone: speed(backbone, catalog) for backbone in args.backbones}
    if args.quick:
        print(json.dumps(speeds, indent=2))
        return
    out = Path(args.output)
    out.with_suffix(".json").write_text(
        json.dumps({"runs": runs, "speed": speeds, "seeds": args.seeds, "machine": machine}, indent=2) + "\n"
    )
    write_report(out, runs, speeds, args.seeds, machine)
    print(out.read_text())


if __name__ == "__main__":
    main()
