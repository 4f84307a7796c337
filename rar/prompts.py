"""Prompt datasets for stage 2 (RAR, GRPO) and its SFT warm start, built from a catalog.

``build_prompt_dataset`` turns a catalog (``afmrl.catalog.load.load_catalog``) into what TRL 1.16's
``GRPOTrainer`` reads: a conversational ``prompt`` column (``[{"role": "user", "content": str}]``),
an ``image`` column (or ``images``), and the catalog columns the rewards need (``listing_id`` for
``rewards.RetrievalRankReward``; ``attributes`` for reference-F1 rewards). ``build_sft_dataset``
writes TRL ``SFTTrainer``'s conversational ``messages`` format with the teacher's canonical
attribute line as the assistant turn.

What TRL does with the image (checked in trl 1.16 source, ``trainer/grpo_trainer.py``
``_generate_and_score_completions``): when the batch has an ``images`` column it takes each row's
list; otherwise an ``image`` column becomes ``[image]`` (None -> no image). Prompts must then be
conversational (else ValueError), and ``data_utils.prepare_multimodal_messages`` inserts one
``{"type": "image"}`` block per image before the text of the first user message. So the prompt
text must NOT carry an image block itself. ``GRPOTrainer`` keeps ``prompt``, ``image`` and
``images`` as signature columns; every other column reaches the reward functions as a keyword list.
``SFTTrainer`` (``trainer/sft_trainer.py``) does the same for ``messages``, turning ``image`` into
``images=[image]``.

Images stay lazy: the catalog's ``datasets.Image()`` column (absolute paths in Arrow) is passed on
as a column; a first-of-``images`` image is taken with the feature cast to ``decode=False`` so
only the path/bytes struct moves. Maps read only the columns they need (``input_columns``).

Template placeholders: ``{title}`` (the listing's seller title; the paper's MLLM sees image +
title) and ``{keys}``, which becomes "Use these keys where they apply: a, b, c." when
``attribute_keys`` is given, else "Choose the keys that best identify the product.". Any other
placeholder raises ValueError naming it; write literal braces as ``{{`` and ``}}``.
"""

from __future__ import annotations

import logging
import string
from collections.abc import Mapping, Sequence

import datasets

from afmrl.attributes import format_attributes

__all__ = [
    "DEFAULT_PROMPT",
    "build_prompt_dataset",
    "build_sft_dataset",
    "sft_target",
    "PROMPT_FILE",
    "save_prompt_settings",
]

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = (
    "Product title: {title}\n"
    "List the key attributes of the product in the image that tell it apart from similar products. "
    "Answer with one line of key: value pairs separated by semicolons, like `color: red; size: large`. "
    "{keys}"
)
PLACEHOLDERS = ("title", "keys")
# Columns a reward may read (TRL passes every dataset column to it): the ids the retrieval reward looks up, the
# teacher's attributes, and a catalog's true attributes where it has them (the correctness control's reference).
DEFAULT_KEEP = ("listing_id", "product_id", "attributes", "true_attributes", "category")
IMAGE_COLUMNS = ("image", "images")


def _check_template(template: str) -> None:
    names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    for name in names:
        base = name.split(".")[0].split("[")[0]
        if base not in PLACEHOLDERS:
            shown = "{" + name + "}" if name else "{} (positional)"
            raise ValueError(
                f"unknown placeholder {shown} in prompt template; allowed: "
                + ", ".join("{" + p + "}" for p in PLACEHOLDERS)
                + " (write literal braces as {{ }})"
            )
        if name != base:
            raise ValueError(f"placeholder {{{name}}} in prompt template: use plain {{{base}}}")


def _keys_sentence(attribute_keys: Sequence[str] | None) -> str:
    if attribute_keys:
        return "Use these keys where they apply: " + ", ".join(attribute_keys) + "."
    return "Choose the keys that best identify the product."


def _user_text_fn(template: str, attribute_keys: Sequence[str] | None):
    _check_template(template)
    keys = _keys_sentence(attribute_keys)

    def text(title: str | None) -> str:
        return template.format(title=(title or "").strip(), keys=keys).strip()

    return text


def _image_columns(ds: datasets.Dataset, image_column: str) -> tuple[datasets.Dataset, list[str]]:
    """Give ``ds`` the lazily decoded image column TRL reads; return it and that column's name."""
    if image_column not in IMAGE_COLUMNS:
        raise ValueError(f"image_column must be 'image' or 'images', got {image_column!r}")
    source = next((c for c in IMAGE_COLUMNS if c in ds.column_names), None)
    if source is None:
        raise ValueError("the catalog has neither an 'image' nor an 'images' column")
    if source == image_column:
        return ds, [source]
    raw = datasets.Image(decode=False)
    if source == "images":  # the listing's first image; the list's other images are dropped
        ds = ds.cast_column("images", datasets.List(raw))
        ds = ds.map(
            lambda imgs: {"image": imgs[0]},
            input_columns=["images"],
            remove_columns=["images"],
            features=_with(ds.features, "images", "image", raw),
            desc="first image",
        )
        return ds.cast_column("image", datasets.Image()), ["image"]
    ds = ds.cast_column("image", raw)  # one image -> a one-element list
    ds = ds.map(
        lambda img: {"images": [img]},
        input_columns=["image"],
        remove_columns=["image"],
        features=_with(ds.features, "image", "images", datasets.List(raw)),
        desc="image list",
    )
    return ds.cast_column("images", datasets.List(datasets.Image())), ["images"]


