"""Loading multimodal LLMs, real or tiny, through one door.

Every stage of AFMRL (the AGCL encoder, the attribute generator, the GRPO policy) starts from a
Qwen2-VL-class model and its processor. This module is the one place that loads them:

- `load_mllm(name_or_path)` loads a hub model or a local directory, optionally in 4-bit (QLoRA).
- `load_processor(name_or_path)` returns a processor that has an image processor, also on
  machines without torchvision, where the stock Qwen processors cannot be built
  (see `TorchvisionFreeQwen2VLProcessor`).
- `load_dual(name_or_path)` loads a CLIP or SigLIP dual encoder (image and text towers) and its processor;
  `is_dual_backbone` tells the two kinds apart from the config alone (`DUAL_MODEL_TYPES`).
- `language_lora_targets(model, names)` lists the language model's linears for LoRA (never the vision tower's),
  and `outside_zero3()` loads a frozen helper model whole in a DeepSpeed ZeRO-3 run.

The tiny models of the embedded default (`afmrl.embedded.tiny_models`) are saved to disk and loaded here too,
exactly as real checkpoints are.

Nothing here downloads anything unless a hub id is passed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    BitsAndBytesConfig,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from afmrl.hub import download_hint, hub_unreachable

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Dual encoders (an image tower and a text tower with get_image_features / get_text_features): afmrl.encoder.dual
DUAL_MODEL_TYPES = ("clip", "siglip")

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


PROCESSOR_FOR_FAMILY = {
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
        raise FileNotFoundError(
            f"{repo_id} is neither a local directory nor in the local Hugging Face cache, and the "
            f"hub {reason}: {download_hint(repo_id, 'model')}"
        )


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
    cls = PROCESSOR_FOR_FAMILY.get(family)
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
        raise ValueError(
            f"{name_or_path}: the processor has no image processor, so the model cannot see the product image"
        )
    tokenizer = getattr(processor, "tokenizer", processor)
    if not (getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)):
        raise ValueError(
            f"{name_or_path}: the processor and tokenizer have no chat template; listings and prompts "
            "are rendered as conversations (add chat_template.jinja to the model directory)"
        )


def backbone_signature(config) -> dict:
    """What a trained adapter or head depends on in a backbone's ``PretrainedConfig``: its family and the
    shapes of its language model. Two backbones with equal signatures can carry each other's adapters."""
    text = getattr(config, "text_config", None) or config
    vision = getattr(config, "vision_config", None)
    signature = {
        "model_type": config.model_type,
        "hidden_size": text.hidden_size,
        "num_hidden_layers": text.num_hidden_layers,
        "vocab_size": text.vocab_size,
    }
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
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    if load_in_4bit:
        disable_bnb_cpu_inference_repack(model)
    return model, processor


def is_dual_backbone(name_or_path) -> bool:
    """Whether ``name_or_path`` is a CLIP/SigLIP-style dual encoder (``DUAL_MODEL_TYPES``), from its config alone."""
    return _model_type(name_or_path) in DUAL_MODEL_TYPES


def load_dual(name_or_path, *, dtype=None, trust_remote_code: bool = False):
    """Load a CLIP or SigLIP dual encoder (``AutoModel``) and its processor by hub id or local directory.

    Refuses, naming what is missing, a checkpoint without one of its towers or a processor without an image
    processor or tokenizer. Returns ``(model, processor)``; the model is in eval mode."""
    from transformers import AutoConfig, AutoModel

    _check_path(name_or_path, need_config=True)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if config.model_type not in DUAL_MODEL_TYPES:
        raise ValueError(f"{name_or_path}: model_type {config.model_type!r} is not a dual encoder "
                         f"({', '.join(DUAL_MODEL_TYPES)})")  # fmt: skip
    for tower in ("text_config", "vision_config"):
        if getattr(config, tower, None) is None:
            raise ValueError(f"{name_or_path}: the dual encoder's config has no {tower} (both towers are needed)")
    processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    for part in ("image_processor", "tokenizer"):
        if getattr(processor, part, None) is None:
            raise ValueError(f"{name_or_path}: the processor has no {part} (a dual encoder reads photos and text)")
    kwargs = {} if dtype is None else {"dtype": dtype}
    model, info = AutoModel.from_pretrained(
        name_or_path, trust_remote_code=trust_remote_code, output_loading_info=True, **kwargs
    )
    missing = sorted({key.split(".")[0] for key in info.get("missing_keys", [])} & {"text_model", "vision_model"})
    if missing:
        raise ValueError(f"{name_or_path}: the checkpoint has no weights for its {' and '.join(missing)} "
                         "(a dual encoder needs both towers)")  # fmt: skip
    model.eval()
    return model, processor


def language_lora_targets(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Full module paths of the LoRA targets outside the vision tower.

    Qwen-VL vision blocks also contain `qkv`/`proj`-like linears; targeting by short name alone
    would adapt them too, so the paths are listed explicitly.
    """
    wanted = set(names)
    targets = [
        path
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in wanted and "visual" not in path
    ]
    if not targets:
        raise ValueError(f"no language-model linear layer named any of {sorted(wanted)} in the backbone")
    return targets


@contextlib.contextmanager
def outside_zero3():
    """Switch transformers' DeepSpeed ZeRO-3 hook off while a frozen helper model loads.

    With a ZeRO-3 config alive (``TrainingArguments(deepspeed=...)``), every ``from_pretrained``
    runs under ``deepspeed.zero.Init`` and partitions the weights across ranks, leaving each
    process with empty tensors; a frozen model that one process uses alone (the reward's encoder, a
    generator that annotates or evaluates) must be whole.
    """
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except Exception:
        yield
        return
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved
