"""The vision stage (afmrl.embedded.vision_stage): a tower trained to read each key before it learns to caption."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from afmrl.catalog.load import load_catalog
from afmrl.embedded.synthetic_catalog import make_synthetic_catalog
from afmrl.embedded.tiny_models import build_tiny_mllm
from afmrl.embedded.vision_stage import readout_accuracy, train_vision_stage


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory):
    return make_synthetic_catalog(tmp_path_factory.mktemp("vision") / "c", num_products=60, seed=5, test_fraction=0.2)


def test_a_short_vision_stage_learns_to_read_what_it_is_trained_on(catalog_dir, one_thread):
    """A learning test: 150 batches of 16 lower the loss and read the body colour of the photos it trained on far above
    the most frequent colour; the tower's weights change, the language model's do not."""
    train = load_catalog(catalog_dir, split="train")
    model, processor = build_tiny_mllm(seed=0)
    tower = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    lm = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    readout = train_vision_stage(
        model, processor, train, ["color", "pattern"], steps=150, batch_size=16, learning_rate=3e-3, seed=0
    )
    assert np.mean(readout.losses[-10:]) < 0.5 * np.mean(readout.losses[:10])
    colors = [a["color"] for a in train["true_attributes"]]
    majority = max(colors.count(c) for c in set(colors)) / len(colors)
    accuracy = readout_accuracy(readout, processor, train)
    assert accuracy["color"] > majority + 0.3, (accuracy, majority)
    assert any(not v.equal(tower[k]) for k, v in model.model.visual.state_dict().items())
    assert all(v.equal(lm[k]) for k, v in model.model.language_model.state_dict().items())


def test_a_frozen_tower_trains_the_heads_only(catalog_dir, one_thread):
    train = load_catalog(catalog_dir, split="train")
    model, processor = build_tiny_mllm(seed=0)
    tower = {k: v.clone() for k, v in model.model.visual.state_dict().items()}
    readout = train_vision_stage(model, processor, train, ["color"], steps=3, batch_size=8, train_tower=False)
    assert all(v.equal(tower[k]) for k, v in model.model.visual.state_dict().items())
    assert any(p.abs().sum() > 0 for p in readout.queries.values())


def test_rows_without_a_value_are_neither_trained_on_nor_counted(catalog_dir, one_thread):
    """A photo whose key has no value (None in the column) is left out of that key's loss and accuracy, not read as a
    value and not an error."""
    train = load_catalog(catalog_dir, split="train")
    train = train.map(lambda a, i: {"true_attributes": {**a, "pattern": None} if i % 2 else a},
                      input_columns=["true_attributes"], with_indices=True)  # fmt: skip
    model, processor = build_tiny_mllm(seed=0)
    readout = train_vision_stage(model, processor, train, ["pattern"], steps=2, batch_size=1)  # one row has no value
    assert all(np.isfinite(readout.losses))
    assert "None" not in readout.values["pattern"]
    first = readout_accuracy(readout, processor, train.select([0]))["pattern"]
    assert first in (0.0, 1.0)  # the row with a value alone counts: 0 or 1 of 1
    assert readout_accuracy(readout, processor, train.select([1]))["pattern"] == 0.0  # nothing to count


@pytest.mark.slow
def test_pretraining_with_a_vision_stage_is_reproduced_and_reports_its_readout(
    tmp_path, catalog_dir, load_recipe, one_thread
):
    """``--vision_steps`` runs the stage before the conversations: same flags, same weights; the weights differ from
    a run without it; perception.json holds the stage's held-out readout, of the keys ``--vision_keys`` names."""
    common = [
        "--config",
        "recipes/configs/pretrain_tiny_encoder.yaml",
        "--catalog",
        str(catalog_dir),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--save_strategy",
        "no",
        "--max_eval_listings",
        "8",
        "--disable_tqdm",
        "true",
    ]
    weights = {}
    for name, steps in (("a", "4"), ("b", "4"), ("none", "0")):
        load_recipe("pretrain_tiny").cli([*common, "--output_dir", str(tmp_path / name), "--vision_steps", steps])
        weights[name] = load_file(tmp_path / name / "model.safetensors")
    assert all(weights["a"][k].equal(weights["b"][k]) for k in weights["a"])
    assert any(not weights["a"][k].equal(weights["none"][k]) for k in weights["a"] if "visual" in k)
    readout = json.loads((tmp_path / "a" / "perception.json").read_text())["vision_stage_readout"]
    assert set(readout) == {"category", "color", "secondary_color", "pattern", "logo"}
    assert json.loads((tmp_path / "none" / "perception.json").read_text())["vision_stage_readout"] == {}
    load_recipe("pretrain_tiny").cli(
        [*common, "--output_dir", str(tmp_path / "keys"), "--vision_steps", "2", "--vision_keys", "color"]
    )
    assert set(json.loads((tmp_path / "keys" / "perception.json").read_text())["vision_stage_readout"]) == {"color"}
