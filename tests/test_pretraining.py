"""Pretraining tiny MLLMs (afmrl.embedded.pretraining, recipes/pretrain_tiny.py) and the shipped pretrained models."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from afmrl.catalog.load import load_catalog
from afmrl.embedded import PRETRAINED_MODELS, resolve_model
from afmrl.embedded.pretraining import (
    build_pretraining_dataset,
    conversation,
    perception_accuracy,
    stated_keys,
    visible_keys,
)
from afmrl.embedded.synthetic_catalog import ATTRIBUTE_KEYS, make_synthetic_catalog, products_of_seed

HIDDEN = ("brand", "size")


def _texts(messages):
    return [block["text"] for m in messages for block in m["content"] if block.get("type") == "text"]


def _write_catalog(path: Path, rows: list[dict]) -> Path:
    """``rows`` as a .jsonl beside the corpus's own catalog.jsonl (so its relative image paths resolve)."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "catalog.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    return make_synthetic_catalog(
        tmp_path_factory.mktemp("pretrain") / "c",
        num_products=40,
        seed=11,
        test_fraction=0.2,
        exclude_products_of_seeds=[0],
    )


def test_the_corpus_holds_no_product_of_an_excluded_seed(tmp_path):
    excluded = products_of_seed(0, 150)
    demo = {
        tuple(r["true_attributes"][k] for k in ATTRIBUTE_KEYS)
        for r in _rows(make_synthetic_catalog(tmp_path / "demo", num_products=120, seed=0))
    }
    assert demo <= excluded  # a smaller catalog of the seed holds a subset of what is reserved
    corpus = make_synthetic_catalog(
        tmp_path / "corpus", num_products=200, seed=0, exclude_products_of_seeds=[0], exclude_up_to=150
    )
    drawn = {tuple(r["true_attributes"][k] for k in ATTRIBUTE_KEYS) for r in _rows(corpus)}
    assert len(drawn) > 180 and not drawn & excluded
    plain = make_synthetic_catalog(tmp_path / "plain", num_products=200, seed=0)
    assert {tuple(r["true_attributes"][k] for k in ATTRIBUTE_KEYS) for r in _rows(plain)} & excluded  # same seed


def test_conversations_name_what_the_photo_and_the_title_show():
    attributes = {
        "category": "mug",
        "brand": "acme",
        "color": "red",
        "secondary_color": "blue",
        "pattern": "solid",
        "logo": "none",
        "size": "M",
    }
    keys = [k for k in ATTRIBUTE_KEYS if k not in HIDDEN]
    title = "Acme red coffee mug size M hot sale"
    assert stated_keys(title, attributes, ATTRIBUTE_KEYS) == ["category", "brand", "color", "size"]
    seen = set()
    for i in range(200):
        messages = conversation(title, attributes, keys, ATTRIBUTE_KEYS, np.random.default_rng([0, i]))
        question, reply = _texts(messages)
        assert messages[0]["content"][0] == {"type": "image"} and ":" not in reply.replace("title:", "")
        if question.startswith("Title:"):
            seen.add("title")
            assert "acme" in reply and "size m" in reply and "blue" not in reply
        elif "?" in question and question not in ("What do you see in this picture?",):
            seen.add("ask")
        else:
            seen.add("describe")
            for word in ("mug", "red", "blue", "plain"):
                assert word in reply.lower()
            assert "acme" not in reply.lower() and " M" not in reply  # hidden keys only from the title
    assert seen == {"title", "ask", "describe"}


