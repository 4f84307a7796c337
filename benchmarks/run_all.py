"""Regenerate docs/results/ from scratch on the embedded catalog: every benchmark, one command.

    python -m benchmarks.run_all                 # about 60 minutes on 2 CPU cores (ladder 29, MOON ablation 21+)
    python -m benchmarks.run_all --quick         # every benchmark in its smoke-test mode; docs/ untouched
    python -m benchmarks.run_all --only memory   # rerun some; RESULTS.md is reassembled from docs/results/

Each benchmark is its own module in ``benchmarks/`` that also runs alone (``python -m benchmarks.NAME``) and
writes its own page in ``docs/results/`` (the command and machine at its top). This runner runs them in child
processes and then assembles ``docs/results/RESULTS.md`` from those pages, and the marked block of README.md from
``docs/results/ladder.json``, so that no figure is typed by hand and README cannot drift from RESULTS.md.

Order: the ablation ladder first (the longest; its seeds run two at a time, one thread each), then
the timing benchmarks one after another with nothing else running, since they compare times
measured within one run on shared cores.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "results"
WORK = ROOT / "outputs" / "run-all"
# Paths handed to the benchmarks are relative to the repository (their working directory), so that the
# commands they print in the docs hold on any clone.
REL_WORK = Path("outputs") / "run-all"
LADDER_ENCODER = REL_WORK / "ladder" / "seed0" / "agcl"  # the ladder's seed-0 AGCL encoder serves the timing runs

# name -> (section title, script + arguments, quick arguments, page it writes)
BENCHMARKS = {
    # The weighting-only / filtering-only encoders are left to agcl_ablation.py and a plain ladder.py run: at
    # about 4 minutes they would take run_all further past its budget on 2 cores.
    "ladder": (
        "The ablation ladder (3 seeds)",
        ["ladder.py", "--work_dir", str(REL_WORK / "ladder"), "--stage1_ablation", "false"],
        ["--seeds", "0", "--quick"],
        "ladder.md",
    ),
    "moon_ablation": (
        "MOON-family options of stage 1 (3 seeds)",
        ["moon_ablation.py", "--reuse", str(REL_WORK / "ladder"), "--work_dir", str(REL_WORK / "moon")],
        ["--seeds", "0", "--quick"],
        "moon_ablation.md",
    ),
    "catalog_difficulty": (
        "How hard the embedded catalog is",
        ["catalog_difficulty.py"],
        ["--seeds", "0", "--output", str(REL_WORK / "quick" / "catalog_difficulty.md")],
        "catalog_difficulty.md",
    ),
    "agcl_step_time": ("AGCL step time against InfoNCE", ["agcl_step_time.py"], ["--steps", "3"], "agcl_step_time.md"),
    "grpo_step_breakdown": (
        "Where a GRPO step goes: the demo's policy",
        ["grpo_step_breakdown.py", "--encoder", str(LADDER_ENCODER)],
        ["--quick"],
        "grpo_step_breakdown.md",
    ),
    "grpo_step_breakdown_larger": (
        "Where a GRPO step goes: a larger policy",
        [
            "grpo_step_breakdown.py",
            "--policy",
            "larger",
            "--steps",
            "6",
            "--encoder",
            str(LADDER_ENCODER),
            "--output",
            "docs/results/grpo_step_breakdown_larger.md",
        ],
        ["--quick"],
        "grpo_step_breakdown_larger.md",
    ),
    "reward_cost": (
        "The reward's cost: physical limit, gallery size and index type",
        ["reward_cost.py", "--hnsw_max_size", "100000"],
        ["--quick"],
        "reward_cost.md",
    ),
    "memory": ("Memory: LoRA vs QLoRA, and the real sizes", ["memory.py"], ["--quick"], "memory.md"),
}
# Pages of benchmarks that run_all does not rerun (too long for its budget, or made on other hardware); included
# when present. Research probes are not here: they live in experiments/ and docs/experiments/.
STANDALONE = {
    "index_scale": ("Deployment index at 100k and 1M vectors: flat, IVF, IVF-PQ", "index_scale.md"),
    "index_scale_clustered": ("Deployment index at 100k and 1M vectors, clustered data", "index_scale_clustered.md"),
    "match_scale": ("Match groups at 100k and 1M; Milvus Lite beside faiss", "match_scale.md"),
    "dual_encoder": ("Stage 1 over a dual encoder (CLIP) beside the MLLM encoder (3 seeds)", "dual_encoder.md"),
    "moon_guided_moe": ("MOON's guided experts beside the modality experts (3 seeds)", "moon_guided_moe.md"),
    "real_size": ("Real sizes: the published Qwen2-VL-2B / Qwen2.5-VL-3B / 7B shapes", "real_size.md"),
}
README_BEGIN, README_END = (
    "<!-- results:begin (python -m benchmarks.run_all writes this block) -->",
    "<!-- results:end -->",
)


def run_benchmark(name: str, quick: bool) -> float:
    _, argv, quick_argv, _ = BENCHMARKS[name]
    (WORK / "quick").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", f"benchmarks.{argv[0].removesuffix('.py')}", *argv[1:], *(quick_argv if quick else [])]
    if quick and name.startswith("grpo_step_breakdown"):
        cmd = [c for c in cmd if c not in ("--encoder", str(LADDER_ENCODER))]  # no ladder encoder in quick mode
    print(f"[run_all] {name}: {' '.join(cmd)}", flush=True)
    started = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    return time.time() - started


def demote(markdown: str) -> str:
    """A page's headings one level down, so that it nests under its RESULTS.md section."""
    return re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", markdown, flags=re.MULTILINE)


def assemble(seconds: dict) -> Path:
    lines = [
        "# Results",
        "",
        "Everything on this page is regenerated by `python -m benchmarks.run_all` (each section also by its own "
        "script, named at its top) from the embedded synthetic catalog and tiny models built from config: no "
        "figure is typed by hand. Timings were measured on shared CPU cores: compare ratios within one section, "
        "not absolute times across sections or machines.",
        "",
    ]
    if "_full_run" in seconds:
        full = seconds["_full_run"]
        lines += [f"Last full run: {full['seconds'] / 60:.1f} min on: {full['machine']}.", ""]
    sections = [(name, title, page) for name, (title, _, _, page) in BENCHMARKS.items()]
    sections += [(name, title, page) for name, (title, page) in STANDALONE.items()]
    present = [(name, title, page) for name, title, page in sections if (DOCS / page).is_file()]
    lines += ["| section | page | time in the last run_all |", "|---|---|---|"]
    for name, title, page in present:
        took = f"{seconds[name] / 60:.1f} min" if name in seconds else "not rerun by run_all"
        lines.append(f"| [{title}](#{anchor(title)}) | [{page}]({page}) | {took} |")
    for _, title, page in present:
        body = (DOCS / page).read_text(encoding="utf-8")
        body = re.sub(r"\A# [^\n]*\n", "", body)  # the page's own title gives way to the section title
        lines += ["", f"## {title}", "", demote(body).strip(), ""]
    out = DOCS / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def anchor(title: str) -> str:
    return re.sub(r"[^a-z0-9 -]", "", title.lower()).replace(" ", "-")


def update_readme() -> bool:
    """Replace README.md's marked block with the ladder's headline table (from docs/results/ladder.json)."""
    readme, data = ROOT / "README.md", DOCS / "ladder.json"
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or not data.is_file():
        return False
    from benchmarks.ladder import RUNGS, mean_std

    runs = list(json.loads(data.read_text(encoding="utf-8"))["seeds"].values())
    block = [
        README_BEGIN,
        "",
        f"Instance retrieval on the embedded catalog's held-out products, mean ± sample sd (ddof=1) over "
        f"{len(runs)} seeds, every listing annotated by the generator of its rung as in deployment (`python -m "
        "benchmarks.run_all`; the plain-gallery protocol and the rest in "
        "[docs/results/RESULTS.md](docs/results/RESULTS.md)):",
        "",
        "| rung | Recall@1 | Recall@5 | Recall@10 |",
        "|---|---|---|---|",
    ]
    for rung in RUNGS:
        cells = [
            f"{m:.1f} ± {s:.1f}"
            for m, s in (
                mean_std([r[rung] for r in runs], "instance", k) for k in ("recall@1", "recall@5", "recall@10")
            )
        ]
        block.append(f"| {rung} | " + " | ".join(cells) + " |")
    block += ["", README_END]
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + "\n".join(block) + text[end:], encoding="utf-8")
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Every benchmark's smoke test; docs/ untouched.")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="Run these only, then reassemble.")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="Keep the finished stages of the ladder and the MOON ablation in outputs/run-all "
        "(default: start from scratch).",
    )
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    started = time.time()
    machine = describe_machine()
    if not args.reuse and not args.quick:  # finished stages are reused by both: start them from scratch
        for name in ("ladder", "moon_ablation"):
            if name in names:
                shutil.rmtree(WORK / {"ladder": "ladder", "moon_ablation": "moon"}[name], ignore_errors=True)
    seconds_file = DOCS / "run_all_seconds.json"
    seconds = json.loads(seconds_file.read_text()) if seconds_file.is_file() and not args.quick else {}
    for name in names:
        seconds[name] = run_benchmark(name, args.quick)
    if args.quick:
        print(f"[run_all] quick run of {len(names)} benchmarks: {(time.time() - started) / 60:.1f} min")
        return
    if args.only is None:
        seconds["_full_run"] = {"seconds": time.time() - started, "machine": machine}
    seconds_file.write_text(json.dumps(seconds, indent=2) + "\n", encoding="utf-8")
    out = assemble(seconds)
    print(
        f"[run_all] wrote {out}"
        + (" and README.md's results block" if update_readme() else "")
        + f" in {(time.time() - started) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
