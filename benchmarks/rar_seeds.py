"""How much of the RAR demo's result is seed noise? GRPO from the same encoder and SFT policy, several seeds.

    accelerate launch recipes/rar_grpo.py              # once: builds outputs/rar-demo/{encoder,sft}
    python benchmarks/rar_seeds.py --seeds 0 1 2       # writes docs/rar_seeds.md (+ .json)
    python benchmarks/rar_seeds.py --doc docs/rar_seeds_reference.md --output_dir outputs/rar-seeds-reference \
        -- --gallery_attributes reference               # a variant: flags after -- go to recipes/rar_grpo.py

Each seed reruns only the GRPO stage of recipes/configs/rar_demo.yaml (``--seed``; the sampled
completions and the prompt order change) from the demo's stage-1 encoder and SFT generator, and
evaluates on the held-out products. The SFT attributes are greedy, so they are the same for every
seed; the spread of RAR - SFT is the RL stage's own noise.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def run_seed(seed: int, demo: Path, out: Path, extra: list[str] = ()) -> dict:
    cmd = [sys.executable, str(ROOT / "recipes" / "rar_grpo.py"), "--config", str(ROOT / "recipes/configs/rar_demo.yaml"),
           "--encoder", str(demo / "encoder"), "--encoder_recipe", "", "--sft_recipe", "",
           "--model_name_or_path", str(demo / "sft"), "--output_dir", str(out), "--seed", str(seed),
           "--disable_tqdm", "true", *extra]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--demo_dir", default="outputs/rar-demo", help="Where the demo left encoder/ and sft/.")
    parser.add_argument("--output_dir", default="outputs/rar-seeds")
    parser.add_argument("--doc", default="docs/rar_seeds.md")
    parser.add_argument("--jobs", type=int, default=1,
                        help="Seeds run at once (one process each; with 2 or more, set OMP_NUM_THREADS=1 on 2 cores).")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    demo = Path(args.demo_dir)
    if not (demo / "encoder" / "encoder_config.json").is_file() or not (demo / "sft" / "config.json").is_file():
        sys.exit(f"error: {demo} has no encoder/ or sft/: run `accelerate launch recipes/rar_grpo.py` first")
    start = time.time()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each seed is its own subprocess
        futures = {s: pool.submit(run_seed, s, demo, Path(args.output_dir) / f"seed{s}", extra) for s in args.seeds}
        runs = {s: f.result() for s, f in futures.items()}
    sources = ("no_attributes", "sft_attributes", "rar_attributes")
    rows = ["| seed | none R@1 | SFT R@1 | RAR R@1 | RAR - SFT (pts) | RAR R@5 | retrieval reward, first -> last quarter |",
            "|---|---|---|---|---|---|---|"]
    deltas = []
    for seed, m in runs.items():
        r1 = {s: 100 * m[s]["recall@1"] for s in sources}
        deltas.append(r1["rar_attributes"] - r1["sft_attributes"])
        trend = m.get("reward_trend", {}).get("retrieval_rank")
        trend = f"{trend['first_quarter']:+.3f} -> {trend['last_quarter']:+.3f}" if trend else "(no retrieval reward)"
        rows.append(f"| {seed} | {r1['no_attributes']:.1f} | {r1['sft_attributes']:.1f} | {r1['rar_attributes']:.1f} | "
                    f"{deltas[-1]:+.1f} | {100 * m['rar_attributes']['recall@5']:.1f} | {trend} |")
    summary = (f"RAR - SFT over {len(deltas)} seeds: {np.mean(deltas):+.1f} ± {np.std(deltas):.1f} points R@1 "
               f"(min {min(deltas):+.1f}, max {max(deltas):+.1f}).")
    n_listings = next(iter(runs.values()))["no_attributes"]["n_queries"]
    doc = "\n".join([
        "# RAR demo: seed spread of the GRPO stage",
        "",
        f"Made by `{' '.join(['python benchmarks/rar_seeds.py', *argv])}` on {platform.node()} "
        f"({platform.machine()}, Python {platform.python_version()}) in {time.time() - start:.0f} s, from the encoder and "
        f"SFT generator of `{demo}`; held-out instance retrieval ({n_listings} listings), every listing annotated by the generator "
        "under test (the deployment protocol, metrics.json's top level), percent.",
        "",
        *rows,
        "",
        summary,
        "",
    ])
    Path(args.doc).write_text(doc, encoding="utf-8")
    Path(args.doc).with_suffix(".json").write_text(json.dumps({str(k): v for k, v in runs.items()}, indent=2) + "\n")
    print(doc)


if __name__ == "__main__":
    main()
