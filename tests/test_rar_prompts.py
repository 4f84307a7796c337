"""rar.prompts: GRPO prompt / SFT datasets from a catalog, and the launch configs in deepspeed_configs/."""

import json
import logging
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image

from afmrl.attributes import format_attributes
from afmrl.catalog.load import load_catalog
from afmrl.embedded.synthetic_catalog import ATTRIBUTE_KEYS, make_synthetic_catalog
from rar.prompts import DEFAULT_PROMPT, build_prompt_dataset, build_sft_dataset, sft_target

CONFIG_DIR = Path(__file__).resolve().parents[1] / "deepspeed_configs"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def catalog(small_catalog_dir):
    return load_catalog(small_catalog_dir, split="train", verify_images=False)


@pytest.fixture(scope="module")
def multi_image_catalog(tmp_path_factory):
    path = make_synthetic_catalog(tmp_path_factory.mktemp("multi") / "c", num_products=6, seed=1, images_per_listing=2)
    return load_catalog(path, verify_images=False)


def stored_paths(ds, column):
    """The Arrow storage of an image column: (bytes, path) structs, never decoded pixels."""
    values = ds.data.column(column).to_pylist()
    return [v for row in values for v in (row if isinstance(row, list) else [row])]


def test_prompt_dataset_columns_text_and_lazy_images(catalog):
    ds = build_prompt_dataset(catalog, attribute_keys=ATTRIBUTE_KEYS)
    assert ds.column_names == [
        "prompt",
        "image",
        "listing_id",
        "product_id",
        "attributes",
        "true_attributes",
        "category",
    ]
    assert len(ds) == len(catalog)
    assert isinstance(ds.features["image"], datasets.Image)
    stored = stored_paths(ds, "image")
    assert all(v["bytes"] is None and Path(v["path"]).is_file() for v in stored)
    row, source = ds[3], catalog[3]
    assert row["listing_id"] == source["listing_id"] and row["attributes"] == source["attributes"]
    (message,) = row["prompt"]
    assert message["role"] == "user" and isinstance(message["content"], str)
    assert source["title"].strip() in message["content"]
    assert all(key in message["content"] for key in ATTRIBUTE_KEYS)
    assert "{" not in message["content"]
    assert isinstance(row["image"], Image.Image) and row["image"].size == source["image"].size


def test_prompt_without_keys_and_custom_template(catalog):
    assert "{title}" in DEFAULT_PROMPT and "{keys}" in DEFAULT_PROMPT
    ds = build_prompt_dataset(catalog.select(range(2)))
    assert "Choose the keys" in ds[0]["prompt"][0]["content"]
    ds = build_prompt_dataset(
        catalog.select(range(2)), prompt_template="T={title} {{json}}", keep_columns=("listing_id", "no_such_column")
    )
    assert ds.column_names == ["prompt", "image", "listing_id"]
    assert ds[1]["prompt"][0]["content"] == f"T={catalog[1]['title'].strip()} {{json}}"


def test_images_catalog_first_image_or_list(multi_image_catalog):
    first = build_prompt_dataset(multi_image_catalog)
    assert "images" not in first.column_names and isinstance(first.features["image"], datasets.Image)
    assert [v["path"] for v in stored_paths(first, "image")] == [
        v[0]["path"] for v in multi_image_catalog.data.column("images").to_pylist()
    ]
    assert isinstance(first[0]["image"], Image.Image)
    both = build_prompt_dataset(multi_image_catalog, image_column="images")
    assert "image" not in both.column_names and len(both[0]["images"]) == 2
    assert all(v["bytes"] is None for v in stored_paths(both, "images"))


def test_single_image_catalog_as_list(catalog):
    ds = build_prompt_dataset(catalog.select(range(3)), image_column="images")
    assert [len(x) for x in ds["images"]] == [1, 1, 1] and isinstance(ds[0]["images"][0], Image.Image)