def test_key_first_phrasing_names_the_key_before_any_value_word():
    """In every key-first phrase, the words before the value are the same for all of that key's values (so a model
    knows which key it is describing before it must look at the photo), and differ between keys."""
    from afmrl.embedded.pretraining import KEY_FIRST_CLAUSES, KEY_FIRST_NO_LOGO, clause
    from afmrl.embedded.synthetic_catalog import ATTRIBUTE_VALUES

    class Pick:  # stands in for the random stream: always the i-th phrasing
        def __init__(self, i):
            self.i = i

        def integers(self, n):
            return self.i

    prefixes = {}
    for key, phrases in KEY_FIRST_CLAUSES.items():
        values = list(ATTRIBUTE_VALUES[key])
        for i in range(len(phrases)):
            texts = [clause(key, v, Pick(i), "key_first") for v in values]
            assert len(set(texts)) == len(values)
            common = os.path.commonprefix(texts)
            assert common.strip() and common.endswith(" "), (key, i, texts)
            prefixes[(key, i)] = common
    assert len(KEY_FIRST_NO_LOGO) == len(KEY_FIRST_CLAUSES["logo"])
    firsts = [p for (_, i), p in prefixes.items()]
    assert len(set(firsts)) == len(firsts)  # no two keys open a phrase with the same words
    natural = [clause("pattern", v, Pick(0)) for v in ATTRIBUTE_VALUES["pattern"]]
    assert not os.path.commonprefix(natural).strip()  # "striped pattern": the natural phrasing leads with the value
    with pytest.raises(ValueError, match="phrasing 'loud'"):
        clause("color", "red", None, "loud")


def test_captions_name_every_visible_value_in_a_fixed_order():
    from afmrl.embedded.pretraining import caption

    keys = [k for k in ATTRIBUTE_KEYS if k not in HIDDEN]
    attributes = {
        "category": "mug",
        "brand": "acme",
        "color": "red",
        "secondary_color": "blue",
        "pattern": "striped",
        "logo": "star",
        "size": "M",
    }
    assert caption(attributes, keys) == "A red striped mug with blue trim and a star logo."
    assert (
        caption({**attributes, "pattern": "solid", "logo": "none"}, keys)
        == "A red plain mug with blue trim and no logo."
    )
    assert (
        caption({"hue": "orange", "material": "wool"}, ["hue", "material"])
        == "An item with hue orange and material wool."
    )
    three = [
        conversation("t", attributes, keys, ATTRIBUTE_KEYS, np.random.default_rng([0, i]), (0.5, 0.3, 0.2))
        for i in range(50)
    ]
    four = [
        conversation("t", attributes, keys, ATTRIBUTE_KEYS, np.random.default_rng([0, i]), (0.5, 0.3, 0.2, 0.0))
        for i in range(50)
    ]
    assert three == four  # three weights: the shipped models' mix, draw for draw
    only = conversation("t", attributes, keys, ATTRIBUTE_KEYS, np.random.default_rng(0), (0, 0, 0, 1))
    assert _texts(only)[1] == caption(attributes, keys)


def test_any_catalog_keys_get_generic_phrasing(tmp_path, corpus_dir):
    rows = _rows(corpus_dir)
    for r in rows:
        a = r["true_attributes"]
        r["true_attributes"] = {
            "hue": a["color"],
            "material": "cotton" if a["pattern"] == "solid" else "wool",
            "brand": a["brand"],
        }
    other = _write_catalog(corpus_dir / "other_keys.jsonl", rows)
    catalog = load_catalog(other, split="train")
    keys = visible_keys(catalog, HIDDEN)
    assert keys == ["hue", "material"]
    ds = build_pretraining_dataset(catalog, keys, passes=2, seed=0)
    assert len(ds) == 2 * len(catalog)
    replies = " ".join(_texts(ds[i]["messages"])[1] for i in range(len(ds)))
    assert "hue" in replies and "material" in replies and ("cotton" in replies or "wool" in replies)
    again = build_pretraining_dataset(catalog, keys, passes=2, seed=0)
    assert again["messages"] == ds["messages"]
    assert build_pretraining_dataset(catalog, keys, passes=2, seed=1)["messages"] != ds["messages"]


