"""Loading multimodal LLMs, real or tiny, through one door.

Every stage of AFMRL (the AGCL encoder, the attribute generator, the GRPO policy) starts from a
Qwen2-VL-class model and its processor. This module is the one place that loads them:

- `load_mllm(name_or_path)` loads a hub model or a local directory, optionally in 4-bit (QLoRA).
- `load_processor(name_or_path)` returns a processor that has an image processor, also on
  machines without torchvision, where the stock Qwen processors cannot be built
  (see `TorchvisionFreeQwen2VLProcessor`).
- `build_tiny_mllm` / `tiny_mllm_path` make the embedded default: a randomly initialised
  Qwen2-VL, Qwen2.5-VL or Qwen3-VL of about 0.2M parameters with a tokenizer trained on the
  synthetic catalog's words, saved once to disk so that tests, demos and recipes load it with
  the very same `load_mllm` they use for real checkpoints.

Nothing here downloads anything unless a hub id is passed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from agcl.hub import download_hint, hub_unreachable

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")

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

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


# ---------------------------------------------------------------- processors without torchvision


class _ImagesOnlyProcessor:
    """Turns a stock Qwen-VL processor into an images-only one that builds without torchvision.

    The stock processors take a video processor, and `ProcessorMixin` type-checks every
    sub-processor, None included, against a video mapping that needs torchvision ("type object
    'VIDEO_PROCESSOR_MAPPING' has no attribute '_extra_content'"). `ProcessorMixin` derives the
    sub-processors from the `__init__` signature, so leaving `video_processor` out is enough.

    Saved files name the stock class, so a saved directory is an ordinary Qwen-VL checkpoint:
    `AutoProcessor` builds the stock processor from it where torchvision exists, and here it fails
    loudly (`load_processor` then rebuilds this class) instead of silently returning a tokenizer.
    """

    _stock_name: str

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # The stock __init__ passes (image_processor, tokenizer, None) on; ProcessorMixin zips them
        # with our two attributes and so drops the None video processor.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    def to_dict(self):
        return {**super().to_dict(), "processor_class": self._stock_name}

    def save_pretrained(self, save_directory, **kwargs):
        files = super().save_pretrained(save_directory, **kwargs)
        self.tokenizer._set_processor_class(self._stock_name)  # tokenizer_config.json names it too
        self.tokenizer.save_pretrained(save_directory)
        return files


class TorchvisionFreeQwen2VLProcessor(_ImagesOnlyProcessor, Qwen2VLProcessor):
    """Images-only `Qwen2VLProcessor`."""

    _stock_name = "Qwen2VLProcessor"


class TorchvisionFreeQwen2_5_VLProcessor(_ImagesOnlyProcessor, Qwen2_5_VLProcessor):
    """Images-only `Qwen2_5_VLProcessor` (differs from Qwen2-VL's only for videos)."""

    _stock_name = "Qwen2_5_VLProcessor"


class TorchvisionFreeQwen3VLProcessor(_ImagesOnlyProcessor, Qwen3VLProcessor):
    """Images-only `Qwen3VLProcessor` (tracks vision start/end ids, returns no token type ids)."""

    _stock_name = "Qwen3VLProcessor"


_PROCESSOR_FOR_FAMILY = {
    "qwen2_vl": TorchvisionFreeQwen2VLProcessor,
    "qwen2_5_vl": TorchvisionFreeQwen2_5_VLProcessor,
    "qwen3_vl": TorchvisionFreeQwen3VLProcessor,
}


def _check_path(name_or_path, *, need_config: bool) -> None:
    """Fail early, with the path in the message, instead of deep inside a hub lookup."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"Expected a model directory, got a file: {text}")
        if need_config and not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"Model directory {text} has no config.json; it does not look like a saved model "
                "(save one with model.save_pretrained(dir) and processor.save_pretrained(dir))."
            )
        return
    looks_local = text.startswith((".", "/", "~")) or os.sep in text.replace("/", "", 1) or "\\" in text
    if looks_local or not _HUB_ID.match(text):
        raise FileNotFoundError(f"Model path does not exist: {text} (and it is not a hub id like 'org/name')")
    _check_hub_model(text)


def check_model_source(name_or_path) -> None:
    """Fail at once, saying what to do, when a model is neither a saved model directory nor a hub id that is
    cached or can be fetched now (no weights are read)."""
    _check_path(name_or_path, need_config=True)


def _check_hub_model(repo_id: str) -> None:
    """A hub id that is not in the local cache needs the hub: say at once when it cannot be reached, instead of
    after transformers' retries (minutes) with a message about some processor file."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # cached: loads offline
    reason = hub_unreachable(repo_id, "model")
    if reason:
        raise FileNotFoundError(f"{repo_id} is neither a local directory nor in the local Hugging Face cache, and the "
                                f"hub {reason}: {download_hint(repo_id, 'model')}")


def _model_type(name_or_path) -> str:
    config_file = Path(name_or_path).expanduser() / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text()).get("model_type", "")
    from transformers import AutoConfig  # a hub id: cached or downloaded like any other file

    try:
        return AutoConfig.from_pretrained(name_or_path).model_type
    except (OSError, ValueError):
        return ""


def load_processor(name_or_path, trust_remote_code: bool = False):
    """Load the processor of a multimodal model; the result always has an `image_processor`.

    Tries `AutoProcessor` first (real checkpoints on machines with torchvision). Without
    torchvision the stock Qwen processors fail while building their video processor; the
    processor is then rebuilt, images only, from `AutoTokenizer`, the PIL image processor (same
    saved settings, no torchvision) and the saved chat template.
    """
    _check_path(name_or_path, need_config=False)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        if hasattr(processor, "image_processor"):
            return processor
        first_error = f"AutoProcessor returned a {type(processor).__name__} without an image processor"
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as error:
        # Without torchvision, for Qwen-VL checkpoints: "OSError: Can't load video processor for ...".
        first_error = f"AutoProcessor failed: {type(error).__name__}: {error}"

    model_type = _model_type(name_or_path)
    family = "qwen3_vl" if model_type.startswith("qwen3") else model_type
    cls = _PROCESSOR_FOR_FAMILY.get(family)
    if cls is None:
        raise ValueError(
            f"The processor of {name_or_path} has no image processor ({first_error}), and the "
            f"torchvision-free fallback only knows Qwen-VL models, not model_type {model_type!r}."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(name_or_path)
        processor_dict, _ = cls.get_processor_dict(name_or_path)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Could not build a processor with an image processor for {name_or_path}: {error} ({first_error})"
        ) from error
    chat_template = processor_dict.get("chat_template") or getattr(tokenizer, "chat_template", None)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def check_processor(processor, name_or_path) -> None:
    """Refuse a processor that cannot serve this package's models: every stage shows the model an image
    (an image processor) inside a conversation (a chat template). Raises ``ValueError`` naming the model."""
    if getattr(processor, "image_processor", None) is None:
        raise ValueError(f"{name_or_path}: the processor has no image processor, so the model cannot see the "
                         "product image")
    tokenizer = getattr(processor, "tokenizer", processor)
    if not (getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)):
        raise ValueError(f"{name_or_path}: the processor and tokenizer have no chat template; listings and prompts "
                         "are rendered as conversations (add chat_template.jinja to the model directory)")


