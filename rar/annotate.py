"""A generator annotates listings: the one resumable loop that the teacher step, CIT, RL's reward gallery,
the held-out evaluation and deployment all use.

``annotate(listings, generator)`` returns one greedy completion per listing for the prompt GRPO trains on
(``rar.prompts``: image + title). With ``log_path`` every batch is appended to a JSONL log
(``{"listing_id", "completion"}``) as it finishes, listings already in the log are not generated again, and the
generator is loaded only when some listing is missing: a killed run started again picks up where it stopped.
Completions are raw strings; ``afmrl.attributes.canonical_attributes`` parses them as the reward does.

``generate_attributes`` is the batched generation underneath: the model sees exactly what GRPO showed it (one
user turn, one image block inserted before the text the way TRL does it, the processor's chat template and a
generation prompt); batches are left-padded so that every row's new tokens start at the same position; decoding
is greedy by default so that evaluation is deterministic. ::

    texts = annotate(catalog, "outputs/rar-demo", log_path="outputs/annotations.jsonl", batch_size=32)
    lines = canonical_attributes(texts)          # "category: mug; color: red; ..." or None per listing
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import datasets
import torch
from tqdm.auto import tqdm

from afmrl.modeling import outside_zero3
from rar.policy import load_policy, placeholder_token_ids
from rar.prompts import DEFAULT_PROMPT, build_prompt_dataset

__all__ = [
    "annotate",
    "generate_attributes",
    "load_generator",
    "read_generation_log",
    "sample_attributes",
    "user_messages",
]


def read_generation_log(path) -> dict[str, str]:
    """listing_id -> completion from a JSONL log of an earlier (possibly interrupted) run, as ``annotate`` appends
    it batch by batch; a torn last line is ignored, and a missing file is an empty log."""
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

    ``on_batch(start, texts)`` is called after every batch (``annotate`` writes them to its log there, which
    makes a run resumable). The model's training mode and the tokenizer's padding side are restored afterwards.
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
    placeholders = placeholder_token_ids(model)
    if placeholders:  # as TRL's GRPO samples: a policy trained with them suppressed may rank them first unmasked
        options["suppress_tokens"] = placeholders
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
                texts.append(
                    processor.apply_chat_template(
                        user_messages(row["prompt"], len(row_images)), tokenize=False, add_generation_prompt=True
                    )
                )
            has_images = any(images)
            if has_images and not all(images):
                raise ValueError(f"rows {start}..{start + len(rows) - 1}: some prompts have an image and some do not")
            inputs = processor(text=texts, images=images if has_images else None, padding=True, return_tensors="pt")
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            generated = model.generate(**inputs, **options)
            new_tokens = generated[:, inputs["input_ids"].shape[1] :]
            batch = [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
            outputs.extend(batch)
            if on_batch is not None:
                on_batch(start, batch)
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def load_generator(
    name_or_path: str,
    *,
    model_args=None,
    cache_dir: str = "outputs/embedded",
    trust_remote_code: bool = False,
    device=None,
):
    """``(model, processor)`` of a generator for annotation: a saved policy (full weights or a LoRA adapter, merged),
    a hub id or an embedded name, loaded whole (outside DeepSpeed ZeRO-3) and placed on ``device`` (default: CUDA
    when there is one, else the CPU; 4-bit weights stay where they were loaded). ``model_args`` (a
    ``trl.ModelConfig``) carries the dtype and 4-bit settings."""
    from trl import ModelConfig

    model_args = model_args or ModelConfig(model_name_or_path=str(name_or_path))
    with outside_zero3():
        model, processor, _ = load_policy(
            model_args,
            cache_dir=cache_dir,
            name_or_path=str(name_or_path),
            trust_remote_code=trust_remote_code,
            for_training=False,
        )
    if getattr(model, "hf_quantizer", None) is None:  # 4-bit models are placed at load time and refuse .to()
        model = model.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, processor


def annotate(
    listings: datasets.Dataset,
    generator,
    *,
    prompt_template: str | None = None,
    attribute_keys: Sequence[str] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    log_path: str | Path | None = None,
    show_progress: bool | None = None,
    desc: str = "annotating listings",
) -> list[str]:
    """One greedy completion per listing (a catalog Dataset with ``listing_id``), in row order.

    ``generator``: a generator directory or name (``load_generator``), a ``(model, processor)`` pair, or a
    callable returning one (called only when some listing still needs generating). ``prompt_template`` and
    ``attribute_keys`` are the prompt the generator was trained with (``rar.prompts``; default ``DEFAULT_PROMPT``).
    With ``log_path``, completions are appended batch by batch and read back on the next call."""
    ids = [str(x) for x in listings["listing_id"]]
    done = read_generation_log(log_path)
    todo = [i for i, lid in enumerate(ids) if lid not in done]
    if todo:
        prompts = build_prompt_dataset(
            listings.select(todo), attribute_keys=attribute_keys, prompt_template=prompt_template or DEFAULT_PROMPT
        )  # a bad template: no load
        if isinstance(generator, str | Path):
            model, processor = load_generator(generator)
        else:
            model, processor = generator() if callable(generator) else generator
        if log_path is not None:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a", encoding="utf-8") if log_path is not None else nullcontext() as log:

            def save(start: int, texts: list[str]):
                for i, text in zip(todo[start : start + len(texts)], texts, strict=True):
                    done[ids[i]] = text
                    if log is not None:
                        log.write(json.dumps({"listing_id": ids[i], "completion": text}, ensure_ascii=False) + "\n")
                if log is not None:
                    log.flush()

            generate_attributes(
                model,
                processor,
                prompts,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                show_progress=show_progress,
                desc=desc,
                on_batch=save,
            )
    return [done[lid] for lid in ids]


def sample_attributes(
    model,
    processor,
    prompts: datasets.Dataset,
    *,
    draws: int,
    temperature: float = 1.0,
    batch_size: int = 32,
    show_progress: bool | None = None,
) -> list[list[str]]:
    """``draws`` sampled completions per prompt, as GRPO samples a group: ``[draw][row]``, draw d seeded with d (so
    that a rerun draws the same lines)."""
    out = []
    for draw in range(draws):
        torch.manual_seed(draw)
        out.append(
            generate_attributes(
                model,
                processor,
                prompts,
                batch_size=batch_size,
                do_sample=True,
                temperature=temperature,
                show_progress=show_progress,
                desc=f"sampling (draw {draw + 1}/{draws})",
            )
        )
    return out
