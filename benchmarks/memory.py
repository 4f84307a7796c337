"""Memory: LoRA vs QLoRA measured at one model size, and model-state estimates for the real sizes.

    python -m benchmarks.memory            # writes docs/results/memory.md (+ .json); about 3 minutes on 2 cores
    python -m benchmarks.memory --quick    # a smaller measured model, nothing written

(i) Estimates for the paper's models. Each architecture is built on the meta device from its
    published config (the values of its config.json on the hub, written out below; no weights, no
    network) and its parameters counted by kind: 4-bit-quantisable linears (every ``nn.Linear`` but
    the LM head, as transformers' bitsandbytes integration does), other weights, and the LoRA
    parameters (rank 16 on the language model's q/k/v/o/gate/up/down projections, as the recipes
    use). Model-state bytes per GPU then follow the usual accounting (ZeRO paper, Rajbhandari et al.
    2020): frozen bf16 weights 2 B; nf4 weights 0.5 B + double-quantised block constants
    (8 bits per 64 weights + 32 bits per 64x256) ; a trainable parameter 16 B on one GPU (fp32
    weight, gradient, two Adam moments), and 2 B + 14 B / N under ZeRO-2 or 16 B / N under ZeRO-3
    with N GPUs; ZeRO-3 also partitions the frozen weights. Activations, the KV cache of
    generation and CUDA workspace come on top and depend on batch and sequence length: they are
    not in the estimate (measured on a GPU where one was lent; see below).
(ii) Measured (CPU): a mid-size random Qwen2-VL (the same code path as real checkpoints:
    ``afmrl.modeling.load_mllm``, peft LoRA on the language model) loaded with bf16 weights
    (LoRA) and with nf4 weights (QLoRA), then three AdamW steps on a batch of token sequences.
    Each variant runs in its own process; resident memory (``VmRSS``) after loading, and the peak
    (``VmHWM``, reset after loading) during the steps, both above the process's memory before
    loading. The estimate of (i) for the same architecture stands beside the measurement.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._machine import describe_machine

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
N_GPUS = 8
LORA_R = 16
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + fp8 absmax per 64 + fp32 per 256 blocks (double quant)
_MROPE = {"type": "mrope", "mrope_section": [16, 24, 24]}
_QWEN25_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
# The published configs (config.json on the hub), and the parameter counts the hub reports for them.
ARCHITECTURES = {
    "Qwen2-VL-2B (stage-1 encoder)": dict(
        model_type="qwen2_vl",
        tie_word_embeddings=True,
        published=2_208_985_600,
        text_config=dict(
            hidden_size=1536,
            intermediate_size=8960,
            num_attention_heads=12,
            num_hidden_layers=28,
            num_key_value_heads=2,
            vocab_size=151936,
            rope_scaling=_MROPE,
        ),
        vision_config=dict(
            depth=32,
            embed_dim=1280,
            mlp_ratio=4,
            num_heads=16,
            in_chans=3,
            hidden_size=1536,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
    ),
    "Qwen2.5-VL-3B (generator)": dict(
        model_type="qwen2_5_vl",
        tie_word_embeddings=True,
        published=3_754_622_976,
        text_config=dict(
            hidden_size=2048,
            intermediate_size=11008,
            num_attention_heads=16,
            num_hidden_layers=36,
            num_key_value_heads=2,
            vocab_size=151936,
            rope_scaling=_MROPE,
        ),
        vision_config=dict(_QWEN25_VISION, out_hidden_size=2048),
    ),
    "Qwen2.5-VL-7B (generator)": dict(
        model_type="qwen2_5_vl",
        tie_word_embeddings=False,
        published=8_292_166_656,
        text_config=dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_attention_heads=28,
            num_hidden_layers=28,
            num_key_value_heads=4,
            vocab_size=152064,
            rope_scaling=_MROPE,
        ),
        vision_config=dict(_QWEN25_VISION, out_hidden_size=3584),
    ),
}
# The measured model: the same family, small enough for a CPU (about 200M parameters).
MEASURED = dict(
    model_type="qwen2_vl",
    tie_word_embeddings=False,
    text_config=dict(
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_hidden_layers=12,
        num_key_value_heads=4,
        vocab_size=32000,
        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
    ),
    vision_config=dict(
        depth=2,
        embed_dim=512,
        mlp_ratio=4,
        num_heads=8,
        in_chans=3,
        hidden_size=1024,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    ),
)
QUICK = dict(MEASURED, text_config=dict(MEASURED["text_config"], num_hidden_layers=2, vocab_size=4096))


def build_config(spec: dict):
    from transformers import AutoConfig

    spec = {k: v for k, v in spec.items() if k != "published"}
    return AutoConfig.for_model(spec.pop("model_type"), **spec)


def count_parameters(model) -> dict:
    """Parameters of ``model`` by kind: total, vision tower, 4-bit-quantisable linears, the rest, and LoRA's."""
    from afmrl.modeling import language_lora_targets
    from rar.policy import LM_LORA_TARGETS

    total = sum(p.numel() for p in model.parameters())
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    linear = sum(
        m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")
    )
    modules = dict(model.named_modules())
    lora = sum(
        LORA_R * (modules[n].in_features + modules[n].out_features)
        for n in language_lora_targets(model, LM_LORA_TARGETS)
    )
    return {"total": total, "vision": vision, "quantisable_linear": linear, "other": total - linear, "lora": lora}


