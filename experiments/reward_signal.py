"""Does the retrieval reward point where RL should go? Scores of hand-made attribute lines against the demo's reward.

    accelerate launch recipes/rar_grpo.py          # once: writes outputs/rar-demo (encoder, gallery_attributes.jsonl)
    python -m experiments.reward_signal             # writes outputs/reward_signal.md
    python -m experiments.reward_signal --gallery_split train val --galleries policy true \
        --gallery_attributes_file outputs/rar-seeds-trainval/seed0/gallery_attributes.jsonl \
        --output outputs/reward_signal_trainval.md    # the reward of a run with --gallery_split train val
    python -m experiments.reward_signal --galleries policy --samples 8 --output outputs/reward_signal_noise.md

A run's page is a record of one setting: add it as a row and a section of docs/experiments/reward_signal.md (one
page for every setting measured), with its command and commit.

RL can only move the generator toward what its reward ranks higher. This script rebuilds the demo's
reward exactly as ``recipes/rar_grpo.py`` does (``retrieval_rank``, the frozen demo encoder, the
``val`` gallery annotated once by the SFT policy: ``gallery_attributes.jsonl``) and scores, for every
``val`` listing, attribute lines that differ from the SFT policy's own greedy line in one controlled
way: the true values, the SFT line with its wrong values removed (an oracle), the SFT line without the
keys it guesses (pattern, logo, size, brand), the SFT line with its colour changed, and one key only.
A reward that points the right way scores the true and the oracle lines above the SFT line, and the
corrupted one below it; the share of listings where a variant beats the SFT line says how often a
GRPO group containing both would push the policy toward it.

With ``--samples N`` the SFT policy also samples N completions per listing at GRPO's temperature, as
GRPO's groups do, and each is scored: the spread of those rewards within a listing is the noise that
GRPO's group-relative advantage sees, against which the headroom above (true − SFT line) has to be found.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from afmrl.attributes import format_attributes, parse_attributes
from afmrl.catalog.load import load_catalog
from afmrl.modeling import load_mllm
from rar.annotate import sample_attributes
from rar.config import POLICY_COLUMN
from rar.prompts import build_prompt_dataset
from rewards import get_reward_funcs

ROOT = Path(__file__).resolve().parents[1]
GUESSED = ("pattern", "logo", "size", "brand")  # keys the SFT generator names near chance (attribute_headroom.md)
GALLERIES = {
    "policy": "annotated once by the SFT policy (the demo's `--gallery_attributes policy`)",
    "reference": "the catalog's stored teacher attributes (`--gallery_attributes reference`)",
    "none": "image + title (`--gallery_attributes none`)",
    "true": "the true attributes (`--gallery_attributes true_attributes`; a diagnostic: no deployment has them)",
}
COLOURS = ("black", "blue", "green", "orange", "purple", "red", "white", "yellow")


def variants(sft: dict, true: dict) -> dict[str, dict]:
    """Attribute dicts derived from the SFT line ``sft`` and the listing's ``true`` attributes."""
    right = {k: v for k, v in sft.items() if str(true.get(k, "")).lower() == str(v).lower()}
    other = next(
        c for c in COLOURS if c != str(sft.get("color", "")).lower() and c != str(true.get("color", "")).lower()
    )
    return {
        "SFT line (the policy's own)": sft,
        "true attributes": {k: v for k, v in true.items() if v not in (None, "")},
        "SFT, wrong values removed (oracle)": right,
        "SFT without pattern, logo, size, brand": {k: v for k, v in sft.items() if k not in GUESSED},
        "SFT with a wrong colour": {**sft, "color": other},
        "colour only (SFT's)": {"color": sft["color"]} if "color" in sft else {},
    }


def sample_lines(policy_dir: Path, catalog, rows: list[int], draws: int, temperature: float) -> list[list[str]]:
    """``draws`` sampled completions of the policy for each listing of ``rows`` (draw d seeded with d): [draw][row]."""
    template = json.loads((policy_dir.parent / "attribute_prompt.json").read_text())["prompt_template"]
    prompts = build_prompt_dataset(catalog.select(rows), prompt_template=template)
    model, processor = load_mllm(str(policy_dir))
    return sample_attributes(model, processor, prompts, draws=draws, temperature=temperature)


