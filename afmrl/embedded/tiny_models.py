"""The tiny embedded default: random-init Qwen2-VL, Qwen2.5-VL, Qwen3-VL, CLIP and SigLIP models built in code.

Tests, the demo and the pretraining recipe need Qwen-VL models that exist without a download. This
module builds them from a config of a few hundred thousand parameters (the real architecture, tiny
sizes), with a byte-level tokenizer trained on the synthetic catalog's words, Qwen's special tokens
and a chat template with ``{% generation %}`` markers, and saves each once to disk so that every stage
loads it with the very same ``afmrl.modeling.load_mllm`` it uses for real checkpoints.

    from afmrl.embedded.tiny_models import tiny_mllm_path
    from afmrl.modeling import load_mllm
    model, processor = load_mllm(tiny_mllm_path("outputs/embedded/tiny-models", family="qwen2_5_vl"))

Same arguments, same weights (``seed``). The shipped pretrained tiny models (docs/embedded.md) start
from these architectures. ``build_tiny_dual`` makes the dual encoders (``tiny-clip``, ``tiny-siglip``: an image
tower and a text tower, 64 px photos in 16 patches, the same tokenizer closing each text on ``<|im_end|>``) that
``afmrl.encoder.dual`` trains like any CLIP or SigLIP checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3VLConfig,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from afmrl.modeling import FAMILIES, PROCESSOR_FOR_FAMILY

# The Qwen2-VL special tokens, in Qwen's order. `<|vision_pad|>` and the box/quad markers are not
# used by the processor but exist in every real Qwen-VL tokenizer, so prompts written for real
# models tokenise the same way here.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)  # fmt: skip

# Qwen2-VL's chat template, minus the default system prompt (it would only lengthen every prompt
# of a random model). Content may be a string or a list of blocks; TRL sends both. The
# {% generation %} markers (around the answer and its "<|im_end|>\n", as in TRL's Qwen2.5-VL
# training template) let SFT use assistant-only loss. transformers renders templates with
# trim_blocks, so every newline sits before a tag, never right after one.
CHAT_TEMPLATE = (
    "{% macro render(content) %}"
    "{% if content is string %}{{ content }}"
    "{% else %}{% for block in content %}"
    "{% if block['type'] == 'image' or 'image' in block or 'image_url' in block %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif block['type'] == 'video' or 'video' in block %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in block %}{{ block['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{% endmacro %}"
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ render(message['content']) }}<|im_end|>\n{% endgeneration %}"
    "{% else %}{{ render(message['content']) }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(corpus, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `corpus`, with the Qwen special tokens and chat template.

    Byte-level means every string is encodable (no unknown tokens), as with real Qwen tokenizers;
    training on the catalog's words keeps prompts short. Special tokens take ids 0..13.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts = [text for text in corpus if text]
    if not texts:
        raise ValueError("train_tokenizer needs a non-empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        padding_side="left",  # decoder-only generation pads on the left
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _mrope_section(head_dim: int, family: str) -> list[int]:
    """Split head_dim/2 rotary frequencies over (time, height, width) like the real models.

    Qwen2(.5)-VL uses [16, 24, 24] of 64; Qwen3-VL interleaves [24, 20, 20] of 64.
    """
    half = head_dim // 2
    spatial = half * 5 // 16 if family == "qwen3_vl" else half * 3 // 8
    return [half - 2 * spatial, spatial, spatial]


def _tiny_config(family, tokenizer, hidden_size, num_layers, num_heads, vision_hidden_size=32, vision_depth=2):
    if hidden_size % num_heads or (hidden_size // num_heads) % 4:
        raise ValueError(f"hidden_size {hidden_size} must split into {num_heads} heads of a multiple of 4")
    head_dim = hidden_size // num_heads
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "mrope_section": _mrope_section(head_dim, family)},
        # No pad_token_id, as in real Qwen-VL configs: it would freeze that embedding row.
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
    )  # fmt: skip
    # A vision tower of two blocks (width 32) by default: small, but it really reads the pixels.
    vision_embed = vision_hidden_size
    if family == "qwen2_vl":
        config_cls = Qwen2VLConfig
        vision = dict(depth=vision_depth, embed_dim=vision_embed, hidden_size=hidden_size, num_heads=2, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        config_cls = Qwen2_5_VLConfig
        vision = dict(depth=vision_depth, hidden_size=vision_embed, intermediate_size=2 * vision_embed, num_heads=2,
                      out_hidden_size=hidden_size, fullatt_block_indexes=[1])  # fmt: skip
    else:  # qwen3_vl (build_tiny_mllm checked the family)
        config_cls = Qwen3VLConfig
        text["head_dim"] = head_dim  # Qwen3 has an explicit head_dim (default 128)
        vision = dict(depth=vision_depth, hidden_size=vision_embed, intermediate_size=2 * vision_embed, num_heads=2,
                      out_hidden_size=hidden_size, num_position_embeddings=64,
                      deepstack_visual_indexes=[0])  # fmt: skip
    return config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def _tiny_image_processor(family: str, max_image_tokens: int, min_image_tokens: int = 4) -> Qwen2VLImageProcessorPil:
    """Images are resized to multiples of patch*merge (28 for Qwen2(.5)-VL, 32 for Qwen3-VL) with
    between `min_image_tokens` and `max_image_tokens` LLM tokens: with the default 4, a 64x64 image
    becomes 56x56 (Qwen2) or 64x64 (Qwen3), 16 patches, 4 tokens (16 tokens with min_image_tokens=16:
    the image is scaled up); larger images are scaled down to at most `max_image_tokens`.
    """
    patch = 16 if family == "qwen3_vl" else 14
    factor = patch * 2
    mean_std = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if family == "qwen3_vl" else {}
    return Qwen2VLImageProcessorPil(
        patch_size=patch,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": min_image_tokens * factor**2, "longest_edge": max_image_tokens * factor**2},
        **mean_std,
    )


def build_tiny_mllm(
    family: str = "qwen2_vl",
    *,
    corpus=None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 2048,
    max_image_tokens: int = 16,
    min_image_tokens: int = 4,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    seed: int = 0,
):
    """A random-init Qwen-VL model and processor, built locally; same arguments, same weights.

    `corpus` (list of strings) trains the tokenizer; None uses the synthetic catalog's vocabulary.
    The vocabulary is at most `vocab_size` (smaller when the corpus is small).
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown tiny model family {family!r}; choose one of {FAMILIES}")
    if corpus is None:
        from afmrl.embedded.synthetic_catalog import vocabulary_corpus  # lazy: keeps modeling independent

        corpus = vocabulary_corpus()
    tokenizer = train_tokenizer(corpus, vocab_size)
    if not 1 <= min_image_tokens <= max_image_tokens:
        raise ValueError(f"need 1 <= min_image_tokens ({min_image_tokens}) <= max_image_tokens ({max_image_tokens})")
    if vision_depth < 1:
        raise ValueError(f"vision_depth must be >= 1, got {vision_depth}")
    config = _tiny_config(family, tokenizer, hidden_size, num_layers, num_heads, vision_hidden_size, vision_depth)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    processor = PROCESSOR_FOR_FAMILY[family](
        image_processor=_tiny_image_processor(family, max_image_tokens, min_image_tokens),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


DUAL_FAMILIES = ("clip", "siglip")


def build_tiny_dual(
    family: str = "clip",
    *,
    corpus=None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    vocab_size: int = 2048,
    image_size: int = 64,
    patch_size: int = 16,
    max_text_tokens: int = 64,
    seed: int = 0,
):
    """A random-init CLIP or SigLIP dual encoder and its processor; same arguments, same weights.

    The text tower reads the tiny Qwen tokenizer's ids; each text ends on ``<|im_end|>`` (a post-processor adds
    it), the token CLIP pools (its ``eos_token_id``); SigLIP pools the last position, as the real one does with
    ``padding="max_length"``."""
    from tokenizers import processors
    from transformers import (
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPProcessor,
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipProcessor,
    )

    if family not in DUAL_FAMILIES:
        raise ValueError(f"Unknown tiny dual-encoder family {family!r}; choose one of {DUAL_FAMILIES}")
    if corpus is None:
        from afmrl.embedded.synthetic_catalog import vocabulary_corpus

        corpus = vocabulary_corpus()
    tokenizer = train_tokenizer(corpus, vocab_size)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|im_end|>", special_tokens=[("<|im_end|>", end)]
    )
    tokenizer.padding_side = "right"
    tokenizer.chat_template = None
    tokenizer.model_max_length = max_text_tokens
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, max_position_embeddings=max_text_tokens,
                bos_token_id=end, eos_token_id=end, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, image_size=image_size, patch_size=patch_size)  # fmt: skip
    side = {"height": image_size, "width": image_size}
    if family == "clip":
        config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden_size)
        image_processor = CLIPImageProcessorPil(size=side, crop_size=side)
        processor_cls = CLIPProcessor
    else:
        config = SiglipConfig(text_config=text, vision_config=vision)
        image_processor = SiglipImageProcessorPil(size=side)
        processor_cls = SiglipProcessor
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, dtype=torch.float32)
    model.eval()
    return model, processor_cls(image_processor=image_processor, tokenizer=tokenizer)


