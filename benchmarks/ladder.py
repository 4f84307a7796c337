"""The paper's ablation ladder on the embedded catalog, over seeds: InfoNCE -> + AGCL -> + SFT attributes ->
+ RAR attributes -> + one CIT round. Also the stage-1 ablation (weighting only, filtering only) from the same runs.

    python -m benchmarks.ladder                    # seeds 0 1 2, two at a time; writes docs/results/ladder.md (+ .json)
    python -m benchmarks.ladder --seeds 0 --quick      # smoke test: a few steps per stage, nothing written
    python -m benchmarks.ladder --world paper --seeds 0 1 2 3 4 --stage1_config recipes/configs/agcl_paper_world.yaml \
        --rar_config RAR.yaml --work_dir outputs/ladder-paper --output docs/results/ladder_paper.md   # the fair test
    python -m benchmarks.ladder --report_from docs/results/ladder_paper.json outputs/s34.json --world paper \
        --stage1_ablation false --output docs/results/ladder_paper.md   # merge sessions' seeds (no training)

Per seed, every stage is one of the recipes, run as a child process exactly as a user runs it, with
``--seed`` set (so the seed moves stage 1's pair draws, the SFT shuffling, GRPO's sampling and CIT):

1. ``agcl_train.py`` four times on the training split of the demo catalog
   (``recipes/configs/agcl_demo.yaml``; the catalog of ``rar_demo.yaml``, 30% of the train families
   held out as ``val`` for RL): InfoNCE, + hard-negative weighting, + false-negative filtering,
   AGCL (both);
2. ``rar_grpo.py --config recipes/configs/rar_demo.yaml`` over the AGCL encoder: SFT warm start on the
   teacher's attributes, GRPO with the retrieval-rank reward on ``val``, greedy SFT and RAR
   attributes for the test split (``attributes.jsonl``);
3. ``cit.py --fraction 0.3``: the RAR generator re-annotates 30% of the training products and AGCL
   continues on them (the paper's one round on about 30% of the data).

Every rung is then evaluated on the test split (held-out products) with the same code
(``afmrl.retrieval.evaluation.evaluate_encoder``): instance Recall@1/5/10, coarse mAP@1, image->text and
text->image Recall@1. Attributes (SFT or RAR, greedy) change the instance task under two protocols: in
the headline (deployment) the generator under test annotates every listing, queries and gallery alike; the
second table annotates the queries only, against an image + title gallery.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afmrl.stats import format_summary, summarize, verdict
from benchmarks._machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
STAGE1 = {
    "InfoNCE": ["--hard_negative_weighting", "false", "--false_negative_filter", "none"],
    "+ weighting": ["--hard_negative_weighting", "true", "--false_negative_filter", "none"],
    "+ filtering": ["--hard_negative_weighting", "false", "--false_negative_filter", "attribute"],
    "AGCL": ["--hard_negative_weighting", "true", "--false_negative_filter", "attribute"],
}
RUNGS = ["InfoNCE encoder", "+ AGCL", "+ SFT (distilled) attributes", "+ RAR attributes", "+ one CIT round"]
# The paper's ladder on M5Product, instance Recall@1 (AFMRL, ACL 2026, its ablation); no CIT rung there.
PAPER_R1 = {"InfoNCE encoder": 48.05, "+ AGCL": 51.06, "+ SFT (distilled) attributes": 52.42, "+ RAR attributes": 54.28}
METRICS = [
    ("instance", "recall@1", "instance R@1"),
    ("instance", "recall@5", "R@5"),
    ("instance", "recall@10", "R@10"),
    ("coarse", "mAP@1", "coarse mAP@1"),
    ("image_to_text", "recall@1", "image→text R@1"),
    ("text_to_image", "recall@1", "text→image R@1"),
]
CONFIRMATORY_SEEDS = 5  # the fewest seeds a verdict of the fair test rests on (docs/experiments/fair_test_plan.md)
GAIN_LABELS = {  # each rung's gain over the one below, as the README's status table names it
    "+ AGCL": "AGCL − InfoNCE",
    "+ SFT (distilled) attributes": "SFT attributes − none",
    "+ RAR attributes": "RAR − SFT",
    "+ one CIT round": "CIT − RAR",
}
TASKS = ("instance", "coarse", "image_to_text", "text_to_image")


def slug(name: str) -> str:
    return name.replace("+ ", "plus-").replace(" ", "-").lower()


@dataclass
class Task:
    """One child process of the ladder; ``done`` is the file it leaves when it has finished."""

    name: str
    cmd: list[str]
    done: Path
    deps: tuple[str, ...] = ()


def quick_sft_config(work: Path) -> str:
    import yaml

    data = yaml.safe_load((ROOT / "recipes/configs/sft_demo.yaml").read_text())
    data.update(num_train_epochs=1, max_train_listings=32)
    path = work / "sft_quick.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def seed_tasks(
    seed: int,
    work: Path,
    catalog: str,
    quick: bool,
    stage1_ablation: bool = True,
    stage1_config: str = "recipes/configs/agcl_demo.yaml",
    rar_config: str = "recipes/configs/rar_demo.yaml",
    rar_catalog: bool = False,
) -> dict[str, list[Task]]:
    """The stages of one seed, as recipe commands: the critical chain (AGCL -> RAR -> CIT), the other
    stage-1 variants (InfoNCE; with ``stage1_ablation`` also weighting only and filtering only), and
    the evaluation of every rung. ``rar_catalog``: hand ``catalog`` to RAR too (a world's catalog, whose seed moves
    with the run's; the demo's RAR config names its own)."""
    work.mkdir(parents=True, exist_ok=True)
    py, recipes = sys.executable, ROOT / "recipes"
    stage1 = {}
    for name, flags in STAGE1.items():
        if not stage1_ablation and name not in ("InfoNCE", "AGCL"):
            continue
        out = work / slug(name)
        stage1[name] = Task(
            f"seed{seed}/{slug(name)}",
            [
                py,
                str(recipes / "agcl_train.py"),
                "--config",
                stage1_config,
                "--catalog",
                catalog,
                "--output_dir",
                str(out),
                "--eval_split",
                "none",
                "--seed",
                str(seed),
                "--disable_tqdm",
                "true",
                *flags,
                *(["--num_train_epochs", "1"] if quick else []),
            ],
            out / "encoder_config.json",
        )
    agcl, rar, cit = work / "agcl", work / "rar", work / "cit"
    rar_task = Task(
        f"seed{seed}/rar",
        [
            py,
            str(recipes / "rar_grpo.py"),
            "--config",
            rar_config,
            *(["--catalog", catalog] if rar_catalog else []),
            "--encoder",
            str(agcl),
            "--output_dir",
            str(rar),
            "--seed",
            str(seed),
            "--disable_tqdm",
            "true",
            *(["--max_steps", "4", "--sft_recipe", quick_sft_config(work)] if quick else []),
        ],
        rar / "metrics.json",
        (stage1["AGCL"].name,),
    )
    cit_task = Task(
        f"seed{seed}/cit",
        [
            py,
            str(recipes / "cit.py"),
            "--generator",
            str(rar),
            "--encoder",
            str(agcl),
            "--output_dir",
            str(cit),
            "--seed",
            str(seed),
            "--fraction",
            "0.3",
            "--agcl_config",
            stage1_config,
            *(["--catalog", catalog] if rar_catalog else []),
            *(["--epochs", "1"] if quick else []),
        ],
        cit / "cit_metrics.json",
        (rar_task.name,),
    )
    others = [t for n, t in stage1.items() if n != "AGCL"]
    evaluate = Task(
        f"seed{seed}/evaluate",
        [py, "-m", "benchmarks.ladder", "--_evaluate", str(work), catalog],
        work / "ladder.json",
        (cit_task.name, *(t.name for t in others)),
    )
    return {"chain": [stage1["AGCL"], rar_task, cit_task], "others": others, "evaluate": [evaluate]}


def schedule(tasks: list[Task], jobs: int, log_dir: Path, started: float, label: str = "ladder"):
    """Run ``tasks`` as child processes, ``jobs`` at a time, each once its dependencies are done; the first
    ready task in list order starts first. Finished tasks (their ``done`` file exists, at the start or by the time
    they would start) are skipped."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two single-threaded processes beat one two-threaded on 2 cores
    done = {t.name for t in tasks if t.done.is_file()}
    pending = [t for t in tasks if t.name not in done]
    running: dict[str, tuple[Task, subprocess.Popen, float]] = {}
    while pending or running:
        for task in [t for t in pending if t.done.is_file()]:  # finished meanwhile by a run of its own
            pending.remove(task)
            done.add(task.name)
        for task in [t for t in pending if all(d in done for d in t.deps)][: jobs - len(running)]:
            pending.remove(task)
            log = log_dir / f"{task.name.replace('/', '-')}.log"
            with log.open("w", encoding="utf-8") as f:
                f.write("$ " + " ".join(task.cmd) + "\n")
                f.flush()
                running[task.name] = (
                    task,
                    subprocess.Popen(task.cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT),
                    time.time(),
                )
        if not running and not pending:
            break
        if not running:
            raise RuntimeError(f"tasks whose dependencies can never finish: {[t.name for t in pending]}")
        time.sleep(0.5)
        for name, (task, proc, began) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0 or not task.done.is_file():
                for _, other, _ in running.values():
                    other.kill()
                raise RuntimeError(
                    f"{name} failed (exit {proc.returncode}); see {log_dir / name.replace('/', '-')}.log"
                )
            done.add(name)
            print(
                f"[{label}] {name} done in {(time.time() - began) / 60:.1f} min ({(time.time() - started) / 60:.1f} "
                "min in all)",
                flush=True,
            )


def evaluate_seed(work: Path, catalog: str) -> dict:
    """Every rung of one seed on the test split. ``instance`` is the deployment protocol (the generator under
    test annotates every listing, queries and gallery alike); ``instance_plain_gallery`` beside it annotates the
    queries only, against the plain image + title gallery (not the demo's reward gallery, which the SFT policy
    annotates)."""
    from afmrl.attributes import canonical_attributes, format_attributes
    from afmrl.catalog.load import load_catalog
    from afmrl.encoder.model import ProductEncoder
    from afmrl.retrieval.evaluation import evaluate_encoder, instance_retrieval

    test = load_catalog(catalog, split="test")
    lines = (work / "rar" / "attributes.jsonl").read_text(encoding="utf-8").splitlines()
    rows = {row["listing_id"]: row for row in map(json.loads, lines)}
    # Parsed and re-written canonically, as rar_grpo's own evaluation does.
    attributes = {
        key: canonical_attributes([rows[lid][key] or "" for lid in test["listing_id"]])
        for key in ("sft_attributes", "rar_attributes")
    }

    def both_sides(encoder, texts):
        return instance_retrieval(encoder, test, {"a": texts}, gallery_attributes=texts, show_progress=False)["a"]

    results = {}
    for name in [n for n in STAGE1 if (work / slug(n) / "encoder_config.json").is_file()]:
        results[name] = evaluate_encoder(
            ProductEncoder.from_pretrained(work / slug(name)), test, tasks=TASKS, show_progress=False
        )
        results[name]["instance_plain_gallery"] = results[name]["instance"]  # no attributes: one protocol
    results["InfoNCE encoder"], results["+ AGCL"] = results["InfoNCE"], results["AGCL"]
    # Attributes change only the instance task: the AGCL encoder's other tasks are shared.
    agcl = ProductEncoder.from_pretrained(work / slug("AGCL"))
    query_only = instance_retrieval(agcl, test, attributes, show_progress=False)
    for rung, key in (("+ SFT (distilled) attributes", "sft_attributes"), ("+ RAR attributes", "rar_attributes")):
        results[rung] = {
            **results["AGCL"],
            "instance": both_sides(agcl, attributes[key]),
            "instance_plain_gallery": query_only[key],
        }
    cit = ProductEncoder.from_pretrained(work / "cit" / "encoder")
    results["+ one CIT round"] = evaluate_encoder(
        cit, test, tasks=TASKS, show_progress=False, query_attributes=attributes["rar_attributes"]
    )
    results["+ one CIT round"]["instance_plain_gallery"] = results["+ one CIT round"]["instance"]
    results["+ one CIT round"]["instance"] = both_sides(cit, attributes["rar_attributes"])
    # The reward's protocol: queries as the rung writes them, against a gallery carrying the teacher's lines.
    if "attributes" in test.column_names:
        teacher = [format_attributes(a) or None for a in test["attributes"]]

        def teacher_gallery(encoder, sources: dict) -> dict:
            return instance_retrieval(encoder, test, sources, gallery_attributes=teacher, show_progress=False)

        lines = {key: attributes[key] for key in ("sft_attributes", "rar_attributes")}
        for name in [n for n in STAGE1 if n in results]:  # one gallery encoding per encoder: AGCL's serves its lines
            encoder = agcl if name == "AGCL" else ProductEncoder.from_pretrained(work / slug(name))
            measured = teacher_gallery(encoder, {"none": None, **(lines if name == "AGCL" else {})})
            rung = {"InfoNCE": "InfoNCE encoder", "AGCL": "+ AGCL"}.get(name)
            for key in (name, rung) if rung else (name,):
                results[key] = {**results[key], "instance_teacher_gallery": measured["none"]}
            if name == "AGCL":
                lined = measured
        for rung, key in (("+ SFT (distilled) attributes", "sft_attributes"), ("+ RAR attributes", "rar_attributes")):
            results[rung]["instance_teacher_gallery"] = lined[key]
        cit_lined = teacher_gallery(cit, {"rar": attributes["rar_attributes"]})["rar"]
        results["+ one CIT round"]["instance_teacher_gallery"] = cit_lined
    (work / "ladder.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


# ----------------------------------------------------------------------------- report


def mean_std(runs: list[dict], task: str, metric: str) -> tuple[float, float]:
    """Mean and sample sd (ddof=1; 0 for one seed) over seeds, in percent."""
    values = 100 * np.array([r[task][metric] for r in runs])
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def paired(values: np.ndarray) -> str:
    """A rung's gain over the previous one: the mean of the per-seed paired differences with its 95% t-interval."""
    return format_summary(summarize(values))


def plot(path: Path, per_seed: dict[int, dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = list(per_seed.values())
    means, stds = zip(*(mean_std([r[rung] for r in runs], "instance", "recall@1") for rung in RUNGS), strict=True)
    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(len(RUNGS))
    ax.bar(x - 0.2, means, 0.4, yerr=stds, capsize=4, label=f"embedded catalog ({len(runs)} seeds, mean ± sd)")
    paper = [PAPER_R1.get(rung, np.nan) for rung in RUNGS]
    ax.bar(x + 0.2, paper, 0.4, label="paper, M5Product", color="0.7")
    ax.set_xticks(x, [r.replace(" (distilled)", "") for r in RUNGS], rotation=12)
    ax.set_ylabel("instance Recall@1 (%)")
    ax.set_title("The ablation ladder: compare the shape, not the values")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reproduction_status(runs: list[dict]) -> list[str]:
    """The page's first table: each rung's paired R@1 gain over the rung below (both sides, the headline protocol)
    beside the paper's, and ``afmrl.stats.verdict``."""
    sizes = sorted({r["InfoNCE encoder"]["instance"].get("n_queries", 0) for r in runs})
    listings = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]} to {sizes[-1]}"
    lines = [
        f"**Reproduction status** (instance R@1, both sides; {len(runs)} seed(s), {listings} test listings per seed; "
        "the rule, fixed before the runs: `afmrl.stats.verdict`):",
        "",
        "| rung | paper Δ | ours: mean ± sd (95% CI, n) | verdict |",
        "|---|---|---|---|",
    ]
    # the confirmatory ladder's seeds are at least five (the fair test's plan): fewer give an interim reading
    interim = f" (interim: n = {len(runs)} < {CONFIRMATORY_SEEDS})" if 1 < len(runs) < CONFIRMATORY_SEEDS else ""
    for below, rung in zip(RUNGS, RUNGS[1:], strict=False):
        gains = [100 * (r[rung]["instance"]["recall@1"] - r[below]["instance"]["recall@1"]) for r in runs]
        paper = PAPER_R1[rung] - PAPER_R1[below] if rung in PAPER_R1 and below in PAPER_R1 else None
        summary = summarize(gains)
        lines.append(
            f"| {GAIN_LABELS[rung]} | {'—' if paper is None else f'{paper:+.1f}'} | "
            f"{format_summary(summary)} | {verdict(summary, paper)}{interim} |"
        )
    return lines


def write_report(
    out: Path, per_seed: dict[int, dict], machine: str, seconds: float, jobs: int, extra_flags: str = "", note: str = ""
):
    seeds = sorted(per_seed, key=int)
    runs = [per_seed[s] for s in seeds]
    lines = [
        "# The ablation ladder on the embedded catalog",
        "",
        f"Generated by `python -m benchmarks.ladder --seeds {' '.join(map(str, seeds))} --jobs {jobs}{extra_flags}` in "
        f"{seconds / 60:.1f} min on: {machine}{note}.",
        "Protocol: the module docstring of `benchmarks/ladder.py`. Test split (held-out products), percent, "
        f"mean ± sample sd (ddof=1) over seeds {', '.join(map(str, seeds))}, "
        f"{runs[0]['InfoNCE encoder']['instance'].get('n_queries', '?')} test listings. Δ: the mean of the per-seed "
        "paired differences against the previous rung, ± their sample sd, with the 95% t-interval. The paper's column "
        "is its M5Product ladder (instance R@1): compare the shape, not the values.",
        "",
        *reproduction_status(runs),
        "",
        "| rung | " + " | ".join(label for _, _, label in METRICS) + " | paper R@1 | Δ R@1 vs previous rung |",
        "|---|" + "---|" * (len(METRICS) + 2),
    ]
    previous = None
    for rung in RUNGS:
        cells = [f"{m:.1f} ± {s:.1f}" for m, s in (mean_std([r[rung] for r in runs], t, k) for t, k, _ in METRICS)]
        r1 = np.array([r[rung]["instance"]["recall@1"] for r in runs]) * 100
        delta = "" if previous is None else paired(r1 - previous)
        paper = f"{PAPER_R1[rung]:.2f}" if rung in PAPER_R1 else "—"
        lines.append(f"| {rung} | " + " | ".join(cells) + f" | {paper} | {delta} |")
        previous = r1
    protocols = ["instance", "instance_plain_gallery"]
    teacher = all("instance_teacher_gallery" in r[rung] for r in runs for rung in RUNGS)
    protocols += ["instance_teacher_gallery"] if teacher else []
    lines += [
        "",
        "Instance retrieval under each protocol (R@1; Δ vs the previous rung, paired over seeds as above): "
        "*both sides* is the table above (every listing annotated by the generator under test, as deployed), "
        "*plain gallery* annotates the queries only and leaves the gallery image + title"
        + (
            "; *teacher gallery* annotates the queries as the rung does (none for the first two) against the "
            "teacher's stored lines (the RL reward's protocol, and what a stage 1 trained with a line on every "
            "candidate was trained for)."
            if teacher
            else "."
        ),
        "",
        "| rung | both sides R@1 | Δ | plain gallery R@1 | Δ |" + (" teacher gallery R@1 | Δ |" if teacher else ""),
        "|---|---|---|---|---|" + ("---|---|" if teacher else ""),
    ]
    previous = {}
    for rung in RUNGS:
        cells = []
        for task in protocols:
            r1 = np.array([r[rung][task]["recall@1"] for r in runs]) * 100
            delta = "" if task not in previous else paired(r1 - previous[task])
            cells += [f"{r1.mean():.1f} ± {r1.std(ddof=1) if len(r1) > 1 else 0:.1f}", delta]
            previous[task] = r1
        lines.append(f"| {rung} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"![ladder]({out.with_suffix('.png').name})",
        "",
        "## Stage 1 alone: which part of AGCL helps",
        "",
        "Same runs (the InfoNCE and AGCL encoders are the ladder's first two rungs); instance retrieval, "
        "no attributes on the queries; Δ against InfoNCE with the same seed.",
        "",
        "| variant | R@1 | R@5 | R@10 | mAP@10 | Δ R@1 (pts) |",
        "|---|---|---|---|---|---|",
    ]
    base = np.array([r["InfoNCE"]["instance"]["recall@1"] for r in runs]) * 100
    variants = [n for n in STAGE1 if all(n in r for r in runs)]
    for name in variants:
        cells = [
            f"{m:.1f} ± {s:.1f}"
            for m, s in (
                mean_std([r[name] for r in runs], "instance", k)
                for k in ("recall@1", "recall@5", "recall@10", "mAP@10")
            )
        ]
        delta = np.array([r[name]["instance"]["recall@1"] for r in runs]) * 100 - base
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {paired(delta)} |")
    if len(variants) < len(STAGE1):
        lines += [
            "",
            "Weighting only and filtering only were not run here (`--stage1_ablation false`): "
            "`python -m benchmarks.ladder` runs them, and `experiments/agcl_ablation.py` on the default catalog.",
        ]
    lines += ["", "Per seed, instance R@1:", "", "| seed | " + " | ".join(RUNGS) + " |", "|---|" + "---|" * len(RUNGS)]
    for s in seeds:
        lines.append(
            f"| {s} | " + " | ".join(f"{100 * per_seed[s][r]['instance']['recall@1']:.1f}" for r in RUNGS) + " |"
        )
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(out.with_suffix(".png"), per_seed)  # beside its page: ladder.md -> ladder.png, ladder_paper.md -> ...


def world_flags(args) -> str:
    """The command-line flags that chose a world and its configs (empty for the demo's ladder)."""
    flags = [("--world", args.world, None), ("--stage1_config", args.stage1_config, "recipes/configs/agcl_demo.yaml"),
             ("--rar_config", args.rar_config, "recipes/configs/rar_demo.yaml")]  # fmt: skip
    return "".join(f" {flag} {value}" for flag, value, default in flags if value != default)


def check_local_models(config: str) -> None:
    """Exit with an error line (code 2) when ``config`` is missing or names a model under a local path that does
    not exist (a world's generator base is built by a command of its own, named in the config's comment), before
    any stage runs. Hub ids and the shipped tiny models' names are left to the recipes."""
    import yaml

    path = Path(config) if Path(config).is_file() else ROOT / config
    if not path.is_file():
        print(f"error: {config} does not exist", file=sys.stderr)
        sys.exit(2)
    for key, value in (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).items():
        if not key.endswith("model_name_or_path") or not isinstance(value, str) or not value:
            continue
        local = value.startswith((".", "/", "~", "outputs/")) or value.count("/") > 1
        if local and not (Path(value).expanduser().exists() or (ROOT / value).exists()):
            print(
                f"error: {config}: {key} {value} does not exist; build it first (the config's header says how)",
                file=sys.stderr,
            )
            sys.exit(2)


def merge_saved(paths: list[str]) -> dict:
    """One summary from the ladder.json files of several invocations: their seeds side by side (a seed in two files
    is an error line and exit 2), their seconds summed, their machines named once each."""
    merged = {"seeds": {}, "machine": [], "seconds": 0.0}
    for path in paths:
        if not Path(path).is_file():
            print(f"error: --report_from {path} does not exist", file=sys.stderr)
            sys.exit(2)
        saved = json.loads(Path(path).read_text(encoding="utf-8"))
        for seed, rungs in saved["seeds"].items():
            if str(seed) in merged["seeds"]:
                print(f"error: --report_from: seed {seed} is in two files (the second is {path})", file=sys.stderr)
                sys.exit(2)
            merged["seeds"][str(seed)] = rungs
        merged["seconds"] += saved["seconds"]
        if saved["machine"] not in merged["machine"]:
            merged["machine"].append(saved["machine"])
    merged["seeds"] = dict(sorted(merged["seeds"].items(), key=lambda item: int(item[0])))
    merged["machine"] = "; ".join(merged["machine"])
    return merged


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="Child processes at once, each on one thread.")
    parser.add_argument(
        "--work_dir",
        default=str(ROOT / "outputs" / "ladder"),
        help="Stages already finished there are reused (delete it to start over).",
    )
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "ladder.md"))
    parser.add_argument("--quick", action="store_true", help="A few steps per stage; nothing written to docs/.")
    parser.add_argument(
        "--stage1_ablation",
        default="true",
        choices=["true", "false"],
        help="Also train the weighting-only and filtering-only encoders (the stage-1 ablation).",
    )
    parser.add_argument(
        "--report_from",
        nargs="+",
        default=None,
        metavar="LADDER_JSON",
        help="Rewrite the page from ladder.json files this script saved (no training): their runs, today's "
        "statistics. Several files (say seeds 0-2 from one session, 3-4 from the next) are merged, a seed in two "
        "of them is an error, and the merged JSON is written beside --output.",
    )
    parser.add_argument(
        "--world",
        default=None,
        help="A named world of the embedded catalog (afmrl.embedded.WORLDS, e.g. paper): seed s runs on "
        "embedded:WORLD:s, so the catalog seed moves with the run seed. Default: the demo's catalog for every seed.",
    )
    parser.add_argument("--stage1_config", default="recipes/configs/agcl_demo.yaml", help="Stage 1's YAML.")
    parser.add_argument("--rar_config", default="recipes/configs/rar_demo.yaml", help="Stage 2's YAML.")
    parser.add_argument("--_evaluate", nargs=2, metavar=("SEED_DIR", "CATALOG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._evaluate:
        evaluate_seed(Path(args._evaluate[0]), args._evaluate[1])
        return None
    if args.report_from:
        saved = merge_saved(args.report_from)
        for rungs in saved["seeds"].values():  # before 2026-12-06 the plain-gallery protocol was "instance_query_only"
            for metrics in rungs.values():
                if "instance_query_only" in metrics:
                    metrics["instance_plain_gallery"] = metrics.pop("instance_query_only")
        flags = ("" if args.stage1_ablation == "true" else " --stage1_ablation false") + world_flags(args)
        write_report(
            Path(args.output),
            saved["seeds"],
            saved["machine"],
            saved["seconds"],
            args.jobs,
            flags,
            f" (page rewritten from `{' '.join(args.report_from)}` by `python -m benchmarks.ladder --report_from`)",
        )
        if len(args.report_from) > 1:
            Path(args.output).with_suffix(".json").write_text(json.dumps(saved, indent=2) + "\n", encoding="utf-8")
        return saved  # fmt: skip

    from afmrl.embedded import resolve_catalog

    for config in (args.stage1_config, args.rar_config):
        check_local_models(config)  # in seconds, not after stage 1's half hour
    started = time.time()
    machine = describe_machine()
    work = Path(tempfile.mkdtemp(prefix="ladder-quick-")) if args.quick else Path(args.work_dir)
    demo = str(resolve_catalog("embedded", "outputs/embedded", val_fraction=0.3))  # the catalog of rar_demo.yaml
    catalogs = {s: resolve_catalog(f"embedded:{args.world}:{s}", "outputs/embedded") if args.world else demo
                for s in args.seeds}  # fmt: skip
    per_seed = {
        s: seed_tasks(s, work / f"seed{s}", catalogs[s], args.quick, args.stage1_ablation == "true",
                      args.stage1_config, args.rar_config, rar_catalog=bool(args.world))
        for s in args.seeds
    }  # fmt: skip
    # Longest chains first, then the independent stage-1 variants, then the evaluations.
    order = [t for i in range(3) for s in args.seeds for t in per_seed[s]["chain"][i : i + 1]]
    order += [t for s in args.seeds for t in per_seed[s]["others"]] + [
        t for s in args.seeds for t in per_seed[s]["evaluate"]
    ]
    (work / "logs").mkdir(parents=True, exist_ok=True)
    schedule(order, args.jobs, work / "logs", started)
    results = {s: json.loads((work / f"seed{s}" / "ladder.json").read_text()) for s in args.seeds}
    summary = {"seeds": results, "machine": machine, "seconds": time.time() - started}
    if args.quick:
        print(json.dumps({s: {r: v[r]["instance"]["recall@1"] for r in RUNGS} for s, v in results.items()}, indent=1))
        return summary
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(
        out,
        results,
        machine,
        time.time() - started,
        args.jobs,
        ("" if args.stage1_ablation == "true" else " --stage1_ablation false") + world_flags(args),
    )
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(out.read_text())
    return summary


if __name__ == "__main__":
    main()
