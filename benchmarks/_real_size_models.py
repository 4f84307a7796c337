"""Helpers of ``benchmarks/real_size.py``: real-shape checkpoints with random weights, a real-format processor and
a locally trained tokenizer, the photo catalog, and process memory readings.

The checkpoint is written tensor by tensor from the architecture built on the meta device (the published config
of ``benchmarks/memory.py``), in safetensors shards with an index, so that even the 7B shape (16.6 GB in bf16)
is written by a process holding one tensor at a time; ``afmrl.modeling.load_mllm`` then loads it as it loads any
downloaded checkpoint. Weights: normal(0, 0.02) (the configs' ``initializer_range``), norm weights 1, biases 0.

The real tokenizer files cannot be downloaded here. The tokenizer is a byte-level BPE trained on local text (the
synthetic catalog's words and this repository's docs), padded with unused entries so that the Qwen special tokens
sit at their real ids (``<|endoftext|>`` 151643 ... ``<|video_pad|>`` 151656, which the published configs point
at), with the real Qwen2-VL / Qwen2.5-VL chat template (the copy TRL ships). The image processor has the published
``preprocessor_config.json`` settings: patch 14, merge 2, temporal patch 2, min_pixels 3136, max_pixels 12845056,
the CLIP mean and std; a 448 x 448 photo is 32 x 32 patches, 256 language-model tokens.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHARD_BYTES = 2 * 1024**3
DONE = "real_size_complete.json"


# ----------------------------------------------------------------------------- memory of this process


def status_bytes(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM), in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


# ----------------------------------------------------------------------------- shapes


def quick_spec(spec: dict) -> dict:
    """The same family at a CPU-minute size: 2 text layers, a 2-block vision tower; vocabulary, special token ids,
    image geometry and module names stay real."""
    spec = copy.deepcopy(spec)
    text, vision = spec["text_config"], spec["vision_config"]
    text.update(
        hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=2
    )  # head_dim 128, as real
    if spec["model_type"] == "qwen2_vl":
        vision.update(depth=2, embed_dim=128, num_heads=4, hidden_size=256)
    else:
        vision.update(
            depth=2, hidden_size=128, intermediate_size=256, num_heads=4, out_hidden_size=256, fullatt_block_indexes=[1]
        )
    spec.pop("published", None)
    return spec


# ----------------------------------------------------------------------------- tokenizer and processor


def local_tokenizer(vocab_size: int = 8000):
    """Byte-level BPE trained on local text; Qwen special tokens at their real ids; the real chat template."""
    import trl
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from afmrl.embedded.synthetic_catalog import vocabulary_corpus
    from afmrl.embedded.tiny_models import SPECIAL_TOKENS

    corpus = list(vocabulary_corpus()) + [p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))]
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trained.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    first_special = 151643  # Qwen2(.5)-VL: <|endoftext|>
    for i in range(len(vocab), first_special):  # unused entries (no merge produces them)
        vocab[f"<|unused_{i}|>"] = i
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        padding_side="left",
    )
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert ids == list(range(first_special, first_special + len(SPECIAL_TOKENS))), ids
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5_vl.jinja").read_text()
    return tokenizer


def real_processor(model_type: str, tokenizer):
    """The published image-processor settings in the torchvision-free processor of ``afmrl.modeling``."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from afmrl.modeling import PROCESSOR_FOR_FAMILY

    image_processor = Qwen2VLImageProcessorPil(
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": 3136, "longest_edge": 12845056},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return PROCESSOR_FOR_FAMILY[model_type](
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


# ----------------------------------------------------------------------------- checkpoint


def _random_tensor(name: str, shape, generator) -> torch.Tensor:
    if len(shape) == 1:
        return (torch.ones if name.endswith("weight") else torch.zeros)(shape, dtype=torch.bfloat16)
    return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)


def write_checkpoint(spec: dict, out: Path, seed: int = 0, log=print) -> dict:
    """A bf16 safetensors checkpoint of ``spec`` with random weights, its processor and generation config, written
    one tensor at a time; returns the parameter counts of ``benchmarks/memory.py``. Complete when ``DONE`` exists."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, GenerationConfig

    from benchmarks.memory import build_config, count_parameters

    out.mkdir(parents=True, exist_ok=True)
    config = build_config(spec)
    config.text_config.bos_token_id, config.text_config.eos_token_id = 151643, 151645
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    counts = count_parameters(model)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(seed)
    weight_map, shard, shard_bytes, files = {}, {}, 0, []

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({k: name for k in shard})
            log(f"  wrote {name} ({shard_bytes / 1e9:.1f} GB, {len(weight_map)}/{len(shapes)} tensors)")
        shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        tensor = _random_tensor(name, shape, generator)
        if shard_bytes and shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        shard_bytes += tensor.nbytes
    flush()
    total = sum(2 * torch.Size(s).numel() for s in shapes.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643).save_pretrained(out)
    real_processor(spec["model_type"], local_tokenizer()).save_pretrained(out)
    (out / DONE).write_text(json.dumps(counts))
    return counts


# ----------------------------------------------------------------------------- data


def photo_catalog(cache_dir: Path, num_products: int, image_size: int) -> str:
    """The embedded synthetic catalog (several listings per product, attributes, titles) at ``image_size`` px."""
    from afmrl.embedded import resolve_catalog

    return resolve_catalog("embedded", cache_dir, num_products=num_products, image_size=image_size)


def distinct_reward(completions, **kwargs) -> list[float]:
    """A stand-in reward in [0, 1) that differs between distinct completions (a hash of the text). With random
    weights every real reward gives the G completions of a prompt the same value (all unparsable), so advantages,
    the loss and every LoRA gradient would be exactly zero; this one makes the GRPO steps move the adapters."""
    import hashlib

    texts = [c if isinstance(c, str) else json.dumps(c, sort_keys=True, default=str) for c in completions]
    return [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) / 2**32 for t in texts]
