"""Reusing a listing's image work across encoder calls: the processor's patches and the vision tower's output.

The RAR reward re-embeds the same listing many times (its G attribute variants, step after step)
with a frozen stage-1 encoder. Only the text changes between those calls, so the image processor
and, where the backbone allows it, the vision tower need to run once per listing. ``ImageCache``
keeps that work per caller-chosen key (e.g. the listing id); ``ProductEncoder.encode`` takes it with
``image_keys=...``, builds the text exactly as without it, and runs only the language model per call.
Same embeddings as without the cache, up to float rounding (tests/test_encoder_image_cache.py).

    cache = encoder.new_image_cache()
    vectors = encoder.encode(images, titles, attribute_texts, image_keys=listing_ids, image_cache=cache)
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from PIL import Image

__all__ = [
    "CachedImageBatch",
    "ImageCache",
    "ListingImages",
    "images_of",
    "supports_vision_cache",
    "vision_model_inputs",
]


def images_of(image) -> list:
    """A listing's image field as a list of images: None -> [], one image -> [it], a list or tuple -> its items."""
    return [] if image is None else (list(image) if isinstance(image, list | tuple) else [image])


def as_rgb(images: Sequence, max_side: int = 0) -> list:
    """The images in RGB; with ``max_side``, each larger one downscaled (aspect kept) so that its longer side is at
    most that many pixels: the coarse view of an encoder with few image tokens."""
    out = [im.convert("RGB") if isinstance(im, Image.Image) else im for im in images]
    if max_side:
        for i, im in enumerate(out):
            if isinstance(im, Image.Image) and max(im.size) > max_side:
                scale = max_side / max(im.size)
                size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
                out[i] = im.resize(size, Image.Resampling.BICUBIC)
    return out


@dataclass(eq=False)
class ListingImages:
    """One cache key's image work: the processor's output for its image(s) and, optionally, the vision tower's."""

    grid: torch.Tensor | None = None  # (num_images, 3) ``image_grid_thw`` rows (CPU)
    pixel_values: torch.Tensor | None = (
        None  # the images' patches as the processor packs them; None once features exist
    )
    features: tuple | None = None  # per image: the vision tower's merged output, (tokens, hidden)
    deepstack: tuple | None = None  # per image: one (tokens, hidden) tensor per deepstack layer (Qwen3-VL)
    output_class: type | None = None  # the class ``get_image_features`` returns (rebuilt for ``mm_encoder_outputs``)
    replacements: list | None = None  # per image: the processor's expansion of its image token

    @property
    def num_images(self) -> int:
        return 0 if self.grid is None else int(self.grid.shape[0])


