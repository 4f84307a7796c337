"""Where does a generator's perception go when SFT teaches it the ``key: value`` schema?

Three measurements on the demo catalog's photos, each for the values its title does not state
(docs/experiments/pretraining.md, "A seventh probe"):

* ``--caption MODEL``: a base pretrained on captions writes a caption for each photo (greedy); how often
  does it name the true colour, pattern, logo ...?
* ``--generator SFT_DIR``: an SFT generator writes its attributes for listings of products it was trained on
  (split ``train``) and of held-out products (``test``); per key, how often is the value right?
* ``--vision MODEL``: how much does the vision tower's output alone (the merged image tokens, flattened)
  say? A linear probe (softmax regression, torch) trained on corpus photos, scored on the demo's photos.

    python -m experiments.sft_perception --caption outputs/pretrained/generator \
        --generator outputs/rar-demo/sft --vision afmrl/embedded/pretrained/pretrained-tiny-qwen2-vl-large
"""

import argparse
import json

import torch
from trl import ModelConfig

from afmrl.attributes import parse_attributes
from afmrl.catalog.load import load_catalog
from afmrl.embedded.pretraining import CAPTION_PROMPTS, _value_words
from afmrl.modeling import load_mllm
from rar.annotate import generate_attributes
from rar.policy import load_policy
from rar.prompts import build_prompt_dataset

KEYS = ("category", "color", "secondary_color", "pattern", "logo")


def unstated(rows, key):
    """Indices of rows whose true ``key`` value exists and is not in the title."""
    return [
        i
        for i, (a, t) in enumerate(zip(rows["true_attributes"], rows["title"], strict=True))
        if a.get(key) not in (None, "") and str(a[key]).lower() not in t.lower()
    ]


def score(rows, right) -> dict:
    """Per key: % of the rows (title silent on it) where ``right(i, key, truth)`` holds."""
    out = {}
    for key in KEYS:
        idx = unstated(rows, key)
        out[key] = round(
            100 * sum(right(i, key, str(rows["true_attributes"][i][key])) for i in idx) / max(len(idx), 1), 1
        )
    return out


def caption_accuracy(model_dir, rows, batch_size=25) -> dict:
    model, processor = load_mllm(model_dir)
    model.eval()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPTS[0]}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    texts = []
    for start in range(0, len(rows["image"]), batch_size):
        images = [im.convert("RGB") for im in rows["image"][start : start + batch_size]]
        batch = processor(text=[prompt] * len(images), images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=40, do_sample=False)
        texts += [
            t.lower() for t in processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        ]

    def right(i, key, truth):
        truth = _value_words(key, truth).lower()  # a caption says "plain" for the solid pattern
        if key == "logo":
            return ("no logo" if truth == "none" else f"{truth} logo") in texts[i]
        if key == "secondary_color":
            return f"{truth} trim" in texts[i]
        return truth in texts[i].replace(".", " ").replace(",", " ").split() or truth in texts[i]

    return score(rows, right)


def generator_accuracy(sft_dir, rows, prompt_template) -> dict:
    model, processor, _ = load_policy(ModelConfig(model_name_or_path=sft_dir), for_training=False)  # or a LoRA adapter
    prompts = build_prompt_dataset(rows, prompt_template=prompt_template)
    texts = generate_attributes(model, processor, prompts, batch_size=25, show_progress=False)
    parsed = [parse_attributes(t).attributes for t in texts]
    return score(rows, lambda i, key, truth: str(parsed[i].get(key, "")).lower() == truth.lower())


def vision_features(model, processor, images, batch_size=64) -> torch.Tensor:
    out = []
    for start in range(0, len(images), batch_size):
        batch = processor.image_processor(
            images=[im.convert("RGB") for im in images[start : start + batch_size]], return_tensors="pt"
        )
        with torch.no_grad():
            features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"])
        features = getattr(features, "pooler_output", features)  # one (tokens, hidden) tensor per photo
        out += [f.flatten() for f in features]
    return torch.stack(out)


def vision_probe(model_dir, train, test, steps=300) -> dict:
    """Softmax regression on standardised vision outputs (Adam, small L2), trained on ``train``'s photos."""
    torch.manual_seed(0)
    model, processor = load_mllm(model_dir)
    model.eval()
    x_train, x_test = (
        vision_features(model, processor, train["image"]),
        vision_features(model, processor, test["image"]),
    )
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    result = {}
    for key in KEYS:
        values = sorted({str(a[key]) for a in train["true_attributes"]})
        y_train = torch.tensor([values.index(str(a[key])) for a in train["true_attributes"]])
        y_test = torch.tensor(
            [values.index(str(a[key])) if str(a[key]) in values else -1 for a in test["true_attributes"]]
        )
        weight = torch.zeros(x_train.shape[1], len(values), requires_grad=True)
        bias = torch.zeros(len(values), requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=1e-2)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(x_train @ weight + bias, y_train) + 1e-3 * weight.pow(2).sum()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            result[key] = {
                "fit": round(100 * ((x_train @ weight + bias).argmax(1) == y_train).float().mean().item(), 1),
                "demo": round(100 * ((x_test @ weight + bias).argmax(1) == y_test).float().mean().item(), 1),
            }
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--caption", nargs="*", default=[], help="Caption-pretrained base(s) to let caption the photos."
    )
    parser.add_argument(
        "--generator", nargs="*", default=[], help="SFT generator(s) to score on train and test products."
    )
    parser.add_argument("--vision", nargs="*", default=[], help="Model(s) whose vision output to probe linearly.")
    parser.add_argument("--catalog", default="outputs/embedded/catalog-600-seed0-val0.3", help="The demo's catalog.")
    parser.add_argument("--corpus", default="outputs/pretrain-corpus", help="Photos the linear probe is trained on.")
    parser.add_argument("--photos", type=int, default=200, help="Demo listings per split scored.")
    parser.add_argument(
        "--splits", nargs="+", default=["train", "test"], help="Splits the generators are scored on (val: RL prompts)."
    )
    parser.add_argument("--probe_photos", type=int, default=4000, help="Corpus photos the linear probe fits.")
    parser.add_argument("--prompt_template", default="Title: {title}\nAttributes:", help="The demo's RL/SFT prompt.")
    parser.add_argument("--out", help="Also write the results here as JSON.")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    demo = {s: load_catalog(args.catalog, split=s) for s in dict.fromkeys([*args.splits, "test"])}
    head = {s: c.select(range(min(args.photos, len(c)))) for s, c in demo.items()}
    results = {"caption": {}, "generator": {}, "vision": {}}
    for name in args.caption:
        results["caption"][name] = caption_accuracy(name, head["test"][:])
    for name in args.generator:
        results["generator"][name] = {s: generator_accuracy(name, head[s], args.prompt_template) for s in args.splits}
    if args.vision:
        corpus = load_catalog(args.corpus, split="train")
        corpus = corpus.select(range(min(args.probe_photos, len(corpus))))
        for name in args.vision:
            results["vision"][name] = vision_probe(name, corpus, demo["test"])
    print(json.dumps(results, indent=1))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
