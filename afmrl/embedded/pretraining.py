"""Pretraining conversations for tiny MLLMs: what a general MLLM learns before it meets this task.

AFMRL starts both of its models from MLLMs that already perceive (the paper: Qwen2-VL-2B as the
embedder, a Qwen2.5-VL-3B generator distilled from a 72B teacher). A randomly initialised tiny
model trained for minutes on a thousand photos does not (it names the logo at chance), so on the
embedded default attributes could not help. ``recipes/pretrain_tiny.py`` therefore pretrains tiny
Qwen-VL models on a separate corpus with the objectives a general MLLM gets from pretraining, and
this module writes that corpus's conversations from any catalog with a ``true_attributes`` column:

- **describe**: image + "Describe the product in the photo." -> free text naming what the photo
  shows ("A striped mug, mainly red, with blue trim and a star logo.");
- **ask**: image + a question about one visible key ("What colour is the product?") -> "It is red.";
- **read the title**: image + title + "What does the title tell you?" -> the values the title
  states ("The title names brand acme and size M.");
- **caption** (off unless given a weight): a terse alt-text caption in a fixed word order ("A red
  striped mug with blue trim and a star logo."), nearly every word a value.

Phrasings are drawn from several alternatives, never the ``key: value`` schema that the SFT stage
teaches; keys this module has no words for are phrased generically ("its material is cotton"), so
any catalog's keys work. Keys the photo cannot show (``hidden_keys``, e.g. brand and size) appear
only where the title states them. Every draw comes from ``numpy`` streams seeded by (seed, row,
pass), so the same arguments give the same conversations in any order.

``perception_accuracy`` scores a model (docs/embedded.md): for each held-out photo and visible
key, is the true value the one whose answer ("It is red.") or, for a model pretrained on captions,
whose caption the model finds most likely?

    corpus = load_catalog("outputs/pretrain-corpus", split="train")
    keys = visible_keys(corpus, hidden_keys=("brand", "size"))
    conversations = build_pretraining_dataset(corpus, keys, passes=3, seed=0)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import datasets
import numpy as np
import torch

__all__ = [
    "PERCEPTION_FORMATS",
    "TASK_PROBABILITIES",
    "ask_question",
    "build_pretraining_dataset",
    "caption",
    "conversation",
    "describe",
    "perception_accuracy",
    "perception_scores",
    "stated_keys",
    "visible_keys",
]

TASKS = ("describe", "ask", "title", "caption")
TASK_PROBABILITIES = (0.5, 0.3, 0.2, 0.0)
CAPTION_PROMPTS = ("Caption this photo.", "Give the photo a short caption.")

DESCRIBE_PROMPTS = (
    "Describe the product in the photo.",
    "What do you see in this picture?",
    "Write a short description of this item.",
    "Tell me what this product looks like.",
)
TITLE_PROMPTS = (
    "What does the title tell you?",
    "Which details does the seller's title give?",
    "Read the title. What does it say about the item?",
)
TITLE_OPENERS = ("The title names", "The seller's title gives", "According to the title:")

# Clauses for keys this module knows words for; the first phrasing of each key is the one
# `perception_accuracy` scores. "{v}" is the value; `_value_words` turns "solid" into "plain".
CLAUSES = {
    "category": ("a {v}", "the item is a {v}", "this is a {v}"),
    "color": ("mainly {v}", "{v} in colour", "the body is {v}"),
    "secondary_color": ("with {v} trim", "trimmed in {v}", "{v} accents"),
    "pattern": ("{v} pattern", "a {v} surface", "covered in a {v} print"),
    "logo": ("a {v} logo", "marked with a {v}", "the logo is a {v}"),
}
NO_LOGO = ("no logo", "without a logo", "no mark on it")
GENERIC_CLAUSES = ("its {k} is {v}", "{v} {k}", "the {k} is {v}")
# The same facts with the key named before its value. In "a {v} surface" the value comes first, so a
# model must guess which key the next word belongs to before it can use the photo; a tiny model
# learns such slots slowly (docs/experiments/pretraining.md, the phrasing probe).
KEY_FIRST_CLAUSES = {
    "category": ("the item is a {v}", "this is a {v}", "the product is a {v}"),
    "color": ("mainly {v}", "the body is {v}", "its main colour is {v}"),
    "secondary_color": ("trimmed in {v}", "the trim is {v}", "with accents in {v}"),
    "pattern": ("the pattern is {v}", "its surface is {v}", "covered in a {v} print"),
    "logo": ("the logo is a {v}", "marked with a {v}", "its logo is a {v}"),
}
KEY_FIRST_NO_LOGO = ("the logo is none", "marked with nothing", "its logo is none")  # the prefixes of a logo
KEY_FIRST_GENERIC_CLAUSES = ("its {k} is {v}", "the {k} is {v}", "with a {k} of {v}")
PHRASINGS = ("natural", "key_first")
QUESTIONS = {
    "category": ("What kind of product is this?", "What is this item?"),
    "color": ("What colour is the product?", "What is its main colour?"),
    "secondary_color": ("What colour is the trim?", "What colour are the accents?"),
    "pattern": ("What pattern does it have?", "How is its surface patterned?"),
    "logo": ("What logo is on it?", "Which mark does it carry?"),
}
GENERIC_QUESTIONS = ("What is its {k}?", "Which {k} does it have?")
ANSWERS = ("It is {v}.", "{V}.", "I see {v}.")


def _key_words(key: str) -> str:
    return key.replace("_", " ").strip()


def _value_words(key: str, value: str) -> str:
    return "plain" if key == "pattern" and value == "solid" else str(value)


def clause(key: str, value, rng: np.random.Generator | None = None, phrasing: str = "natural") -> str:
    """One phrase saying that ``key`` has ``value``; the first phrasing when ``rng`` is None.

    ``phrasing="key_first"`` only uses phrases that name the key before the value."""
    if phrasing not in PHRASINGS:
        raise ValueError(f"phrasing {phrasing!r}: choose one of {', '.join(PHRASINGS)}")
    key_first = phrasing == "key_first"
    if key == "logo" and str(value) == "none":
        options = KEY_FIRST_NO_LOGO if key_first else NO_LOGO
    else:
        options = (KEY_FIRST_CLAUSES if key_first else CLAUSES).get(
            key, KEY_FIRST_GENERIC_CLAUSES if key_first else GENERIC_CLAUSES
        )
    text = options[0 if rng is None else int(rng.integers(len(options)))]
    return text.format(k=_key_words(key), v=_value_words(key, value))


def _sentence(parts: Sequence[str]) -> str:
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[:1].upper() + text[1:] + "."


def describe(
    attributes: Mapping, keys: Sequence[str], rng: np.random.Generator, phrasing: str = "natural", shuffle: bool = True
) -> str:
    """Free text naming the values of ``keys`` in a random phrasing, in a random order (or in ``keys``' order)."""
    present = [k for k in keys if attributes.get(k) not in (None, "")]
    order = rng.permutation(len(present)) if shuffle else range(len(present))
    return _sentence([clause(present[int(i)], attributes[present[int(i)]], rng, phrasing) for i in order])


def caption(attributes: Mapping, keys: Sequence[str]) -> str:
    """A terse alt-text caption in a fixed word order: "A red striped mug with blue trim and a star logo."

    Every word but the few fixed ones is a value, so nearly all of the loss is on what the photo shows."""
    present = [k for k in keys if attributes.get(k) not in (None, "")]
    words = [_value_words(k, attributes[k]) for k in ("color", "pattern") if k in present]
    noun = str(attributes["category"]) if "category" in present else "item"
    tails = [f"{attributes['secondary_color']} trim"] if "secondary_color" in present else []
    if "logo" in present:
        tails.append("no logo" if str(attributes["logo"]) == "none" else f"a {attributes['logo']} logo")
    known = {"category", "color", "secondary_color", "pattern", "logo"}
    tails += [f"{_key_words(k)} {attributes[k]}" for k in present if k not in known]
    rest = " ".join([*words, noun])
    head = ("an " if rest[:1] in "aeiou" else "a ") + rest
    return _sentence([head + (" with " + tails[0] if tails else ""), *tails[1:]])


def ask_question(key: str, rng: np.random.Generator | None = None) -> str:
    """A question about ``key``; the first phrasing when ``rng`` is None."""
    options = QUESTIONS.get(key, GENERIC_QUESTIONS)
    return options[0 if rng is None else int(rng.integers(len(options)))].format(k=_key_words(key))


def answer(key: str, value, rng: np.random.Generator | None = None) -> str:
    words = "no logo" if key == "logo" and str(value) == "none" else _value_words(key, value)
    text = ANSWERS[0 if rng is None else int(rng.integers(len(ANSWERS)))]
    return text.format(v=words, V=words[:1].upper() + words[1:])


def stated_keys(title: str | None, attributes: Mapping, keys: Sequence[str]) -> list[str]:
    """Keys whose value the title spells out (whole words, any case): what reading the title can tell."""
    text = f" {(title or '').lower()} "
    found = []
    for key in keys:
        value = attributes.get(key)
        if value in (None, "") or (key == "logo" and value == "none"):
            continue
        if re.search(r"(?<![\w])" + re.escape(str(value).lower()) + r"(?![\w])", text):
            found.append(key)
    return found


def visible_keys(
    catalog: datasets.Dataset, hidden_keys: Sequence[str] = (), column: str = "true_attributes"
) -> list[str]:
    """The keys of ``column`` that a photo can show (all but ``hidden_keys``), in first-seen order.

    Raises ValueError naming the column when it is missing, empty, or every key is hidden."""
    if column not in catalog.column_names:
        raise ValueError(
            f"the pretraining catalog has no {column!r} column: pretraining describes each photo's "
            f"true attributes (columns: {', '.join(catalog.column_names)})"
        )
    keys = {}
    for attributes in catalog[column]:
        for key, value in (attributes or {}).items():
            if value not in (None, ""):
                keys.setdefault(key)
    if not keys:
        raise ValueError(f"column {column!r}: no row has any attribute value")
    shown = [k for k in keys if k not in set(hidden_keys)]
    if not shown:
        raise ValueError(
            f"column {column!r}: none of its keys ({', '.join(keys)}) is visible in the photo: every "
            "one is in --hidden_keys"
        )
    return shown


def conversation(
    title: str | None,
    attributes: Mapping,
    keys: Sequence[str],
    all_keys: Sequence[str],
    rng: np.random.Generator,
    task_probabilities: Sequence[float] = TASK_PROBABILITIES,
    phrasing: str = "natural",
    shuffle: bool = True,
) -> list[dict]:
    """One user/assistant exchange about a photo (the image block goes before the user text); the task is drawn
    with ``task_probabilities`` over ``TASKS`` (describe, ask, title, caption). ``phrasing`` and ``shuffle`` shape the
    descriptions (``describe``)."""
    weights = np.zeros(len(TASKS))
    weights[: len(task_probabilities)] = task_probabilities  # three weights: no captions (the shipped models' mix)
    task = TASKS[int(rng.choice(len(TASKS), p=weights / weights.sum()))]
    present = [k for k in keys if attributes.get(k) not in (None, "")]
    if task == "title" or not present:
        stated = stated_keys(title, attributes, all_keys)
        question = f"Title: {title or ''}\n{TITLE_PROMPTS[int(rng.integers(len(TITLE_PROMPTS)))]}"
        opener = TITLE_OPENERS[int(rng.integers(len(TITLE_OPENERS)))]
        said = [f"{_key_words(k)} {_value_words(k, attributes[k])}" for k in stated]
        reply = f"{opener} {_sentence(said)[:-1].lower()}." if said else "The title names no detail."
    elif task == "caption":
        question = CAPTION_PROMPTS[int(rng.integers(len(CAPTION_PROMPTS)))]
        reply = caption(attributes, present)
    elif task == "describe":
        question = DESCRIBE_PROMPTS[int(rng.integers(len(DESCRIBE_PROMPTS)))]
        reply = describe(attributes, present, rng, phrasing, shuffle)
    else:
        key = present[int(rng.integers(len(present)))]
        question, reply = ask_question(key, rng), answer(key, attributes[key], rng)
    return [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": reply}]},
    ]


def build_pretraining_dataset(
    catalog: datasets.Dataset,
    keys: Sequence[str],
    *,
    passes: int = 1,
    seed: int = 0,
    column: str = "true_attributes",
    task_probabilities: Sequence[float] = TASK_PROBABILITIES,
    phrasing: str = "natural",
    shuffle: bool = True,
) -> datasets.Dataset:
    """``passes`` conversations per listing (``messages`` + its ``image``), each drawn afresh."""
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if phrasing not in PHRASINGS:  # before any map, not on its first row
        raise ValueError(f"phrasing {phrasing!r}: choose one of {', '.join(PHRASINGS)}")
    all_keys = list(dict.fromkeys(k for a in catalog[column] for k in (a or {})))
    image_column = "image" if "image" in catalog.column_names else "images"
    base = catalog.select_columns([image_column, "title", column])

    def draw(title, attributes, index, *, offset):
        rng = np.random.default_rng([seed, offset, index])
        return {
            "messages": conversation(
                title, attributes or {}, keys, all_keys, rng, task_probabilities, phrasing, shuffle
            )
        }

    parts = [
        base.map(
            draw,
            input_columns=["title", column],
            with_indices=True,
            fn_kwargs={"offset": p},
            remove_columns=["title", column],
            desc=f"pretraining conversations (pass {p + 1})",
        )
        for p in range(passes)
    ]
    ds = datasets.concatenate_datasets(parts)
    if image_column == "images":  # one photo per conversation: the listing's first
        ds = ds.map(lambda imgs: {"image": imgs[0]}, input_columns=["images"], remove_columns=["images"])
    return ds.select_columns(["messages", "image"])


PERCEPTION_FORMATS = ("ask", "caption")


def _reply(task: str, key: str, value, attributes: Mapping, keys: Sequence[str]) -> str:
    """The reply a model of ``task`` would give if ``key`` had ``value`` (the photo's other values true)."""
    if task == "caption":
        return caption({**attributes, key: value}, [k for k in keys if attributes.get(k) not in (None, "")])
    return answer(key, value)


@torch.no_grad()
def perception_scores(
    model,
    processor,
    images: Sequence,
    attributes: Sequence[Mapping],
    key: str,
    candidates: Sequence[str],
    keys: Sequence[str],
    batch_size: int = 64,
    task: str = "ask",
) -> tuple[list[int], np.ndarray]:
    """The photos with a value for ``key`` and, per photo and candidate value, the summed log-probability of
    the reply that names it (``perception_accuracy`` says which reply)."""
    if task not in PERCEPTION_FORMATS:
        raise ValueError(f"task {task!r}: choose one of {', '.join(PERCEPTION_FORMATS)}")
    tokenizer = processor.tokenizer
    device = next(model.parameters()).device
    rows = [i for i, a in enumerate(attributes) if a.get(key) not in (None, "")]
    question = ask_question(key) if task == "ask" else CAPTION_PROMPTS[0]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    pairs = [(i, c) for i in rows for c in range(len(candidates))]
    scores = np.zeros(len(pairs))
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        replies = [_reply(task, key, candidates[c], attributes[i], keys) + "<|im_end|>" for i, c in chunk]
        lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
        batch = processor(
            text=[prompt + r for r in replies],
            images=[images[i].convert("RGB") for i, _ in chunk],
            padding=True,
            return_tensors="pt",
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch).logits.float()
        logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["attention_mask"]
        ends = mask.shape[1] - mask.flip(1).argmax(1)  # one past each row's last real token, either padding side
        for j, length in enumerate(lengths):  # the reply is the row's last tokens; logprobs[t] predicts token t+1
            end = int(ends[j])
            scores[start + j] = logprobs[j, end - 1 - length : end - 1].sum().item()
    return rows, scores.reshape(len(rows), len(candidates))


def perception_accuracy(
    model,
    processor,
    images: Sequence,
    attributes: Sequence[Mapping],
    keys: Sequence[str],
    values: Mapping[str, Sequence[str]],
    batch_size: int = 64,
    task: str = "ask",
) -> dict[str, float]:
    """Per key, the fraction of photos whose true value the model finds the likeliest reply.

    ``task="ask"``: each candidate value is scored by the summed log-probability of its answer ("It is
    red.") after the first phrasing of the key's question. ``task="caption"``, for a model pretrained on
    captions: by the log-probability of the whole caption with that value and the photo's other values
    true ("A red striped mug with ..."). Photos without a value for the key are not counted."""
    model.eval()
    results = {}
    for key in keys:
        candidates = list(values[key])
        if len(candidates) < 2:
            continue
        rows, scores = perception_scores(model, processor, images, attributes, key, candidates, keys, batch_size, task)
        if not rows:
            continue
        truth = [
            candidates.index(str(attributes[i][key])) if str(attributes[i][key]) in candidates else -1 for i in rows
        ]
        results[key] = float(np.mean(scores.argmax(axis=1) == np.asarray(truth)))
    return results
