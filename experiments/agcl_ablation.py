"""Stage-1 ablation: InfoNCE vs weighting only vs filtering only vs full AGCL, over seeds.

    python -m experiments.agcl_ablation                     # writes docs/experiments/agcl_ablation.md (+ .json)
    python -m experiments.agcl_ablation --seeds 0 --num_train_epochs 5   # a quick look
    python -m experiments.agcl_ablation --config recipes/configs/agcl_qwen2vl_2b.yaml \
        --catalog data/my_catalog --output docs/agcl_ablation_2b.md      # paper scale (GPU, weights)

Flags the script does not know go to `recipes/agcl_train.py` for every variant (`--catalog`,
`--num_train_epochs`, ...).

Same encoder, catalog, steps and seed for every variant; only the loss options change. Reports
instance Recall@1/5/10 on the catalog's test split and the step-time ratio AGCL/InfoNCE
measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
from transformers import TrainerCallback
from trl import ModelConfig, TrlParser

from agcl.config import AGCLConfig, AGCLScriptArguments
from recipes import agcl_train

VARIANTS = {
    "InfoNCE": ["--hard_negative_weighting", "false", "--false_negative_filter", "none"],
    "+ weighting": ["--hard_negative_weighting", "true", "--false_negative_filter", "none"],
    "+ filtering": ["--hard_negative_weighting", "false", "--false_negative_filter", "attribute"],
    "AGCL (both)": ["--hard_negative_weighting", "true", "--false_negative_filter", "attribute"],
}


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (data collation, forward, loss, backward, update)."""

    def __init__(self):
        self.times, self._start = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


DEMO_RECIPE = "recipes/configs/agcl_demo.yaml"


def run(
    variant_flags: list[str], seed: int, extra: list[str], output_dir: str, config: str = DEMO_RECIPE
) -> tuple[dict, list[float]]:
    parser = TrlParser((AGCLScriptArguments, AGCLConfig, ModelConfig))
    args = parser.parse_args_and_config(
        [
            "--config",
            config,
            "--seed",
            str(seed),
            "--output_dir",
            output_dir,
            "--disable_tqdm",
            "true",
            *variant_flags,
            *extra,
        ]
    )
    timer = StepTimer()
    original = agcl_train.AGCLTrainer.__init__

    def with_timer(self, *a, **k):
        original(self, *a, **k)
        self.add_callback(timer)

    agcl_train.AGCLTrainer.__init__ = with_timer
    try:
        agcl_train.main(*args)
    finally:
        agcl_train.AGCLTrainer.__init__ = original
    results = json.loads((Path(output_dir) / "eval_results.json").read_text())
    return results, timer.times


def write_report(output: str, lines: list[str], summary: dict) -> None:
    """The markdown page, its numbers as JSON beside it, and the page on stdout."""
    text = "\n".join(lines) + "\n"
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(text, encoding="utf-8")
    Path(output).with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", default="docs/experiments/agcl_ablation.md")
    parser.add_argument("--work_dir", default="outputs/agcl-ablation")
    parser.add_argument("--config", default=DEMO_RECIPE, help="The agcl_train recipe every variant starts from.")
    args, extra = parser.parse_known_args(argv)

    table: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    step_times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for seed in args.seeds:
        for name, flags in VARIANTS.items():
            slug = name.replace(" ", "").replace("+", "plus").replace("(", "").replace(")", "")
            out = f"{args.work_dir}/seed{seed}-{slug}"
            results, times = run(flags, seed, extra, out, args.config)
            table[name].append(results["instance"])
            step_times[name] += times[1:]  # the first step pays for warm-up
            print(f"seed {seed} {name}: R@1 {100 * results['instance']['recall@1']:.1f}", flush=True)

    base = np.array([r["recall@1"] for r in table["InfoNCE"]])
    lines = [
        "# AGCL ablation" + ("" if any(a.startswith("--catalog") for a in extra) else " on the embedded catalog"),
        "",
        f"Made by `python -m experiments.agcl_ablation --seeds {' '.join(map(str, args.seeds))}"
        f"{'' if args.config == DEMO_RECIPE else ' --config ' + args.config}"
        f"{(' ' + ' '.join(extra)) if extra else ''}` on {platform.node() or 'this machine'} "
        f"({platform.machine()}, Python {platform.python_version()}); recipe `{args.config}`.",
        "",
        "Instance retrieval on the test split (held-out products), mean ± std over seeds; Δ R@1 is against InfoNCE "
        "with the same seed.",
        "",
        "| variant | Recall@1 | Recall@5 | Recall@10 | mAP@10 | Δ R@1 (pts) | step time / InfoNCE |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    base_time = np.median(step_times["InfoNCE"])
    for name, runs in table.items():
        cells = []
        for key in ("recall@1", "recall@5", "recall@10", "mAP@10"):
            vals = 100 * np.array([r[key] for r in runs])
            cells.append(f"{vals.mean():.1f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.1f}")
        delta = 100 * (np.array([r["recall@1"] for r in runs]) - base)
        ratio = np.median(step_times[name]) / base_time
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {delta.mean():+.1f} (min {delta.min():+.1f}) | {ratio:.2f} |"
        )
        summary[name] = {
            "runs": runs,
            "delta_recall@1": delta.tolist(),
            "median_step_s": float(np.median(step_times[name])),
        }
    lines += [
        "",
        "Step time: median wall time of an optimizer step (collation, two encoder passes, loss, backward,",
        "update), ratios measured in one process so that machine noise cancels.",
    ]
    write_report(args.output, lines, summary)


if __name__ == "__main__":
    main()