def noise_rows(
    reward, ids: list[str], samples: list[list[str]], base: np.ndarray, headroom: float, temperature: float
) -> list[str]:
    """Markdown: the sampled completions' reward against the SFT line, and the within-listing spread."""
    values = np.asarray(
        [[np.nan if r is None else r for r in reward(completions=texts, listing_id=ids)] for texts in samples],
        dtype=float,
    )  # [draw, listing]
    ok = ~np.isnan(base) & ~np.isnan(values).any(axis=0)
    spread = values[:, ok].std(axis=0, ddof=1)  # per listing, over its draws: what a GRPO group's advantage sees
    sigma = float(spread.mean())
    diff = values[:, ok] - base[ok]
    best = values[:, ok].max(axis=0) - base[ok]
    lines = [
        f"| SFT samples, T={temperature:g}, {len(samples)} per listing (each scored) | "
        f"{np.mean(values[:, ok]):+.3f} | {diff.mean():+.3f} | {100 * (diff > 1e-9).mean():.0f}% | "
        f"{100 * (diff < -1e-9).mean():.0f}% |",
        f"| best of those {len(samples)} samples, per listing (chosen by the reward itself) | "
        f"{np.mean(values[:, ok].max(axis=0)):+.3f} | {best.mean():+.3f} | {100 * (best > 1e-9).mean():.0f}% | "
        f"{100 * (best < -1e-9).mean():.0f}% |",
        "",
    ]
    lines.append(
        f"Within one listing the {len(samples)} sampled completions' rewards spread by σ = {sigma:.3f} (mean "
        f"over listings of their standard deviation; median {np.median(spread):.3f}); the true attributes "
        f"beat the SFT line by δ = {headroom:+.3f} on average. Telling a +δ line from the SFT line by the "
        f"mean of a listing's samples takes about (σ/δ)² = "
        + (f"{(sigma / headroom) ** 2:,.0f}" if headroom > 0 else "(no positive headroom: never)")
        + " samples of that listing (one standard error)."
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", default=str(ROOT / "outputs" / "rar-demo"))
    parser.add_argument("--catalog", default=str(ROOT / "outputs" / "embedded" / "catalog-600-seed0-val0.3"))
    parser.add_argument("--split", default="val", help="The listings scored (the RL prompts).")
    parser.add_argument(
        "--gallery_split",
        nargs="+",
        default=None,
        help="The reward gallery's split(s) (rar_grpo.py's --gallery_split; default: --split).",
    )
    parser.add_argument(
        "--gallery_attributes_file",
        default=None,
        help="The SFT policy's gallery lines (default: <demo>/gallery_attributes.jsonl); they must "
        "cover the gallery splits for `--galleries policy`.",
    )
    parser.add_argument(
        "--galleries",
        nargs="+",
        default=["policy", "reference", "none", "true"],
        choices=["policy", "reference", "none", "true"],
        help="The reward's gallery attributes (rar_grpo.py's --gallery_attributes): the SFT policy's "
        "greedy lines (the demo), the catalog's stored teacher attributes, none (image + title), or "
        "the true attributes (a diagnostic: no deployment has them).",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=0,
        help="Also sample this many completions per listing from <demo>/sft at --temperature and "
        "score them (the noise GRPO's groups see); 0: hand-made lines only.",
    )
    parser.add_argument("--temperature", type=float, default=1.0, help="Sampling temperature (rar_demo.yaml's).")
    parser.add_argument("--output", default=str(ROOT / "outputs" / "reward_signal.md"))
    args = parser.parse_args()
    if args.samples < 0 or args.temperature <= 0:
        parser.error("--samples must be >= 0 and --temperature > 0")
    start = time.time()
    demo = Path(args.demo)
    gallery_splits = list(dict.fromkeys(args.gallery_split or [args.split]))
    lookup = list(dict.fromkeys([args.split, *gallery_splits]))
    source = Path(args.gallery_attributes_file or demo / "gallery_attributes.jsonl")
    written = {
        r["listing_id"]: r["completion"] for r in map(json.loads, source.read_text(encoding="utf-8").splitlines())
    }
    full = load_catalog(args.catalog)
    policy = [
        parse_attributes(written[lid]).attributes or None if lid in written else None for lid in full["listing_id"]
    ]
    catalog = full.add_column(POLICY_COLUMN, policy)
    rows = [i for i, s in enumerate(full["split"]) if s == args.split]
    listing_ids, true_attributes = full["listing_id"], full["true_attributes"]  # columns: no image is decoded
    ids = [listing_ids[i] for i in rows]
    samples = sample_lines(demo / "sft", full, rows, args.samples, args.temperature) if args.samples else []
    per_variant: dict[str, list] = {}
    for i, lid in zip(rows, ids, strict=True):
        for name, attrs in variants(parse_attributes(written[lid]).attributes, true_attributes[i]).items():
            per_variant.setdefault(name, []).append(format_attributes(attrs) or "none")
    lines = [
        "# Does the retrieval reward point where RL should go?",
        "",
        f"Made by `python -m experiments.reward_signal{''.join(' ' + a for a in sys.argv[1:])}` from `{demo.name}`: "
        "the demo's reward (`retrieval_rank`, "
        "reciprocal-rank improvement over the same listing without attributes, the frozen demo encoder) over the "
        f"`{' + '.join(gallery_splits)}` gallery, scored on the `{args.split}` listings whose product has another "
        "listing in the gallery. "
        "Each row changes the SFT policy's own greedy line in one way (module docstring); a positive difference is "
        "where GRPO would push the policy if its group held both lines.",
    ]
    for gallery in args.galleries:
        column = {"policy": POLICY_COLUMN, "reference": "attributes", "none": None, "true": "true_attributes"}[gallery]
        options = {"attribute_column": column} if column else {}
        if lookup != gallery_splits:
            options["split"] = gallery_splits
        (reward,) = get_reward_funcs(
            ["retrieval_rank"],
            encoder=str(demo / "encoder"),
            catalog=catalog,
            split=lookup if len(lookup) > 1 else lookup[0],
            **({"gallery_options": options} if options else {}),
        )
        scores = {
            name: np.asarray(
                [np.nan if r is None else r for r in reward(completions=texts, listing_id=ids)], dtype=float
            )
            for name, texts in per_variant.items()
        }
        base = scores["SFT line (the policy's own)"]
        ok = ~np.isnan(base)
        plain = reward.score(ids, per_variant["SFT line (the policy's own)"])  # its ranks without attributes too
        first = plain.scored & (plain.rank_without_attributes == 1)
        lines += [
            "",
            f"## Gallery: {GALLERIES[gallery]} ({int(ok.sum())} listings)",
            "",
            f"Without attributes the true product is first for {100 * first.sum() / plain.scored.sum():.1f}% of "
            f"these listings (MRR {np.nanmean(plain.reciprocal_rank_without_attributes[plain.scored]):.3f}; "
            f"gallery of {reward._state.gallery.size} listings).",
            "",
            "| attribute line | mean reward | minus the SFT line's | listings where it scores higher | lower |",
            "|---|---|---|---|---|",
        ]
        for name, values in scores.items():
            diff = values[ok] - base[ok]
            lines.append(
                f"| {name} | {np.mean(values[ok]):+.3f} | {diff.mean():+.3f} | {100 * (diff > 1e-9).mean():.0f}% | "
                f"{100 * (diff < -1e-9).mean():.0f}% |"
            )
        if samples:
            headroom = float(np.mean(scores["true attributes"][ok] - base[ok]))
            lines += noise_rows(reward, ids, samples, base, headroom, args.temperature)
    lines += ["", f"{time.time() - start:.0f} s on the CPU."]
    Path(args.output).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