def _with(features: datasets.Features, old: str, new: str, feature) -> datasets.Features:
    out = {k: v for k, v in features.items() if k != old}
    out[new] = feature
    return datasets.Features(out)


def _assemble(catalog, template, attribute_keys, keep_columns, image_column, carry: Sequence[str] = ()):
    """prompt + image column(s) + carried internal columns + kept catalog columns."""
    if not isinstance(catalog, datasets.Dataset):
        raise TypeError(
            f"catalog must be a datasets.Dataset (see afmrl.catalog.load.load_catalog), got {type(catalog).__name__}"
        )
    if "listing_id" not in catalog.column_names:
        raise ValueError("the catalog has no 'listing_id' column; the RAR rewards need it to find the ground truth")
    text = _user_text_fn(template, attribute_keys)
    if "title" not in catalog.column_names:
        if "{title}" in template:
            raise ValueError("the prompt template uses {title} but the catalog has no 'title' column")
        catalog = catalog.add_column("title", [""] * len(catalog))
    ds, image_cols = _image_columns(catalog, image_column)
    kept = [
        c
        for c in dict.fromkeys(["listing_id", *keep_columns])
        if c in ds.column_names and c not in (*image_cols, *carry, "prompt")
    ]
    ds = ds.map(
        lambda title: {"prompt": [{"role": "user", "content": text(title)}]}, input_columns=["title"], desc="prompts"
    )
    return ds.select_columns(["prompt", *carry, *image_cols, *kept]), image_cols


def build_prompt_dataset(
    catalog: datasets.Dataset,
    *,
    prompt_template: str = DEFAULT_PROMPT,
    attribute_keys: Sequence[str] | None = None,
    keep_columns: Sequence[str] = DEFAULT_KEEP,
    image_column: str = "image",
) -> datasets.Dataset:
    """The GRPO prompt dataset: ``prompt``, ``image`` (or ``images``), then the kept columns.

    Args:
        catalog: a validated catalog (``load_catalog``); needs ``listing_id``, and ``title`` when
            the template uses ``{title}``.
        prompt_template: text with ``{title}`` / ``{keys}`` placeholders (module docstring).
        attribute_keys: the keys the model should write, named in ``{keys}``; None = its choice.
        keep_columns: catalog columns passed on to the rewards; absent ones are skipped,
            ``listing_id`` is always kept.
        image_column: ``"image"``: one image per prompt (an ``images`` catalog contributes its
            first image); ``"images"``: a list per prompt (TRL inserts one image block per
            image; an ``image`` catalog gives one-element lists).
    """
    ds, _ = _assemble(catalog, prompt_template, attribute_keys, keep_columns, image_column)
    return ds


def sft_target(row: Mapping, attribute_keys: Sequence[str] | None = None) -> str | None:
    """Canonical ``key: value; ...`` text of ``row["attributes"]`` (keys in ``attribute_keys``
    order first); None when the row has no attributes or none with a value."""
    return format_attributes(row.get("attributes"), attribute_keys) or None


def build_sft_dataset(
    catalog: datasets.Dataset,
    *,
    prompt_template: str = DEFAULT_PROMPT,
    attribute_keys: Sequence[str] | None = None,
    keep_columns: Sequence[str] = ("listing_id",),
    image_column: str = "image",
) -> datasets.Dataset:
    """SFT warm-start data in TRL's conversational format: ``messages`` = [user prompt, assistant
    canonical teacher attributes], ``image`` (or ``images``) and the kept columns.

    Rows without attributes are skipped and counted in a logged warning; raises ValueError when the
    catalog has no ``attributes`` column or no row has any.
    """
    if "attributes" not in catalog.column_names:
        raise ValueError(
            "the catalog has no 'attributes' column: nothing to fine-tune on (run recipes/extract_attributes.py first)"
        )
    keys = list(attribute_keys) if attribute_keys is not None else None
    ds = catalog.map(
        lambda a: {"_target": sft_target({"attributes": a}, keys) or ""},
        input_columns=["attributes"],
        desc="SFT targets",
    )
    total = len(ds)
    ds = ds.filter(lambda t: bool(t), input_columns=["_target"], desc="rows with attributes")
    skipped = total - len(ds)
    if skipped:
        logger.warning("build_sft_dataset: skipped %d of %d rows without attributes", skipped, total)
    if len(ds) == 0:
        raise ValueError(f"no row of the catalog has attributes ({total} rows): nothing to fine-tune on")
    ds, image_cols = _assemble(ds, prompt_template, keys, keep_columns, image_column, carry=("_target",))
    ds = ds.map(
        lambda p, t: {"messages": [*p, {"role": "assistant", "content": t}]},
        input_columns=["prompt", "_target"],
        remove_columns=["prompt", "_target"],
        desc="messages",
    )
    kept = [c for c in ds.column_names if c not in ("messages", *image_cols)]
    return ds.select_columns(["messages", *image_cols, *kept])


PROMPT_FILE = "attribute_prompt.json"


def save_prompt_settings(
    directory, *, prompt_template: str, attribute_keys: Sequence[str] | None, max_new_tokens: int
) -> None:
    """Write beside a generator the prompt it was trained with (``attribute_prompt.json``), so that
    ``recipes/index_catalog.py`` asks it the same way."""
    import json
    from pathlib import Path

    settings = {
        "prompt_template": prompt_template,
        "attribute_keys": list(attribute_keys) if attribute_keys else None,
        "max_new_tokens": max_new_tokens,
    }
    (Path(directory) / PROMPT_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
