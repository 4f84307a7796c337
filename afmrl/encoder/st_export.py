"""A product encoder as a plain sentence-transformers model: ``SentenceTransformer(dir)`` loads it with no package code.

Most teams train and serve embeddings with sentence-transformers (6.x loads multimodal models); this writes a
``ProductEncoder`` so that ``model.encode(...)`` of a listing equals ``ProductEncoder.encode`` (float32: to about
1e-7): the backbone with any LoRA merged, saved as an ordinary transformers checkpoint that ST's ``Transformer``
module runs (feature-extraction, ``last_hidden_state``), the processor, last-token pooling and normalisation, and
the instruction as the default prompt. The one piece that is ours is the chat template written into the exported
processor: ST hands a template the prompt as a system turn and the listing as a user turn, and
``EMBEDDING_CHAT_TEMPLATE`` renders them as the package does, one user turn with the photos first, then the
instruction, title and attributes joined by newlines, ending on ``<|im_end|>`` (the token whose state is pooled).

    encoder.save_sentence_transformer("outputs/encoder-st")
    model = SentenceTransformer("outputs/encoder-st")
    model.encode([{"image": photo, "text": "red cotton shirt\\nAttributes: color: red"}, "a title only", photo])

A listing's text is its title, then ``attribute_prefix + attributes`` on the next line; several photos (crop views)
are a list under ``"image"``. What ST cannot express is refused when exporting: the package's own photo
downscaling (``image_max_side``) and modality experts (``moe_experts``). Two differences remain and are documented
in docs/stage1.md: the package truncates the text part to ``max_length`` tokens before templating (ST truncates
whole sequences only; pass long titles shortened), and in bfloat16 the package pools in float32 (about 3e-4 apart).

A dual encoder (CLIP, SigLIP; ``afmrl.encoder.dual``) exports as ST's CLIP-style model: ``encode(photo)`` and
``encode(text)`` equal the package's image-only and text-only vectors, and a listing with both is
``fuse_listing(encode(photos), encode(text), w)`` (ST encodes a photo or a text, never both as one input).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

__all__ = ["EMBEDDING_CHAT_TEMPLATE", "PROMPT_NAME", "fuse_listing", "save_sentence_transformer"]

PROMPT_NAME = "listing"

# ST gives the template [system: instruction] + [user: content blocks]; the package renders one user turn:
# images first, then "\n".join(instruction, title?, attributes?), then <|im_end|> with no trailing newline
# (afmrl.encoder.inputs). transformers renders templates with trim_blocks/lstrip_blocks: every newline that must
# survive sits in a string literal.
EMBEDDING_CHAT_TEMPLATE = (
    "{%- set ns = namespace(media='', text='', parts=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- if message['content'] or message['role'] == 'system' -%}"
    "{%- set ns.text = ns.text ~ ('\n' if ns.parts else '') ~ message['content'] -%}"
    "{%- set ns.parts = ns.parts + 1 -%}"
    "{%- endif -%}"
    "{%- else -%}"
    "{%- for block in message['content'] -%}"
    "{%- if block['type'] == 'image' -%}"
    "{%- set ns.media = ns.media ~ '<|vision_start|><|image_pad|><|vision_end|>' -%}"
    "{%- elif block['type'] == 'video' -%}"
    "{%- set ns.media = ns.media ~ '<|vision_start|><|video_pad|><|vision_end|>' -%}"
    "{%- elif block['type'] == 'text' and (block['text'] or message['role'] == 'system') -%}"
    "{%- set ns.text = ns.text ~ ('\n' if ns.parts else '') ~ block['text'] -%}"
    "{%- set ns.parts = ns.parts + 1 -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "<|im_start|>user\n{{ ns.media }}{{ ns.text }}<|im_end|>"
)
_MARKERS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def check_exportable(encoder) -> None:
    """Refuse, naming what is missing, an encoder that sentence-transformers could not reproduce."""
    config = encoder.config
    if config.image_max_side:
        raise ValueError(f"encoder {config.backbone!r}: image_max_side={config.image_max_side} downsizes photos "
                         "before the processor, which sentence-transformers does not do")  # fmt: skip
    if config.encoder_type == "dual":
        return
    if config.moe_experts:
        raise ValueError(f"encoder {config.backbone!r}: modality experts (moe_experts={config.moe_experts}) have no "
                         "sentence-transformers module; export an encoder trained without them")  # fmt: skip
    if config.guided_moe_layers:
        raise ValueError(f"encoder {config.backbone!r}: guided experts (guided_moe_layers="
                         f"{config.guided_moe_layers}) have no sentence-transformers module")  # fmt: skip
    vocabulary = encoder.processor.tokenizer.get_vocab()
    missing = [m for m in _MARKERS if m not in vocabulary]
    if missing:
        raise ValueError(f"encoder {config.backbone!r}: its tokenizer lacks {', '.join(missing)}: the export's chat "
                         "template is for Qwen2-VL-style backbones (Qwen2-VL, Qwen2.5-VL)")  # fmt: skip


def _save_backbone(encoder, out: Path) -> None:
    model = encoder.model
    if hasattr(model, "peft_config"):  # LoRA merged into a copy: the encoder itself keeps its adapter
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(str(out), safe_serialization=True)


def _save_dual(encoder, out: Path) -> Path:
    """A dual encoder as ST's CLIP-style model: texts through the text tower, photos through the image tower, each
    normalised. The listing's fusion, ``normalize(w · normalize(mean of photos) + (1 − w) · text)``, is the one step
    ST does not take (its CLIP models encode an image or a text, not both as one input): ``fuse_listing``'s three
    lines, or the docs' snippet, do it."""
    _save_backbone(encoder, out)
    encoder.processor.save_pretrained(str(out))
    modality = {
        "text": {"method": "get_text_features", "method_output_name": "pooler_output"},
        "image": {"method": "get_image_features", "method_output_name": "pooler_output"},
    }
    text_kwargs = {"truncation": True, "max_length": encoder.inputs.max_tokens}
    if encoder.inputs.padding == "max_length":  # SigLIP: fixed-length texts, as trained (batch-independent)
        text_kwargs["padding"] = "max_length"
    _write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Normalize",
         "type": "sentence_transformers.base.modules.normalize.Normalize"},
    ])  # fmt: skip
    _write_json(out / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": modality,
        "module_output_name": "sentence_embedding",
        "processing_kwargs": {"text": text_kwargs},
    })  # fmt: skip
    _write_json(out / "1_Normalize" / "config.json",
                {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})  # fmt: skip
    _write_json(out / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        "similarity_fn_name": "cosine",
        "afmrl_listing_fusion": {"image_weight": encoder.config.image_weight,
                                 "attribute_prefix": encoder.config.attribute_prefix},
    })  # fmt: skip
    return out


