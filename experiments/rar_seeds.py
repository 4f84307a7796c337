"""How much of the RAR demo's result is seed noise? GRPO from the same encoder and SFT policy, several seeds.

    accelerate launch recipes/rar_grpo.py              # once: builds outputs/rar-demo/{encoder,sft}
    python -m experiments.rar_seeds --seeds 0 1 2       # setting "demo": docs/experiments/rar_seeds/demo.json
    python -m experiments.rar_seeds --setting reference --title "a teacher-annotated reward gallery" \
        --output_dir outputs/rar-seeds-reference -- --gallery_attributes reference   # flags after -- go to rar_grpo
    python -m experiments.rar_seeds --table_only        # rewrite docs/experiments/rar_seeds.md from the JSON files
    python -m experiments.rar_seeds --ladder_dir outputs/ladder-paper --world paper --seeds 0 1 2 3 4 \
        --config recipes/configs/rar_paper_world.yaml --setting gate_paper -- --advantage_gate sft_likelihood

Each seed reruns only the GRPO stage of recipes/configs/rar_demo.yaml (``--seed``; the sampled completions and the
prompt order change) from the demo's stage-1 encoder and SFT generator, and evaluates on the held-out products. The
SFT attributes are greedy, so they are the same for every seed; the spread of RAR - SFT is the RL stage's own noise.
With ``--ladder_dir`` a seed instead starts from that ladder seed's own stages (``seedS/agcl`` and ``seedS/rar/sft``,
on ``--catalog embedded:WORLD:S``), and its faithful RAR rung (``seedS/rar/metrics.json``) is kept beside it: a
variant of the RL stage is then paired with the rung it varies, seed by seed (the table's "− RAR" column).
A seed whose run directory already holds the metrics of the same command is read, not rerun, and each seed is
recorded as it finishes: a killed experiment loses one seed at most. ``--add_seeds`` adds seeds to a setting's
record from an earlier session whose run directories are gone (the same command, other seeds). Every setting is one
JSON file (its metrics per seed, the command, the commit and the machine); the page
``docs/experiments/rar_seeds.md`` is one table with a row per setting, rebuilt from all of them: RAR - SFT as the
mean of the per-seed differences, sample sd (ddof=1), 95% t-interval and n (``afmrl.stats``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from afmrl.stats import format_summary, summarize

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "docs" / "experiments" / "rar_seeds"
PAGE = ROOT / "docs" / "experiments" / "rar_seeds.md"
SOURCES = ("no_attributes", "sft_attributes", "rar_attributes")


def run_seed(
    seed: int,
    demo: Path,
    out: Path,
    extra: list[str] = (),
    config: str = "recipes/configs/rar_demo.yaml",
    encoder: Path | None = None,
    sft: Path | None = None,
) -> dict:
    """One GRPO run from ``encoder`` and the ``sft`` policy (default: ``demo``/encoder and ``demo``/sft)."""
    encoder = demo / "encoder" if encoder is None else encoder
    sft = demo / "sft" if sft is None else sft
    cmd = [
        sys.executable,
        str(ROOT / "recipes" / "rar_grpo.py"),
        "--config",
        str(ROOT / config),
        "--encoder",
        str(encoder),
        "--encoder_recipe",
        "",
        "--sft_recipe",
        "",
        "--model_name_or_path",
        str(sft),
        "--output_dir",
        str(out),
        "--seed",
        str(seed),
        "--disable_tqdm",
        "true",
        *extra,
    ]
    stamp = out / "rar_seeds_command.json"
    if (out / "metrics.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == cmd[1:]:
        return json.loads((out / "metrics.json").read_text())  # this very run finished before
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    with open(out / "train.log", "w") as log:  # the recipe's progress, to follow a long seed with tail -f
        subprocess.run(cmd, check=True, stdout=log)
    stamp.write_text(json.dumps(cmd[1:]))  # last: the seed is complete
    return json.loads((out / "metrics.json").read_text())


def seed_sources(args, seed: int, demo: Path, extra: list[str]) -> tuple[Path, Path, list[str], Path | None]:
    """(encoder, SFT policy, recipe flags, the faithful RAR rung's metrics or None) of one seed."""
    if args.ladder_dir is None:
        encoder, sft, flags, faithful = demo / "encoder", demo / "sft", list(extra), None
        hint = "run `accelerate launch recipes/rar_grpo.py` first"
    else:
        stages = Path(args.ladder_dir) / f"seed{seed}"
        encoder, sft, faithful = stages / "agcl", stages / "rar" / "sft", stages / "rar" / "metrics.json"
        flags = (["--catalog", f"embedded:{args.world}:{seed}"] if args.world else []) + list(extra)
        hint = "run the ladder's seed first (python -m benchmarks.ladder ...)"
        if not faithful.is_file():
            print(f"error: --ladder_dir: {faithful} does not exist: {hint}", file=sys.stderr)
            sys.exit(2)
        from afmrl.retrieval.fingerprints import TRAINING_RECORD, check_training_record

        if args.world and (encoder / TRAINING_RECORD).is_file():  # the encoder's record names the world it saw
            from afmrl.embedded import resolve_catalog

            try:
                check_training_record(encoder, str(resolve_catalog(flags[1], args.cache_dir)), flag="--ladder_dir")
            except ValueError as err:
                print(f"error: --world {args.world}: {err}", file=sys.stderr)
                sys.exit(2)
    for path, marker in ((encoder, "encoder_config.json"), (sft, "config.json")):
        if not (path / marker).is_file():
            print(f"error: {path} has no {marker}: {hint}", file=sys.stderr)
            sys.exit(2)
    return encoder, sft, flags, faithful


def commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def r_at_1(metrics: dict, source: str) -> float:
    return 100 * metrics[source]["recall@1"]


def table(records: list[dict]) -> str:
    """The page: one row per setting, oldest first."""
    lines = [
        "# RAR: seed spread of the GRPO stage, one row per setting",
        "",
        "Regenerated by `python -m experiments.rar_seeds --table_only` from the JSON files in "
        "[rar_seeds/](rar_seeds/) (one per setting: metrics per seed, command, commit, machine); never edited by hand. "
        "Each setting reruns only the GRPO stage of the demo from the same encoder and SFT generator over GRPO seeds "
        "(`--seed`), and evaluates on the held-out products with every listing annotated by the generator under test "
        "(the deployment protocol). **RAR − SFT** is R@1 in points: the mean of the per-seed differences, sample sd "
        "(ddof=1), 95% t-interval, n seeds. SFT is greedy, so it is the same at every seed of a setting (a setting on "
        "a ladder's seeds starts each seed from that seed's own encoder, SFT policy and catalog; **− RAR** pairs it "
        "with the ladder's faithful RAR rung, seed by seed, the same summary). What these "
        "settings asked and what they show: [README.md](README.md).",
        "",
        "| setting | what changes | SFT R@1 | RAR − SFT (R@1, pts) | per seed | − RAR (the ladder's rung) "
        "| test listings | made | command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for record in sorted(records, key=lambda r: (r.get("date", ""), r["setting"])):
        seeds = record["seeds"]
        deltas = [r_at_1(m, "rar_attributes") - r_at_1(m, "sft_attributes") for m in seeds.values()]
        faithful = record.get("faithful_rar") or {}
        versus = [r_at_1(seeds[s], "rar_attributes") - r_at_1(faithful[s], "rar_attributes") for s in faithful]
        versus_cell = format_summary(summarize(versus)) if versus else "–"
        sft = sorted({round(r_at_1(m, "sft_attributes"), 1) for m in seeds.values()})
        n_listings = next(iter(seeds.values()))["no_attributes"]["n_queries"]
        lines.append(
            f"| {record['setting']} | {record.get('title', '')} | {' / '.join(f'{v:.1f}' for v in sft)} | "
            f"{format_summary(summarize(deltas))} | {' / '.join(f'{d:+.1f}' for d in deltas)} | {versus_cell} | "
            f"{n_listings} | "
            f"{record.get('date', '?')}, {record.get('commit', '?')} | `{record.get('command', '?')}` |"
        )
    return "\n".join(lines) + "\n"


def write_table() -> str:
    records = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(DATA.glob("*.json"))]
    page = table(records)
    PAGE.write_text(page, encoding="utf-8")
    return page


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--setting", default="demo", help="Name of this setting: docs/experiments/rar_seeds/NAME.json.")
    parser.add_argument("--title", default="the demo's settings", help="What this setting changes, for the table.")
    parser.add_argument("--demo_dir", default="outputs/rar-demo", help="Where the demo left encoder/ and sft/.")
    parser.add_argument("--output_dir", default="outputs/rar-seeds")
    parser.add_argument("--config", default="recipes/configs/rar_demo.yaml", help="The GRPO recipe each seed runs.")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="Seeds run at once (one process each; with 2 or more, set OMP_NUM_THREADS=1 on 2 cores).",
    )
    parser.add_argument("--table_only", action="store_true", help="Only rewrite the page from the JSON files.")
    parser.add_argument(
        "--ladder_dir",
        default=None,
        help="Start seed S from a ladder's own stages (DIR/seedS/agcl, DIR/seedS/rar/sft) instead of --demo_dir, and "
        "pair it with that seed's RAR rung (DIR/seedS/rar/metrics.json).",
    )
    parser.add_argument("--world", default=None, help="With --ladder_dir: seed S runs on --catalog embedded:WORLD:S.")
    parser.add_argument("--cache_dir", default="outputs/embedded", help="Where the embedded worlds are built.")
    parser.add_argument(
        "--add_seeds",
        action="store_true",
        help="Add these seeds to the setting's record, keeping the seeds it holds (an earlier session's, whose run "
        "directories may be gone): the rest of the command must be the record's, and a recorded seed is an error.",
    )
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.table_only:
        print(write_table())
        return
    if not (ROOT / args.config).is_file():
        print(f"error: --config {args.config} does not exist", file=sys.stderr)
        sys.exit(2)
    previous = recorded_before(args, argv) if args.add_seeds else None  # checked before any training
    demo = Path(args.demo_dir)
    sources = {s: seed_sources(args, s, demo, extra) for s in args.seeds}  # exits with an error: line when missing
    start = time.time()
    runs, faithful = {}, {}
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:  # each seed is its own subprocess
        futures = {
            pool.submit(
                run_seed, s, demo, Path(args.output_dir) / f"seed{s}", flags, args.config, encoder=enc, sft=sft
            ): s
            for s, (enc, sft, flags, _) in sources.items()
        }
        for future in as_completed(futures):  # each seed is recorded as it finishes: a killed run keeps the rest
            seed = futures[future]
            runs[str(seed)] = future.result()
            if sources[seed][3] is not None:
                faithful[str(seed)] = paired_rung(args, seed, runs[str(seed)], sources[seed][3])
            write_record(args, argv, demo, runs, faithful, previous, time.time() - start)
    print(write_table())


