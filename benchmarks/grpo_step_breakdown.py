"""Where does a GRPO step go? Writes docs/results/grpo_step_breakdown.md.

    python -m benchmarks.grpo_step_breakdown                  # the full run (under a minute on 2 shared cores)
    python -m benchmarks.grpo_step_breakdown --quick          # smoke test: 1 + 2 steps, nothing written
    python -m benchmarks.grpo_step_breakdown --encoder fresh  # untrained encoder instead of outputs/agcl-demo
    python -m benchmarks.grpo_step_breakdown --policy larger --output docs/results/grpo_step_breakdown_larger.md

A real ``trl.GRPOTrainer`` run on CPU, one process, one torch thread:

* policy: the embedded tiny Qwen2-VL (``afmrl.embedded.resolve_model("tiny-qwen2-vl", ...)``),
  first warm-started by a short supervised pass on the teacher's canonical attribute text (as in
  ``tests/test_grpo_with_rewards.py``) so that its completions parse and the rewards differ
  inside a group;
* rewards: ``retrieval_rank`` and ``attribute_format`` through ``rewards.get_reward_funcs``,
  with the recommended arguments (encoder directory, saved gallery directory, catalog, split);
  the encoder is ``outputs/agcl-demo`` when it holds a trained encoder, else a fresh
  ``ProductEncoder`` (no LoRA) over the same tiny backbone saved to a temporary directory; the
  gallery is the embedded catalog's train split encoded by that encoder;
* prompts: the embedded catalog's train split (image + fixed instruction; ``listing_id`` and
  ``attributes`` columns for the rewards).

Per optimizer step it records, all with ``time.perf_counter``:

* the step: a ``TrainerCallback`` from ``on_step_begin`` to ``on_step_end`` (generation, scoring,
  loss, backward and optimizer update all happen inside), and the interval between two
  ``on_step_end`` (adds the data loading of the next batch and the logging);
* each reward call: every reward callable is wrapped in a plain timing proxy that keeps its
  ``__name__`` (so TRL's logging names are unchanged) and is not an ``nn.Module`` (so TRL still
  calls it as a function); for ``retrieval_rank`` also the encoder forward inside the call
  (the reward's own ``last_timings``), split into input building (``ProductEncoder.build_inputs``,
  or ``build_inputs_cached`` with the reward's image cache, the default) and the rest (image fetch,
  the vision tower for listings not cached yet, the model forward);
* generation: the policy's ``generate`` (the object TRL unwraps for generation) is replaced on
  the instance by a timed wrapper;
* ``_generate_and_score_completions`` and ``training_step`` of the trainer, timed the same way
  on the instance, and the optimizer update (``on_pre_optimizer_step`` -> ``on_optimizer_step``).

The remainders are differences of these timers: scoring bookkeeping (prompt preparation, image
processing, decoding, advantages) = generate-and-score - generate - rewards; policy forward +
backward = training_step - generate-and-score; the rest of the step (gradient clipping,
zero_grad, scheduler, callbacks) = step - training_step - optimizer.

The first ``--warmup_steps`` steps are left out of the table (the reward loads its encoder and
gallery on its first call, the first forward passes allocate); they are reported separately.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import faiss
import torch
import transformers
import trl

from afmrl.catalog.load import load_catalog
from afmrl.embedded import resolve_catalog, resolve_model
from afmrl.embedded.synthetic_catalog import ATTRIBUTE_KEYS
from afmrl.embedded.tiny_models import tiny_mllm_path
from afmrl.encoder.model import ENCODER_CONFIG_NAME, EncoderConfig, ProductEncoder
from afmrl.modeling import load_mllm
from afmrl.retrieval.gallery import ProductGallery
from benchmarks._machine import describe_machine
from rar.prompts import build_prompt_dataset
from rewards import get_reward_funcs, validate_reward_weights

ROOT = Path(__file__).resolve().parents[1]
REWARDS = ["retrieval_rank", "attribute_format"]
REWARD_WEIGHTS = [1.0, 0.2]
SHARE_GOAL = 0.10


# ---------------------------------------------------------------------------------------------
# ---------------------------------------------------------------------------------------------
class StepTimes:
    """Durations per optimizer step: ``parts[step][name]`` seconds (summed over calls)."""

    def __init__(self):
        self.parts: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.calls: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.step = -1  # index of the step in progress (0-based); -1 before training

    def add(self, name: str, seconds: float) -> None:
        self.parts[self.step][name] += seconds
        self.calls[self.step][name] += 1

    def timed(self, name: str, func):
        """``func`` wrapped so that each call's duration is added to ``name``."""

        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return func(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - t0)

        return wrapper


