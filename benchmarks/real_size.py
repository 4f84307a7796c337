"""Real sizes: the published Qwen2-VL-2B / Qwen2.5-VL-3B / 7B shapes through every code path, once. Writes
docs/results/real_size.md.

    nice -n 10 python -m benchmarks.real_size      # CPU, every case that fits (resumable; tens of minutes)
    python -m benchmarks.real_size --quick         # 2-layer models of the same families: checks the script
    python -m benchmarks.real_size --only agcl_2b  # one case (again: --force)
    python -m benchmarks.real_size --device cuda   # on a GPU: bf16, peak GPU memory, vLLM when installed

Tests run tiny models only; a user's first real run meets the real module names, image geometry, chat template and
memory. Weights cannot be downloaded here, so each architecture is built from its published config (the ones
written out in ``benchmarks/memory.py``) with random bf16 weights and saved as an ordinary checkpoint, with the
published image-processor settings and a locally trained tokenizer that has the Qwen special tokens at their real
ids and the real chat template (the real tokenizer files could not be downloaded; see
``benchmarks/_real_size_models.py``). Every case then runs OUR entry points on it: ``recipes/agcl_train.py``'s
``main`` with ``recipes/configs/agcl_qwen2vl_2b.yaml`` (LoRA r16/alpha64, activation checkpointing, GradCache),
``RetrievalRankReward`` over a ``ProductGallery`` built by the trained 2B encoder, and ``recipes/rar_grpo.py``'s
``main`` with ``rar_qwen25vl_3b.yaml`` / ``rar_qlora_7b.yaml`` (LoRA or QLoRA, TRL GRPO), overriding only sizes.

Each case runs in its own process (its peak resident set, VmHWM, is its own; a crash ends only that case) and
writes ``outputs/real_size/<device>[-quick]/<case>.json``; a rerun skips finished cases. Before each case the
script waits while /tmp/quiet.lock exists (a shared machine), and on CPU a case whose model-state estimate (from
``benchmarks/memory.py``) exceeds ``--max_rss_gb`` is skipped with that reason instead of risking the machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import _real_size_models as M
from benchmarks.memory import ARCHITECTURES, GB, meta_counts, model_state_bytes

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"2b": "Qwen2-VL-2B (stage-1 encoder)", "3b": "Qwen2.5-VL-3B (generator)", "7b": "Qwen2.5-VL-7B (generator)"}
# case -> (model, what it runs); sizes per device in SETTINGS
CASES = {
    "agcl_2b": ("2b", "stage 1: 2 AGCL steps, LoRA r16/a64, activation checkpointing, GradCache chunk 2"),
    "reward_2b": ("2b", "RetrievalRankReward with the 2B encoder over a gallery"),
    "grpo_3b": ("3b", "stage 2: 2 GRPO steps, LoRA, beta 0.04 (adapter-disabled reference)"),
    "grpo_7b_qlora": ("7b", "stage 2: 2 GRPO steps, QLoRA nf4 (rar_qlora_7b.yaml: beta 0)"),
    "zero3_2b": (
        "2b",
        "stage 1: 2 AGCL steps under DeepSpeed ZeRO-3, 2 processes (no GradCache: refused with DeepSpeed)",
    ),
}
DISTINCT = "_real_size_models:distinct_reward"  # random weights: all completions score alike without it
# listings per AGCL step = 2 x pairs; G completions of `tokens` per prompt; the reward's gallery = the train listings of
# `gallery_products` products with `gallery_photo` px photos (on CPU smaller photos: one 448 px listing is ~17 s of 2B
# encoder forward on 2 cores, so 200 of them would take about an hour)
SETTINGS = {
    "cpu": dict(
        pairs=2,
        chunk=2,
        G=2,
        prompts=1,
        tokens=32,
        products=60,
        photo=448,
        reward_queries=4,
        gallery_products=75,
        gallery_photo=112,
    ),
    "cuda": dict(
        pairs=4,
        chunk=2,
        G=4,
        prompts=2,
        tokens=32,
        products=60,
        photo=448,
        reward_queries=8,
        gallery_products=75,
        gallery_photo=448,
    ),
}


def progress(case: str, message: str) -> None:
    print(
        f"[{time.strftime('%H:%M:%S')}] {case}: {message} (RSS {M.status_bytes('VmRSS') / GB:.1f} GB, "
        f"peak {M.status_bytes('VmHWM') / GB:.1f} GB)",
        flush=True,
    )


def probe_callback(case: str, result: dict):
    """A TrainerCallback: step times, progress lines, and which LoRA tensors got a finite non-zero gradient."""
    import torch
    from transformers import TrainerCallback

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            result.setdefault("steps", [])
            held = {}  # bytes of parameters this process holds, by dtype (ZeRO-3: its partitions)
            for p in model.parameters():
                key = str(getattr(p, "ds_tensor", p).dtype)
                held[key] = (
                    held.get(key, 0) + getattr(p, "ds_tensor", p).numel() * getattr(p, "ds_tensor", p).element_size()
                )
            result["parameter_bytes_held"] = held
            progress(case, f"training starts ({state.max_steps} steps)")

        def on_step_begin(self, args, state, control, **kwargs):
            self.started, self.cpu_started = time.perf_counter(), time.process_time()

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]
            if any(hasattr(p, "ds_id") for _, p in lora):  # ZeRO-3: DeepSpeed holds (and has applied) the gradients
                self.grads = {"gradients": "held by DeepSpeed (not inspected; see the loss)"}
                return
            missing = [n for n, p in lora if p.grad is None or not torch.isfinite(p.grad).all()]
            zero = [n for n, p in lora if p.grad is not None and not p.grad.any()]
            self.grads = {
                "lora_tensors": len(lora),
                "without_finite_grad": len(missing),
                "zero_grad": len(zero),
                "examples": (missing or zero)[:2],
            }

        def on_step_end(self, args, state, control, **kwargs):
            step = {
                "seconds": time.perf_counter() - self.started,
                "cpu_seconds": time.process_time() - self.cpu_started,
                **getattr(self, "grads", {}),
            }
            result["steps"].append(step)
            if torch.cuda.is_available():
                step["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()
            grads = step.get("gradients") or (
                f"LoRA tensors with a gradient: {step.get('lora_tensors', 0) - step.get('without_finite_grad', 0)}/"
                f"{step.get('lora_tensors', 0)} ({step.get('zero_grad', 0)} exactly zero)"
            )
            progress(
                case,
                f"step {state.global_step}/{state.max_steps} in {step['seconds']:.0f} s (CPU time of the "
                f"process {step['cpu_seconds']:.0f} s); {grads}",
            )

        def on_log(self, args, state, control, logs=None, **kwargs):
            result.setdefault("logs", []).append({k: v for k, v in (logs or {}).items() if isinstance(v, int | float)})

    return Probe()


def with_probe(trainer_cls, case: str, result: dict):
    """``trainer_cls`` with the probe callback added (the recipes build their own trainer)."""

    class Probed(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(probe_callback(case, result))

    return Probed


# ----------------------------------------------------------------------------- cases (each in its own process)


def run_agcl(ctx: dict, result: dict) -> None:
    import agcl_train

    s = ctx["settings"]
    argv = [
        "--config",
        str(ROOT / "recipes/configs/agcl_qwen2vl_2b.yaml"),
        "--catalog",
        ctx["catalog"],
        "--model_name_or_path",
        ctx["model_dir"],
        "--output_dir",
        str(ctx["work"] / "encoder"),
        "--per_device_train_batch_size",
        str(s["pairs"]),
        "--gradient_cache_chunk_size",
        str(s["chunk"]),
        "--max_steps",
        "2",
        "--eval_split",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--warmup_steps",
        "0",
        "--disable_tqdm",
        "true",
        "--use_cpu",
        str(ctx["device"] == "cpu").lower(),
    ]
    result["argv"] = argv
    agcl_train.AGCLTrainer = with_probe(agcl_train.AGCLTrainer, ctx["case"], result)
    agcl_train.main(*agcl_train.parse_args(argv))


def ensure_encoder(ctx: dict) -> Path:
    """The 2B encoder agcl_2b trained, else a fresh LoRA one over the 2B backbone (same shapes, untrained)."""
    encoder = ctx["work"] / "encoder"
    if not (encoder / "encoder_config.json").is_file():
        from afmrl.encoder.model import EncoderConfig, ProductEncoder

        progress(ctx["case"], "no trained encoder (agcl_2b not run): saving a fresh LoRA encoder over the 2B")
        ProductEncoder.from_backbone(EncoderConfig(backbone=ctx["models"]["2b"]), trainable=False).save_pretrained(
            encoder
        )
    return encoder


def run_reward(ctx: dict, result: dict) -> None:
    import torch

    from afmrl.catalog.load import load_catalog
    from afmrl.encoder.model import ProductEncoder
    from afmrl.retrieval.gallery import ProductGallery
    from rewards.retrieval_rank import RetrievalRankReward

    s, case = ctx["settings"], ctx["case"]
    device = "cuda" if ctx["device"] == "cuda" else "cpu"
    encoder = ProductEncoder.from_pretrained(ensure_encoder(ctx)).to(device)
    catalog = load_catalog(ctx["reward_catalog"], split="train")
    progress(case, f"encoder loaded; building the gallery of {len(catalog)} listings ({s['gallery_photo']} px photos)")
    started, cpu = time.perf_counter(), time.process_time()
    gallery = ProductGallery.build(catalog, encoder, batch_size=8, show_progress=True)
    result["gallery"] = {
        "listings": len(catalog),
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu,
    }
    gallery.save(ctx["work"] / "gallery")
    progress(case, f"gallery built in {result['gallery']['seconds']:.0f} s; saved for grpo_* cases")
    reward = RetrievalRankReward(encoder=encoder, gallery=gallery, catalog=ctx["reward_catalog"], split="train")
    rows = catalog.select(range(0, len(catalog), max(1, len(catalog) // s["reward_queries"]))[: s["reward_queries"]])
    keys = ("color", "pattern", "logo", "category", "secondary_color")
    calls = []
    for call in range(2):  # the first call processes each listing's image; the second reuses it (ImageCache)
        ids, completions = [], []
        for row in rows:
            attrs = row["attributes"] or {}
            for g in range(4):  # G = 4 distinct attribute texts per listing
                kept = [k for k in keys[: 2 + (g + call) % 4] if attrs.get(k)]
                ids.append(row["listing_id"])
                completions.append([{"role": "assistant", "content": "; ".join(f"{k}: {attrs[k]}" for k in kept)}])
        started, cpu = time.perf_counter(), time.process_time()
        values = reward(prompts=[None] * len(ids), completions=completions, listing_id=ids)
        seconds = time.perf_counter() - started
        calls.append(
            {
                "completions": len(ids),
                "seconds": seconds,
                "per_completion_s": seconds / len(ids),
                "cpu_seconds": time.process_time() - cpu,
                "finite": all(v is None or v == v for v in values),
                "timings": reward.last_timings,
            }
        )
        progress(case, f"reward call {call + 1}: {len(ids)} completions in {seconds:.1f} s")
    result["calls"] = calls
    texts = [c[0]["content"] for c in completions]
    images = [im for im in rows["image"] for _ in range(4)]
    titles = [t for t in rows["title"] for _ in range(4)]
    started, cpu = time.perf_counter(), time.process_time()
    encoder.encode(images, titles, texts, batch_size=8)
    limit = (time.perf_counter() - started) / len(texts)
    result["encoder_forward_per_query_s"] = limit
    result["encoder_forward_per_query_cpu_s"] = (time.process_time() - cpu) / len(texts)
    progress(case, f"physical limit: {limit:.2f} s per enriched query (one encoder forward, image included)")
    if device == "cuda":
        result["gpu_peak_bytes"] = torch.cuda.max_memory_allocated()


def run_grpo(ctx: dict, result: dict) -> None:
    import rar_grpo

    s, big = ctx["settings"], ctx["case"] == "grpo_7b_qlora"
    gallery = ctx["work"] / "gallery"
    rewards = ["--reward_funcs", "attribute_format", DISTINCT, "--reward_weights", "1.0", "1.0"]
    if ctx["grpo_retrieval"]:
        if not (gallery / "gallery.json").exists() and not gallery.is_dir():
            raise SystemExit("--grpo_retrieval needs the gallery of reward_2b: run that case first")
        rewards = [
            "--reward_funcs",
            "retrieval_rank",
            "attribute_format",
            DISTINCT,
            "--reward_weights",
            "1.0",
            "0.1",
            "1.0",
            "--gallery",
            str(gallery),
        ]
    argv = [
        "--config",
        str(ROOT / "recipes/configs" / ("rar_qlora_7b.yaml" if big else "rar_qwen25vl_3b.yaml")),
        "--catalog",
        ctx["reward_catalog" if ctx["grpo_retrieval"] else "catalog"],
        "--encoder",
        str(ensure_encoder(ctx)),
        "--model_name_or_path",
        ctx["model_dir"],
        "--output_dir",
        str(ctx["work"] / ctx["case"]),
        "--sft_recipe",
        "",
        "--eval_split",
        "none",
        "--reward_kwargs",
        "",
        *rewards,
        "--num_generations",
        str(s["G"]),
        "--per_device_train_batch_size",
        str(s["G"] * s["prompts"]),
        "--gradient_accumulation_steps",
        "1",
        "--max_completion_length",
        str(s["tokens"]),
        "--max_steps",
        "2",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--max_train_listings",
        "16",
        "--log_completions",
        "false",
        "--warmup_steps",
        "0",
        "--disable_tqdm",
        "true",
        "--use_cpu",
        str(ctx["device"] == "cpu").lower(),
    ]
    if ctx["device"] == "cuda" and importlib.util.find_spec("vllm") and not big:
        argv += ["--use_vllm", "true", "--vllm_mode", "colocate", "--vllm_gpu_memory_utilization", "0.3"]
    result["argv"] = argv
    rar_grpo.GRPOTrainer = with_probe(rar_grpo.GRPOTrainer, ctx["case"], result)
    rar_grpo.main(*rar_grpo.parse_args(argv))


def run_zero3(ctx: dict, result: dict) -> None:
    """Two processes (``accelerate launch --config_file deepspeed_configs/zero3.yaml``, as a user starts ZeRO-3; gloo
    on CPU) each running agcl_train's main; each reports its own steps and peak."""
    s = ctx["settings"]
    out = ctx["work"] / "zero3"
    out.mkdir(parents=True, exist_ok=True)
    argv = [
        "--config",
        str(ROOT / "recipes/configs/agcl_qwen2vl_2b.yaml"),
        "--catalog",
        ctx["catalog"],
        "--model_name_or_path",
        ctx["model_dir"],
        "--output_dir",
        str(out / "encoder"),
        "--per_device_train_batch_size",
        str(max(1, s["pairs"] // 2)),
        "--gradient_cache_chunk_size",
        "0",
        "--max_steps",
        "2",
        "--eval_split",
        "none",
        "--save_strategy",
        "no",
        "--logging_steps",
        "1",
        "--report_to",
        "none",
        "--dataloader_num_workers",
        "0",
        "--warmup_steps",
        "0",
        "--disable_tqdm",
        "true",
        "--use_cpu",
        str(ctx["device"] == "cpu").lower(),
    ]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "deepspeed_configs/zero3.yaml"),
        "--num_processes",
        "2",
        __file__,
        "--_rank",
        str(out),
        "--",
        *argv,
    ]
    result["argv"] = argv
    subprocess.run(cmd, check=True, cwd=ROOT)
    result["ranks"] = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]