def backbone_signature(config) -> dict:
    """What a trained adapter or head depends on in a backbone's ``PretrainedConfig``: its family and the
    shapes of its language model. Two backbones with equal signatures can carry each other's adapters."""
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None)
    signature = {"model_type": config.model_type, "hidden_size": text.hidden_size,
                 "num_hidden_layers": text.num_hidden_layers, "vocab_size": text.vocab_size}
    if vision is not None:
        # The vision tower's own width: Qwen2-VL calls it embed_dim (its hidden_size is the merger's output).
        signature["vision_hidden_size"] = getattr(vision, "embed_dim", None) or getattr(vision, "hidden_size", None)
    return signature


def read_backbone_signature(name_or_path, trust_remote_code: bool = False) -> dict:
    """``backbone_signature`` from the config file alone (no weights are read)."""
    from transformers import AutoConfig

    _check_path(name_or_path, need_config=True)
    return backbone_signature(AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code))


# ---------------------------------------------------------------- loading models


QUANTIZATION_INSTALL = "pip install 'afmrl[quantization]' (bitsandbytes)"


def require_bitsandbytes(flag: str = "--load_in_4bit") -> None:
    """4-bit loading needs bitsandbytes, an optional extra (as in TRL's ``[quantization]``): without it, say so
    with the install line, before any model loads. (Where it is installed, importing transformers' trainer
    utilities imports it through peft, so it is only installed for those who quantise.)"""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"{flag} needs bitsandbytes, which is not installed: {QUANTIZATION_INSTALL}")


