"""The product encoder: a multimodal LLM read as an embedding model (VLM2Vec style).

An instruction, the listing's image(s) and its text (title, optionally followed by attribute text)
go through an ``AutoModelForImageTextToText`` backbone; the last layer's hidden state at the last
non-padding token, L2-normalised, is the product embedding (Jiang et al., VLM2Vec, arXiv
2410.05160; the AFMRL paper uses Qwen2-VL-2B this way). The backbone is adapted with LoRA
(peft) on the language model; the vision tower stays frozen by default.

On disk an encoder is a directory with ``encoder_config.json`` (which backbone, prompt, LoRA
settings) and either the peft adapter (``adapter_model.safetensors``; the backbone is reloaded by
name or path through ``afmrl.modeling.load_mllm``) or, for an encoder trained without LoRA, the
whole backbone in safetensors (``backbone`` is then ``"."``: the directory itself).

The parts live beside it: ``afmrl.encoder.config`` (what is saved), ``afmrl.encoder.inputs`` (how a
listing becomes a batch), ``afmrl.encoder.image_cache`` (reusing image work across calls, as the RAR reward
does) and ``afmrl.encoder.pooling`` (last token to vector).

    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone="pretrained-tiny-qwen2-vl"))
    vectors = encoder.encode(images, titles, attribute_texts)   # (N, dim) float32, rows L2-normalised
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from afmrl.encoder.config import (
    DEFAULT_INSTRUCTION,
    ENCODER_CONFIG_NAME,
    ENCODER_FORMAT,
    ENCODER_TYPES,
    MOE_FILE,
    EncoderConfig,
    EncoderLoadError,
    read_encoder_config,
)
from afmrl.encoder.crops import catalog_views
from afmrl.encoder.image_cache import CachedImageBatch, ImageCache, supports_vision_cache, vision_model_inputs
from afmrl.encoder.inputs import ListingInputs
from afmrl.encoder.pooling import last_token_states
from afmrl.modeling import (
    backbone_signature,
    is_dual_backbone,
    language_lora_targets,
    load_mllm,
    outside_zero3,
    read_backbone_signature,
)

__all__ = [
    "DEFAULT_INSTRUCTION",
    "ENCODER_CONFIG_NAME",
    "ENCODER_FORMAT",
    "MOE_FILE",
    "CachedImageBatch",
    "EncoderConfig",
    "EncoderLoadError",
    "ImageCache",
    "ProductEncoder",
    "encode_catalog",
    "load_frozen_encoder",
    "read_encoder_config",
]


class ProductEncoder(torch.nn.Module):
    """Embeds listings (images + title [+ attributes]) into L2-normalised vectors."""

    def __init__(self, model, processor, config: EncoderConfig):
        super().__init__()
        self.model = model  # a peft model when LoRA is on, else the plain backbone
        self.processor = processor
        self.config = config
        # Right padding makes "last non-padding token" = attention_mask.sum() - 1 for every row (afmrl.encoder.pooling).
        self.processor.tokenizer.padding_side = "right"
        self.inputs = ListingInputs(
            processor, config, with_modality=bool(config.moe_experts), with_kinds=bool(config.guided_moe_layers)
        )
        self.moe = None
        self.last_routing = None  # the MoE gates of the latest forward (the trainer's entropy term reads them)
        if config.moe_experts:
            from afmrl.encoder.moe import ModalityMoE

            self.moe = ModalityMoE(self.embedding_dim, config.moe_experts, config.moe_hidden_size or None)
        self.guided = None
        if config.guided_moe_layers:
            from afmrl.encoder.guided_moe import GuidedExperts

            hidden = self.embedding_dim
            self.guided = GuidedExperts(config.guided_moe_layers, hidden, config.guided_moe_hidden_size or hidden)
            self.guided.attach(self.backbone)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(
        cls,
        config: EncoderConfig | str,
        *,
        dtype=None,
        load_in_4bit=False,
        trust_remote_code=False,
        adapter_dir: str | Path | None = None,
        trainable: bool = True,
        backbone_path: str | Path | None = None,
    ) -> ProductEncoder:
        """A new encoder over ``config.backbone`` with a fresh LoRA adapter (or ``adapter_dir``'s).

        With ``config.lora_r == 0`` and ``trainable`` the language model's own weights train
        (full fine-tuning); the vision tower trains only when ``freeze_vision`` is off.
        """
        from peft import LoraConfig, PeftModel, get_peft_model

        if isinstance(config, str):
            config = EncoderConfig(backbone=config)
        source = config.backbone if backbone_path is None else backbone_path
        if config.encoder_type not in ENCODER_TYPES:
            raise ValueError(f"encoder_type must be one of {ENCODER_TYPES}, got {config.encoder_type!r}")
        if config.encoder_type == "auto":
            config.encoder_type = "dual" if is_dual_backbone(source) else "mllm"
        if config.encoder_type == "dual" and cls is ProductEncoder:  # CLIP/SigLIP: afmrl.encoder.dual
            from afmrl.encoder.dual import DualEncoder

            cls = DualEncoder
        model, processor = cls.load_backbone(
            source, dtype=dtype, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code
        )
        model.requires_grad_(False)
        if config.backbone_signature is None:
            config.backbone_signature = backbone_signature(model.config)
        if adapter_dir is not None:
            try:
                model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
            except RuntimeError as err:  # e.g. "size mismatch for ...lora_A.weight": an adapter of another backbone
                raise EncoderLoadError(
                    f"the adapter in {str(adapter_dir)!r} does not fit backbone "
                    f"{config.backbone!r}: {str(err).splitlines()[0]}"
                ) from err
        elif config.lora_r > 0:
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=cls.lora_targets(model, config.lora_target_modules),
                bias="none",
                # An unfrozen vision tower trains whole beside the adapter: peft keeps a trainable copy of it and saves
                # it in the adapter file (without this the reloaded encoder silently lost the trained tower).
                modules_to_save=None if config.freeze_vision else list(cls.VISION_MODULES),
            )
            model = get_peft_model(model, lora)
        elif trainable:
            for name, param in model.named_parameters():
                if not cls.is_vision_parameter(name):
                    param.requires_grad_(True)
        if not config.freeze_vision and trainable and not hasattr(model, "peft_config"):
            for name, param in model.named_parameters():
                if cls.is_vision_parameter(name):
                    param.requires_grad_(True)
        encoder = cls(model, processor, config)
        for head in (encoder.moe, encoder.guided):
            if head is not None:
                head.requires_grad_(trainable)
        return encoder

    @staticmethod
    def load_backbone(source, *, dtype=None, load_in_4bit=False, trust_remote_code=False):
        """``(model, processor)`` of the backbone (``afmrl.modeling.load_mllm``)."""
        return load_mllm(source, dtype=dtype, load_in_4bit=load_in_4bit, trust_remote_code=trust_remote_code)

    @staticmethod
    def lora_targets(model, names) -> list[str]:
        """The linears that get LoRA: the language model's (``afmrl.modeling.language_lora_targets``)."""
        return language_lora_targets(model, names)

    VISION_MODULES = ("visual",)  # the vision tower's module name(s) in the backbone

    @staticmethod
    def is_vision_parameter(name: str) -> bool:
        return "visual" in name

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype=None, load_in_4bit=False, trust_remote_code=False, trainable: bool = False
    ) -> ProductEncoder:
        """Load an encoder saved by ``save_pretrained`` (frozen unless ``trainable``)."""
        path = Path(path)
        config = read_encoder_config(path)
        has_adapter = (path / "adapter_config.json").is_file()
        if config.lora_r > 0 and not has_adapter:
            raise EncoderLoadError(
                f"{str(path)!r} declares a LoRA adapter (lora_r={config.lora_r}) but has no adapter_config.json"
            )
        backbone_path = path if config.backbone == "." else None
        if backbone_path is not None and not (path / "config.json").is_file():
            raise EncoderLoadError(f"{str(path)!r} declares its own backbone (backbone '.') but has no config.json")
        if (
            config.backbone_signature is not None
        ):  # before any weights load (encoders saved by earlier versions lack it)
            found = read_backbone_signature(backbone_path or config.backbone, trust_remote_code=trust_remote_code)
            if found != config.backbone_signature:
                differ = {k: (v, found.get(k)) for k, v in config.backbone_signature.items() if found.get(k) != v}
                raise EncoderLoadError(
                    f"{str(path)!r} was built over another backbone than {config.backbone!r}: "
                    + ", ".join(f"{k} {saved!r} (saved) vs {now!r} (found)" for k, (saved, now) in differ.items())
                    + f"; point 'backbone' in {ENCODER_CONFIG_NAME} at the model the encoder was trained over"
                )
        encoder = cls.from_backbone(
            config,
            dtype=dtype,
            load_in_4bit=load_in_4bit,
            trust_remote_code=trust_remote_code,
            adapter_dir=path if has_adapter else None,
            trainable=trainable,
            backbone_path=backbone_path,
        )
        encoder.load_heads(path, error=EncoderLoadError)
        if not trainable:
            encoder.eval()
        return encoder

    def heads(self) -> dict:
        """The trained parts beside the backbone, by the file each is saved in."""
        from afmrl.encoder.guided_moe import GUIDED_MOE_FILE

        return {name: head for name, head in ((MOE_FILE, self.moe), (GUIDED_MOE_FILE, self.guided)) if head is not None}

    def load_heads(self, path: str | Path, error=EncoderLoadError) -> None:
        """Load every head's saved weights from ``path`` (strictly); ``error`` names a missing file."""
        from safetensors.torch import load_file

        for name, head in self.heads().items():
            file = Path(path) / name
            if not file.is_file():
                raise error(f"{str(path)!r}: this encoder's configuration has experts but the directory has no {name}")
            head.load_state_dict(load_file(str(file)), strict=True)

    def save_sentence_transformer(self, path: str | Path) -> Path:
        """Write this encoder as a plain sentence-transformers model (``afmrl.encoder.st_export``):
        ``SentenceTransformer(path).encode(listing)`` equals ``self.encode`` with no package code."""
        from afmrl.encoder.st_export import save_sentence_transformer

        return save_sentence_transformer(self, path)

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
        from safetensors.torch import save_file

        for name, head in self.heads().items():
            save_file({k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}, str(path / name))
        (path / ENCODER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ memory

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs=None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Recompute the backbone's activations in backward (``--activation_checkpointing true``).

        The Trainer calls this on the model it trains, which is this wrapper, not a transformers
        model; the backbone does the work (and makes its input embeddings require grad, which
        reentrant checkpointing needs to reach LoRA adapters behind frozen embeddings).
        """
        self.backbone.activation_checkpointing_enable(
            activation_checkpointing_kwargs, every_n_layers=every_n_layers, offload=offload
        )

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether any backbone module recomputes its activations."""
        return self.backbone.is_activation_checkpointing

    # ------------------------------------------------------------------ inputs (afmrl.encoder.inputs)

    @property
    def embedding_dim(self) -> int:
        cfg = self.backbone.config
        return int(getattr(cfg, "text_config", cfg).hidden_size)

    @property
    def backbone(self):
        """The transformers model (LoRA layers injected in place when present)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def listing_text(self, title: str | None, attributes: str | None = None) -> str:
        """The text part of a listing: instruction, title, ``Attributes: ...``, cut to ``config.max_length`` tokens."""
        return self.inputs.text(title, attributes)

    def build_inputs(
        self, images: Sequence, titles: Sequence[str | None], attributes: Sequence[str | None] | None = None
    ):
        """Tokenise a batch. ``images[i]`` is a PIL image, a list of them, or None (text-only)."""
        return self.inputs.build(images, titles, attributes)

    def split_inputs(self, batch, size: int) -> list[dict]:
        """Split ``build_inputs`` output into chunks of ``size`` listings (for GradCache)."""
        return self.inputs.split(batch, size)

    # ------------------------------------------------------------------ inputs with reused image work
    # (afmrl.encoder.image_cache)

    def new_image_cache(self, max_entries: int = 256, *, vision_features: bool = True) -> ImageCache:
        """An empty ``ImageCache`` for ``encode(..., image_keys=..., image_cache=...)`` (see its docstring)."""
        return ImageCache(max_entries, vision_features=vision_features)

    def supports_vision_cache(self) -> bool:
        """Whether vision-tower outputs can be reused: the backbone takes ``mm_encoder_outputs`` and its
        vision tower is frozen (no parameter requires grad)."""
        return supports_vision_cache(self.backbone)

    def build_inputs_cached(
        self,
        images: Sequence,
        titles: Sequence[str | None],
        attributes: Sequence[str | None] | None,
        image_keys: Sequence[Hashable | None],
        image_cache: ImageCache,
    ) -> CachedImageBatch:
        """``build_inputs`` with each key's image processing done once and kept in ``image_cache``.

        ``image_keys[i]`` names row i's image(s) (None: not cached, processed for this batch only).
        Where the cache (or an earlier row of the batch) already holds the key, ``images[i]`` is not
        read. Same token ids as ``build_inputs``; vision-tower outputs are computed later, by
        ``cached_model_inputs``.
        """
        level = image_cache.bind(self, self.supports_vision_cache())
        return self.inputs.build_cached(images, titles, attributes, image_keys, image_cache, level)

    def cached_model_inputs(self, batch: CachedImageBatch, device=None) -> dict:
        """The backbone's keyword arguments for ``batch`` (the vision tower runs only on images not seen before)."""
        device = next(self.parameters()).device if device is None else device
        return vision_model_inputs(self.backbone, batch, device)

    def encode_cached_batch(self, images, titles, attributes, image_keys, image_cache, device) -> torch.Tensor:
        """One batch of ``encode(..., image_cache=...)``: its embeddings, with each key's image work reused."""
        cached = self.build_inputs_cached(images, titles, attributes, image_keys, image_cache)
        return self(**self.cached_model_inputs(cached, device))

    # ------------------------------------------------------------------ embedding

    def forward(self, **inputs) -> torch.Tensor:
        backbone = self.backbone
        modality = inputs.pop("listing_modality", None)
        kinds = inputs.pop("guided_token_kinds", None)
        if self.guided is not None:
            self.guided.kinds = kinds  # read by the experts' hooks (None: they refuse the forward)
        # The base model (without the LM head) returns the last hidden states directly: no vocabulary
        # projection is computed for an embedding.
        outputs = backbone.base_model(**inputs, return_dict=True)
        pooled = last_token_states(outputs.last_hidden_state, inputs["attention_mask"])
        if self.moe is not None:
            if modality is None:
                raise ValueError(
                    "this encoder has modality experts: build its inputs with build_inputs or "
                    "build_inputs_cached, which add `listing_modality`"
                )
            pooled, self.last_routing = self.moe(pooled, modality)
        return F.normalize(pooled, dim=-1)

    @torch.no_grad()
    def encode(
        self,
        images: Sequence,
        titles: Sequence[str | None],
        attributes: Sequence[str | None] | None = None,
        *,
        batch_size: int = 32,
        show_progress: bool | None = None,
        desc: str = "encoding",
        image_keys: Sequence[Hashable | None] | None = None,
        image_cache: ImageCache | None = None,
    ) -> np.ndarray:
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
                chunks.append(
                    self.encode_cached_batch(
                        images[start:end],
                        titles[start:end],
                        None if attributes is None else attributes[start:end],
                        image_keys[start:end],
                        image_cache,
                        device,
                    ).cpu()
                )
                continue
            batch = self.build_inputs(
                images[start:end], titles[start:end], None if attributes is None else attributes[start:end]
            ).to(device)
            chunks.append(self(**batch).cpu())
        self.train(was_training)
        if not chunks:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return torch.cat(chunks).numpy().astype(np.float32)


def encode_catalog(encoder, listings, attributes: Sequence[str | None] | None = None, **options) -> np.ndarray:
    """Embed every listing of a catalog Dataset (image(s) + title [+ ``attributes[i]``]) the way ``encoder`` was
    trained to see them: with its product-region crop views when it uses them (``afmrl.encoder.crops``).
    ``encoder`` is a ``ProductEncoder`` or any object with the same ``encode``; ``options`` go to ``encode``."""
    images = catalog_views(listings, encoder)
    return encoder.encode(images, list(listings["title"]), None if attributes is None else list(attributes), **options)


def load_frozen_encoder(encoder, device: str | None = None, **kwargs):
    """A frozen encoder, whole in this process: ``encoder`` itself when it is an object; a saved ``ProductEncoder``
    directory loaded outside DeepSpeed ZeRO-3 (``afmrl.modeling.outside_zero3``) on ``device`` (default: the current
    CUDA device, else CPU) otherwise, remembering its directory for fingerprint checks. ``kwargs`` go to
    ``ProductEncoder.from_pretrained``."""
    if not isinstance(encoder, str | Path):
        return encoder
    if device is None:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    with outside_zero3():
        model = ProductEncoder.from_pretrained(encoder, **kwargs)
    model.to(device)
    model._afmrl_source_dir = str(Path(encoder).resolve())  # lets fingerprint checks read the files
    return model
