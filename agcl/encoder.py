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

Repeated listings (e.g. the G attribute variants of one listing that the RAR reward re-embeds)
can share their image work: ``encode(..., image_keys=ids, image_cache=encoder.new_image_cache())``
runs the image processor, and where the backbone allows it the vision tower, once per key and
keeps the result across calls (``ImageCache``: bounded LRU, owned by the caller, valid only for an
encoder whose vision tower does not change). Same embeddings as without it, up to float rounding.
"""

from __future__ import annotations

import inspect
import json
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from agcl.modeling import backbone_signature, load_mllm, read_backbone_signature

ENCODER_CONFIG_NAME = "encoder_config.json"
MOE_FILE = "moe.safetensors"
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
    crop_views: bool = field(default=False, metadata={
        "help": "Show a listing with a `bbox` as its image(s) plus the crop to the box (MOON; agcl.crops)."})
    moe_experts: int = field(default=0, metadata={
        "help": "Modality-aware experts on the embedding (MOON2.0, agcl.modality_moe); 0 = off."})
    moe_hidden_size: int = field(default=0, metadata={"help": "Hidden size of each expert; 0 = the embedding size."})
    moe_entropy_weight: float = field(default=0.01, metadata={
        "help": "Weight of the routing entropy regulariser in the training loss (with moe_experts > 0)."})
    backbone_signature: dict | None = field(default=None, metadata={
        "help": "Family and shapes of the backbone the encoder was built over (filled in when it is built); loading "
                "over a backbone with another signature is refused."})
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
            raise EncoderLoadError(f"{ENCODER_CONFIG_NAME} has unknown field(s) {unknown}; was it written by a newer afmrl?")
        return cls(**data)


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


@dataclass(eq=False)
class _ListingImages:
    """One cache key's image work: the processor's output for its image(s) and, optionally, the vision tower's."""

    grid: torch.Tensor | None = None  # (num_images, 3) ``image_grid_thw`` rows (CPU)
    pixel_values: torch.Tensor | None = None  # the images' patches as the processor packs them; None once features exist
    features: tuple | None = None  # per image: the vision tower's merged output, (tokens, hidden)
    deepstack: tuple | None = None  # per image: one (tokens, hidden) tensor per deepstack layer (Qwen3-VL)
    output_class: type | None = None  # the class ``get_image_features`` returns (rebuilt for ``mm_encoder_outputs``)
    replacements: list | None = None  # per image: the processor's expansion of its image token

    @property
    def num_images(self) -> int:
        return 0 if self.grid is None else int(self.grid.shape[0])


class ImageCache:
    """Per-listing image work of a FROZEN encoder, reused across ``ProductEncoder.encode`` calls.

    The caller owns it and passes it with one key per listing (``encode(..., image_keys=ids,
    image_cache=cache)``; e.g. the listing id): the listing's image(s) go through the processor's
    image processor once per key and, when the backbone supports it, through the vision tower once
    per key; every later query of that listing (any title or attribute text) reuses the result. The
    text is still built per query exactly as ``build_inputs`` does (chat template, processor's
    image-token expansion from ``image_grid_thw``, tokenizer) and the language model runs per query.

    Two levels, chosen when the cache is first used with an encoder:

    * ``"vision"``: the vision tower's output per image (and Qwen3-VL's deepstack features) is kept
      and handed to the backbone as ``mm_encoder_outputs`` (the transformers API of Qwen2-VL,
      Qwen2.5-VL and Qwen3-VL); mRoPE positions come from the model's own ``get_rope_index`` over
      ``input_ids`` / ``image_grid_thw`` / ``mm_token_type_ids``. Used when the backbone accepts
      ``mm_encoder_outputs`` and its vision tower has no trainable parameter.
    * ``"processor"``: only ``pixel_values`` / ``image_grid_thw`` are kept; the vision tower runs on
      every forward (other backbones, or ``vision_features=False``).

    Validity (the caller's responsibility): a key must always stand for the same image(s) (a
    listing id of one catalog version); the processor must not change; in ``"vision"`` mode the
    vision tower's weights must not change while the cache is in use: use it with a frozen encoder
    (e.g. the reward's stage-1 encoder, loaded with ``trainable=False``); ``encode`` runs in eval
    mode. A cache serves one encoder: using it with another raises ``ValueError`` (``clear()``
    frees it for another), and so does a ``"vision"`` cache whose encoder's vision tower has since
    been made trainable. Bounded: at most ``max_entries`` keys, least recently used dropped first
    (the listings of the batch being encoded stay alive for that batch whatever the bound). Memory:
    per image, ``tokens x hidden`` values in the model dtype (Qwen2-VL-2B, a 448 x 448 image: 256 x 1536
    bf16, about 0.8 MB) on the encoder's device.
    """

    LEVELS = ("vision", "processor")

    def __init__(self, max_entries: int = 256, *, vision_features: bool = True):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive integer, got {max_entries!r}")
        self.max_entries = max_entries
        self.vision_features = bool(vision_features)
        self.level: str | None = None  # fixed on first use
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, _ListingImages] = OrderedDict()
        self._owner = None  # weakref to the encoder it serves

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return (f"ImageCache(level={self.level!r}, entries={len(self)}/{self.max_entries}, hits={self.hits}, "
                f"misses={self.misses})")

    def clear(self) -> None:
        """Forget every entry and the encoder it served."""
        self._entries.clear()
        self._owner = None
        self.level = None

    def _bind(self, encoder, vision_ok: bool) -> str:
        owner = None if self._owner is None else self._owner()
        if owner is None:
            self.clear()
            self._owner = weakref.ref(encoder)
            self.level = "vision" if self.vision_features and vision_ok else "processor"
        elif owner is not encoder:
            raise ValueError("this ImageCache holds another encoder's image work: use one cache per encoder "
                             "(or clear() it first)")
        elif self.level == "vision" and not vision_ok:
            raise ValueError("this ImageCache keeps vision-tower outputs, but the encoder's vision tower is no longer "
                             "frozen: cached features may be stale (clear() the cache, or keep the vision tower frozen)")
        return self.level

    def touch(self, keys) -> None:
        """Mark the present ``keys`` most recently used, so that the entries put next evict other keys first."""
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)

    def _get(self, key) -> _ListingImages | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def _put(self, key, entry: _ListingImages) -> None:
        self.misses += 1
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