def test_visible_keys_refuse_a_catalog_without_them(tmp_path, corpus_dir):
    catalog = load_catalog(corpus_dir, split="train")
    with pytest.raises(ValueError, match="'nope'"):
        visible_keys(catalog, HIDDEN, column="nope")
    with pytest.raises(ValueError, match="'true_attributes': none of its keys"):
        visible_keys(catalog, ATTRIBUTE_KEYS)


@pytest.mark.usefixtures("no_weights")
@pytest.mark.parametrize(
    "case", ["no column", "all hidden", "no catalog", "bad format", "negative vision steps", "hidden vision key"]
)
def test_bad_pretraining_catalog_fails_before_training_with_one_line(tmp_path, corpus_dir, case, load_recipe, capsys):
    """In process: exit 2 and one `error:` line naming the column, before any model exists."""
    rows = _rows(corpus_dir)
    for r in rows:
        if case == "no column":
            del r["true_attributes"]
    catalog = _write_catalog(corpus_dir / f"bad_{case.replace(' ', '_')}.jsonl", rows)
    args = ["--config", "recipes/configs/pretrain_tiny_encoder.yaml", "--output_dir", str(tmp_path / "out")]
    if case != "no catalog":
        args += ["--catalog", str(catalog)]
    if case == "all hidden":
        args += ["--hidden_keys", *ATTRIBUTE_KEYS]
    if case == "bad format":
        args += ["--perception_format", "describe"]
    if case == "negative vision steps":
        args += ["--vision_steps", "-1"]
    if case == "hidden vision key":
        args += ["--vision_steps", "3", "--vision_keys", "pattern", "brand"]
    recipe = load_recipe("pretrain_tiny")
    recipe.build_tiny_mllm = lambda *a, **k: pytest.fail("a model was built before the inputs were checked")
    with pytest.raises(SystemExit) as info:
        recipe.cli(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in err
    assert {
        "no column": "'true_attributes'",
        "all hidden": "none of its keys",
        "no catalog": "--catalog",
        "bad format": "--perception_format 'describe'",
        "negative vision steps": "--vision_steps",
        "hidden vision key": "--vision_keys ['brand']",
    }[case] in error[0]
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_a_short_pretraining_run_is_reproduced_bit_for_bit(tmp_path, corpus_dir, load_recipe, one_thread):
    """Two runs with the same flags (CPU, one thread) write identical weights; another seed does not."""
    common = [
        "--config",
        "recipes/configs/pretrain_tiny_encoder.yaml",
        "--catalog",
        str(corpus_dir),
        "--max_steps",
        "6",
        "--per_device_train_batch_size",
        "8",
        "--save_strategy",
        "no",
        "--max_eval_listings",
        "8",
        "--disable_tqdm",
        "true",
    ]
    weights = []
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        load_recipe("pretrain_tiny").cli([*common, "--output_dir", str(tmp_path / name), "--seed", seed])
        weights.append((tmp_path / name / "model.safetensors").read_bytes())
        perception = json.loads((tmp_path / name / "perception.json").read_text())["perception"]
        assert set(perception) == {"category", "color", "secondary_color", "pattern", "logo"}
        assert json.loads((tmp_path / name / "perception.json").read_text())["perception_format"] == "ask"
        assert "pretrain_tiny.py" in (tmp_path / name / "README.md").read_text()
    assert weights[0] == weights[1] and weights[0] != weights[2]


@pytest.mark.parametrize("name", sorted(PRETRAINED_MODELS))
def test_shipped_model_loads_by_name_offline_and_perceives(name, small_catalog_dir, one_thread):
    """A learning test on photos no pretraining run saw (the demo seed's catalog): the shipped model names the
    visible attributes well above chance."""
    from afmrl.encoder.crops import catalog_views
    from afmrl.modeling import load_mllm

    path = resolve_model(name, "unused-cache-dir")
    assert Path(path).is_dir() and (Path(path) / "model.safetensors").is_file()
    card = (Path(path) / "README.md").read_text()
    assert "recipes/pretrain_tiny.py" in card and "seed" in card
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        model, processor = load_mllm(path)
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = old
    catalog = load_catalog(small_catalog_dir, split="test").select(range(48))
    keys = ["category", "color", "secondary_color", "pattern", "logo"]
    from afmrl.embedded.synthetic_catalog import ATTRIBUTE_VALUES

    task = json.loads((Path(path) / "perception.json").read_text()).get("perception_format", "ask")
    with torch.no_grad():
        accuracy = perception_accuracy(
            model,
            processor,
            catalog_views(catalog),
            catalog["true_attributes"],
            keys,
            {k: ATTRIBUTE_VALUES[k] for k in keys},
            task=task,
        )
    chance = {k: 1 / len(ATTRIBUTE_VALUES[k]) for k in keys}
    # What each model learned in pretraining (docs/embedded.md): the small one category and colour, the
    # large one (16 tokens per photo, four vision blocks, captions) the secondary colour and the pattern too.
    learned = {
        "pretrained-tiny-qwen2-vl": ("category", "color"),
        "pretrained-tiny-qwen2-vl-large": ("category", "color", "secondary_color", "pattern"),
    }[name]
    for key in learned:
        assert accuracy[key] >= chance[key] + 0.4, (key, accuracy)


@pytest.mark.parametrize("task", ["ask", "caption"])
def test_perception_scores_match_scoring_each_reply_alone(task, corpus_dir, one_thread):
    """Batched, padded scoring equals scoring each (photo, value) reply alone, unpadded; accuracy is its argmax."""
    from afmrl.embedded.pretraining import CAPTION_PROMPTS, answer, ask_question, caption, perception_scores
    from afmrl.embedded.synthetic_catalog import ATTRIBUTE_VALUES
    from afmrl.embedded.tiny_models import build_tiny_mllm
    from afmrl.encoder.crops import catalog_views

    catalog = load_catalog(corpus_dir, split="test").select(range(4))
    keys = ["category", "color", "pattern", "logo"]
    model, processor = build_tiny_mllm("qwen2_vl", seed=3)
    images, truth = catalog_views(catalog), catalog["true_attributes"]
    values = {k: list(ATTRIBUTE_VALUES[k]) for k in keys}

    def reply_logprob(image, question, reply):
        prompt = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            tokenize=False,
            add_generation_prompt=True,
        )
        n_prompt = processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")["input_ids"].shape[1]
        batch = processor(text=[prompt + reply + "<|im_end|>"], images=[image.convert("RGB")], return_tensors="pt")
        logprobs = torch.log_softmax(model(**batch).logits[0, :-1].float(), -1)
        ids = batch["input_ids"][0, 1:]
        return logprobs[torch.arange(len(ids)), ids][n_prompt - 1 :].sum().item()

    accuracy = perception_accuracy(model, processor, images, truth, keys, values, batch_size=7, task=task)
    with torch.no_grad():
        for key in keys:
            rows, scores = perception_scores(model, processor, images, truth, key, values[key], keys, 7, task)
            assert rows == list(range(len(images)))
            if task == "ask":
                reference = [
                    [reply_logprob(im, ask_question(key), answer(key, v)) for v in values[key]] for im in images
                ]
            else:
                reference = [
                    [reply_logprob(im, CAPTION_PROMPTS[0], caption({**a, key: v}, keys)) for v in values[key]]
                    for im, a in zip(images, truth, strict=True)
                ]
            np.testing.assert_allclose(scores, reference, rtol=1e-4, atol=1e-4)
            hits = [values[key][int(np.argmax(r))] == str(a[key]) for r, a in zip(reference, truth, strict=True)]
            assert accuracy[key] == pytest.approx(np.mean(hits)), key
    with pytest.raises(ValueError, match="task 'describe'"):
        perception_accuracy(model, processor, images, truth, keys, values, task="describe")