def settings_of(argv: list[str]) -> list[str]:
    """A command's flags without the ones that may differ between its parts (--seeds, --jobs, --add_seeds)."""
    kept, skip = [], False
    for arg in argv:
        if arg in ("--seeds", "--jobs"):
            skip = True
            continue
        if skip and arg.isdigit():
            continue
        skip = False
        if arg != "--add_seeds":
            kept.append(arg)
    return kept


def recorded_before(args, argv: list[str]) -> dict:
    """The setting's record, for --add_seeds: its command must be this one's but for the seeds, none of whose seeds
    may be one of these."""
    path = DATA / f"{args.setting}.json"
    if not path.is_file():
        print(f"error: --add_seeds: the setting {args.setting} has no record ({path}) to add to", file=sys.stderr)
        sys.exit(2)
    record = json.loads(path.read_text(encoding="utf-8"))
    before = shlex.split(record["command"])[3:]
    if settings_of(before) != settings_of(argv):
        print(
            f"error: --add_seeds: the setting {args.setting} was recorded by another command (`{record['command']}`); "
            "only --seeds and --jobs may differ",
            file=sys.stderr,
        )
        sys.exit(2)
    clash = sorted(set(map(str, args.seeds)) & set(record["seeds"]), key=int)
    if clash:
        print(f"error: --add_seeds: seed(s) {' '.join(clash)} of --seeds are recorded already", file=sys.stderr)
        sys.exit(2)
    return record


