"""Stage 2 from a bare catalog: what ``recipes/rar_grpo.py`` runs around GRPO when its config asks for it.

The embedded demo starts from nothing but a catalog and two base models, so before RL it trains what the
paper assumes exists, and after RL it measures what RL changed. Each step runs only when the config names it:

1. ``train_missing_stages``: the stage-1 encoder (``--encoder_recipe``, ``recipes/agcl_train.py``) and the SFT
   warm start (``--sft_recipe``, ``recipes/sft_attributes.py``), each in a clean single-process child, each
   reused when its directory already holds one trained on this catalog;
2. ``annotate_reward_gallery`` (``--gallery_attributes policy``): the starting policy annotates the reward's
   gallery splits once, greedy (``rar.annotate``), as a deployed catalog is annotated by its generator;
3. ``policy_attributes`` and ``report_heldout`` (``--eval_split``): greedy attributes of the starting and the RL
   policy on held-out products, instance retrieval under the deployment protocol (every listing annotated by
   the generator under test) and the reward's (the queries annotated, the reward gallery), ``metrics.json`` and
   plots (``rar.evaluation``).

    policy_path = train_missing_stages(script_args, training_args, model_args, catalog, recipes_dir)
    reward_catalog = annotate_reward_gallery(script_args, training_args, model_args, policy_path, catalog)
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from afmrl.attributes import canonical_attributes, parse_attributes
from afmrl.catalog import load_catalog
from afmrl.encoder.model import load_frozen_encoder
from afmrl.retrieval.evaluation import attribute_texts
from rar.annotate import annotate, load_generator
from rar.config import POLICY_COLUMN
from rar.evaluation import SOURCES, evaluate_attribute_sources, format_table, write_report

__all__ = ["annotate_reward_gallery", "policy_attributes", "report_heldout", "run_recipe", "train_missing_stages"]

logger = logging.getLogger(__name__)

# A child recipe must not join this run's process group.
_DISTRIBUTED_ENV = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def run_recipe(script: Path, config: str, overrides: dict) -> None:
    """Run a recipe ``script`` with ``--config config`` and flags in a clean single-process child; a failure ends
    this run with the child's exit code (the child printed its own error: one ``error:`` line for a user error)."""
    cmd = [sys.executable, str(script), "--config", config]
    for key, value in overrides.items():
        if value is not None:
            cmd += [f"--{key}", *(map(str, value) if isinstance(value, list | tuple) else [str(value)])]
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in _DISTRIBUTED_ENV and not k.startswith(("ACCELERATE_", "TORCHELASTIC_"))
    }
    print(f"[rar_grpo] running {' '.join(cmd)}", flush=True)
    code = subprocess.run(cmd, env=env).returncode
    if code:
        print(f"[rar_grpo] stage {script.name} failed (exit code {code})", file=sys.stderr, flush=True)
        sys.exit(code)


def train_missing_stages(script_args, training_args, model_args, catalog: str, recipes_dir: Path) -> str:
    """Train the encoder and the SFT warm start that the config names and the output directory lacks; returns the
    policy RL starts from (the SFT output, else ``--model_name_or_path``). Call it in every process, inside
    ``main_process_first``: the main process trains, the others find the results."""
    if not (Path(script_args.encoder) / "encoder_config.json").is_file():
        run_recipe(
            recipes_dir / "agcl_train.py",
            script_args.encoder_recipe,
            {
                "catalog": catalog,
                "cache_dir": script_args.cache_dir,
                "output_dir": script_args.encoder,
                "model_name_or_path": script_args.encoder_model_name_or_path or model_args.model_name_or_path,
                "seed": training_args.seed,
            },
        )
    if not script_args.sft_recipe:
        return model_args.model_name_or_path
    policy_path = str(Path(training_args.output_dir) / "sft")
    if not any((Path(policy_path) / name).is_file() for name in ("config.json", "adapter_config.json")):
        run_recipe(
            recipes_dir / "sft_attributes.py",
            script_args.sft_recipe,
            {
                "catalog": catalog,
                "split": script_args.sft_split,
                "cache_dir": script_args.cache_dir,
                "model_name_or_path": model_args.model_name_or_path,
                "output_dir": policy_path,
                "prompt_template": script_args.prompt_template,
                "attribute_keys": script_args.attribute_keys,
                "seed": training_args.seed,
            },
        )
    return policy_path


