"""The RAR policy: an image-text-to-text MLLM by hub id or path, with LoRA (or QLoRA) on its language model.

``load_policy`` returns ``(model, processor, peft_config)`` for TRL's trainers, which wrap the
model with the peft config themselves (and use the adapter-disabled base as the KL reference when
``beta > 0``, so no second copy of the weights is loaded).

* LoRA targets are the language model's linears only (``afmrl.modeling.language_lora_targets``):
  peft has no default targets for Qwen-VL, and short names such as ``q_proj`` would also match the
  vision tower's attention. The vision tower is therefore frozen with LoRA, and frozen without
  LoRA too unless ``freeze_vision=False`` (a policy from a base that cannot see yet must learn to).
* ``--load_in_4bit``: nf4 weights with double quantisation and LoRA on top (QLoRA), loaded through
  ``afmrl.modeling.load_mllm``, which also applies the CPU bitsandbytes workaround (no inference
  repacking of ``Linear4bit`` weights, see ../shared/PLATFORM.md) so that the evaluation's no-grad
  generation does not break the next training step.
* ``trust_remote_code`` is off unless the user passes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from afmrl.embedded import resolve_model
from afmrl.modeling import check_processor, language_lora_targets, load_mllm, load_processor

__all__ = ["LM_LORA_TARGETS", "check_policy_processor", "freeze_vision_tower", "load_policy"]

LM_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_VISION_PREFIXES = ("visual", "vision_tower", "vision_model")


def placeholder_token_ids(model) -> list[int]:
    """The image and video placeholder tokens of a multimodal model's config: input slots the processor fills with
    vision features, never a word of a line."""
    config = getattr(model, "config", None)
    ids = (getattr(config, "image_token_id", None), getattr(config, "video_token_id", None))
    return [int(i) for i in ids if i is not None]


def mask_placeholder_logits(model, value: float = -1e4):
    """Give the placeholder tokens a logit of ``value`` in every forward pass (a hook on the output layer; returns
    its handle, or None for a model without placeholders). TRL's GRPO masks the image placeholder only while it
    samples, then scores the sampled tokens under the unmasked distribution: RL never penalises the masked token and
    mass can drift onto it unseen (a paper-world policy's greedy lines ended in runs of it). With the mask in the
    forward pass, the loss scores the distribution that is sampled. Finite, not -inf: entropies stay finite."""
    ids, head = placeholder_token_ids(model), model.get_output_embeddings()
    if not ids or head is None:
        return None
    index = torch.tensor(ids)

    def mask(module, inputs, logits):
        return logits.index_fill(-1, index.to(logits.device), value)

    return head.register_forward_hook(mask)


def freeze_vision_tower(model) -> int:
    """``requires_grad=False`` on every vision-tower parameter; returns how many tensors were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        parts = name.split(".")
        if any(p in _VISION_PREFIXES for p in parts):
            param.requires_grad_(False)
            frozen += 1
    return frozen


def _adapter_base(name: str) -> str | None:
    """The base model of a LoRA adapter directory (peft's adapter_config.json), else None."""
    adapter = Path(name) / "adapter_config.json"
    return json.loads(adapter.read_text(encoding="utf-8"))["base_model_name_or_path"] if adapter.is_file() else None


def check_policy_processor(
    name_or_path: str, *, cache_dir: str = "outputs/embedded", trust_remote_code: bool = False
) -> None:
    """Fail early (no weights loaded) when the policy's processor cannot serve RAR: it must see images
    (an image processor) and render conversations (a chat template, for TRL's conversational prompts)."""
    name = resolve_model(name_or_path, cache_dir)
    if _adapter_base(name) and not (Path(name) / "tokenizer_config.json").is_file():
        name = _adapter_base(name)  # an adapter saved without its processor: the base model's
    check_processor(load_processor(name, trust_remote_code=trust_remote_code), name)


def load_policy(
    model_args,
    *,
    cache_dir: str = "outputs/embedded",
    freeze_vision: bool = True,
    trust_remote_code: bool = False,
    name_or_path: str | None = None,
    for_training: bool = True,
):
    """Load the policy described by ``model_args`` (a ``trl.ModelConfig``).

    ``name_or_path`` overrides ``model_args.model_name_or_path`` (the recipe passes its SFT warm
    start or its own output there). Tiny embedded names (``tiny-qwen2-vl`` ...) are built into
    ``cache_dir``. A directory holding a LoRA adapter (a LoRA SFT or RL output) is loaded over its
    base model and merged (kept unmerged on 4-bit weights, where merging would round the update).
    ``for_training=False`` returns ``(model, processor, None)`` for generation.
    """
    from trl import get_peft_config

    name = resolve_model(name_or_path or model_args.model_name_or_path or "tiny-qwen2-vl", cache_dir)
    if model_args.load_in_4bit and not model_args.use_peft and for_training:
        raise ValueError("--load_in_4bit trains LoRA adapters on frozen 4-bit weights: pass --use_peft too (QLoRA)")
    base = _adapter_base(name)
    model, processor = load_mllm(
        base or name, dtype=model_args.dtype, load_in_4bit=model_args.load_in_4bit, trust_remote_code=trust_remote_code
    )
    if base is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, name)
        if not model_args.load_in_4bit:
            # peft loads an adapter for inference (every weight frozen) and merging keeps that: a full
            # fine-tune of the merged model must train its weights again
            model = model.merge_and_unload().requires_grad_(True)
        elif for_training:
            raise ValueError(
                f"{name} is a LoRA adapter over 4-bit weights: merge it into its base model before "
                "starting QLoRA RL from it"
            )
    if not for_training:
        return model, processor, None
    peft_config = get_peft_config(model_args)
    if peft_config is not None:
        peft_config.target_modules = language_lora_targets(model, model_args.lora_target_modules or LM_LORA_TARGETS)
    elif freeze_vision:
        freeze_vision_tower(model)
    return model, processor, peft_config
