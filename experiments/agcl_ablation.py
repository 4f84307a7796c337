"""Stage-1 ablation: InfoNCE vs weighting only vs filtering only vs full AGCL, over seeds.

    python -m experiments.agcl_ablation                     # writes docs/experiments/agcl_ablation.md (+ .json)
    python -m experiments.agcl_ablation --seeds 0 --num_train_epochs 5   # a quick look
    python -m experiments.agcl_ablation --config recipes/configs/agcl_qwen2vl_2b.yaml \
        --catalog data/my_catalog --output docs/agcl_ablation_2b.md      # paper scale (GPU, weights)

Flags the script does not know go to `recipes/agcl_train.py` for every variant (`--catalog`,
`--num_train_epochs`, ...). ``--world paper`` trains seed s on ``embedded:paper:s``, as the ladder does.
``--variants InfoNCE "AGCL (both)"`` trains only those (the training-seed spread of the full loss on one catalog).

Resumable: each variant's figures are written beside its encoder as it finishes, and a rerun of the same
command reuses them, so seeds can run in separate processes (``--seeds 3`` and ``--seeds 4`` side by side,
each with ``OMP_NUM_THREADS=1``) and one last ``--seeds 3 4`` writes the page. The two halves run first, so a
run cut short still pairs with the full pair recorded elsewhere. Where the catalog stores the teacher's lines,
each encoder is also measured against a gallery carrying them (the reward's protocol, as the ladder reports).

Same encoder, catalog, steps and seed for every variant; only the loss options change. Reports
instance Recall@1/5/10 on the catalog's test split and the step-time ratio AGCL/InfoNCE
measured in the same process.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import time
from pathlib import Path

import numpy as np
from transformers import TrainerCallback
from trl import ModelConfig, TrlParser

from afmrl.embedded import WORLDS
from afmrl.retrieval.fingerprints import TRAINING_RECORD
from afmrl.stats import format_summary, summarize
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


# The order variants train in: the two halves first (the page keeps VARIANTS' order).
RUN_ORDER = ["+ weighting", "+ filtering", "InfoNCE", "AGCL (both)"]


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
    catalog = json.loads((Path(output_dir) / TRAINING_RECORD).read_text())["catalog"]  # as agcl_train resolved it
    teacher = teacher_gallery_results(output_dir, catalog)
    if teacher is not None:
        results["instance_teacher_gallery"] = teacher
    return results, timer.times


def teacher_gallery_results(encoder_dir: str, catalog: str) -> dict | None:
    """Instance retrieval of plain queries against a test gallery carrying the teacher's lines (None when the
    catalog stores none): the ladder's ``instance_teacher_gallery`` for a stage-1 rung."""
    from afmrl.attributes import format_attributes
    from afmrl.catalog.load import load_catalog
    from afmrl.encoder.model import ProductEncoder
    from afmrl.retrieval.evaluation import instance_retrieval

    test = load_catalog(catalog, split="test")
    if "attributes" not in test.column_names:
        return None
    teacher = [format_attributes(a) or None for a in test["attributes"]]
    encoder = ProductEncoder.from_pretrained(encoder_dir)
    return instance_retrieval(encoder, test, {"none": None}, gallery_attributes=teacher, show_progress=False)["none"]


def run_or_reuse(
    variant_flags: list[str], seed: int, extra: list[str], output_dir: str, config: str
) -> tuple[dict, list[float]]:
    """``run``, or the figures a finished run of the same variant (same flags, seed and recipe) left in
    ``output_dir``; another command's figures there are an error, never reused."""
    done = Path(output_dir) / "ablation_result.json"
    command = {"flags": variant_flags, "seed": seed, "extra": extra, "config": config}
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved.get("command", command) != command:
            raise SystemExit(
                f"error: {done} was written by another command ({saved['command']}, not {command}): "
                "use another --work_dir"
            )
        return saved["results"], saved["step_times"]
    results, times = run(variant_flags, seed, extra, output_dir, config)
    saved = {"command": command, "results": results, "step_times": times}
    done.write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
    return results, times


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
    parser.add_argument(
        "--world", default=None, help="A named world (afmrl.embedded.WORLDS): seed s trains on embedded:WORLD:s."
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="The variants to train (InfoNCE, the baseline, always among them): e.g. InfoNCE 'AGCL (both)' for the "
        "full loss against its baseline only.",
    )
    args, extra = parser.parse_known_args(argv)
    if "InfoNCE" not in args.variants:
        parser.error("--variants: every Δ is against InfoNCE, so it must be one of them")
    if args.world is not None and any(a.startswith("--catalog") for a in extra):
        parser.error("--world names the catalog of every seed: drop --catalog")
    if args.world is not None and args.world not in WORLDS:
        parser.error(f"--world {args.world!r}: not one of {', '.join(WORLDS)}")

    chosen = [name for name in VARIANTS if name in args.variants]  # the page keeps VARIANTS' order
    table: dict[str, list[dict]] = {name: [] for name in chosen}
    teacher: dict[str, list[dict]] = {name: [] for name in chosen}
    step_times: dict[str, list[float]] = {name: [] for name in chosen}
    for seed in args.seeds:
        seed_extra = [*extra, *(["--catalog", f"embedded:{args.world}:{seed}"] if args.world else [])]
        for name in (name for name in RUN_ORDER if name in chosen):
            slug = name.replace(" ", "").replace("+", "plus").replace("(", "").replace(")", "")
            out = f"{args.work_dir}/seed{seed}-{slug}"
            results, times = run_or_reuse(VARIANTS[name], seed, seed_extra, out, args.config)
            table[name].append(results["instance"])
            teacher[name].append(results.get("instance_teacher_gallery"))
            step_times[name] += times[1:]  # the first step pays for warm-up
            print(f"seed {seed} {name}: R@1 {100 * results['instance']['recall@1']:.1f}", flush=True)

    base = np.array([r["recall@1"] for r in table["InfoNCE"]])
    lines = [
        "# AGCL ablation"
        + (
            f" on the embedded world `{args.world}`"
            if args.world
            else ""
            if any(a.startswith("--catalog") for a in extra)
            else " on the embedded catalog"
        ),
        "",
        f"Made by `python -m experiments.agcl_ablation --seeds {' '.join(map(str, args.seeds))}"
        f"{'' if args.config == DEMO_RECIPE else ' --config ' + args.config}"
        f"{'' if args.world is None else ' --world ' + args.world}"
        f"{'' if chosen == list(VARIANTS) else ' --variants ' + ' '.join(shlex.quote(n) for n in chosen)}"
        f"{(' ' + ' '.join(extra)) if extra else ''}` on {platform.node() or 'this machine'} "
        f"({platform.machine()}, Python {platform.python_version()}); recipe `{args.config}`.",
        "",
        "Instance retrieval on the test split (held-out products), mean ± sd (ddof = 1) over seeds; Δ R@1 is "
        "against InfoNCE with the same seed, per seed, then mean ± sd (95% CI, n).",
        "",
        "| variant | Recall@1 | Recall@5 | Recall@10 | mAP@10 | Δ R@1 (pts) per seed | Δ R@1 (pts) | "
        "step time / InfoNCE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    base_time = np.median(step_times["InfoNCE"])
    for name, runs in table.items():
        cells = []
        for key in ("recall@1", "recall@5", "recall@10", "mAP@10"):
            vals = 100 * np.array([r[key] for r in runs])
            cells.append(f"{vals.mean():.1f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.1f}")
        delta = 100 * (np.array([r["recall@1"] for r in runs]) - base)
        per_seed = " / ".join(f"{d:+.1f}" for d in delta)
        ratio = np.median(step_times[name]) / base_time if step_times[name] and step_times["InfoNCE"] else np.nan
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {per_seed} | {format_summary(summarize(delta))} | {ratio:.2f} |"
        )
        summary[name] = {
            "seeds": args.seeds,
            "runs": runs,
            "delta_recall@1": delta.tolist(),
            "median_step_s": float(np.median(step_times[name])) if step_times[name] else None,
        }
    if all(r is not None for runs in teacher.values() for r in runs):
        lines += [
            "",
            "Against a test gallery carrying the teacher's lines (queries plain: the reward's protocol, as the "
            "ladder reports it beside), Δ R@1 against InfoNCE:",
            "",
            "| variant | Recall@1 | Δ R@1 (pts) per seed | Δ R@1 (pts) |",
            "|---|---|---|---|",
        ]
        teacher_base = np.array([r["recall@1"] for r in teacher["InfoNCE"]])
        for name, runs in teacher.items():
            vals = 100 * np.array([r["recall@1"] for r in runs])
            delta = vals - 100 * teacher_base
            lines.append(
                f"| {name} | {vals.mean():.1f} ± {vals.std(ddof=1) if len(vals) > 1 else 0:.1f} | "
                + " / ".join(f"{d:+.1f}" for d in delta)
                + f" | {format_summary(summarize(delta))} |"
            )
            summary[name]["teacher_gallery_runs"] = runs
            summary[name]["teacher_gallery_delta_recall@1"] = delta.tolist()
    lines += [
        "",
        "Step time: median wall time of an optimizer step (collation, two encoder passes, loss, backward,",
        "update), ratios measured in one process so that machine noise cancels.",
    ]
    write_report(args.output, lines, summary)


if __name__ == "__main__":
    main()