def policy_attributes(script_args, training_args, model_args, policy_path, listings, log_path=None) -> list[str]:
    """Greedy completions of a saved policy for ``listings`` (a whole copy of it, outside ZeRO-3), with the
    recipe's prompt; resumable through ``log_path``."""
    return annotate(
        listings,
        lambda: load_generator(
            str(policy_path),
            model_args=model_args,
            cache_dir=script_args.cache_dir,
            device=training_args.device,
            trust_remote_code=training_args.trust_remote_code,
        ),
        prompt_template=script_args.prompt_template,
        attribute_keys=script_args.attribute_keys,
        max_new_tokens=script_args.eval_max_new_tokens or training_args.max_completion_length,
        batch_size=script_args.eval_batch_size,
        log_path=log_path,
        desc="generating attributes",
    )


def annotate_reward_gallery(script_args, training_args, model_args, policy_path, catalog: str):
    """``--gallery_attributes policy``: the whole catalog, with the starting policy's parsed attributes of the
    reward's gallery splits in ``POLICY_COLUMN`` (None elsewhere). The completions are logged in
    ``<output_dir>/gallery_attributes.jsonl`` and reused: call it inside ``main_process_first``, so that the main
    process generates and the others read."""
    full = load_catalog(catalog)
    splits = set(script_args.gallery_splits)
    rows = (
        range(len(full))
        if "split" not in full.column_names
        else [i for i, s in enumerate(full["split"]) if s in splits]
    )
    gallery = full.select(rows)
    log = Path(training_args.output_dir) / "gallery_attributes.jsonl"
    texts = policy_attributes(script_args, training_args, model_args, policy_path, gallery, log)
    parsed = dict(zip(gallery["listing_id"], texts, strict=True))
    values = [parse_attributes(parsed[lid]).attributes or None if lid in parsed else None for lid in full["listing_id"]]
    return full.add_column(POLICY_COLUMN, values)


def report_heldout(script_args, training_args, evaluation, generated: dict, log_history, started: float) -> dict:
    """Instance retrieval on held-out products with no / SFT / RAR attributes under both protocols; writes
    ``metrics.json``, ``attributes.jsonl`` and the plots, prints both tables; returns the deployment results."""
    output_dir = Path(training_args.output_dir)
    encoder = load_frozen_encoder(script_args.encoder, device=training_args.device)  # a whole copy, this process only
    sources = {
        "no_attributes": None,
        **{k: canonical_attributes(v, script_args.attribute_keys) for k, v in generated.items()},
    }
    # The deployment protocol (every listing annotated by the generator under test) is the headline; the
    # reward's protocol (the queries annotated, against the reward gallery: --gallery_attributes) sits beside it.
    results = evaluate_attribute_sources(
        encoder, evaluation, sources, protocol="both_sides", batch_size=script_args.eval_batch_size
    )
    gallery_texts = (
        sources["sft_attributes"]
        if script_args.gallery_attributes == "policy"
        else attribute_texts(evaluation, script_args.gallery_attributes, script_args.attribute_keys)
    )
    reward_gallery = evaluate_attribute_sources(
        encoder,
        evaluation,
        sources,
        protocol="query_side",
        gallery_attributes=gallery_texts,
        batch_size=script_args.eval_batch_size,
    )
    paths = write_report(
        output_dir,
        {k: results[k] for k in SOURCES},
        log_history=log_history,
        generated={"listing_id": evaluation["listing_id"], **generated},
        extra={
            "protocol": "both_sides",
            "reward_gallery": {k: reward_gallery[k] for k in SOURCES},
            "elapsed_s": round(time.time() - started, 1),
            "eval_split": script_args.eval_split,
            "n_eval_listings": len(evaluation),
            "gallery_attributes": script_args.gallery_attributes,
        },
    )
    print(
        f"\nHeld-out instance retrieval ({len(evaluation)} listings of split {script_args.eval_split!r}), every "
        "listing annotated by the generator (deployment):"
    )
    print(format_table({k: results[k] for k in SOURCES}))
    print(f"Queries annotated, reward gallery {script_args.gallery_attributes!r} (the reward's protocol):")
    print(format_table({k: reward_gallery[k] for k in SOURCES}))
    print(f"wrote {', '.join(str(p) for p in paths.values())} ({time.time() - started:.0f} s in all)")
    logger.info("metrics: %s", json.dumps(results))
    return results