@dataclass(eq=False)
class CachedImageBatch:
    """``ProductEncoder.build_inputs_cached`` output: text inputs plus the batch's per-listing image entries."""

    inputs: dict  # input_ids, attention_mask, [mm_token_type_ids], [image_grid_thw] (CPU tensors)
    listings: list  # _ListingImages of the rows with at least one image, in row order (repeats allowed)
    level: str  # ImageCache level


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


class ProductEncoder(torch.nn.Module):
    """Embeds listings (images + title [+ attributes]) into L2-normalised vectors."""

    def __init__(self, model, processor, config: EncoderConfig):
        super().__init__()
        self.model = model  # a peft model when LoRA is on, else the plain backbone
        self.processor = processor
        self.config = config
        # Right padding makes "last non-padding token" = attention_mask.sum() - 1 for every row.
        self.processor.tokenizer.padding_side = "right"
        self.moe = None
        self.last_routing = None  # the MoE gates of the latest forward (the trainer's entropy term reads them)
        if config.moe_experts:
            from agcl.modality_moe import ModalityMoE

            self.moe = ModalityMoE(self.embedding_dim, config.moe_experts, config.moe_hidden_size or None)

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
        if config.backbone_signature is None:
            config.backbone_signature = backbone_signature(model.config)
        if adapter_dir is not None:
            try:
                model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
            except RuntimeError as err:  # e.g. "size mismatch for ...lora_A.weight": an adapter of another backbone
                raise EncoderLoadError(f"the adapter in {str(adapter_dir)!r} does not fit backbone "
                                       f"{config.backbone!r}: {str(err).splitlines()[0]}") from err
        elif config.lora_r > 0:
            lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                              target_modules=language_lora_targets(model, config.lora_target_modules), bias="none")
            model = get_peft_model(model, lora)
        elif trainable:
            for name, param in model.named_parameters():
                if "visual" not in name:
                    param.requires_grad_(True)
        if not config.freeze_vision and trainable:
            for name, param in model.named_parameters():
                if "visual" in name:
                    param.requires_grad_(True)
        encoder = cls(model, processor, config)
        if encoder.moe is not None:
            encoder.moe.requires_grad_(trainable)
        return encoder

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype=None, load_in_4bit=False, trust_remote_code=False,
                        trainable: bool = False) -> ProductEncoder:
        """Load an encoder saved by ``save_pretrained`` (frozen unless ``trainable``)."""
        path = Path(path)
        config = read_encoder_config(path)
        has_adapter = (path / "adapter_config.json").is_file()
        if config.lora_r > 0 and not has_adapter:
            raise EncoderLoadError(f"{str(path)!r} declares a LoRA adapter (lora_r={config.lora_r}) but has no adapter_config.json")
        backbone_path = path if config.backbone == "." else None
        if backbone_path is not None and not (path / "config.json").is_file():
            raise EncoderLoadError(f"{str(path)!r} declares its own backbone (backbone '.') but has no config.json")
        if config.backbone_signature is not None:  # before any weights load (encoders saved by earlier versions lack it)
            found = read_backbone_signature(backbone_path or config.backbone, trust_remote_code=trust_remote_code)
            if found != config.backbone_signature:
                differ = {k: (v, found.get(k)) for k, v in config.backbone_signature.items() if found.get(k) != v}
                raise EncoderLoadError(
                    f"{str(path)!r} was built over another backbone than {config.backbone!r}: "
                    + ", ".join(f"{k} {saved!r} (saved) vs {now!r} (found)" for k, (saved, now) in differ.items())
                    + f"; point 'backbone' in {ENCODER_CONFIG_NAME} at the model the encoder was trained over")
        encoder = cls.from_backbone(config, dtype=dtype, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code,
                                    adapter_dir=path if has_adapter else None, trainable=trainable,
                                    backbone_path=backbone_path)
        if encoder.moe is not None:
            moe_file = path / MOE_FILE
            if not moe_file.is_file():
                raise EncoderLoadError(f"{str(path)!r} declares {config.moe_experts} experts but has no {MOE_FILE}")
            from safetensors.torch import load_file

            encoder.moe.load_state_dict(load_file(str(moe_file)), strict=True)
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
        if self.moe is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in self.moe.state_dict().items()}, str(path / MOE_FILE))
        (path / ENCODER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ memory

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs=None, every_n_layers: int = 1,
                                        offload: bool = False) -> None:
        """Recompute the backbone's activations in backward (``--activation_checkpointing true``).

        The Trainer calls this on the model it trains, which is this wrapper, not a transformers
        model; the backbone does the work (and makes its input embeddings require grad, which
        reentrant checkpointing needs to reach LoRA adapters behind frozen embeddings).
        """
        self.backbone.activation_checkpointing_enable(activation_checkpointing_kwargs, every_n_layers=every_n_layers,
                                                      offload=offload)

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether any backbone module recomputes its activations."""
        return self.backbone.is_activation_checkpointing

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
        return self._truncate("\n".join(parts))

    def _truncate(self, text: str) -> str:
        """``text`` cut to ``config.max_length`` tokens (the text part of a listing; image tokens come on top).

        Real titles can run to hundreds of words; without a bound one such listing sets the sequence length, and so
        the memory, of its whole batch. A byte-level tokenizer makes at most one token per byte, so short texts
        skip the tokenizer."""
        limit = self.config.max_length
        if not limit or len(text.encode("utf-8")) <= limit:
            return text
        tokenizer = self.processor.tokenizer
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= limit else tokenizer.decode(ids[:limit])

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
        batch = self.processor(text=texts, images=flat_images or None, padding=True, return_tensors="pt")
        if self.moe is not None:
            batch["listing_modality"] = self._modality(
                [im is not None and (not isinstance(im, list | tuple) or len(im) > 0) for im in images], titles, attributes)
        return batch

    @staticmethod
    def _modality(has_image: Sequence[bool], titles, attributes) -> torch.Tensor:
        from agcl.modality_moe import listing_modality

        has_text = [bool(t) or bool(attributes is not None and attributes[i]) for i, t in enumerate(titles)]
        return listing_modality(has_image, has_text)

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

    # ------------------------------------------------------------------ inputs with reused image work

    def new_image_cache(self, max_entries: int = 256, *, vision_features: bool = True) -> ImageCache:
        """An empty ``ImageCache`` for ``encode(..., image_keys=..., image_cache=...)`` (see its docstring)."""
        return ImageCache(max_entries, vision_features=vision_features)

    def supports_vision_cache(self) -> bool:
        """Whether vision-tower outputs can be reused: the backbone takes ``mm_encoder_outputs`` and its
        vision tower is frozen (no parameter requires grad)."""
        base = self.backbone.base_model
        visual = getattr(base, "visual", None)
        if visual is None or not callable(getattr(base, "get_image_features", None)):
            return False
        accepts = getattr(self, "_accepts_mm_encoder_outputs", None)
        if accepts is None:
            try:
                accepts = "mm_encoder_outputs" in inspect.signature(base.forward).parameters
            except (TypeError, ValueError):
                accepts = False
            self._accepts_mm_encoder_outputs = accepts
        return accepts and not any(p.requires_grad for p in visual.parameters())

    def _processor_call_kwargs(self) -> tuple[dict, dict, bool]:
        """(text kwargs, image kwargs, return mm_token_type_ids) as ``processor(..., padding=True,
        return_tensors="pt")`` (``build_inputs``) resolves them."""
        proc = self.processor
        merged = proc._merge_kwargs(tokenizer_init_kwargs=getattr(proc.tokenizer, "init_kwargs", {}), padding=True,
                                    return_tensors="pt")
        text_kwargs = dict(merged["text_kwargs"])
        return_mm = text_kwargs.pop("return_mm_token_type_ids", merged.get("return_mm_token_type_ids", False))
        text_kwargs.pop("return_text_replacement_offsets", None)
        return text_kwargs, dict(merged["images_kwargs"]), bool(return_mm)

    def _mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``processor.create_mm_token_type_ids`` vectorised: 1 image, 2 video, 3 audio tokens, else 0."""
        types = torch.zeros_like(input_ids)
        for value, name in ((1, "image_token_ids"), (2, "video_token_ids"), (3, "audio_token_ids")):
            ids = [i for i in (getattr(self.processor, name, None) or []) if i is not None]
            if ids:
                types[torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype))] = value
        return types

    def build_inputs_cached(self, images: Sequence, titles: Sequence[str | None], attributes: Sequence[str | None] | None,
                            image_keys: Sequence[Hashable | None], image_cache: ImageCache) -> CachedImageBatch:
        """``build_inputs`` with each key's image processing done once and kept in ``image_cache``.

        ``image_keys[i]`` names row i's image(s) (None: not cached, processed for this batch only).
        Where the cache (or an earlier row of the batch) already holds the key, ``images[i]`` is not
        read. The text goes through the chat template, the processor's image-token expansion (from
        each image's ``image_grid_thw``) and the tokenizer with the processor's own arguments, so
        the token ids equal ``build_inputs``'s. Vision-tower outputs are computed later, by
        ``cached_model_inputs``.
        """
        n = len(titles)
        if len(images) != n or len(image_keys) != n or (attributes is not None and len(attributes) != n):
            raise ValueError(f"batch lengths differ: {len(images)} images, {n} titles, {len(image_keys)} image keys, "
                             f"{None if attributes is None else len(attributes)} attribute texts")
        level = image_cache._bind(self, self.supports_vision_cache())
        text_kwargs, image_kwargs, return_mm = self._processor_call_kwargs()
        rows: list[_ListingImages] = []
        batch_entries: dict = {}
        todo: list[tuple[Hashable | None, _ListingImages, list]] = []
        for i in range(n):
            key = image_keys[i]
            entry = None if key is None else batch_entries.get(key)
            if entry is None and key is not None:
                entry = image_cache._get(key)
            if entry is None:
                image = images[i]
                listing_images = [] if image is None else (list(image) if isinstance(image, list | tuple) else [image])
                entry = _ListingImages()
                if listing_images:
                    todo.append((key, entry, [im.convert("RGB") if isinstance(im, Image.Image) else im
                                              for im in listing_images]))
                elif key is not None:
                    image_cache._put(key, entry)
            if key is not None:
                batch_entries[key] = entry
            rows.append(entry)
        if todo:  # one image-processor call for every image not seen before
            processed = self.processor.image_processor([im for _, _, ims in todo for im in ims], **image_kwargs)
            grid = processed["image_grid_thw"]
            patches = torch.split(processed["pixel_values"], grid.prod(dim=-1).tolist())
            first = 0
            for key, entry, ims in todo:
                last = first + len(ims)
                entry.grid = grid[first:last]
                entry.pixel_values = torch.cat(patches[first:last])
                entry.replacements = [self.processor.replace_image_token({"image_grid_thw": entry.grid}, image_idx=j)
                                      for j in range(len(ims))]
                first = last
                if key is not None:
                    image_cache._put(key, entry)

        texts = []
        for i, entry in enumerate(rows):
            content = [{"type": "image"} for _ in range(entry.num_images)]
            content.append({"type": "text", "text": self.listing_text(titles[i], None if attributes is None else attributes[i])})
            chat = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=False)
            texts.append(chat.rstrip())
        listings = [entry for entry in rows if entry.num_images]
        inputs = {}
        if listings:
            grid = torch.cat([entry.grid for entry in listings])
            texts, _ = self.processor.get_text_with_replacements(texts, [r for entry in listings for r in entry.replacements])
        # Padded lists, then one tensor per field: the values of the tokenizer's own "pt" conversion, faster.
        text_kwargs.pop("return_tensors", None)
        inputs.update({k: torch.tensor(v) for k, v in self.processor.tokenizer(texts, **text_kwargs).items()})
        if return_mm:
            inputs["mm_token_type_ids"] = self._mm_token_type_ids(inputs["input_ids"])
        if listings:
            inputs["image_grid_thw"] = grid
        if self.moe is not None:
            inputs["listing_modality"] = self._modality([entry.num_images > 0 for entry in rows], titles, attributes)
        return CachedImageBatch(inputs=inputs, listings=listings, level=level)

    def cached_model_inputs(self, batch: CachedImageBatch, device=None) -> dict:
        """The backbone's keyword arguments for ``batch``: in ``"vision"`` mode the vision tower runs
        on the images whose output is not cached yet (once per image) and every image's output goes
        in as ``mm_encoder_outputs``; in ``"processor"`` mode the cached ``pixel_values``."""
        device = next(self.parameters()).device if device is None else device
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        if not batch.listings:
            return inputs
        if batch.level != "vision":
            inputs["pixel_values"] = torch.cat([entry.pixel_values for entry in batch.listings]).to(device)
            return inputs
        missing = list({id(e): e for e in batch.listings if e.features is None}.values())
        if missing:
            base = self.backbone.base_model
            with torch.no_grad():
                out = base.get_image_features(torch.cat([e.pixel_values for e in missing]).to(device),
                                              torch.cat([e.grid for e in missing]).to(device), return_dict=True)
            pooled = out.pooler_output
            deep = getattr(out, "deepstack_features", None)
            first = 0
            for entry in missing:
                last = first + entry.num_images
                entry.features = tuple(t.detach() for t in pooled[first:last])
                if deep is not None:
                    entry.deepstack = tuple(tuple(layer[j].detach() for layer in deep) for j in range(first, last))
                entry.output_class = type(out)
                entry.pixel_values = None  # the features replace the patches
                first = last
        features = tuple(f.to(device) for e in batch.listings for f in e.features)
        extra = {}
        if batch.listings[0].deepstack is not None:
            layers = len(batch.listings[0].deepstack[0])
            extra["deepstack_features"] = [tuple(d[layer].to(device) for e in batch.listings for d in e.deepstack)
                                           for layer in range(layers)]
        inputs["mm_encoder_outputs"] = {"image": batch.listings[0].output_class(pooler_output=features, **extra)}
        return inputs

    # ------------------------------------------------------------------ embedding

    def forward(self, **inputs) -> torch.Tensor:
        backbone = self.backbone
        modality = inputs.pop("listing_modality", None)
        # The base model (without the LM head) returns the last hidden states directly: no vocabulary
        # projection is computed for an embedding.
        outputs = backbone.base_model(**inputs, return_dict=True)
        hidden = outputs.last_hidden_state
        last = inputs["attention_mask"].sum(dim=1) - 1
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
        if self.moe is not None:
            if modality is None:
                raise ValueError("this encoder has modality experts: build its inputs with build_inputs or "
                                 "build_inputs_cached, which add `listing_modality`")
            pooled, self.last_routing = self.moe(pooled, modality)
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def encode(self, images: Sequence, titles: Sequence[str | None], attributes: Sequence[str | None] | None = None,
               *, batch_size: int = 32, show_progress: bool | None = None, desc: str = "encoding",
               image_keys: Sequence[Hashable | None] | None = None, image_cache: ImageCache | None = None) -> np.ndarray:
        """Embed many listings in batches; returns float32 (N, dim), rows L2-normalised.

        With ``image_cache`` (``new_image_cache()``; frozen encoder only, see ``ImageCache``) and one
        ``image_keys`` entry per row (e.g. listing ids; None = not cached), each key's image(s) are
        processed, and where supported run through the vision tower, once and kept across calls;
        ``images[i]`` is not read when its key is already cached. Same embeddings as without it
        (up to float rounding).
        """
        if (image_cache is None) != (image_keys is None):
            raise ValueError("pass image_keys and image_cache together (or neither)")
        if image_keys is not None and len(image_keys) != len(titles):
            raise ValueError(f"{len(image_keys)} image keys for {len(titles)} listings")
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        chunks = []
        starts = range(0, len(titles), batch_size)
        bar = tqdm(starts, desc=desc, disable=not show_progress if show_progress is not None else len(starts) < 8)
        for start in bar:
            end = start + batch_size
            if image_cache is not None:
                cached = self.build_inputs_cached(images[start:end], titles[start:end],
                                                  None if attributes is None else attributes[start:end],
                                                  image_keys[start:end], image_cache)
                chunks.append(self(**self.cached_model_inputs(cached, device)).cpu())
                continue
            batch = self.build_inputs(images[start:end], titles[start:end],
                                      None if attributes is None else attributes[start:end]).to(device)
            chunks.append(self(**batch).cpu())
        self.train(was_training)
        if not chunks:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return torch.cat(chunks).numpy().astype(np.float32)