def meta_counts(spec: dict) -> dict:
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(build_config(spec))
    return count_parameters(model)


def model_state_bytes(counts: dict, method: str, zero: str, n: int = N_GPUS) -> float:
    """Bytes per GPU for weights + gradients + Adam states (no activations), as the module docstring says."""
    if method == "full":
        trainable, frozen = counts["total"], 0.0
    else:
        trainable = counts["lora"]
        frozen = (
            counts["quantisable_linear"] * NF4_BYTES + counts["other"] * 2 if method == "qlora" else counts["total"] * 2
        )
    if zero == "none":
        return frozen + trainable * 16
    if zero == "zero2":
        return frozen + trainable * (2 + 14 / n)
    if zero == "zero3":
        return (frozen + trainable * 16) / n
    raise ValueError(zero)


# ----------------------------------------------------------------------------- (ii) measured, one process each


def _status_bytes(field: str) -> int:
    """A /proc/self/status memory field (reported in kB), in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure(model_dir: str, variant: str, steps: int, batch: int, seq: int) -> dict:
    """Runs in a child process: load, LoRA, ``steps`` AdamW steps; memory above the pre-load baseline."""
    from peft import LoraConfig, get_peft_model

    from afmrl.modeling import language_lora_targets, load_mllm
    from rar.policy import LM_LORA_TARGETS

    torch.manual_seed(0)
    before = _status_bytes("VmRSS")
    started = time.perf_counter()
    model, _ = load_mllm(model_dir, dtype=torch.bfloat16, load_in_4bit=variant == "qlora")
    model = get_peft_model(
        model,
        LoraConfig(
            r=LORA_R, lora_alpha=2 * LORA_R, bias="none", target_modules=language_lora_targets(model, LM_LORA_TARGETS)
        ),
    )
    with torch.no_grad():  # transformers may map safetensors lazily: read every weight so that it is resident
        for param in model.parameters():
            param.detach().sum()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand back what loading freed (bitsandbytes quantises via temporaries)
    loaded = _status_bytes("VmRSS") - before
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    tensor_bytes = sum(storages.values())
    load_s = time.perf_counter() - started
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak below is the steps' own
    vocab = model.config.get_text_config().vocab_size
    step_s = []
    for _ in range(steps):
        t = time.perf_counter()
        ids = torch.randint(0, vocab, (batch, seq))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t)
    return {
        "variant": variant,
        "after_load_bytes": loaded,
        "tensor_bytes": tensor_bytes,
        "peak_bytes": _status_bytes("VmHWM") - before,
        "load_s": load_s,
        "step_s": sorted(step_s)[len(step_s) // 2],
        "loss": float(loss),
    }


def build_measured_model(spec: dict, out: Path) -> dict:
    """Random weights for ``spec`` saved in bf16 safetensors, with the tiny model's processor beside them."""
    from transformers import AutoModelForImageTextToText

    from afmrl.embedded.tiny_models import build_tiny_mllm

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(build_config(spec)).to(torch.bfloat16)
    counts = count_parameters(model)
    model.save_pretrained(out)
    build_tiny_mllm("qwen2_vl")[1].save_pretrained(out)  # a processor (tokens stay within the vocabulary)
    return counts


# ----------------------------------------------------------------------------- report


def fmt_gb(x: float) -> str:
    return f"{x / GB:.1f}" if x >= 10 * GB else f"{x / GB:.2f}"


