"""The product encoder's configuration on disk: ``encoder_config.json`` beside the adapter or the weights.

``EncoderConfig`` says which backbone an encoder reads listings with, how a listing is written
(instruction, attribute prefix, text length), how the backbone is adapted (LoRA, or full
fine-tuning) and which optional heads it carries; ``read_encoder_config`` reads and checks it
without loading any weights, so that stage 2 can refuse a wrong directory in seconds.

    config = read_encoder_config("outputs/agcl")   # EncoderLoadError when it is not an encoder
    print(config.backbone, config.lora_r)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path

__all__ = [
    "DEFAULT_INSTRUCTION",
    "ENCODER_CONFIG_NAME",
    "ENCODER_FORMAT",
    "ENCODER_TYPES",
    "MOE_FILE",
    "EncoderConfig",
    "EncoderLoadError",
    "read_encoder_config",
]

ENCODER_CONFIG_NAME = "encoder_config.json"
MOE_FILE = "moe.safetensors"
ENCODER_FORMAT = "afmrl-product-encoder"
ENCODER_TYPES = ("auto", "mllm", "dual")
DEFAULT_INSTRUCTION = "Represent the given product for identical product retrieval."


class EncoderLoadError(ValueError):
    """A directory that is not an encoder saved by ``ProductEncoder.save_pretrained``."""


@dataclass
class EncoderConfig:
    """How inputs are built and how the backbone is adapted. Saved as ``encoder_config.json``."""

    backbone: str = field(metadata={"help": "Backbone MLLM: hub name or local path (AutoModelForImageTextToText)."})
    encoder_type: str = field(
        default="auto",
        metadata={
            "help": "'mllm' (one multimodal LLM reads the whole listing), 'dual' (a CLIP/SigLIP image tower and text "
            "tower, fused: afmrl.encoder.dual) or 'auto' (from the backbone's config; saved resolved)."
        },
    )
    image_weight: float = field(
        default=0.5,
        metadata={
            "help": "Dual encoders: the image embedding's weight in a listing's fusion, w·image + (1-w)·text "
            "(each L2-normalised first)."
        },
    )
    instruction: str = field(
        default=DEFAULT_INSTRUCTION, metadata={"help": "Instruction placed before the listing's text."}
    )
    attribute_prefix: str = field(
        default="Attributes: ", metadata={"help": "Text placed before appended attribute text."}
    )
    max_length: int = field(default=256, metadata={"help": "Truncate the text part to this many tokens."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 = no adapter (full fine-tuning, or frozen)."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.1, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        metadata={"help": "Language-model linear layers that get LoRA adapters."},
    )
    freeze_vision: bool = field(
        default=True, metadata={"help": "Keep the vision tower frozen (no LoRA, no gradients)."}
    )
    crop_views: bool = field(
        default=False,
        metadata={
            "help": "Show a listing with a `bbox` as its image(s) plus the crop to the box (MOON; afmrl.encoder.crops)."
        },
    )
    image_max_side: int = field(
        default=0,
        metadata={
            "help": "Downscale every photo so that its longer side is at most this many pixels before the processor "
            "(0: as given): the encoder's view, e.g. 56 for 4 image tokens of a 112 px catalog."
        },
    )
    moe_experts: int = field(
        default=0, metadata={"help": "Modality-aware experts on the embedding (MOON2.0, afmrl.encoder.moe); 0 = off."}
    )
    moe_hidden_size: int = field(default=0, metadata={"help": "Hidden size of each expert; 0 = the embedding size."})
    guided_moe_layers: int = field(
        default=0,
        metadata={
            "help": "MOON's guided experts: in the last N language-model layers, image, category and attribute "
            "tokens each get a dedicated feed-forward expert beside the layer's MLP (encoder.guided_moe); 0 = off."
        },
    )
    guided_moe_hidden_size: int = field(
        default=0, metadata={"help": "Hidden size of each guided expert; 0 = the language model's hidden size."}
    )
    moe_entropy_weight: float = field(
        default=0.01,
        metadata={"help": "Weight of the routing entropy regulariser in the training loss (with moe_experts > 0)."},
    )
    backbone_signature: dict | None = field(
        default=None,
        metadata={
            "help": "Family and shapes of the backbone the encoder was built over (filled in when it is built); "
            "loading "
            "over a backbone with another signature is refused."
        },
    )
    format: str = field(default=ENCODER_FORMAT, metadata={"help": "Marks the directory as a saved product encoder."})

    @property
    def hidden_size(self) -> int | None:
        """The backbone language model's width (from ``backbone_signature``; not a saved field). The Trainer reads
        ``model.config.hidden_size`` to fill DeepSpeed's "auto" bucket sizes (deepspeed_configs/zero*.json); without
        it AGCL under ZeRO-2/3 stopped at start with "The model's config file has neither `hidden_size` ..."."""
        return (self.backbone_signature or {}).get("hidden_size")

    @classmethod
    def from_dict(cls, data: dict) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise EncoderLoadError(
                f"{ENCODER_CONFIG_NAME} has unknown field(s) {unknown}; was it written by a newer afmrl?"
            )
        return cls(**data)


def read_encoder_config(path: str | Path) -> EncoderConfig:
    """The ``EncoderConfig`` of an encoder directory, without loading weights; ``EncoderLoadError`` when
    ``path`` is missing or is not an AGCL encoder (stage 2 checks its encoder with this before loading models)."""
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
    return EncoderConfig.from_dict(data)
