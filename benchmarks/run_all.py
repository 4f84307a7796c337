"""Regenerate docs/RESULTS.md and its plots from scratch on the embedded catalog: every benchmark, one command.

    python benchmarks/run_all.py                 # about 60 minutes on 2 CPU cores (ladder 29, MOON ablation 21+)
    python benchmarks/run_all.py --quick         # every benchmark in its smoke-test mode; docs/ untouched
    python benchmarks/run_all.py --only memory   # rerun some; RESULTS.md is reassembled from all of docs/

Each benchmark is its own script in ``benchmarks/`` that also runs alone and writes its own page in
``docs/`` (the command and machine at its top). This runner runs them in child processes and then
assembles ``docs/RESULTS.md`` from those pages, and the marked block of README.md from
``docs/ladder.json``, so that no figure is typed by hand and README cannot drift from RESULTS.md.

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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe_machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
WORK = ROOT / "outputs" / "run-all"
# Paths handed to the benchmarks are relative to the repository (their working directory), so that the
# commands they print in the docs hold on any clone.
REL_WORK = Path("outputs") / "run-all"
LADDER_ENCODER = REL_WORK / "ladder" / "seed0" / "agcl"  # the ladder's seed-0 AGCL encoder serves the timing runs

# name -> (section title, script + arguments, quick arguments, page it writes)
BENCHMARKS = {
    # The weighting-only / filtering-only encoders are left to agcl_ablation.py and a plain ladder.py run: at
    # about 4 minutes they would take run_all further past its budget on 2 cores.
    "ladder": ("The ablation ladder (3 seeds)",
               ["ladder.py", "--work_dir", str(REL_WORK / "ladder"), "--stage1_ablation", "false"],
               ["--seeds", "0", "--quick"], "ladder.md"),
    "moon_ablation": ("MOON-family options of stage 1 (3 seeds)",
                      ["moon_ablation.py", "--reuse", str(REL_WORK / "ladder"), "--work_dir", str(REL_WORK / "moon")],
                      ["--seeds", "0", "--quick"], "moon_ablation.md"),
    "catalog_difficulty": ("How hard the embedded catalog is", ["catalog_difficulty.py"],
                           ["--seeds", "0", "--output", str(REL_WORK / "quick" / "catalog_difficulty.md")],
                           "catalog_difficulty.md"),
    "agcl_step_time": ("AGCL step time against InfoNCE", ["agcl_step_time.py"], ["--steps", "3"], "agcl_step_time.md"),
    "grpo_step_breakdown": ("Where a GRPO step goes: the demo's policy",
                            ["grpo_step_breakdown.py", "--encoder", str(LADDER_ENCODER)], ["--quick"],
                            "grpo_step_breakdown.md"),
    "grpo_step_breakdown_larger": ("Where a GRPO step goes: a larger policy",
                                   ["grpo_step_breakdown.py", "--policy", "larger", "--steps", "6", "--encoder", str(LADDER_ENCODER),
                                    "--output", "docs/grpo_step_breakdown_larger.md"], ["--quick"],
                                   "grpo_step_breakdown_larger.md"),
    "reward_cost": ("The reward's cost: physical limit, gallery size and index type",
                    ["reward_cost.py", "--hnsw_max_size", "100000"], ["--quick"],
                    "reward_cost.md"),
    "memory": ("Memory: LoRA vs QLoRA, and the real sizes", ["memory.py"], ["--quick"], "memory.md"),
}
# Pages written by benchmarks that run_all does not rerun (too long for its budget); included when present.
STANDALONE = {"agcl_ablation": ("Stage-1 ablation, standalone run", "agcl_ablation.md"),
              "agcl_conditions": ("When AGCL beats InfoNCE: stage 1 under several conditions", "agcl_conditions.md"),
              "errors_by_key": ("Stage-1 errors by the key that separates near-duplicates", "errors_by_key.md"),
              "attribute_headroom": ("How much attributes can lift the encoder", "attribute_headroom.md"),
              "rar_seeds": ("Seed spread of the demo's GRPO stage", "rar_seeds.md"),
              "rar_seeds_reference": ("Seed spread of the GRPO stage, teacher-annotated reward gallery",
                                      "rar_seeds_reference.md"),
              "rar_seeds_recall1": ("Seed spread of the GRPO stage, Recall@1 as the reward", "rar_seeds_recall1.md"),
              "rar_seeds_8prompts": ("Seed spread of the GRPO stage, eight prompts per step", "rar_seeds_8prompts.md"),
              "rar_seeds_trainval": ("Seed spread of the GRPO stage, a train + val reward gallery",
                                     "rar_seeds_trainval.md"),
              "rar_seeds_none": ("Seed spread of the GRPO stage, an image + title reward gallery", "rar_seeds_none.md"),
              "reward_signal": ("Does the retrieval reward point where RL should go?", "reward_signal.md"),
              "reward_signal_trainval": ("The reward's signal with a train + val gallery", "reward_signal_trainval.md"),
              "rl_sharpening": ("Does GRPO improve the attributes or how it samples them?", "rl_sharpening.md"),
              "rar_seeds_t07": ("Seed spread of the GRPO stage, sampling temperature 0.7", "rar_seeds_t07.md"),
              "rar_seeds_scale_none": ("Seed spread of the GRPO stage, unscaled advantages", "rar_seeds_scale_none.md"),
              "rar_seeds_lr5e5": ("Seed spread of the GRPO stage, a quarter of the learning rate", "rar_seeds_lr5e5.md"),
              "rar_seeds_true": ("Seed spread of the GRPO stage, a true-attribute reward gallery (diagnostic)",
                                 "rar_seeds_true.md"),
              "rar_seeds_rl1200": ("Seed spread of the GRPO stage, six times the RL prompts", "rar_seeds_rl1200.md"),
              "reward_signal_noise": ("The reward's headroom against the spread of sampled completions",
                                      "reward_signal_noise.md"),
              "reward_signal_keydrop": ("The reward's signal with an encoder trained on partial attribute lines",
                                        "reward_signal_keydrop.md"),
              "rar_seeds_large_encoder": ("Seed spread of the GRPO stage, the generator's base as the encoder",
                                          "rar_seeds_large_encoder.md"),
              "reward_signal_large_encoder": ("The reward's signal with the generator's base as the encoder",
                                              "reward_signal_large_encoder.md"),
              "reward_signal_intra_attributes": ("The reward's signal with an encoder that ties attribute words to "
                                                 "the photo", "reward_signal_intra_attributes.md"),
              "rar_seeds_precision": ("Seed spread of the GRPO stage, a teacher-precision anchor beside the reward",
                                      "rar_seeds_precision.md"),
              "rar_seeds_precision_only": ("Seed spread of the GRPO stage, the teacher-precision reward alone (control)",
                                           "rar_seeds_precision_only.md"),
              "rar_seeds_intra": ("Seed spread of the GRPO stage, an encoder with the image-attribute term",
                                  "rar_seeds_intra.md"),
              "rar_seeds_intra_reference": ("Seed spread of the GRPO stage, an encoder with the image-attribute term "
                                            "and a teacher reward gallery", "rar_seeds_intra_reference.md"),
              "encoder_attribute_use": ("How much each stage-1 encoder gains from the same attribute lines",
                                        "encoder_attribute_use.md"),
              "encoder_attribute_use_rar": ("RAR generators' lines read by each stage-1 encoder",
                                            "encoder_attribute_use_rar.md"),
              "index_scale": ("Deployment index at 100k and 1M vectors: flat, IVF, IVF-PQ", "index_scale.md"),
              "index_scale_clustered": ("Deployment index at 100k and 1M vectors, clustered data", "index_scale_clustered.md"),
              "real_size": ("Real sizes: the published Qwen2-VL-2B / Qwen2.5-VL-3B / 7B shapes", "real_size.md")}
README_BEGIN, README_END = "<!-- results:begin (benchmarks/run_all.py writes this block) -->", "<!-- results:end -->"


def run_benchmark(name: str, quick: bool) -> float:
    _, argv, quick_argv, _ = BENCHMARKS[name]
    (WORK / "quick").mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / argv[0]), *argv[1:], *(quick_argv if quick else [])]
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
    lines = ["# Results", "",
             "Everything on this page is regenerated by `python benchmarks/run_all.py` (each section also by its own "
             "script, named at its top) from the embedded synthetic catalog and tiny models built from config: no "
             "figure is typed by hand. Timings were measured on shared CPU cores: compare ratios within one section, "
             "not absolute times across sections or machines.", ""]
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
    """Replace README.md's marked block with the ladder's headline table (from docs/ladder.json)."""
    readme, data = ROOT / "README.md", DOCS / "ladder.json"
    text = readme.read_text(encoding="utf-8")
    if README_BEGIN not in text or not data.is_file():
        return False
    from ladder import RUNGS, mean_std

    runs = list(json.loads(data.read_text(encoding="utf-8"))["seeds"].values())
    block = [README_BEGIN, "", f"Instance retrieval on the embedded catalog's held-out products, mean ± std over "
             f"{len(runs)} seeds, every listing annotated by the generator of its rung as in deployment (`python "
             "benchmarks/run_all.py`; the query-only protocol and the rest in [docs/RESULTS.md](docs/RESULTS.md)):", "",
             "| rung | Recall@1 | Recall@5 | Recall@10 |", "|---|---|---|---|"]
    for rung in RUNGS:
        cells = [f"{m:.1f} ± {s:.1f}" for m, s in (mean_std([r[rung] for r in runs], "instance", k)
                                                   for k in ("recall@1", "recall@5", "recall@10"))]
        block.append(f"| {rung} | " + " | ".join(cells) + " |")
    block += ["", README_END]
    start, end = text.index(README_BEGIN), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + "\n".join(block) + text[end:], encoding="utf-8")
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Every benchmark's smoke test; docs/ untouched.")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="Run these only, then reassemble.")
    parser.add_argument("--reuse", action="store_true",
                        help="Keep the finished stages of the ladder and the MOON ablation in outputs/run-all "
                             "(default: start from scratch).")
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
    print(f"[run_all] wrote {out}" + (" and README.md's results block" if update_readme() else "")
          + f" in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