class TimedReward:
    """A timing proxy for a reward callable: same ``__name__``, plain object (not an nn.Module)."""

    def __init__(self, func, times: StepTimes):
        self.func = func
        self.__name__ = getattr(func, "__name__", type(func).__name__)
        self._times = times

    def __call__(self, *args, **kwargs):
        counters = getattr(self.func, "counters", None)
        before = dict(counters) if counters is not None else None
        t0 = time.perf_counter()
        try:
            return self.func(*args, **kwargs)
        finally:
            self._times.add(f"reward/{self.__name__}", time.perf_counter() - t0)
            inner = getattr(self.func, "last_timings", None)
            if inner and "encode" in inner:
                self._times.add(f"reward/{self.__name__}/encode", inner["encode"])
            if before is not None:  # work done in this call (retrieval_rank's counters)
                for key in ("completions", "invalid", "encoded_queries"):
                    if key in counters:
                        self._times.counts[self._times.step][f"{self.__name__}/{key}"] += counters[key] - before.get(
                            key, 0
                        )


class StepTimer(transformers.TrainerCallback):
    def __init__(self, times: StepTimes):
        self.times = times
        self._begin = self._last_end = self._pre_opt = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.times.step = state.global_step
        self._begin = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._pre_opt = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.times.add("optimizer", time.perf_counter() - self._pre_opt)

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.add("step", now - self._begin)
        if self._last_end is not None:
            self.times.add("interval", now - self._last_end)
        self._last_end = now


# ---------------------------------------------------------------------------------------------
# Policies built from config (no download): the demo's, and a wider, deeper one of the same family and tokenizer.
POLICIES = {"tiny": {}, "larger": {"hidden_size": 384, "num_layers": 6, "num_heads": 6}}


def warm_start(model_dir: str, catalog_dir: str, listings: int, steps: int, out_dir: Path) -> Path:
    """The tiny policy after ``steps`` SFT steps of recipes/sft_attributes.py on the first ``listings`` listings."""
    spec = importlib.util.spec_from_file_location("sft_attributes", ROOT / "recipes" / "sft_attributes.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    parser = trl.TrlParser((recipe.SFTScriptArguments, trl.SFTConfig, trl.ModelConfig))
    recipe.main(
        *parser.parse_args_and_config(
            [
                "--catalog",
                str(catalog_dir),
                "--model_name_or_path",
                str(model_dir),
                "--max_train_listings",
                str(listings),
                "--output_dir",
                str(out_dir),
                "--max_steps",
                str(steps),
                "--per_device_train_batch_size",
                str(listings),
                "--learning_rate",
                "1e-2",
                "--lr_scheduler_type",
                "constant",
                "--assistant_only_loss",
                "true",
                "--activation_checkpointing",
                "false",
                "--save_strategy",
                "no",
                "--bf16",
                "false",
                "--use_cpu",
                "true",
                "--report_to",
                "none",
                "--disable_tqdm",
                "true",
                "--seed",
                "0",
            ]
        )
    )
    return out_dir


def _shape(config) -> str:
    text = getattr(config, "text_config", config)
    return f"{config.model_type}, hidden size {text.hidden_size}, {text.num_hidden_layers} decoder layers"


def grpo_args(args, output_dir: Path) -> dict:
    return dict(
        output_dir=str(output_dir),
        num_generations=args.num_generations,
        per_device_train_batch_size=args.batch_size,  # counts completions: batch_size / num_generations prompts
        max_completion_length=args.max_completion_length,
        max_steps=args.warmup_steps + args.steps,
        learning_rate=args.learning_rate,
        reward_weights=REWARD_WEIGHTS,
        logging_steps=1,
        save_strategy="no",
        bf16=False,
        activation_checkpointing=False,
        use_cpu=True,
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )


# ---------------------------------------------------------------------------------------------
def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), statistics.fmean(values)


