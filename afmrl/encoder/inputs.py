"""How a listing becomes the encoder's input: instruction, image(s), title and attribute text in the chat template.

The product encoder reads a listing as one user turn of the backbone's chat template: an image
block per photo, then the instruction, the title and, when given, ``Attributes: <text>`` (the
generated attributes AFMRL appends). The turn ends on ``<|im_end|>`` so that the last token, whose
hidden state is the embedding (``afmrl.encoder.pooling``), closes the whole listing. Padding is on the right.

``ListingInputs`` builds such batches in two ways with the same token ids: ``build`` (the processor
does everything) and ``build_cached`` (each listing's image work comes from an ``ImageCache``; only
the text is tokenised per call). ``split`` cuts a batch into chunks of listings for GradCache.

    inputs = ListingInputs(processor, EncoderConfig(backbone="tiny-qwen2-vl"))
    batch = inputs.build(images, titles, attribute_texts)
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Sequence

import torch

from afmrl.encoder.image_cache import CachedImageBatch, ImageCache, as_rgb, images_of

__all__ = ["ListingInputs"]

IMAGE_PAD = "<|image_pad|>"


class ListingInputs:
    """Builds the encoder's input batches from listings (``config``: an ``EncoderConfig``)."""

    def __init__(self, processor, config, *, with_modality: bool = False, with_kinds: bool = False):
        self.processor = processor
        self.config = config
        self.with_modality = with_modality  # add `listing_modality` (the modality experts route on it)
        self.with_kinds = with_kinds  # add `guided_token_kinds` (MOON's guided experts route on it)
        self.max_side = getattr(config, "image_max_side", 0) or 0  # the encoder's view of a photo (0: as given)

    def text(self, title: str | None, attributes: str | None = None) -> str:
        """The listing's text part: instruction, title, attribute text, cut to ``config.max_length`` tokens."""
        parts = [self.config.instruction]
        if title:
            parts.append(title)
        if attributes:
            parts.append(self.config.attribute_prefix + attributes)
        return self.truncate("\n".join(parts))

    def truncate(self, text: str) -> str:
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

    def _chat(self, num_images: int, title, attributes) -> str:
        content = [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": self.text(title, attributes)})
        chat = self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=False
        )
        return chat.rstrip()  # end on <|im_end|>: the embedding token then closes the whole listing

    def build(self, images: Sequence, titles: Sequence[str | None], attributes: Sequence[str | None] | None = None):
        """Tokenise a batch. ``images[i]`` is a PIL image, a list of them, or None (text-only)."""
        if len(images) != len(titles) or (attributes is not None and len(attributes) != len(titles)):
            raise ValueError(
                f"batch lengths differ: {len(images)} images, {len(titles)} titles, "
                f"{None if attributes is None else len(attributes)} attribute texts"
            )
        texts, flat_images = [], []
        for i, (image, title) in enumerate(zip(images, titles, strict=True)):
            listing_images = images_of(image)
            texts.append(self._chat(len(listing_images), title, None if attributes is None else attributes[i]))
            flat_images += as_rgb(listing_images, self.max_side)
        batch = self.processor(text=texts, images=flat_images or None, padding=True, return_tensors="pt")
        if self.with_modality:
            batch["listing_modality"] = self._modality([bool(images_of(im)) for im in images], titles, attributes)
        if self.with_kinds:
            if flat_images:  # the processor's image-token expansion, written out
                merge = self.processor.image_processor.merge_size
                counts = iter((batch["image_grid_thw"].prod(dim=-1) // merge**2).tolist())
                texts = [re.sub(re.escape(IMAGE_PAD), lambda _: IMAGE_PAD * next(counts), t) for t in texts]
            batch["guided_token_kinds"] = self._kinds(texts, batch["input_ids"])
        return batch

    def build_cached(
        self,
        images: Sequence,
        titles: Sequence[str | None],
        attributes: Sequence[str | None] | None,
        image_keys: Sequence[Hashable | None],
        image_cache: ImageCache,
        level: str,
    ) -> CachedImageBatch:
        """``build`` with each key's image processing done once and kept in ``image_cache`` (bound at ``level``).

        The text goes through the chat template, the processor's image-token expansion (from each
        image's ``image_grid_thw``) and the tokenizer with the processor's own arguments, so the
        token ids equal ``build``'s."""
        n = len(titles)
        if len(images) != n or len(image_keys) != n or (attributes is not None and len(attributes) != n):
            raise ValueError(
                f"batch lengths differ: {len(images)} images, {n} titles, {len(image_keys)} image keys, "
                f"{None if attributes is None else len(attributes)} attribute texts"
            )
        text_kwargs, image_kwargs, return_mm = self._processor_call_kwargs()
        rows = image_cache.entries(images, image_keys, self.processor, image_kwargs, self.max_side)
        texts = [
            self._chat(entry.num_images, titles[i], None if attributes is None else attributes[i])
            for i, entry in enumerate(rows)
        ]
        listings = [entry for entry in rows if entry.num_images]
        if listings:
            texts, _ = self.processor.get_text_with_replacements(
                texts, [r for entry in listings for r in entry.replacements]
            )
        # Padded lists, then one tensor per field: the values of the tokenizer's own "pt" conversion, faster.
        text_kwargs.pop("return_tensors", None)
        inputs = {k: torch.tensor(v) for k, v in self.processor.tokenizer(texts, **text_kwargs).items()}
        if return_mm:
            inputs["mm_token_type_ids"] = self._mm_token_type_ids(inputs["input_ids"])
        if listings:
            inputs["image_grid_thw"] = torch.cat([entry.grid for entry in listings])
        if self.with_modality:
            inputs["listing_modality"] = self._modality([entry.num_images > 0 for entry in rows], titles, attributes)
        if self.with_kinds:
            inputs["guided_token_kinds"] = self._kinds(texts, inputs["input_ids"])
        return CachedImageBatch(inputs=inputs, listings=listings, level=level)

    def split(self, batch, size: int) -> list[dict]:
        """Split ``build`` output into chunks of ``size`` listings (for GradCache).

        Qwen-VL processors pack the patches of every image into one ``pixel_values`` tensor, with
        one ``image_grid_thw`` row per image; a listing's share is found from its own tokens: one
        ``<|vision_start|>`` per image.
        """
        n = batch["input_ids"].shape[0]
        plain = {k: v for k, v in batch.items() if k not in ("pixel_values", "image_grid_thw")}
        if "pixel_values" not in batch:
            return [{k: v[i : i + size] for k, v in plain.items()} for i in range(0, n, size)]
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
            chunk["pixel_values"] = batch["pixel_values"][patch_offsets[first] : patch_offsets[last]]
            chunk["image_grid_thw"] = batch["image_grid_thw"][first:last]
            chunks.append(chunk)
        return chunks

    def _kinds(self, expanded_texts, input_ids) -> torch.Tensor:
        from afmrl.encoder.guided_moe import token_kinds

        return token_kinds(self.processor.tokenizer, expanded_texts, input_ids, self.config.attribute_prefix)

    @staticmethod
    def _modality(has_image: Sequence[bool], titles, attributes) -> torch.Tensor:
        from afmrl.encoder.moe import listing_modality

        has_text = [bool(t) or bool(attributes is not None and attributes[i]) for i, t in enumerate(titles)]
        return listing_modality(has_image, has_text)

    def _processor_call_kwargs(self) -> tuple[dict, dict, bool]:
        """(text kwargs, image kwargs, return mm_token_type_ids) as ``processor(..., padding=True,
        return_tensors="pt")`` (``build``) resolves them."""
        proc = self.processor
        merged = proc._merge_kwargs(
            tokenizer_init_kwargs=getattr(proc.tokenizer, "init_kwargs", {}), padding=True, return_tensors="pt"
        )
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