def zero3_rank(out: str, argv: list[str]) -> None:
    import agcl_train

    result = {"rank": int(os.environ.get("RANK", 0))}
    agcl_train.AGCLTrainer = with_probe(agcl_train.AGCLTrainer, f"zero3 rank {result['rank']}", result)
    agcl_train.main(*agcl_train.parse_args(argv))
    result["peak_rss_bytes"] = M.status_bytes("VmHWM")
    Path(out, f"rank{result['rank']}.json").write_text(json.dumps(result))


RUNNERS = {
    "agcl_2b": run_agcl,
    "reward_2b": run_reward,
    "grpo_3b": run_grpo,
    "grpo_7b_qlora": run_grpo,
    "zero3_2b": run_zero3,
}


def child(case: str, ctx_file: str) -> None:
    ctx = json.loads(Path(ctx_file).read_text())
    ctx["work"], ctx["case"] = Path(ctx["work"]), case
    result = {"case": case}
    started = time.perf_counter()
    progress(case, "starts")
    RUNNERS[case](ctx, result)
    result.update(
        seconds=time.perf_counter() - started, cpu_seconds=time.process_time(), peak_rss_bytes=M.status_bytes("VmHWM")
    )
    Path(ctx_file).with_suffix(".result.json").write_text(json.dumps(result, default=str))


# ----------------------------------------------------------------------------- the driver (one process per case)


def estimate_bytes(case: str, counts: dict, grpo_retrieval: bool) -> tuple[float, str]:
    """Model states of ``benchmarks/memory.py`` (weights, gradients, Adam; no activations) for one process."""
    c = counts[CASES[case][0]]
    if case == "agcl_2b":
        return model_state_bytes(c, "lora", "none"), "2B bf16 + LoRA r16 states"
    if case == "reward_2b":
        return c["total"] * 2.0, "2B bf16 (frozen)"
    if case == "zero3_2b":
        return model_state_bytes(c, "lora", "zero3", n=2), "2B bf16 + LoRA states, ZeRO-3 over 2, per process"
    method = "qlora" if case == "grpo_7b_qlora" else "lora"
    value, label = model_state_bytes(c, method, "none"), f"{CASES[case][0].upper()} {method} states"
    if grpo_retrieval:
        value, label = value + counts["2b"]["total"] * 2.0, label + " + the reward's 2B encoder"
    return value, label


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def wait_quiet(lock=Path("/tmp/quiet.lock")) -> None:
    while lock.exists():
        print(f"[{time.strftime('%H:%M:%S')}] {lock} exists (someone is timing): waiting", flush=True)
        time.sleep(30)