def fuse_listing(image_vectors, text_vector, image_weight: float = 0.5):
    """A dual encoder's listing vector from its exported model's outputs (numpy): ``image_vectors`` (n_photos, d;
    may be empty) and ``text_vector`` (d,) or None, as ``ProductEncoder.encode`` fuses them."""
    import numpy as np

    def unit(x):
        return x / max(float(np.linalg.norm(x)), 1e-12)

    if len(image_vectors) == 0:
        return unit(np.asarray(text_vector))
    photos = unit(np.asarray(image_vectors).sum(axis=0))
    return photos if text_vector is None else unit(image_weight * photos + (1 - image_weight) * np.asarray(text_vector))


def save_sentence_transformer(encoder, directory: str | Path) -> Path:
    """Write ``encoder`` (a ``ProductEncoder``) to ``directory`` as a sentence-transformers model."""
    check_exportable(encoder)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    if encoder.config.encoder_type == "dual":
        return _save_dual(encoder, out)
    _save_backbone(encoder, out)
    processor = copy.deepcopy(encoder.processor)
    processor.chat_template = processor.tokenizer.chat_template = EMBEDDING_CHAT_TEMPLATE
    processor.tokenizer.padding_side = "right"
    processor.save_pretrained(str(out))
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    _write_json(out / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.base.modules.transformer.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.sentence_transformer.modules.pooling.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.base.modules.normalize.Normalize"},
    ])  # fmt: skip
    _write_json(out / "sentence_bert_config.json", {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": forward, "image": forward, "message": {**forward, "format": "structured"}},
        "module_output_name": "token_embeddings",
        "unpad_inputs": False,  # Qwen2-VL takes padded batches
    })  # fmt: skip
    hidden = int(getattr(encoder.backbone.config, "text_config", encoder.backbone.config).hidden_size)
    _write_json(out / "1_Pooling" / "config.json",
                {"embedding_dimension": hidden, "pooling_mode": "lasttoken", "include_prompt": True})  # fmt: skip
    _write_json(out / "2_Normalize" / "config.json",
                {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})  # fmt: skip
    instruction = encoder.config.instruction
    _write_json(out / "config_sentence_transformers.json", {
        "model_type": "SentenceTransformer",
        # encode_query / encode_document use the "query" / "document" prompts: all three carry the instruction
        "prompts": {"query": instruction, "document": instruction, PROMPT_NAME: instruction},
        "default_prompt_name": PROMPT_NAME,
        "similarity_fn_name": "cosine",
    })  # fmt: skip
    return out