def summarise(times: StepTimes, first_measured: int, reward_names: list[str]) -> dict:
    steps = sorted(s for s in times.parts if s >= first_measured and "step" in times.parts[s])
    rows: dict[str, list[float]] = defaultdict(list)
    for s in steps:
        p = times.parts[s]
        rewards = sum(p.get(f"reward/{n}", 0.0) for n in reward_names)
        rows["step"].append(p["step"])
        if "interval" in p:
            rows["interval"].append(p["interval"])
        rows["generate"].append(p.get("generate", float("nan")))
        for n in reward_names:
            rows[f"reward/{n}"].append(p.get(f"reward/{n}", 0.0))
            if f"reward/{n}/encode" in p:
                rows[f"reward/{n}/encode"].append(p[f"reward/{n}/encode"])
                rows[f"reward/{n}/encoder_inputs"].append(p.get("encoder_inputs", 0.0))
                rows[f"reward/{n}/encoder_forward"].append(p[f"reward/{n}/encode"] - p.get("encoder_inputs", 0.0))
        rows["rewards"].append(rewards)
        rows["scoring_other"].append(p["gen_score"] - p.get("generate", 0.0) - rewards)
        rows["fwd_bwd"].append(p["training_step"] - p["gen_score"])
        rows["optimizer"].append(p["optimizer"])
        rows["step_other"].append(p["step"] - p["training_step"] - p["optimizer"])
        rows["gen_score"].append(p["gen_score"])
        rows["reward_share"].append(rewards / p["step"])
        rows["generate_calls"].append(times.calls[s].get("generate", 0))
        rows["gen_score_calls"].append(times.calls[s].get("gen_score", 0))
        for key in ("completions", "invalid", "encoded_queries"):
            rows[f"rr/{key}"].append(times.counts[s].get(f"retrieval_rank/{key}", 0))
    return {"steps": steps, "rows": dict(rows)}


def fmt_ms(x: float) -> str:
    return "n/a" if x != x else f"{x * 1000:.0f} ms" if x >= 0.1 else f"{x * 1000:.1f} ms"


def report(args, command, info, setup, summary, warmup, logs, elapsed) -> str:
    rows = summary["rows"]
    n = len(summary["steps"])
    step_mean = statistics.fmean(rows["step"])
    share_med, share_mean = _stats(rows["reward_share"])
    share_total = sum(rows["rewards"]) / sum(rows["step"])
    generate_seen = all(c > 0 for c in rows["generate_calls"])

    def line(label, key, indent=False):
        med, mean = _stats(rows[key])
        return (
            f"| {'&nbsp;&nbsp;' if indent else ''}{label} | {fmt_ms(med)} | {fmt_ms(mean)} | {mean / step_mean:.1%} |"
        )

    table = [
        "| part of the step | median | mean | share of mean step |",
        "|---|---|---|---|",
        line("**whole step** (on_step_begin -> on_step_end)", "step"),
        line("generate + score (`_generate_and_score_completions`)", "gen_score"),
    ]
    if generate_seen:
        table.append(line("policy `generate`", "generate", indent=True))
    for name in setup["reward_names"]:
        table.append(line(f"reward `{name}`", f"reward/{name}", indent=True))
        if f"reward/{name}/encode" in rows:
            table.append(line("&nbsp;&nbsp;of which `encoder.encode`", f"reward/{name}/encode", indent=True))
            table.append(
                line(
                    "&nbsp;&nbsp;&nbsp;&nbsp;input building (chat template, tokenizer, image processor)",
                    f"reward/{name}/encoder_inputs",
                    indent=True,
                )
            )
            table.append(
                line(
                    "&nbsp;&nbsp;&nbsp;&nbsp;encoder model forward (and image fetch)",
                    f"reward/{name}/encoder_forward",
                    indent=True,
                )
            )
    table += [
        line("**all rewards**", "rewards", indent=True),
        line("prompt/image processing, decoding, advantages, metrics", "scoring_other", indent=True),
        line("policy forward + backward (loss)", "fwd_bwd"),
        line("optimizer update", "optimizer"),
        line("rest (grad clipping, zero_grad, scheduler, callbacks)", "step_other"),
    ]
    if rows.get("interval"):
        med, mean = _stats(rows["interval"])
        table.append(
            f"| step-to-step interval (adds next batch loading and logging) | {fmt_ms(med)} | {fmt_ms(mean)} | "
            f"{mean / step_mean:.1%} |"
        )
    met = max(share_mean, share_total) <= SHARE_GOAL
    enc_mean = statistics.fmean(rows.get("reward/retrieval_rank/encode", [float("nan")]))
    fb_mean = statistics.fmean(rows["fwd_bwd"])
    rr_rest = statistics.fmean(rows.get("reward/retrieval_rank", [float("nan")])) - enc_mean
    config_lines = [f"    {k}={v!r}," for k, v in setup["config"].items()]
    derived = ", ".join(f"`{k}` = {v!r}" for k, v in setup["derived"].items())
    lines = [
        "# Where a GRPO step goes: rewards vs generation vs the policy update",
        "",
        f"Generated by `{command}` in {elapsed:.0f} s (after imports) on: {info}.",
        f"`torch.set_num_threads({args.threads})` and `faiss.omp_set_num_threads({args.threads})` were set by the "
        "script "
        "(on shared cores a second OpenMP thread waiting for a busy core makes tiny forwards far slower). Every number "
        "below was measured in that run; see the module docstring of `benchmarks/grpo_step_breakdown.py` for how. "
        "Timings on shared cores are noisy: compare figures within this file only.",
        "",
        "## Setup",
        "",
        f"- Policy: `{setup['policy']}` (Qwen2-VL, {setup['policy_params']:,} parameters, random init), warm-started "
        "by recipes/sft_attributes.py, "
        f"{args.sft_steps} full-batch SFT steps on the teacher's attribute text of {args.sft_rows} train listings "
        f"({setup['sft_seconds']:.1f} s) so that completions parse.",
        f"- Rewards (`rewards.get_reward_funcs`, weights {REWARD_WEIGHTS}): "
        + ", ".join(f"`{r}`" for r in REWARDS)
        + ".",
        f"- Encoder of `retrieval_rank`: {setup['encoder']}.",
        "- Image cache of `retrieval_rank` (`afmrl.encoder.model.ImageCache`, keyed by listing id: image processing "
        "and "
        "vision tower once per listing, then only the language model per query): "
        + (
            f"level `{ic.level}`, {ic.hits} hits / {ic.misses} misses over the whole run (listings of one call "
            "counted once)."
            if (ic := setup.get("image_cache")) is not None
            else "off."
        ),
        f"- Gallery: the embedded catalog's train split, {setup['gallery_size']:,} listings, index "
        f"`{setup['index']}` (built in {setup['gallery_seconds']:.1f} s before training, not in the steps).",
        f"- Prompts: {setup['prompts']:,} train listings of `{setup['catalog']}` (one image + a fixed instruction); "
        f"{args.batch_size // args.num_generations} prompt(s) x {args.num_generations} completions per step.",
        f"- {args.warmup_steps} warm-up steps, then {n} measured steps.",
        "",
        "GRPOConfig:",
        "",
        "```python",
        "trl.GRPOConfig(",
        *config_lines,
        ")",
        "```",
        "",
        f"Resolved by TRL: {derived}.",
        "",
        "## Per optimizer step (measured steps)",
        "",
        *table,
        "",
        f"Reward share of the step: median {share_med:.1%}, mean {share_mean:.1%}, total reward time / total step "
        f"time {share_total:.1%}. Goal <= {SHARE_GOAL:.0%}: " + ("met." if met else "NOT met."),
    ]
    if not generate_seen:
        lines.append(
            "The policy's `generate` was not called through the patched attribute in every step: generation "
            "time is not reported separately (it is inside generate + score)."
        )
    lines += [
        "",
        "Per-step values (ms):",
        "",
        "| step | whole step | generate | rewards | of which retrieval_rank | forward + backward | reward share | "
        "parsable completions | enriched queries encoded |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(summary["steps"]):
        parsable = rows["rr/completions"][i] - rows["rr/invalid"][i]
        lines.append(
            f"| {s + 1} | {rows['step'][i] * 1000:.0f} | {rows['generate'][i] * 1000:.0f} | "
            f"{rows['rewards'][i] * 1000:.1f} | {rows['reward/retrieval_rank'][i] * 1000:.1f} | "
            f"{rows['fwd_bwd'][i] * 1000:.0f} | {rows['reward_share'][i]:.1%} | "
            f"{parsable} / {rows['rr/completions'][i]} | {rows['rr/encoded_queries'][i]} |"
        )
    total_c, total_inv = sum(rows["rr/completions"]), sum(rows["rr/invalid"])
    lines += [
        "",
        f"`retrieval_rank` encodes only parsable completions (identical texts of one listing once): "
        f"{total_c - total_inv} of {total_c} completions parsed over the measured steps "
        f"({(total_c - total_inv) / max(total_c, 1):.0%}), {sum(rows['rr/encoded_queries'])} enriched queries were "
        "encoded. A policy whose output parses more often makes the reward proportionally dearer (up to one encoded "
        "query per completion).",
    ]
    lines += [
        "",
        "## Warm-up steps (not in the table)",
        "",
        "| step | whole step | rewards | of which retrieval_rank |",
        "|---|---|---|---|",
    ]
    for w in warmup:
        lines.append(
            f"| {w['step'] + 1} | {fmt_ms(w['step_s'])} | {fmt_ms(w['rewards_s'])} | {fmt_ms(w['retrieval_rank_s'])} |"
        )
    lines += [
        "",
        "The first `retrieval_rank` call loads the encoder and the saved gallery in the training process "
        f"({setup['reward_load_seconds']:.2f} s, the reward's own `load_seconds`).",
        "",
        "## Sanity: what the policy wrote (TRL's logs, means over the measured steps)",
        "",
        "| metric | mean |",
        "|---|---|",
    ]
    for key, value in logs.items():
        lines.append(f"| `{key}` | {value:.4g} |")
    lines += [
        "",
        f"Reading. Policy: {setup['policy_shape']}; encoder backbone: {setup['encoder_shape']}. "
        f"Generation is up to {args.max_completion_length} incremental forwards over {args.batch_size} sequences, the "
        "reward one encoder forward over the step's unique enriched queries plus one exact search over the gallery. "
        "With a real policy, longer completions and a GPU the proportions change (generation grows with the number "
        "of new tokens, the reward does not); these figures say how the step divides at this scale, on this CPU. "
        f"Per step, the reward's `encoder.encode` took {fmt_ms(enc_mean)} (mean) against {fmt_ms(fb_mean)} for the "
        f"policy's forward + backward over the step's prompts and completions; everything else in `retrieval_rank` "
        f"(parsing, lookups, search, metrics, logging) took {fmt_ms(rr_rest)}.",
        "",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_size", type=int, default=16, help="per_device_train_batch_size (completions per step)")
    p.add_argument("--num_generations", type=int, default=8)
    # 64 covers a whole answer: the teacher's canonical attribute lines are 36 tokens (median), 52 (max)
    # in the tiny tokenizer, so 32 would cut most completions short.
    p.add_argument("--max_completion_length", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    p.add_argument("--warmup_steps", type=int, default=2, help="steps run first and left out of the table")
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--sft_steps", type=int, default=40, help="warm-start SFT steps (full batch)")
    p.add_argument("--sft_rows", type=int, default=16, help="train listings in the warm-start batch")
    p.add_argument(
        "--encoder",
        default="auto",
        help="encoder directory; 'fresh': a new ProductEncoder over the tiny backbone; 'auto': outputs/agcl-demo "
        "when it holds an encoder, else a fresh one",
    )
    p.add_argument(
        "--cache_dir",
        default=str(ROOT / "outputs" / "embedded"),
        help="where the embedded catalog and tiny model live (built there if missing)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    p.add_argument(
        "--policy",
        choices=sorted(POLICIES),
        default="tiny",
        help="policy: 'tiny' (the demo's) or 'larger' (same family and tokenizer, wider and deeper)",
    )
    p.add_argument("--output", default=str(ROOT / "docs" / "results" / "grpo_step_breakdown.md"))
    p.add_argument("--quick", action="store_true", help="smoke test: 1 warm-up + 2 measured steps, no file written")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup_steps, args.steps, args.sft_steps = 1, 2, 10
    if args.batch_size % args.num_generations:
        raise SystemExit("--batch_size must be a multiple of --num_generations")
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    command = "python -m benchmarks.grpo_step_breakdown" + (
        "" if argv is None and len(sys.argv) == 1 else " " + " ".join(sys.argv[1:] if argv is None else argv)
    )
    info = describe_machine()
    print(info, flush=True)
    start = time.perf_counter()
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()

    catalog_dir = resolve_catalog("embedded", args.cache_dir)
    model_dir = (
        resolve_model("tiny-qwen2-vl", args.cache_dir)
        if args.policy == "tiny"
        else str(tiny_mllm_path(Path(args.cache_dir) / "tiny-models", **POLICIES[args.policy]))
    )
    train = load_catalog(catalog_dir, split="train", verify_images=False)
    setup = {
        "catalog": os.path.relpath(catalog_dir, ROOT),
        "policy": os.path.relpath(model_dir, ROOT),
        "prompts": len(train),
        "reward_names": list(REWARDS),
    }

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # ---- encoder and gallery (the reward loads both from disk, as a recipe would pass them)
        demo = ROOT / "outputs" / "agcl-demo"
        if args.encoder == "auto":
            encoder_dir = demo if (demo / ENCODER_CONFIG_NAME).is_file() else None
        elif args.encoder == "fresh":
            encoder_dir = None
        else:
            encoder_dir = Path(args.encoder)
        if encoder_dir is None:
            encoder_dir = tmp / "encoder"
            ProductEncoder.from_backbone(
                EncoderConfig(backbone=resolve_model("tiny-qwen2-vl", args.cache_dir), lora_r=0), trainable=False
            ).save_pretrained(encoder_dir)
            setup["encoder"] = (
                "a fresh `ProductEncoder` over the tiny backbone (random weights, no LoRA), saved to a temp dir"
            )
        else:
            setup["encoder"] = f"`{os.path.relpath(encoder_dir, ROOT)}` (a trained encoder)"
        t0 = time.perf_counter()
        gallery = ProductGallery.build(catalog_dir, str(encoder_dir), split="train", batch_size=64, show_progress=False)
        setup["gallery_seconds"] = time.perf_counter() - t0
        setup["gallery_size"] = gallery.size
        setup["index"] = gallery.index.index_type
        gallery.save(tmp / "gallery")
        del gallery
        print(f"gallery: {setup['gallery_size']} listings in {setup['gallery_seconds']:.1f} s", flush=True)

        # ---- policy warm start
        t0 = time.perf_counter()
        policy_dir = warm_start(model_dir, catalog_dir, args.sft_rows, args.sft_steps, tmp / "policy")
        setup["sft_seconds"] = time.perf_counter() - t0
        print(f"warm start: {args.sft_steps} SFT steps in {setup['sft_seconds']:.1f} s", flush=True)

        # ---- prompts, rewards, trainer
        dataset = build_prompt_dataset(train, keep_columns=("listing_id", "attributes"))  # the prompt SFT used
        times = StepTimes()
        funcs = get_reward_funcs(
            REWARDS,
            encoder=str(encoder_dir),
            gallery=str(tmp / "gallery"),
            catalog=catalog_dir,
            split="train",
            known_keys=ATTRIBUTE_KEYS,
        )
        validate_reward_weights(REWARD_WEIGHTS, funcs)
        timed_funcs = [TimedReward(f, times) for f in funcs]
        config_kwargs = grpo_args(args, tmp / "run")
        model, processor = load_mllm(policy_dir)
        setup["policy_params"] = sum(q.numel() for q in model.parameters())
        setup["policy_shape"] = _shape(model.config)
        trainer = trl.GRPOTrainer(
            model=model,
            reward_funcs=timed_funcs,
            args=trl.GRPOConfig(**config_kwargs),
            train_dataset=dataset,
            processing_class=processor,
            callbacks=[StepTimer(times)],
        )
        assert trainer.reward_func_names == REWARDS, trainer.reward_func_names
        gen_model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        gen_model.generate = times.timed("generate", gen_model.generate)
        trainer._generate_and_score_completions = times.timed("gen_score", trainer._generate_and_score_completions)
        # During training only the reward's encoder builds encoder inputs (the gallery was built before).
        # With the reward's image cache (the default) inputs are built by build_inputs_cached instead.
        original_build_inputs = ProductEncoder.build_inputs
        original_build_inputs_cached = ProductEncoder.build_inputs_cached
        ProductEncoder.build_inputs = times.timed("encoder_inputs", original_build_inputs)
        ProductEncoder.build_inputs_cached = times.timed("encoder_inputs", original_build_inputs_cached)
        trainer.training_step = times.timed("training_step", trainer.training_step)
        c = trainer.args
        setup["derived"] = {
            "steps_per_generation": c.steps_per_generation,
            "generation_batch_size": c.generation_batch_size,
            "gradient_accumulation_steps": c.gradient_accumulation_steps,
            "loss_type": c.loss_type,
            "beta": c.beta,
            "num_iterations": c.num_iterations,
            "temperature": c.temperature,
            "optim": str(getattr(c.optim, "value", c.optim)),
        }
        setup["config"] = {k: v for k, v in config_kwargs.items() if k != "output_dir"}
        print("training ...", flush=True)
        try:
            trainer.train()
        finally:
            ProductEncoder.build_inputs = original_build_inputs
            ProductEncoder.build_inputs_cached = original_build_inputs_cached
        state = funcs[0]._state
        setup["reward_load_seconds"] = state.load_seconds if state is not None else float("nan")
        setup["encoder_shape"] = _shape(state.encoder.backbone.config) if state is not None else "not loaded"
        setup["image_cache"] = getattr(state, "image_cache", None) if state is not None else None
        history = [h for h in trainer.state.log_history if "step_time" in h]

    summary = summarise(times, args.warmup_steps, REWARDS)
    warmup = [
        {
            "step": s,
            "step_s": times.parts[s]["step"],
            "rewards_s": sum(times.parts[s].get(f"reward/{r}", 0.0) for r in REWARDS),
            "retrieval_rank_s": times.parts[s].get("reward/retrieval_rank", 0.0),
        }
        for s in sorted(times.parts)
        if 0 <= s < args.warmup_steps
    ]
    measured = history[args.warmup_steps :]
    keys = [
        "completions/mean_length",
        "completions/clipped_ratio",
        "reward",
        "reward_std",
        "rewards/retrieval_rank/mean",
        "rewards/retrieval_rank/std",
        "rewards/attribute_format/mean",
        "rewards/attribute_format/std",
        "retrieval_rank/invalid_rate",
        "retrieval_rank/num_attributes",
        "retrieval_rank/rank",
        "retrieval_rank/rank_without_attributes",
        "step_time",
    ]
    logs = {k: statistics.fmean(h[k] for h in measured if k in h) for k in keys if any(k in h for h in measured)}
    elapsed = time.perf_counter() - start
    print(json.dumps({k: _stats(v) for k, v in summary["rows"].items()}, indent=1), flush=True)
    text = report(args, command, info, setup, summary, warmup, logs, elapsed)
    if args.quick:
        print(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