def run_logged(cmd: list[str], log: Path) -> tuple[int, list[str]]:
    """Run ``cmd`` niced, echoing and logging its output; returns (exit code, last lines)."""
    tail = []
    with (
        log.open("w") as f,
        subprocess.Popen(
            ["nice", "-n", "10", *cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc,
    ):
        for line in proc.stdout:
            f.write(line)
            line = line.split("\r")[-1]  # a progress bar's last state
            print("    " + line, end="", flush=True)
            tail = (tail + [line.rstrip()])[-25:]
    return proc.returncode, tail


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="2-layer models of the same families (script check).")
    parser.add_argument("--only", choices=list(CASES), action="append", help="Run this case (repeatable).")
    parser.add_argument("--force", action="store_true", help="Rerun cases that already have a result.")
    parser.add_argument("--max_rss_gb", type=float, default=14.0, help="CPU: skip a case whose estimate exceeds this.")
    parser.add_argument(
        "--grpo_retrieval",
        choices=("auto", "true", "false"),
        default="auto",
        help="GRPO with retrieval_rank over the 2B encoder (needs reward_2b's gallery); auto: on cuda.",
    )
    parser.add_argument("--workdir", default=str(ROOT / "outputs" / "real_size"))
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "real_size.md"))
    parser.add_argument("--_build", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_case", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--_rank", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    if args._build:
        key, path = args._build
        spec = M.quick_spec(ARCHITECTURES[MODELS[key]]) if args.quick else ARCHITECTURES[MODELS[key]]
        return M.write_checkpoint(spec, Path(path))
    if args._case:
        return child(*args._case)
    if args._rank:
        return zero3_rank(args._rank, rest[1:] if rest[:1] == ["--"] else rest)

    from benchmarks._machine import describe_machine

    mode = args.device + ("-quick" if args.quick else "")
    work = Path(args.workdir)
    results_dir = work / mode
    results_dir.mkdir(parents=True, exist_ok=True)
    settings = dict(SETTINGS[args.device], **({"products": 12, "gallery_products": 12} if args.quick else {}))
    specs = {k: M.quick_spec(ARCHITECTURES[v]) if args.quick else ARCHITECTURES[v] for k, v in MODELS.items()}
    counts = {k: meta_counts(spec) for k, spec in specs.items()}
    grpo_retrieval = args.device == "cuda" if args.grpo_retrieval == "auto" else args.grpo_retrieval == "true"
    catalog = M.photo_catalog(work / "data", settings["products"], settings["photo"])
    reward_catalog = M.photo_catalog(work / "data", settings["gallery_products"], settings["gallery_photo"])
    for case in args.only or list(CASES):
        out = results_dir / f"{case}.json"
        if out.is_file() and not args.force and "error" not in json.loads(out.read_text()):
            print(f"{case}: done before ({out}); --force reruns it (a failed case reruns by itself)", flush=True)
            continue
        key = CASES[case][0]
        estimate, label = estimate_bytes(case, counts, grpo_retrieval and case.startswith("grpo"))
        record = {
            "case": case,
            "what": CASES[case][1],
            "model": MODELS[key],
            "parameters": counts[key]["total"],
            "estimate_bytes": estimate,
            "estimate_of": label,
            "settings": settings,
            "device": args.device,
            "grpo_retrieval": grpo_retrieval and case.startswith("grpo"),
            "machine": describe_machine(),
        }
        if args.device == "cpu" and estimate > args.max_rss_gb * GB:
            record["skipped"] = f"estimate {estimate / GB:.1f} GB > --max_rss_gb {args.max_rss_gb:g}"
        elif args.device == "cuda" and case == "zero3_2b" and gpu_count() < 2:
            record["skipped"] = f"ZeRO-3 over 2 processes needs 2 GPUs; {gpu_count()} found"
        if "skipped" in record:
            out.write_text(json.dumps(record, indent=1))
            print(f"{case}: skipped, {record['skipped']}", flush=True)
            continue
        wait_quiet()
        model_dir = work / "models" / (key + ("-quick" if args.quick else ""))
        if not (model_dir / M.DONE).is_file():
            print(f"building {MODELS[key]} ({counts[key]['total'] / 1e9:.2f} B parameters) in {model_dir}", flush=True)
            started = time.perf_counter()
            code, tail = run_logged(
                [sys.executable, __file__, "--_build", key, str(model_dir)] + (["--quick"] if args.quick else []),
                results_dir / f"build-{key}.log",
            )
            if code:
                raise SystemExit(f"building {key} failed:\n" + "\n".join(tail))
            print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
        ctx = {
            "work": str(work / ("quick" if args.quick else "full")),
            "device": args.device,
            "settings": settings,
            "catalog": catalog,
            "reward_catalog": reward_catalog,
            "model_dir": str(model_dir),
            "grpo_retrieval": record["grpo_retrieval"],
            "models": {k: str(work / "models" / (k + ("-quick" if args.quick else ""))) for k in MODELS},
        }
        Path(ctx["work"]).mkdir(parents=True, exist_ok=True)
        ctx_file = results_dir / f"{case}.ctx.json"
        ctx_file.write_text(json.dumps(ctx))
        print(f"=== {case}: {CASES[case][1]} (estimate {estimate / GB:.1f} GB: {label})", flush=True)
        code, tail = run_logged([sys.executable, __file__, "--_case", case, str(ctx_file)], results_dir / f"{case}.log")
        result_file = ctx_file.with_suffix(".result.json")
        if code or not result_file.is_file():
            record.update(error=f"exit code {code}", tail=tail)
        else:
            record.update(json.loads(result_file.read_text()))
        out.write_text(json.dumps(record, indent=1, default=str))
        print(f"{case}: {'FAILED' if code else 'done'} -> {out}", flush=True)
    import _real_size_report

    report = _real_size_report.write(
        results_dir, Path(args.output) if not args.quick else results_dir / "real_size.md", mode=mode
    )
    print(f"wrote {report}")


if __name__ == "__main__":
    main()