_MARKER = "tiny_mllm_complete.json"


def tiny_dual_path(cache_dir, family: str = "clip", **kwargs) -> Path:
    """``tiny_mllm_path`` for ``build_tiny_dual``: built once into ``cache_dir/<family>-<hash of kwargs>``."""
    return tiny_mllm_path(cache_dir, family, **kwargs)


def tiny_mllm_path(cache_dir, family: str = "qwen2_vl", **kwargs) -> Path:
    """Build the tiny model once into `cache_dir/<family>-<hash of kwargs>`; return that directory.

    `kwargs` go to `build_tiny_mllm` (`build_tiny_dual` for a family of `DUAL_FAMILIES`). The model is
    written to a private directory, completed with a marker file and renamed into place, so concurrent processes
    (accelerate, xdist) never read a half-written model; a directory without the marker is rebuilt. Load it with
    `load_mllm(path)` (`load_dual(path)` for a dual encoder).
    """
    key = json.dumps({"family": family, **kwargs}, sort_keys=True, default=str)
    path = Path(cache_dir) / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (path / _MARKER).is_file():
        return path
    build = build_tiny_dual if family in DUAL_FAMILIES else build_tiny_mllm
    model, processor = build(family, **kwargs)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)  # safetensors
    processor.save_pretrained(tmp)  # processor_config.json, tokenizer files, chat_template.jinja
    (tmp / _MARKER).write_text(key)
    if path.exists() and not (path / _MARKER).is_file():
        shutil.rmtree(path, ignore_errors=True)  # left behind by an interrupted build
    try:
        tmp.rename(path)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / _MARKER).is_file():
            raise
    return path