def write_report(path: Path, estimates: dict, measured: dict, machine: str, seconds: float):
    lines = [
        "# Memory: LoRA vs QLoRA, and what the real sizes need",
        "",
        f"Generated by `python -m benchmarks.memory` in {seconds:.0f} s on: {machine}.",
        "Method: the module docstring of `benchmarks/memory.py`.",
        "",
        "## Estimates for the real architectures (model states per GPU, GB)",
        "",
        f"Built on the meta device from the published configs; parameter counts checked against the hub's. "
        f"ZeRO columns: {N_GPUS} GPUs. Model states only: activations, generation's KV cache and "
        "workspace come on top. GRPO also holds the reward's frozen stage-1 encoder in every process "
        f"(Qwen2-VL-2B in bf16: {fmt_gb(estimates['Qwen2-VL-2B (stage-1 encoder)']['counts']['total'] * 2)} GB, "
        "outside ZeRO-3 by design).",
        "",
        "| architecture | parameters (published) | vision | LoRA r16 (LM) | method | one GPU | ZeRO-2 | ZeRO-3 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, e in estimates.items():
        c = e["counts"]
        ok = "" if c["total"] == e["published"] else " **differs**"
        for method, label in (("lora", "LoRA, bf16 base"), ("qlora", "QLoRA, nf4 base"), ("full", "full fine-tuning")):
            row = e["gb"][method]
            lines.append(
                f"| {name} | {c['total'] / 1e9:.3f} B ({e['published'] / 1e9:.3f} B){ok} | "
                f"{c['vision'] / 1e6:.0f} M | {c['lora'] / 1e6:.1f} M | {label} | {row['none']:.1f} | "
                f"{row['zero2']:.1f} | {row['zero3']:.1f} |"
            )
    m = measured
    c = m["counts"]
    lines += [
        "",
        "## Measured on this machine (CPU, one process per variant)",
        "",
        f"A random Qwen2-VL of {c['total'] / 1e6:.0f} M parameters ({c['quantisable_linear'] / 1e6:.0f} M in "
        f"quantisable linears, LoRA r16: {c['lora'] / 1e6:.2f} M trainable), {m['steps']} AdamW steps on "
        f"{m['batch']} x {m['seq']} tokens. Memory above the process's own before loading, GB.",
        "",
        "| variant | weights held (counted) | weights (estimate) | resident after load | peak during the steps "
        "| step (median) |",
        "|---|---|---|---|---|---|",
    ]
    for r in m["runs"]:
        # the estimate's weight part: frozen weights + LoRA's fp32 weights (gradients and Adam come with the steps)
        est = model_state_bytes(c, r["variant"], "none") - 12 * c["lora"]
        lines.append(
            f"| {'LoRA, bf16 base' if r['variant'] == 'lora' else 'QLoRA, nf4 base'} | "
            f"{fmt_gb(r['tensor_bytes'])} | {fmt_gb(est)} | {fmt_gb(r['after_load_bytes'])} | "
            f"{fmt_gb(r['peak_bytes'])} | {r['step_s']:.2f} s |"
        )
    lora, qlora = (next(r for r in m["runs"] if r["variant"] == v) for v in ("lora", "qlora"))
    lines += [
        "",
        f"QLoRA / LoRA: {qlora['tensor_bytes'] / lora['tensor_bytes']:.2f} in weights held, "
        f"{qlora['after_load_bytes'] / lora['after_load_bytes']:.2f} resident after load, "
        f"{qlora['peak_bytes'] / lora['peak_bytes']:.2f} at the peak; step time "
        f"{qlora['step_s'] / lora['step_s']:.2f}x.",
        "Weights held = the bytes of every parameter and buffer storage, which the estimate's method should "
        "match. On a CPU the resident set says less: the bf16 LoRA model's weights are pages of the "
        "memory-mapped checkpoint, and after quantising, the checkpoint pages that bitsandbytes read stay "
        "mapped (reclaimable, but counted) beside the nf4 copies; during the steps, CPU bitsandbytes "
        "dequantises each layer for its matmuls, so the activations and temporaries of the step, not the "
        "weights, set the peak. On a GPU the weights are copied to device memory and the saving is the "
        "weights' column.",
        "",
        "## Not measured here",
        "",
        "No GPU was lent to this work: real-size bf16 step time and peak GPU memory of the larger configs "
        "(`recipes/configs/rar_qwen25vl_3b.yaml`, `rar_qlora_7b.yaml`) are not measured. On a GPU, "
        "`torch.cuda.max_memory_allocated()` around a step of `recipes/rar_grpo.py` gives the number to "
        "put beside the estimates above.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Smaller measured model and run; nothing written.")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results" / "memory.md"))
    parser.add_argument("--_measure", nargs=2, metavar=("MODEL_DIR", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args(argv)
    if args._measure:
        print(json.dumps(measure(*args._measure, args.steps, args.batch, args.seq)))
        return None
    started = time.time()
    machine = describe_machine()
    estimates = {}
    for name, spec in ARCHITECTURES.items():
        counts = meta_counts(spec)
        estimates[name] = {
            "counts": counts,
            "published": spec["published"],
            "gb": {
                m: {z: model_state_bytes(counts, m, z) / GB for z in ("none", "zero2", "zero3")}
                for m in ("lora", "qlora", "full")
            },
        }
        print(f"{name}: {counts['total']:,} parameters (published {spec['published']:,})", flush=True)
    steps, seq = (2, 64) if args.quick else (args.steps, args.seq)
    with tempfile.TemporaryDirectory() as tmp:
        counts = build_measured_model(QUICK if args.quick else MEASURED, Path(tmp))
        runs = []
        for variant in ("lora", "qlora"):
            cmd = [
                sys.executable,
                __file__,
                "--_measure",
                tmp,
                variant,
                "--steps",
                str(steps),
                "--batch",
                str(args.batch),
                "--seq",
                str(seq),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(f"measured {variant}: {runs[-1]}", flush=True)
    measured = {"counts": counts, "runs": runs, "steps": steps, "batch": args.batch, "seq": seq}
    result = {"estimates": estimates, "measured": measured, "machine": machine}
    if not args.quick:
        out = Path(args.output)
        write_report(out, estimates, measured, machine, time.time() - started)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