@dataclass(eq=False)
class CachedImageBatch:
    """``ProductEncoder.build_inputs_cached`` output: text inputs plus the batch's per-listing image entries."""

    inputs: dict  # input_ids, attention_mask, [mm_token_type_ids], [image_grid_thw] (CPU tensors)
    listings: list  # ListingImages of the rows with at least one image, in row order (repeats allowed)
    level: str  # ImageCache level


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
        self._entries: OrderedDict[Hashable, ListingImages] = OrderedDict()
        self._owner = None  # weakref to the encoder it serves

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return (
            f"ImageCache(level={self.level!r}, entries={len(self)}/{self.max_entries}, hits={self.hits}, "
            f"misses={self.misses})"
        )

    def clear(self) -> None:
        """Forget every entry and the encoder it served."""
        self._entries.clear()
        self._owner = None
        self.level = None

    def bind(self, encoder, vision_ok: bool) -> str:
        """Tie the cache to ``encoder`` on first use and return its level; refuse another encoder, or a vision
        tower that is no longer frozen under a ``"vision"`` cache."""
        owner = None if self._owner is None else self._owner()
        if owner is None:
            self.clear()
            self._owner = weakref.ref(encoder)
            self.level = "vision" if self.vision_features and vision_ok else "processor"
        elif owner is not encoder:
            raise ValueError(
                "this ImageCache holds another encoder's image work: use one cache per encoder (or clear() it first)"
            )
        elif self.level == "vision" and not vision_ok:
            raise ValueError(
                "this ImageCache keeps vision-tower outputs, but the encoder's vision tower is no longer "
                "frozen: cached features may be stale (clear() the cache, or keep the vision tower frozen)"
            )
        return self.level

    def touch(self, keys) -> None:
        """Mark the present ``keys`` most recently used, so that the entries put next evict other keys first."""
        for key in keys:
            if key in self._entries:
                self._entries.move_to_end(key)

    def _get(self, key) -> ListingImages | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
        return entry

    def _put(self, key, entry: ListingImages) -> None:
        self.misses += 1
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def entries(
        self, images: Sequence, image_keys: Sequence[Hashable | None], processor, image_kwargs: dict, max_side: int = 0
    ) -> list[ListingImages]:
        """One entry per row: the cached one for a known key (``images[i]`` is then not read), else a new one,
        filled by a single image-processor call for every image not seen before and kept under its key (a row
        whose key is None is processed for this batch only; a key repeated within the batch is processed once)."""
        rows: list[ListingImages] = []
        batch_entries: dict = {}
        todo: list[tuple[Hashable | None, ListingImages, list]] = []
        for image, key in zip(images, image_keys, strict=True):
            entry = None if key is None else batch_entries.get(key)
            if entry is None and key is not None:
                entry = self._get(key)
            if entry is None:
                listing_images = images_of(image)
                entry = ListingImages()
                if listing_images:
                    todo.append((key, entry, as_rgb(listing_images, max_side)))
                elif key is not None:
                    self._put(key, entry)
            if key is not None:
                batch_entries[key] = entry
            rows.append(entry)
        if todo:
            processed = processor.image_processor([im for _, _, ims in todo for im in ims], **image_kwargs)
            grid = processed["image_grid_thw"]
            patches = torch.split(processed["pixel_values"], grid.prod(dim=-1).tolist())
            first = 0
            for key, entry, ims in todo:
                last = first + len(ims)
                entry.grid = grid[first:last]
                entry.pixel_values = torch.cat(patches[first:last])
                entry.replacements = [
                    processor.replace_image_token({"image_grid_thw": entry.grid}, image_idx=j) for j in range(len(ims))
                ]
                first = last
                if key is not None:
                    self._put(key, entry)
        return rows


def supports_vision_cache(backbone) -> bool:
    """Whether vision-tower outputs can be reused: the backbone takes ``mm_encoder_outputs`` and its vision tower
    is frozen (no parameter requires grad)."""
    base = backbone.base_model
    visual = getattr(base, "visual", None)
    if visual is None or not callable(getattr(base, "get_image_features", None)):
        return False
    return _accepts_mm_encoder_outputs(type(base)) and not any(p.requires_grad for p in visual.parameters())


@functools.cache
def _accepts_mm_encoder_outputs(model_class: type) -> bool:
    try:
        return "mm_encoder_outputs" in inspect.signature(model_class.forward).parameters
    except (TypeError, ValueError):
        return False


def vision_model_inputs(backbone, batch: CachedImageBatch, device) -> dict:
    """The backbone's keyword arguments for ``batch``: in ``"vision"`` mode the vision tower runs on the images
    whose output is not cached yet (once per image) and every image's output goes in as ``mm_encoder_outputs``;
    in ``"processor"`` mode the cached ``pixel_values``."""
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    if not batch.listings:
        return inputs
    if batch.level != "vision":
        inputs["pixel_values"] = torch.cat([entry.pixel_values for entry in batch.listings]).to(device)
        return inputs
    missing = list({id(e): e for e in batch.listings if e.features is None}.values())
    if missing:
        base = backbone.base_model
        with torch.no_grad():
            out = base.get_image_features(
                torch.cat([e.pixel_values for e in missing]).to(device),
                torch.cat([e.grid for e in missing]).to(device),
                return_dict=True,
            )
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
        extra["deepstack_features"] = [
            tuple(d[layer].to(device) for e in batch.listings for d in e.deepstack) for layer in range(layers)
        ]
    inputs["mm_encoder_outputs"] = {"image": batch.listings[0].output_class(pooler_output=features, **extra)}
    return inputs