@pytest.mark.parametrize(
    "template, name", [("{title} {colour}", "{colour}"), ("{}", "positional"), ("{title.upper}", "{title.upper}")]
)
def test_unknown_placeholder(catalog, template, name):
    with pytest.raises(ValueError, match=name.replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")):
        build_prompt_dataset(catalog.select(range(2)), prompt_template=template)


def test_missing_listing_id_and_bad_image_column(catalog):
    with pytest.raises(ValueError, match="listing_id"):
        build_prompt_dataset(catalog.remove_columns("listing_id"))
    with pytest.raises(ValueError, match="image_column"):
        build_prompt_dataset(catalog, image_column="picture")


def test_sft_dataset_targets_and_skipped_rows(catalog, caplog):
    assert sft_target({"attributes": None}, ATTRIBUTE_KEYS) is None
    ids = set(catalog["listing_id"][:5])
    blanked = catalog.map(
        lambda lid, a: {"attributes": None if lid in ids else a},
        input_columns=["listing_id", "attributes"],
        features=catalog.features,
    )
    with caplog.at_level(logging.WARNING, logger="rar.prompts"):
        ds = build_sft_dataset(blanked, attribute_keys=ATTRIBUTE_KEYS)
    assert f"skipped 5 of {len(catalog)} rows without attributes" in caplog.text
    assert ds.column_names == ["messages", "image", "listing_id"] and len(ds) == len(catalog) - 5
    teacher = dict(zip(catalog["listing_id"], catalog["attributes"], strict=True))
    for row in ds.select(range(10)).select_columns(["messages", "listing_id"]):
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert assistant["content"] == format_attributes(teacher[row["listing_id"]], ATTRIBUTE_KEYS)
    assert stored_paths(ds, "image")[0]["bytes"] is None
    with pytest.raises(ValueError, match="no row"):
        build_sft_dataset(
            catalog.map(lambda a: {"attributes": None}, input_columns=["attributes"], features=catalog.features)
        )
    with pytest.raises(ValueError, match="attributes"):
        build_sft_dataset(catalog.remove_columns("attributes"))


def test_deepspeed_json_configs():
    expected = {"zero2.json": (2, False), "zero3.json": (3, False), "zero3_offload.json": (3, True)}
    assert expected.keys() <= {p.name for p in CONFIG_DIR.glob("*.json")}
    for path in CONFIG_DIR.glob("*.json"):
        cfg = json.loads(path.read_text())
        stage, offload = expected[path.name]
        zero = cfg["zero_optimization"]
        assert zero["stage"] == stage, path.name
        assert ("offload_optimizer" in zero and "offload_param" in zero) == offload, path.name
        assert cfg["bf16"]["enabled"] == "auto" and cfg["train_micro_batch_size_per_gpu"] == "auto"


def test_accelerate_yaml_configs():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {
        "zero2.yaml",
        "zero3.yaml",
        "zero3_offload.yaml",
        "single_gpu.yaml",
        "multi_gpu.yaml",
        "cpu_2proc.yaml",
    } <= names
    for path in CONFIG_DIR.glob("*.yaml"):
        cfg = yaml.safe_load(path.read_text())
        if cfg["distributed_type"] == "DEEPSPEED":
            ds_file = CONFIG_DIR.parent / cfg["deepspeed_config"]["deepspeed_config_file"]
            assert ds_file.is_file() and ds_file.stem == path.stem, path.name
            assert cfg["num_processes"] == 8
    cpu = yaml.safe_load((CONFIG_DIR / "cpu_2proc.yaml").read_text())
    assert cpu["distributed_type"] == "MULTI_GPU" and cpu["use_cpu"] is True and cpu["num_processes"] == 2


@pytest.mark.parametrize("image_column", ["image", "images"])
def test_grpo_trainer_runs_on_prompt_dataset(catalog, multi_image_catalog, tiny_model_dir, tmp_path, image_column):
    """The one real check: TRL's GRPOTrainer takes the dataset as built and runs a step."""
    trl = pytest.importorskip("trl")
    from afmrl.modeling import load_mllm

    source = catalog if image_column == "image" else multi_image_catalog  # 2 images per prompt
    ds = build_prompt_dataset(source.select(range(4)), attribute_keys=ATTRIBUTE_KEYS, image_column=image_column)
    seen = {}

    def trivial_reward(completions, listing_id, attributes, **kwargs):
        seen.update(listing_id=list(listing_id), attributes=list(attributes), prompts=kwargs["prompts"])
        return [float(len(c[0]["content"])) for c in completions]

    model, processor = load_mllm(tiny_model_dir)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        num_generations=2,
        per_device_train_batch_size=2,
        max_completion_length=8,
        max_steps=1,
        report_to=[],
        activation_checkpointing=False,
        save_strategy="no",
        logging_steps=1,
        seed=0,
    )
    trainer = trl.GRPOTrainer(
        model=model, reward_funcs=trivial_reward, args=args, train_dataset=ds, processing_class=processor
    )
    trainer.train()
    assert trainer.state.global_step == 1
    assert set(seen["listing_id"]) <= set(ds["listing_id"]) and len(seen["listing_id"]) == 2
    assert isinstance(seen["attributes"][0], dict)
    content = seen["prompts"][0][0]["content"]  # TRL put the image block(s) before our text
    assert [part["type"] for part in content] == ["image"] * (1 if image_column == "image" else 2) + ["text"]
