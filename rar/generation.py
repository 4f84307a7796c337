"""Batched attribute generation with a (policy) MLLM: the teacher step, CIT's re-annotation and
the demo's evaluation all call ``generate_attributes``.

The model sees exactly what GRPO showed it: the prompt dataset of ``rar.prompts`` (one user turn,
one image block inserted before the text the way TRL does it), rendered with the processor's chat
template and a generation prompt. Batches are left-padded so that every row's new tokens start at
the same position; decoding is greedy by default (``do_sample=False``) so that evaluation is
deterministic. Returns raw completion strings; parse them with ``agcl.attributes.parse_attributes``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

__all__ = ["generate_attributes", "read_generation_log", "user_messages"]


def read_generation_log(path) -> dict[str, str]:
    """listing_id -> completion from a JSONL log of an earlier (possibly interrupted) run, as
    ``recipes/extract_attributes.py`` and ``deploy.annotate`` append it batch by batch; a torn last line
    is ignored, and a missing file is an empty log."""
    done: dict[str, str] = {}
    if path is not None and Path(path).is_file():
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # the line being written when the run was killed
            done[row["listing_id"]] = row["completion"]
    return done


def user_messages(prompt: Sequence[dict], num_images: int) -> list[dict]:
    """The conversational prompt with ``num_images`` image blocks before the first user text (TRL's layout)."""
    messages = [dict(m) for m in prompt]
    for message in messages:
        if message["role"] == "user":
            text = message["content"]
            blocks = text if isinstance(text, list) else [{"type": "text", "text": text}]
            message["content"] = [{"type": "image"} for _ in range(num_images)] + blocks
            break
    return messages


def _row_images(row: dict) -> list:
    if "images" in row:
        return [img.convert("RGB") for img in row["images"] if img is not None]
    image = row.get("image")
    return [] if image is None else [image.convert("RGB")]


@torch.no_grad()
def generate_attributes(
    model,
    processor,
    prompts: datasets.Dataset,
    *,
    batch_size: int = 16,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    show_progress: bool | None = None,
    desc: str = "generating attributes",
    on_batch: Callable[[int, list[str]], None] | None = None,
) -> list[str]:
    """One completion per row of ``prompts`` (a ``build_prompt_dataset`` dataset).

    ``on_batch(start, texts)`` is called after every batch (``recipes/extract_attributes.py``
    writes them to disk there, which makes the run resumable). The model's training mode and the
    tokenizer's padding side are restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokenizer = getattr(processor, "tokenizer", processor)
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # new tokens start at the same column for every row
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    # synced_gpus=False: under a ZeRO-3 run transformers would otherwise make every generation step
    # wait for the other ranks, and evaluation generates in one process with a whole model.
    options = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": pad_id, "synced_gpus": False}
    if do_sample:
        options["temperature"] = temperature
    outputs: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc, disable=show_progress is False, unit="batch"):
            rows = prompts.select(range(start, min(start + batch_size, len(prompts))))
            texts, images = [], []
            for row in rows:
                row_images = _row_images(row)
                images.append(row_images)
                texts.append(processor.apply_chat_template(user_messages(row["prompt"], len(row_images)),
                                                           tokenize=False, add_generation_prompt=True))
            has_images = any(images)
            if has_images and not all(images):
                raise ValueError(f"rows {start}..{start + len(rows) - 1}: some prompts have an image and some do not")
            inputs = processor(text=texts, images=images if has_images else None, padding=True, return_tensors="pt")
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            generated = model.generate(**inputs, **options)
            new_tokens = generated[:, inputs["input_ids"].shape[1]:]
            batch = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            outputs.extend(batch)
            if on_batch is not None:
                on_batch(start, batch)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs
