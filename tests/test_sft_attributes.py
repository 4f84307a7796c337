"""recipes/sft_attributes.py: TRL SFTTrainer warm-starts the tiny Qwen2-VL into writing attribute lines."""

import pytest
import torch

from afmrl.attributes import parse_attributes
from afmrl.catalog.load import load_catalog
from afmrl.embedded.synthetic_catalog import ATTRIBUTE_KEYS
from afmrl.modeling import load_mllm
from rar.prompts import build_sft_dataset

trl = pytest.importorskip("trl")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recipe(load_recipe):
    return load_recipe("sft_attributes")


def parse(recipe, argv):
    parser = trl.TrlParser((recipe.SFTScriptArguments, trl.SFTConfig, trl.ModelConfig))
    return parser.parse_args_and_config(argv)


def greedy_answers(model_dir, rows):
    model, processor = load_mllm(model_dir)
    processor.tokenizer.padding_side = "left"
    answers = []
    for row in rows:
        user = row["messages"][0]
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user["content"]}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        batch = processor(text=[text], images=[row["image"]], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=40, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def known_pairs(text):
    parsed = parse_attributes(text, known_keys=ATTRIBUTE_KEYS)
    return [k for k in parsed.attributes if k not in parsed.unknown_keys]


def test_sft_recipe_learns_attribute_lines(recipe, tiny_model_dir, small_catalog_dir, tmp_path):
    out = tmp_path / "sft"
    args = parse(
        recipe,
        [
            "--catalog",
            str(small_catalog_dir),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--max_train_listings",
            "8",
            "--output_dir",
            str(out),
            "--max_steps",
            "40",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-2",
            "--lr_scheduler_type",
            "constant",
            "--assistant_only_loss",
            "true",
            "--activation_checkpointing",
            "false",
            "--logging_steps",
            "5",
            "--save_strategy",
            "no",
            "--bf16",
            "false",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--seed",
            "0",
        ],
    )
    rows = list(build_sft_dataset(load_catalog(small_catalog_dir, split="train").select(range(2))))
    assert not any(len(known_pairs(a)) >= 2 for a in greedy_answers(tiny_model_dir, rows))  # random policy: soup

    trainer = recipe.main(*args)

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses
    assert (out / "config.json").is_file() and (out / "processor_config.json").is_file()
    for answer in greedy_answers(out, rows):  # reloads the saved model + processor
        assert len(known_pairs(answer)) >= 2, answer


def test_bad_catalog_exits_2_with_one_line(tmp_path, load_recipe, capsys):
    """In process (tests/test_entry_points_bad_data.py runs the recipe as a real process too)."""
    with pytest.raises(SystemExit) as info:
        load_recipe("sft_attributes").cli(
            [
                "--catalog",
                str(tmp_path / "missing"),
                "--output_dir",
                str(tmp_path / "o"),
                "--use_cpu",
                "true",
                "--bf16",
                "false",
                "--report_to",
                "none",
            ]
        )
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "missing" in errors[0], err[-2000:]
    assert "Traceback" not in err


def test_freeze_vision_trains_the_language_model_and_keeps_the_vision_tower(
    recipe, tiny_model_dir, small_catalog_dir, tmp_path
):
    from safetensors.torch import load_file

    out = tmp_path / "sft-frozen"
    args = parse(
        recipe,
        [
            "--catalog",
            str(small_catalog_dir),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--max_train_listings",
            "8",
            "--freeze_vision",
            "true",
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
            "--learning_rate",
            "1e-2",
            "--assistant_only_loss",
            "true",
            "--activation_checkpointing",
            "false",
            "--save_strategy",
            "no",
            "--bf16",
            "false",
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--seed",
            "0",
        ],
    )
    recipe.main(*args)

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    vision = [k for k in before if "visual." in k]
    language = [k for k in before if "layers." in k and "visual." not in k and "norm" not in k]
    assert vision and language and set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) for k in vision)
    assert sum(not torch.equal(before[k], after[k]) for k in language) > len(language) // 2


def test_freeze_vision_on_a_model_without_a_known_vision_tower_exits_2(
    recipe, tiny_model_dir, small_catalog_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(recipe, "freeze_vision_tower", lambda model: 0)  # as for a tower under another name
    with pytest.raises(SystemExit) as info:
        recipe.cli(
            [
                "--catalog",
                str(small_catalog_dir),
                "--model_name_or_path",
                str(tiny_model_dir),
                "--cache_dir",
                str(tmp_path / "cache"),
                "--freeze_vision",
                "true",
                "--output_dir",
                str(tmp_path / "o"),
                "--use_cpu",
                "true",
                "--bf16",
                "false",
                "--report_to",
                "none",
            ]
        )
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert info.value.code == 2 and len(errors) == 1 and "--freeze_vision" in errors[0], err[-2000:]
    assert not (tmp_path / "o" / "model.safetensors").exists()
