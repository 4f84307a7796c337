"""The product encoder over a dual encoder: a CLIP or SigLIP image tower and text tower, fused per listing.

Many marketplaces match products with CLIP/SigLIP-style models (Marqo's e-commerce models, Trendyol's matcher):
two towers cost a fraction of an MLLM embedder at 100M listings, and an image's vector can be computed once for
every text it is paired with. ``DualEncoder`` is a ``ProductEncoder`` over such a backbone, so stage 1 (AGCL),
evaluation, the RAR reward, deploy and the sentence-transformers export take it unchanged. A listing is

    t = normalize(text_tower(title [+ "\\n" + attribute_prefix + attributes]))
    v = normalize(mean_i normalize(image_tower(photo_i)))          over the listing's photos (crop views too)
    e = normalize(w · v + (1 − w) · t)                              w = ``EncoderConfig.image_weight`` (0.5)

(a listing without photos is ``t``, one without text ``v``). The towers' own pooled, projected features are used
(``get_text_features`` / ``get_image_features``), so any Hugging Face CLIP or SigLIP checkpoint works as its
authors meant: CLIP pools its end-of-text token, SigLIP its last position (texts padded to ``max_length``, as it
was trained). No instruction is written: the towers are not
instruction-tuned and CLIP reads at most 77 tokens. LoRA adapts the text tower's attention and MLP linears; the
image tower trains whole when ``freeze_vision`` is off (as an MLLM encoder's vision tower); with a frozen one the
reward's image cache keeps each listing's image vector, so re-embedding a listing with new attributes runs the
text tower only.

    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone="openai/clip-vit-base-patch32"))  # a DualEncoder
    vectors = encoder.encode(images, titles, attribute_texts)   # (N, projection dim) float32, rows L2-normalised
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import BatchFeature

from afmrl.encoder.image_cache import as_rgb, images_of
from afmrl.encoder.model import ProductEncoder
from afmrl.modeling import load_dual

__all__ = ["DUAL_LORA_ALIASES", "DualEncoder", "DualInputs"]

# The MLLM's LoRA target names and their CLIP/SigLIP counterparts (the towers call them otherwise).
DUAL_LORA_ALIASES = {"o_proj": "out_proj", "up_proj": "fc1", "gate_proj": "fc1", "down_proj": "fc2"}


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns the pooled, projected tensor (transformers 4) or an output whose
    ``pooler_output`` it is (transformers 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class DualInputs:
    """Builds a dual encoder's input batches: one tokenised text per listing that has text, and every photo with
    the row (``image_rows``) of the listing it belongs to."""

    def __init__(self, processor, config, model_config):
        self.processor = processor
        self.config = config
        self.max_side = config.image_max_side or 0
        limit = int(getattr(model_config.text_config, "max_position_embeddings", 0) or 0)
        self.max_tokens = min(x for x in (config.max_length, limit) if x) if (config.max_length or limit) else None
        # SigLIP was trained on texts padded to a fixed length and pools the last position, so its vector of a text
        # depends on the padding: always pad to max_length (batch-independent vectors); CLIP pools its end token.
        self.padding = "max_length" if model_config.model_type == "siglip" else True

    def text(self, title: str | None, attributes: str | None = None) -> str:
        """The text tower's input: the title, then ``attribute_prefix + attributes`` on the next line."""
        parts = [title] if title else []
        if attributes:
            parts.append(self.config.attribute_prefix + attributes)
        return "\n".join(parts)

    def tokenize(self, texts: list[str]) -> dict:
        return dict(
            self.processor.tokenizer(
                texts, padding=self.padding, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
        )

    def pixels(self, photos: list) -> torch.Tensor:
        return self.processor.image_processor(images=photos, return_tensors="pt")["pixel_values"]

    def build(self, images: Sequence, titles: Sequence[str | None], attributes: Sequence[str | None] | None = None):
        """A ``BatchFeature``: ``has_text`` (B,), the text tower's inputs for those rows, ``pixel_values`` and
        ``image_rows`` for every photo. ``images[i]`` is a PIL image, a list of them, or None (text only)."""
        if len(images) != len(titles) or (attributes is not None and len(attributes) != len(titles)):
            raise ValueError(
                f"batch lengths differ: {len(images)} images, {len(titles)} titles, "
                f"{None if attributes is None else len(attributes)} attribute texts"
            )
        texts, has_text, photos, image_rows = [], [], [], []
        for i, (image, title) in enumerate(zip(images, titles, strict=True)):
            listing_images = images_of(image)
            text = self.text(title, None if attributes is None else attributes[i])
            has_text.append(bool(text) or not listing_images)  # a listing with nothing is the empty text
            if has_text[-1]:
                texts.append(text)
            photos += as_rgb(listing_images, self.max_side)
            image_rows += [i] * len(listing_images)
        batch = {"has_text": torch.tensor(has_text, dtype=torch.bool)}
        if texts:
            batch.update(self.tokenize(texts))
        if photos:
            batch["pixel_values"] = self.pixels(photos)
            batch["image_rows"] = torch.tensor(image_rows, dtype=torch.long)
        return BatchFeature(batch)

    def split(self, batch, size: int) -> list[dict]:
        """``build`` output in chunks of ``size`` listings (GradCache), with chunk-local ``image_rows``."""
        has_text = batch["has_text"]
        text_offsets = torch.cat([has_text.new_zeros(1, dtype=torch.long), has_text.long().cumsum(0)])
        text_keys = [k for k in batch if k not in ("has_text", "pixel_values", "image_rows")]
        chunks = []
        for i in range(0, has_text.shape[0], size):
            j = min(i + size, has_text.shape[0])
            chunk = {"has_text": has_text[i:j]}
            if text_offsets[j] > text_offsets[i]:
                chunk.update({k: batch[k][text_offsets[i] : text_offsets[j]] for k in text_keys})
            if "image_rows" in batch:
                mine = (batch["image_rows"] >= i) & (batch["image_rows"] < j)
                if mine.any():
                    chunk["pixel_values"] = batch["pixel_values"][mine]
                    chunk["image_rows"] = batch["image_rows"][mine] - i
            chunks.append(chunk)
        return chunks


class DualEncoder(ProductEncoder):
    """A ``ProductEncoder`` whose backbone is a CLIP/SigLIP dual encoder (``afmrl.encoder.dual``)."""

    def __init__(self, model, processor, config):
        torch.nn.Module.__init__(self)
        if config.moe_experts:
            raise ValueError(f"{config.backbone!r} is a dual encoder: modality experts (moe_experts) sit on an MLLM "
                             "encoder's pooled state and are not built for two towers; set moe_experts 0")  # fmt: skip
        if config.guided_moe_layers:
            raise ValueError(f"{config.backbone!r} is a dual encoder: guided experts (guided_moe_layers) sit in an "
                             "MLLM's decoder layers; set guided_moe_layers 0")  # fmt: skip
        if not 0.0 < config.image_weight < 1.0:
            raise ValueError(f"image_weight must be between 0 and 1 (exclusive), got {config.image_weight}")
        self.model = model
        self.processor = processor
        self.config = config
        self.processor.tokenizer.padding_side = "right"
        self.inputs = DualInputs(processor, config, self.backbone.config)
        self.moe = None
        self.guided = None
        self.last_routing = None

    @staticmethod
    def lora_targets(model, names: Sequence[str]) -> list[str]:
        """Full paths of the text tower's linears named in ``names`` or their ``DUAL_LORA_ALIASES`` (the image tower
        trains whole when ``freeze_vision`` is off, as an MLLM encoder's vision tower does)."""
        wanted = set(names) | {DUAL_LORA_ALIASES[n] for n in names if n in DUAL_LORA_ALIASES}
        targets = [
            path
            for path, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and path.rsplit(".", 1)[-1] in wanted and "text_model." in path
        ]
        if not targets:
            raise ValueError(f"no text-tower linear layer named any of {sorted(wanted)} in the dual encoder")
        return targets

    @staticmethod
    def load_backbone(source, *, dtype=None, load_in_4bit=False, trust_remote_code=False):
        """``(model, processor)`` of a CLIP/SigLIP checkpoint (``afmrl.modeling.load_dual``)."""
        if load_in_4bit:
            raise ValueError(f"{source}: 4-bit loading is for MLLM backbones; a dual encoder trains in full precision")
        return load_dual(source, dtype=dtype, trust_remote_code=trust_remote_code)

    VISION_MODULES = ("vision_model", "visual_projection")

    @staticmethod
    def is_vision_parameter(name: str) -> bool:
        return "vision_model." in name or "visual_projection" in name

    @property
    def embedding_dim(self) -> int:
        cfg = self.backbone.config
        return int(
            getattr(cfg, "projection_dim", None)
            or getattr(cfg.text_config, "projection_size", None)
            or cfg.text_config.hidden_size
        )

    def listing_text(self, title: str | None, attributes: str | None = None) -> str:
        return self.inputs.text(title, attributes)

    def supports_vision_cache(self) -> bool:
        """Image vectors can be kept when no image-tower parameter trains."""
        return not any(p.requires_grad for n, p in self.named_parameters() if self.is_vision_parameter(n))

    # ------------------------------------------------------------------ embedding

    def text_vectors(self, text_inputs: dict) -> torch.Tensor:
        return F.normalize(_features(self.backbone.get_text_features(**text_inputs)).float(), dim=-1)

    def image_vectors(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.backbone.vision_model.parameters()).dtype
        return F.normalize(
            _features(self.backbone.get_image_features(pixel_values=pixel_values.to(dtype))).float(), dim=-1
        )

    def fuse(self, has_text, text, image_rows, photos) -> torch.Tensor:
        """``normalize(w · mean-of-photos + (1 − w) · text)`` per listing, from per-text and per-photo vectors."""
        n = has_text.shape[0]
        w = self.config.image_weight
        fused = torch.zeros(n, self.embedding_dim, device=has_text.device)
        if text is not None:
            fused = fused.index_add(0, has_text.nonzero()[:, 0], (1 - w) * text)
        if photos is not None:
            per_listing = torch.zeros_like(fused).index_add(0, image_rows, photos)
            fused = fused + w * F.normalize(per_listing, dim=-1)
        return F.normalize(fused, dim=-1)

    def forward(self, has_text, pixel_values=None, image_rows=None, **text_inputs) -> torch.Tensor:
        text = self.text_vectors(text_inputs) if "input_ids" in text_inputs else None
        photos = self.image_vectors(pixel_values) if pixel_values is not None else None
        return self.fuse(has_text, text, image_rows, photos)

    def encode_cached_batch(self, images, titles, attributes, image_keys, image_cache, device) -> torch.Tensor:
        """One batch of ``encode(..., image_cache=...)``: each key's image vector computed once and kept (level
        ``"vision"``: the image tower is frozen), the text tower run per listing."""
        level = image_cache.bind(self, self.supports_vision_cache())
        listing_vectors = self._cached_image_vectors(images, image_keys, image_cache, level)
        texts = [self.inputs.text(t, None if attributes is None else attributes[i]) for i, t in enumerate(titles)]
        has_text = torch.tensor(
            [bool(t) or v is None for t, v in zip(texts, listing_vectors, strict=True)], device=device
        )
        text = None
        if has_text.any():
            inputs = self.inputs.tokenize([t for t, keep in zip(texts, has_text.tolist(), strict=True) if keep])
            text = self.text_vectors({k: v.to(device) for k, v in inputs.items()})
        rows = [i for i, v in enumerate(listing_vectors) if v is not None]
        photos = torch.stack([listing_vectors[i] for i in rows]).to(device) if rows else None
        return self.fuse(has_text, text, torch.tensor(rows, dtype=torch.long, device=device), photos)

    def _cached_image_vectors(self, images, keys, cache, level) -> list:
        """Per listing, the normalised mean of its photos' vectors (None: no photo), each key's computed once and
        kept (level ``"vision"``); at level ``"processor"`` (a training image tower) only pixels are kept. The image
        tower runs once per call, on every photo that needs it."""
        device = next(self.parameters()).device
        entries, batch = [], {}
        for image, key in zip(images, keys, strict=True):
            entry = batch.get(key) if key is not None else None
            if entry is None and key is not None:
                entry = cache._get(key)
            if entry is None:
                photos = as_rgb(images_of(image), self.max_side)
                entry = {"pixels": self.inputs.pixels(photos) if photos else None, "vector": None}
                if key is not None:
                    cache._put(key, entry)
                    batch[key] = entry
            entries.append(entry)
        todo = list({id(e): e for e in entries if e["vector"] is None and e["pixels"] is not None}.values())
        fresh = {}  # at level "processor": this call's vectors only (the tower is training)
        if todo:  # one image-tower pass for every photo of the call that has no kept vector
            vectors = self.image_vectors(torch.cat([e["pixels"] for e in todo]).to(device))
            for entry, part in zip(todo, vectors.split([len(e["pixels"]) for e in todo]), strict=True):
                vector = F.normalize(part.sum(0), dim=-1)
                if level == "vision":
                    entry["vector"], entry["pixels"] = vector, None  # the vector replaces the pixels
                else:
                    fresh[id(entry)] = vector
        return [e["vector"] if e["vector"] is not None else fresh.get(id(e)) for e in entries]

    @property
    def max_side(self) -> int:
        return self.inputs.max_side

    def build_inputs_cached(self, *args, **kwargs):
        raise NotImplementedError("a dual encoder keeps image vectors: use encode(..., image_cache=...)")