def disable_bnb_cpu_inference_repack(model) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference; returns layers touched.

    On CPUs with AVX512-BF16, an eval-mode no-grad forward of `Linear4bit` converts its weight in
    place to an inference-only packed layout. The next training step then fails with
    "a view of a leaf Variable that requires grad is being used in an in-place operation".
    GRPO alternates exactly these two (generation under no_grad, then a training step), so the
    repack must be off. The flag is read on every forward; clearing it costs only speed on CPU.
    """
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    touched = 0
    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False
            touched += 1
    return touched


def load_mllm(
    name_or_path,
    *,
    dtype=None,
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map=None,
    attn_implementation=None,
):
    """Load a multimodal LLM and its processor by hub id or local directory.

    `dtype` is passed to transformers (None keeps its default). `load_in_4bit` quantises the
    linear layers to NF4 with double quantisation (QLoRA); the compute dtype is `dtype`, else bf16
    on CUDA and float32 on CPU. Returns `(model, processor)`; the model is in eval mode.
    """
    _check_path(name_or_path, need_config=True)
    if load_in_4bit:
        require_bitsandbytes()
    # The processor first: a model that cannot be served fails before gigabytes of weights load.
    processor = load_processor(name_or_path, trust_remote_code=trust_remote_code)
    check_processor(processor, name_or_path)
    options = {"dtype": dtype, "device_map": device_map, "attn_implementation": attn_implementation}
    # None means "transformers' default", so it is not passed at all.
    kwargs = {key: value for key, value in options.items() if value is not None}
    if load_in_4bit:
        default = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        compute_dtype = dtype if isinstance(dtype, torch.dtype) else default
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    model = AutoModelForImageTextToText.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, **kwargs
    )
    if load_in_4bit:
        disable_bnb_cpu_inference_repack(model)
    return model, processor


# ---------------------------------------------------------------- the tiny embedded default


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
        from agcl.synthetic_catalog import vocabulary_corpus  # lazy: keeps modeling independent

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
    processor = _PROCESSOR_FOR_FAMILY[family](
        image_processor=_tiny_image_processor(family, max_image_tokens, min_image_tokens),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


_MARKER = "tiny_mllm_complete.json"


def tiny_mllm_path(cache_dir, family: str = "qwen2_vl", **kwargs) -> Path:
    """Build the tiny model once into `cache_dir/<family>-<hash of kwargs>`; return that directory.

    `kwargs` go to `build_tiny_mllm`. The model is written to a private directory, completed with a
    marker file and renamed into place, so concurrent processes (accelerate, xdist) never read a
    half-written model; a directory without the marker is rebuilt. Load it with `load_mllm(path)`.
    """
    key = json.dumps({"family": family, **kwargs}, sort_keys=True, default=str)
    path = Path(cache_dir) / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (path / _MARKER).is_file():
        return path
    model, processor = build_tiny_mllm(family, **kwargs)
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