def paired_rung(args, seed: int, run: dict, rung_path: Path) -> dict:
    """The ladder's faithful RAR rung of ``seed``, after checking the run is paired with it: the same greedy SFT policy
    on the same test split and encoder gives the same SFT R@1 (else an error line, exit 2, and no record of it)."""
    rung = json.loads(rung_path.read_text())
    here, there = r_at_1(run, "sft_attributes"), r_at_1(rung, "sft_attributes")
    if abs(here - there) > 1e-6:
        print(
            f"error: seed {seed} is not paired with its ladder rung: SFT R@1 {here:.2f} here, {there:.2f} in "
            f"{args.ladder_dir} (another catalog, encoder or evaluation: check --world and --config)",
            file=sys.stderr,
        )
        sys.exit(2)
    return rung


def write_record(args, argv, demo, runs: dict, faithful: dict, previous: dict | None, seconds: float):
    """docs/experiments/rar_seeds/SETTING.json from the seeds finished so far (and, with --add_seeds, the record's)."""
    part = {
        "seeds": sorted(map(int, runs)),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(seconds),
        "machine": f"{platform.node()} ({platform.machine()}, Python {platform.python_version()})",
    }
    parts = [part]
    if previous is not None:
        parts = previous.get("parts") or [
            {"seeds": sorted(map(int, previous["seeds"]))} | {k: previous.get(k) for k in part if k != "seeds"}
        ]
        parts = [*parts, part]
        runs = {**previous["seeds"], **runs}
        faithful = {**previous.get("faithful_rar", {}), **faithful}
    ordered = sorted(runs, key=int)
    command = ["--seeds", *ordered, *settings_of(argv)] if previous is not None else argv
    record = {
        "setting": args.setting,
        "title": args.title,
        "command": shlex.join(["python", "-m", "experiments.rar_seeds", *command]),
        **{k: part[k] for k in ("commit", "date")},
        "demo_dir": str(args.ladder_dir or demo),
        "seconds": sum(p["seconds"] or 0 for p in parts),
        "machine": part["machine"],
        "seeds": {s: runs[s] for s in ordered},
        **({"faithful_rar": {s: faithful[s] for s in sorted(faithful, key=int)}} if faithful else {}),
        **({"parts": parts} if len(parts) > 1 else {}),
    }
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / f"{args.setting}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
