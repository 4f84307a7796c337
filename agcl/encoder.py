"""The product encoder: a multimodal LLM read as an embedding model (VLM2Vec style).

An instruction, the listing's image(s) and its text (title, optionally followed by attribute text)
go through an ``AutoModelForImageTextToText`` backbone; the last layer's hidden state at the last
non-padding token, L2-normalised, is the product embedding (Jiang et al., VLM2Vec, arXiv
2410.05160; the AFMRL paper uses Qwen2-VL-2B this way). The backbone is adapted with LoRA
(peft) on the language model; the vision tower stays frozen by default.

On disk an encoder is a directory with ``encoder_config.json`` (which backbone, prompt, LoRA
settings) and either the peft adapter (``adapter_model.safetensors``; the backbone is reloaded by
name or path through ``agcl.modeling.load_mllm``) or, for an encoder trained without LoRA, the
whole backbone in safetensors (``backbone`` is then ``"."``: the directory itself).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from agcl.modeling import load_mllm

ENCODER_CONFIG_NAME = "encoder_config.json"
ENCODER_FORMAT = "afmrl-product-encoder"
DEFAULT_INSTRUCTION = "Represent the given product for identical product retrieval."


class EncoderLoadError(ValueError):
    """A directory that is not an encoder saved by ``ProductEncoder.save_pretrained``."""


@dataclass
class EncoderConfig:
    """How inputs are built and how the backbone is adapted. Saved as ``encoder_config.json``."""

    backbone: str = field(metadata={"help": "Backbone MLLM: hub name or local path (AutoModelForImageTextToText)."})
    instruction: str = field(default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction placed before the listing's text."})
    attribute_prefix: str = field(default="Attributes: ", metadata={"help": "Text placed before appended attribute text."})
    max_length: int = field(default=256, metadata={"help": "Truncate the text part to this many tokens."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 = no adapter (full fine-tuning, or frozen)."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Language-model linear layers that get LoRA adapters."},
    )
    freeze_vision: bool = field(default=True, metadata={"help": "Keep the vision tower frozen (no LoRA, no gradients)."})
    format: str = field(default=ENCODER_FORMAT, metadata={"help": "Marks the directory as a saved product encoder."})

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EncoderLoadError(f"{ENCODER_CONFIG_NAME} has unknown field(s) {unknown}; was it written by a newer afmrl?")
        return cls(**data)


def _language_lora_targets(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
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


class ProductEncoder(torch.nn.Module):
    """Embeds listings (images + title [+ attributes]) into L2-normalised vectors."""

    def __init__(self, model, processor, config: EncoderConfig):
        super().__init__()
        self.model = model  # a peft model when LoRA is on, else the plain backbone
        self.processor = processor
        self.config = config
        # Right padding makes "last non-padding token" = attention_mask.sum() - 1 for every row.
        self.processor.tokenizer.padding_side = "right"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(cls, config: EncoderConfig | str, *, dtype=None, load_in_4bit=False, trust_remote_code=False,
                      adapter_dir: str | Path | None = None, trainable: bool = True,
                      backbone_path: str | Path | None = None) -> ProductEncoder:
        """A new encoder over ``config.backbone`` with a fresh LoRA adapter (or ``adapter_dir``'s).

        With ``config.lora_r == 0`` and ``trainable`` the language model's own weights train
        (full fine-tuning); the vision tower trains only when ``freeze_vision`` is off.
        """
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(config, str):
            config = EncoderConfig(backbone=config)
        model, processor = load_mllm(config.backbone if backbone_path is None else backbone_path, dtype=dtype, load_in_4bit=load_in_4bit,
                                     trust_remote_code=trust_remote_code)
        model.requires_grad_(False)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
        elif config.lora_r > 0:
            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=_language_lora_targets(model, config.lora_target_modules), bias="none")
            model = get_peft_model(model, lora)
        elif trainable:
            for name, param in model.named_parameters():
                if "visual" not in name:
                    param.requires_grad_(True)
        if not config.freeze_vision and trainable:
            for name, param in model.named_parameters():
                if "visual" in name:
                    param.requires_grad_(True)
        return cls(model, processor, config)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype=None, load_in_4bit=False, trust_remote_code=False,
                        trainable: bool = False) -> ProductEncoder:
        """Load an encoder saved by ``save_pretrained`` (frozen unless ``trainable``)."""
        path = Path(path)
        config_file = path / ENCODER_CONFIG_NAME
        if not path.is_dir():
            raise EncoderLoadError(f"encoder directory {str(path)!r} does not exist")
        if not config_file.is_file():
            raise EncoderLoadError(
                f"{str(path)!r} is not an AGCL encoder: {ENCODER_CONFIG_NAME} is missing "
                "(train one with recipes/agcl_train.py, or pass the directory it wrote)"
            )
        try:
            data = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise EncoderLoadError(f"{config_file} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != ENCODER_FORMAT:
            raise EncoderLoadError(f"{config_file} does not describe an {ENCODER_FORMAT} (field 'format')")
        config = EncoderConfig.from_dict(data)
        has_adapter = (path / "adapter_config.json").is_file()
        if config.lora_r > 0 and not has_adapter:
            raise EncoderLoadError(f"{str(path)!r} declares a LoRA adapter (lora_r={config.lora_r}) but has no adapter_config.json")
        backbone_path = path if config.backbone == "." else None
        if backbone_path is not None and not (path / "config.json").is_file():
            raise EncoderLoadError(f"{str(path)!r} declares its own backbone (backbone '.') but has no config.json")
        encoder = cls.from_backbone(config, dtype=dtype, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code,
                                    adapter_dir=path if has_adapter else None, trainable=trainable,
                                    backbone_path=backbone_path)
        if not trainable:
            encoder.eval()
        return encoder

    def save_pretrained(self, path: str | Path) -> None:
        """Write ``encoder_config.json`` and the LoRA adapter, or the whole backbone (safetensors)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = asdict(self.config)
        if hasattr(self.model, "peft_config"):
            self.model.save_pretrained(str(path), safe_serialization=True)
        else:  # no adapter: the weights themselves may have been trained, so the directory carries them
            self.backbone.save_pretrained(str(path), safe_serialization=True)
            self.processor.save_pretrained(str(path))
            config["backbone"] = "."
        (path / ENCODER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ inputs

    @property
    def embedding_dim(self) -> int:
        cfg = self.backbone.config
        return int(getattr(cfg, "text_config", cfg).hidden_size)

    @property
    def backbone(self):
        """The transformers model (LoRA layers injected in place when present)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def listing_text(self, title: str | None, attributes: str | None = None) -> str:
        parts = [self.config.instruction]
        if title:
            parts.append(title)
        if attributes:
            parts.append(self.config.attribute_prefix + attributes)
        return "\n".join(parts)

    def build_inputs(self, images: Sequence, titles: Sequence[str | None], attributes: Sequence[str | None] | None = None):
        """Tokenise a batch. ``images[i]`` is a PIL image, a list of them, or None (text-only)."""
        if len(images) != len(titles) or (attributes is not None and len(attributes) != len(titles)):
            raise ValueError(f"batch lengths differ: {len(images)} images, {len(titles)} titles, "
                             f"{None if attributes is None else len(attributes)} attribute texts")
        texts, flat_images = [], []
        for i, (image, title) in enumerate(zip(images, titles, strict=True)):
            listing_images = [] if image is None else (list(image) if isinstance(image, list | tuple) else [image])
            content = [{"type": "image"} for _ in listing_images]
            content.append({"type": "text", "text": self.listing_text(title, None if attributes is None else attributes[i])})
            chat = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=False)
            # End on <|im_end|>: the embedding token then closes the whole listing.
            texts.append(chat.rstrip())
            flat_images += [im.convert("RGB") if isinstance(im, Image.Image) else im for im in listing_images]
        return self.processor(text=texts, images=flat_images or None, padding=True, return_tensors="pt")

    def split_inputs(self, batch, size: int) -> list[dict]:
        """Split ``build_inputs`` output into chunks of ``size`` listings (for GradCache).

        Qwen-VL processors pack the patches of every image into one ``pixel_values`` tensor, with
        one ``image_grid_thw`` row per image; a listing's share is found from its own tokens: one
        ``<|vision_start|>`` per image.
        """
        n = batch["input_ids"].shape[0]
        plain = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        if "pixel_values" not in batch:
            return [{k: v[i:i + size] for k, v in plain.items()} for i in range(0, n, size)]
        vision_start = self.processor.tokenizer.convert_tokens_to_ids("<|vision_start|>")
        images_per_row = (batch["input_ids"] == vision_start).sum(dim=1)
        image_offsets = torch.cat([images_per_row.new_zeros(1), images_per_row.cumsum(0)])
        patches = batch["image_grid_thw"].prod(dim=-1)
        patch_offsets = torch.cat([patches.new_zeros(1), patches.cumsum(0)])
        chunks = []
        for i in range(0, n, size):
            j = min(i + size, n)
            chunk = {k: v[i:j] for k, v in plain.items()}
            first, last = image_offsets[i], image_offsets[j]
            chunk["pixel_values"] = batch["pixel_values"][patch_offsets[first]:patch_offsets[last]]
            chunk["image_grid_thw"] = batch["image_grid_thw"][first:last]
            chunks.append(chunk)
        return chunks

    # ------------------------------------------------------------------ embedding

    def forward(self, **inputs) -> torch.Tensor:
        backbone = self.backbone
        # The base model (without the LM head) returns the last hidden states directly: no vocabulary
        # projection is computed for an embedding.
        outputs = backbone.base_model(**inputs, return_dict=True)
        hidden = outputs.last_hidden_state
        last = inputs["attention_mask"].sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return F.normalize(pooled.float(), dim=-1)

    @torch.no_grad()
    def encode(self, images: Sequence, titles: Sequence[str | None], attributes: Sequence[str | None] | None = None,
               *, batch_size: int = 32, show_progress: bool | None = None, desc: str = "encoding") -> np.ndarray:
        """Embed many listings in batches; returns float32 (N, dim), rows L2-normalised."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        chunks = []
        starts = range(0, len(titles), batch_size)
        bar = tqdm(starts, desc=desc, disable=not show_progress if show_progress is not None else len(starts) < 8)
        for start in bar:
            end = start + batch_size
            batch = self.build_inputs(images[start:end], titles[start:end],
                                      None if attributes is None else attributes[start:end]).to(device)
            chunks.append(self(**batch).cpu())
        self.train(was_training)
        if not chunks:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return torch.cat(chunks).numpy().astype(np.float32)
