"""recipes/rar_grpo.py end to end on tiny models: LoRA, QLoRA, RLOO, resume, and bad input before any model loads."""

import json
import math

import pytest
import torch
import trl
from safetensors.torch import load_file

from afmrl.catalog.load import load_catalog
from afmrl.embedded.synthetic_catalog import make_synthetic_catalog
from afmrl.modeling import language_lora_targets

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recipe(load_recipe):
    return load_recipe("rar_grpo")


# The demo annotates the reward's gallery with its starting policy and keeps a KL reference; most tests here are
# about other things, and run faster with the teacher-annotated gallery and no reference model.
PRE_DEMO_RL = ["--gallery_attributes", "reference", "--beta", "0.0"]


def base_args(catalog, encoder, policy, out, *extra):
    return [
        "--config",
        "recipes/configs/rar_demo.yaml",
        *PRE_DEMO_RL,
        "--catalog",
        str(catalog),
        "--encoder",
        str(encoder),
        "--encoder_recipe",
        "",
        "--sft_recipe",
        "",
        "--model_name_or_path",
        str(policy),
        "--output_dir",
        str(out),
        "--split",
        "train",
        "--max_train_listings",
        "8",
        "--max_eval_listings",
        "24",
        "--num_generations",
        "4",
        "--per_device_train_batch_size",
        "4",
        "--max_completion_length",
        "24",
        "--max_steps",
        "3",
        "--logging_steps",
        "1",
        "--learning_rate",
        "5e-3",
        "--disable_tqdm",
        "true",
        "--eval_batch_size",
        "8",
        "--seed",
        "0",
        *extra,
    ]


class Snapshot:
    """Wraps a trainer class so the test sees the policy's parameters as training starts."""

    def __init__(self, cls):
        self.before = {}
        outer = self

        class Spy(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                outer.before = {n: p.detach().clone() for n, p in self.model.named_parameters()}
                outer.trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}

        self.cls = Spy


def changed_and_frozen(snapshot, model):
    after = dict(model.named_parameters())
    changed = {
        n
        for n in snapshot.trainable
        if not torch.equal(snapshot.before[n], after[n].detach().float().to(snapshot.before[n].dtype))
    }
    frozen_moved = {
        n
        for n in snapshot.before
        if n not in snapshot.trainable and not torch.equal(snapshot.before[n], after[n].detach())
    }
    return changed, frozen_moved


@pytest.mark.parametrize("checkpointing", ["false", "true"])  # the paper-scale recipes turn it on
def test_lora_grpo_trains_adapters_only_and_reports(
    recipe, monkeypatch, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path, checkpointing
):
    spy = Snapshot(trl.GRPOTrainer)
    monkeypatch.setattr(recipe, "GRPOTrainer", spy.cls)
    out = tmp_path / "run"
    trainer = recipe.cli(
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            warm_policy_dir,
            out,
            "--use_peft",
            "true",
            "--lora_r",
            "8",
            "--lora_alpha",
            "16",
            "--activation_checkpointing",
            checkpointing,
        )
    )

    assert spy.trainable and all("lora_" in n for n in spy.trainable)
    assert not any("visual" in n for n in spy.trainable)  # LoRA on the language model only
    assert trainer.model.get_base_model().is_activation_checkpointing == (checkpointing == "true")
    changed, frozen_moved = changed_and_frozen(spy, trainer.model)
    assert changed == spy.trainable, f"LoRA tensors that did not change: {sorted(spy.trainable - changed)[:5]}"
    assert not frozen_moved, f"base weights moved: {sorted(frozen_moved)[:5]}"

    steps = [h for h in trainer.state.log_history if "reward" in h]
    assert len(steps) == 3 and all(math.isfinite(h["rewards/retrieval_rank/mean"]) for h in steps)
    assert (out / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "trainer_state.json").read_text())["log_history"]  # the per-step log survives the run
    assert [h["rewards/retrieval_rank/mean"] for h in saved if "reward" in h] == [
        h["rewards/retrieval_rank/mean"] for h in steps
    ]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"] == "both_sides"
    if metrics["gallery_attributes"] == "none":  # without text on either side the two protocols are one computation
        assert metrics["reward_gallery"]["no_attributes"] == metrics["no_attributes"]
    else:  # the reward's gallery carries stored attributes, the deployment gallery none
        assert metrics["reward_gallery"]["no_attributes"] != metrics["no_attributes"]
    for source in ("no_attributes", "sft_attributes", "rar_attributes"):
        assert set(metrics[source]) >= {"recall@1", "recall@5", "recall@10"}
        assert set(metrics["reward_gallery"][source]) >= {"recall@1", "recall@5", "recall@10"}
        assert all(0.0 <= metrics[source][k] <= 1.0 for k in ("recall@1", "recall@5", "recall@10"))
        assert metrics[source]["n_queries"] + metrics[source]["n_skipped"] == 24
    assert (out / "reward_curve.png").stat().st_size > 0 and (out / "recall.png").stat().st_size > 0
    rows = [json.loads(line) for line in (out / "attributes.jsonl").read_text().splitlines()]
    assert len(rows) == 24 and set(rows[0]) == {"listing_id", "sft_attributes", "rar_attributes"}


def test_full_finetune_keeps_the_vision_tower_frozen(
    recipe, monkeypatch, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path
):
    spy = Snapshot(trl.GRPOTrainer)
    monkeypatch.setattr(recipe, "GRPOTrainer", spy.cls)
    trainer = recipe.cli(
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            warm_policy_dir,
            tmp_path / "run",
            "--freeze_vision",
            "true",
            "--eval_split",
            "none",
        )
    )
    assert spy.trainable and not any(".visual." in f".{n}" for n in spy.trainable)
    _, frozen_moved = changed_and_frozen(spy, trainer.model)
    assert not frozen_moved
    # neither placeholder is ever sampled, and the saved policy decodes under the same mask
    placeholders = sorted([trainer.model.config.image_token_id, trainer.model.config.video_token_id])
    assert sorted(trainer.generation_kwargs["suppress_tokens"]) == placeholders
    saved = json.loads((tmp_path / "run" / "generation_config.json").read_text())
    assert sorted(saved["suppress_tokens"]) == placeholders
    with torch.no_grad():  # and the loss scores the distribution that was sampled: no mass on them in a forward pass
        logits = trainer.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert (logits[..., placeholders] == -1e4).all()


def test_qlora_4bit_grpo(recipe, monkeypatch, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    spy = Snapshot(trl.GRPOTrainer)
    monkeypatch.setattr(recipe, "GRPOTrainer", spy.cls)
    trainer = recipe.cli(
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            warm_policy_dir,
            tmp_path / "run",
            "--use_peft",
            "true",
            "--load_in_4bit",
            "true",
            "--lora_r",
            "8",
            "--max_eval_listings",
            "8",
        )
    )
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    changed, frozen_moved = changed_and_frozen(spy, trainer.model)
    assert changed == spy.trainable and not frozen_moved
    assert all(math.isfinite(h["reward"]) for h in trainer.state.log_history if "reward" in h)


def test_rloo_is_the_alternative_trainer(recipe, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path):
    trainer = recipe.cli(
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            warm_policy_dir,
            tmp_path / "run",
            "--rl_algorithm",
            "rloo",
            "--eval_split",
            "none",
            "--max_steps",
            "2",
        )
    )
    assert isinstance(trainer, trl.RLOOTrainer)
    assert trainer.state.global_step == 2
    assert trainer.args.num_generations == 4 and trainer.args.max_completion_length == 24


def test_sft_likelihood_gate_damps_positive_advantages_in_a_run(
    recipe, monkeypatch, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path
):
    from rar.advantage_gate import SFTGatedGRPOTrainer, sft_likelihood_gate

    batches = []

    class Spy(SFTGatedGRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            out = super()._generate_and_score_completions(inputs)
            before = torch.tensor(list(self._logs["advantages"])[-len(out["advantages"]) :])
            batches.append((before, out["advantages"].detach().clone(), out["ref_per_token_logps"], out))
            return out

    monkeypatch.setattr(recipe, "SFTGatedGRPOTrainer", Spy)
    argv = ["--advantage_gate", "sft_likelihood", "--beta", "0.04", "--eval_split", "none", "--max_steps", "2"]
    trainer = recipe.cli(base_args(small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path / "run", *argv))
    assert isinstance(trainer, SFTGatedGRPOTrainer) and trainer.state.global_step == 2 and batches
    for before, after, ref, out in batches:
        weights = sft_likelihood_gate(before, ref, out["completion_mask"], 4)
        torch.testing.assert_close(after, before * weights)
        assert torch.equal(after[before <= 0], before[before <= 0])
    logged = [h["gate/weight_positive"] for h in trainer.state.log_history if "gate/weight_positive" in h]
    assert logged and all(0 < w <= 1 for w in logged)
    assert any((b[1] != b[0]).any() for b in batches)  # the tiny policy's samples differ enough to be gated


@pytest.mark.usefixtures("no_models")
def test_advantage_gate_needs_grpo_with_a_reference(
    recipe, capsys, small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path
):
    gate = ["--advantage_gate", "sft_likelihood"]
    expect_exit(
        recipe, capsys, base_args(small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, *gate), "--beta"
    )
    expect_exit(
        recipe,
        capsys,
        base_args(small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, *gate, "--rl_algorithm", "rloo"),
        "--advantage_gate",
    )
    expect_exit(
        recipe,
        capsys,
        base_args(small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, "--advantage_gate", "ada"),
        "--advantage_gate",
    )


def test_resume_continues_at_the_step_it_stopped(
    recipe, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path
):
    out = tmp_path / "run"
    common = [
        "--use_peft",
        "true",
        "--lora_r",
        "8",
        "--eval_split",
        "none",
        "--save_strategy",
        "steps",
        "--save_steps",
        "2",
    ]
    recipe.cli(base_args(small_catalog_dir, tiny_encoder_dir, warm_policy_dir, out, *common, "--max_steps", "2"))
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "optimizer.pt").is_file()
    saved = load_file(checkpoint / "adapter_model.safetensors")

    trainer = recipe.cli(
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            warm_policy_dir,
            out,
            *common,
            "--max_steps",
            "4",
            "--resume_from_checkpoint",
            str(checkpoint),
        )
    )
    assert trainer.state.global_step == 4
    logged = [h["step"] for h in trainer.state.log_history if "reward" in h]
    assert logged == [1, 2, 3, 4]  # the history of the first run continues, no step repeated
    final = load_file(out / "checkpoint-4" / "adapter_model.safetensors")
    assert any(not torch.equal(saved[k], final[k]) for k in saved)


# ------------------------------------------------------------------ bad input: exit 2 before any model loads


@pytest.fixture
def no_models(recipe, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(recipe, "load_policy", refuse)
    monkeypatch.setattr("rar.annotate.load_policy", refuse)
    monkeypatch.setattr("rar.pipeline.run_recipe", refuse)
    monkeypatch.setattr("afmrl.encoder.model.ProductEncoder.from_pretrained", refuse)


def expect_exit(recipe, capsys, argv, *fragments):
    with pytest.raises(SystemExit) as info:
        recipe.cli(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err  # progress bars go to stderr too
    assert any(line.startswith("error: ") for line in err.splitlines()) and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.usefixtures("no_models")
def test_4bit_without_bitsandbytes_names_the_extra(
    recipe, capsys, monkeypatch, small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path
):
    """bitsandbytes is the optional [quantization] extra: --load_in_4bit without it is one line naming it."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a)
    )
    expect_exit(
        recipe,
        capsys,
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            tiny_model_dir,
            tmp_path / "o",
            "--use_peft",
            "true",
            "--load_in_4bit",
            "true",
        ),
        "--load_in_4bit needs bitsandbytes",
        "afmrl[quantization]",
    )


@pytest.mark.usefixtures("no_models")
def test_encoder_dir_that_is_not_an_agcl_encoder(recipe, capsys, small_catalog_dir, tiny_model_dir, tmp_path):
    expect_exit(
        recipe,
        capsys,
        base_args(small_catalog_dir, tiny_model_dir, tiny_model_dir, tmp_path),
        "is not an AGCL encoder",
        "encoder_config.json",
    )
    expect_exit(
        recipe, capsys, base_args(small_catalog_dir, tmp_path / "nowhere", tiny_model_dir, tmp_path), "does not exist"
    )


@pytest.mark.usefixtures("no_models")
def test_catalog_without_images(recipe, capsys, tiny_encoder_dir, tiny_model_dir, tmp_path):
    catalog = tmp_path / "no-images"
    catalog.mkdir()
    rows = [
        {"listing_id": f"L{i}", "product_id": f"P{i // 2}", "title": f"mug {i}", "split": "train"} for i in range(4)
    ]
    (catalog / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    expect_exit(recipe, capsys, base_args(catalog, tiny_encoder_dir, tiny_model_dir, tmp_path / "o"), "line 1", "image")


@pytest.mark.usefixtures("no_models")
def test_unknown_reward_name(recipe, capsys, small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path):
    expect_exit(
        recipe,
        capsys,
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            tiny_model_dir,
            tmp_path,
            "--reward_funcs",
            "retrieval_rank",
            "rank_of_the_moon",
            "--reward_weights",
            "1.0",
            "1.0",
        ),
        "rank_of_the_moon",
    )


@pytest.mark.usefixtures("no_models")
def test_reward_weights_that_do_not_match(
    recipe, capsys, small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path
):
    expect_exit(
        recipe,
        capsys,
        base_args(small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, "--reward_weights", "1.0"),
        "reward",
    )


@pytest.mark.usefixtures("no_models")
def test_num_generations_that_does_not_divide_the_batch(
    recipe, capsys, small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path
):
    expect_exit(
        recipe,
        capsys,
        base_args(small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, "--num_generations", "3"),
        "num_generations",
        "(3)",
    )


@pytest.mark.usefixtures("no_models")
def test_bad_reward_kwargs_and_algorithm(recipe, capsys, small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path):
    expect_exit(
        recipe,
        capsys,
        base_args(small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, "--reward_kwargs", "{not json"),
        "--reward_kwargs",
    )
    expect_exit(
        recipe,
        capsys,
        base_args(small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, "--rl_algorithm", "ppo"),
        "--rl_algorithm",
        "TRL",
    )


def test_catalog_row_errors_name_the_row(recipe, capsys, tiny_encoder_dir, tiny_model_dir, tmp_path):
    catalog = make_synthetic_catalog(tmp_path / "c", num_products=12, seed=0)
    lines = (catalog / "catalog.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["title"] = ""
    lines[2] = json.dumps(row)
    (catalog / "catalog.jsonl").write_text("\n".join(lines) + "\n")
    expect_exit(
        recipe,
        capsys,
        base_args(catalog, tiny_encoder_dir, tiny_model_dir, tmp_path / "o"),
        "line 3",
        row["listing_id"],
        "title",
    )


def test_annotated_gallery_protocol(recipe, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path):
    out = tmp_path / "run"
    trainer = recipe.cli(
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            warm_policy_dir,
            out,
            "--gallery_attributes",
            "reference",
            "--max_steps",
            "1",
        )
    )
    reward = trainer.reward_funcs[0]
    assert reward._state.gallery.info["attribute_column"] == "attributes"
    assert reward.counters["gallery_baselines"] == 0  # baselines re-encoded: gallery vectors carry attributes
    assert json.loads((out / "metrics.json").read_text())["gallery_attributes"] == "reference"


def test_policy_annotated_gallery(recipe, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path):
    """--gallery_attributes policy: before RL the starting policy annotates the reward's gallery split once
    (greedy, written to gallery_attributes.jsonl) and the reward's gallery vectors carry those attributes;
    the reward-gallery evaluation's gallery carries the starting policy's attributes too."""
    from afmrl.attributes import parse_attributes

    out = tmp_path / "run"
    trainer = recipe.cli(
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            warm_policy_dir,
            out,
            "--gallery_attributes",
            "policy",
            "--beta",
            "0.04",
            "--max_steps",
            "1",
        )
    )  # the demo's RL
    train_ids = set(load_catalog(small_catalog_dir, split="train")["listing_id"])
    written = [json.loads(line) for line in (out / "gallery_attributes.jsonl").read_text().splitlines()]
    assert {row["listing_id"] for row in written} == train_ids  # the gallery split (--split train), once each
    assert sum(bool(parse_attributes(row["completion"]).attributes) for row in written) > len(written) // 2
    gallery = trainer.reward_funcs[0]._state.gallery
    assert gallery.info["attribute_column"] == "policy_attributes" and gallery.size == len(train_ids)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["gallery_attributes"] == "policy"
    # At step 0 the two protocols coincide for the starting policy: its attributes on queries and gallery.
    assert metrics["reward_gallery"]["sft_attributes"]["recall@1"] == metrics["sft_attributes"]["recall@1"]


def test_reward_gallery_of_several_splits(recipe, small_catalog_dir, tiny_encoder_dir, warm_policy_dir, tmp_path):
    """--gallery_split train test: the policy annotates the listings of both splits (a rerun annotates only the
    ones gallery_attributes.jsonl lacks), the reward indexes both splits and scores the --split prompts."""
    out = tmp_path / "run"
    out.mkdir()
    train, test = (load_catalog(small_catalog_dir, split=s) for s in ("train", "test"))
    earlier = "".join(json.dumps({"listing_id": lid, "completion": "color: red"}) + "\n" for lid in train["listing_id"])
    (out / "gallery_attributes.jsonl").write_text(earlier)  # as an earlier run with the train gallery left it
    trainer = recipe.cli(
        base_args(
            small_catalog_dir,
            tiny_encoder_dir,
            warm_policy_dir,
            out,
            "--gallery_attributes",
            "policy",
            "--gallery_split",
            "train",
            "test",
            "--max_steps",
            "1",
            "--eval_split",
            "none",
        )
    )
    lines = (out / "gallery_attributes.jsonl").read_text().splitlines()
    assert lines[: len(train)] == earlier.splitlines()  # kept, not regenerated
    assert [json.loads(line)["listing_id"] for line in lines[len(train) :]] == list(test["listing_id"])
    reward = trainer.reward_funcs[0]
    assert sorted(reward._state.gallery.listing_ids) == sorted([*train["listing_id"], *test["listing_id"]])
    kept = dict(zip(reward.catalog["listing_id"], reward.catalog["policy_attributes"], strict=True))
    assert {k: v for k, v in kept[train["listing_id"][0]].items() if v is not None} == {
        "color": "red"
    }  # arrow pads keys
    assert reward.counters["completions"] > 0 and reward.counters["unscorable"] < reward.counters["completions"]


@pytest.mark.usefixtures("no_models")
def test_unknown_gallery_split(recipe, capsys, small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path):
    expect_exit(
        recipe,
        capsys,
        base_args(small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, "--gallery_split", "train", "gallry"),
        "gallry",
    )


@pytest.mark.usefixtures("no_models")
def test_gallery_attributes_column_must_exist(
    recipe, capsys, small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path
):
    expect_exit(
        recipe,
        capsys,
        base_args(
            small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, "--gallery_attributes", "stored_attrs"
        ),
        "--gallery_attributes",
        "stored_attrs",
    )


@pytest.mark.slow
def test_demo_stages_train_then_reuse_encoder_and_warm_start(
    recipe, monkeypatch, capsys, small_catalog_dir, tiny_model_dir, tmp_path
):
    """--encoder_recipe / --sft_recipe: stage 1 and the SFT warm start run (as child recipes) when their
    outputs are missing, and are reused, not rerun, when present -- unless they were trained on another catalog."""
    import shutil

    import yaml

    def short(config, **changes):
        data = yaml.safe_load(open(f"recipes/configs/{config}"))
        data.update(changes, save_strategy="no", disable_tqdm=True)
        path = tmp_path / config
        path.write_text(yaml.safe_dump(data))
        return str(path)

    agcl = short(
        "agcl_demo.yaml",
        max_steps=2,
        per_device_train_batch_size=8,
        eval_split="none",
        model_name_or_path=str(tiny_model_dir),
    )
    sft = short("sft_demo.yaml", max_steps=2, per_device_train_batch_size=4)
    out, encoder = tmp_path / "run", tmp_path / "encoder"
    argv = base_args(
        small_catalog_dir,
        encoder,
        tiny_model_dir,
        out,
        "--encoder_recipe",
        agcl,
        "--sft_recipe",
        sft,
        "--max_steps",
        "1",
        "--eval_split",
        "none",
    )
    recipe.cli(argv)
    assert (encoder / "encoder_config.json").is_file()
    assert (out / "sft" / "config.json").is_file() and (out / "model.safetensors").is_file()

    monkeypatch.setattr("rar.pipeline.run_recipe", lambda *a, **k: pytest.fail(f"stage rerun: {a[0]}"))
    trainer = recipe.cli(argv)  # both stages reused
    assert trainer.state.global_step == 1
    assert json.loads((encoder / "training_catalog.json").read_text())["split"] == "train"

    # The same output directories with another catalog: refused by name, before anything loads or trains.
    other = make_synthetic_catalog(tmp_path / "other", num_products=80, seed=1)
    argv[argv.index("--catalog") + 1] = str(other)
    expect_exit(recipe, capsys, argv, f"--encoder {str(encoder)!r} exists and would be reused", "another catalog")
    shutil.rmtree(encoder)  # with the encoder retrained, the SFT policy is the stale one
    expect_exit(recipe, capsys, argv, "--sft_recipe's output", "another catalog")


@pytest.mark.usefixtures("no_models")
@pytest.mark.parametrize(
    "remove,message", [("chat_template.jinja", "no chat template"), ("processor_config.json", "image processor")]
)
def test_policy_processor_that_cannot_serve_rar(
    recipe, capsys, small_catalog_dir, tiny_encoder_dir, tiny_model_dir, tmp_path, remove, message
):
    import shutil

    policy = tmp_path / "policy"
    shutil.copytree(tiny_model_dir, policy)
    (policy / remove).unlink()
    expect_exit(recipe, capsys, base_args(small_catalog_dir, tiny_encoder_dir, policy, tmp_path / "o"), message)


def test_full_finetune_from_a_lora_adapter_trains_the_merged_weights(tiny_model_dir, tmp_path):
    """A LoRA SFT output as the start of full-weight RL: merged into its base, the language weights
    train again (peft loads adapters frozen, and merging kept that: GRPO then had nothing to train)."""
    from peft import LoraConfig, get_peft_model

    from afmrl.modeling import load_mllm
    from rar.policy import LM_LORA_TARGETS, load_policy

    base, _ = load_mllm(str(tiny_model_dir))
    base_weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    targets = language_lora_targets(base, LM_LORA_TARGETS)
    adapted = get_peft_model(base, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "adapter")

    model, _, peft_config = load_policy(
        trl.ModelConfig(model_name_or_path=str(tmp_path / "adapter")), freeze_vision=True
    )
    assert peft_config is None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and all(".visual." not in f".{n}" for n in trainable)
    assert frozen and all(".visual." in f".{n}" for n in frozen)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, base_weights[n])]
    assert moved and all(any(t in n for t in LM_LORA_TARGETS) for n in moved)  # the adapter was merged in


def test_the_demo_cites_the_fair_tests_confirmatory_figure(recipe, tmp_path):
    def seed(sft, rar):
        return {
            "+ SFT (distilled) attributes": {"instance": {"recall@1": sft, "n_queries": 3100}},
            "+ RAR attributes": {"instance": {"recall@1": rar, "n_queries": 3100}},
        }

    path = tmp_path / "ladder_paper.json"
    path.write_text(json.dumps({"seeds": {"0": seed(0.50, 0.51), "1": seed(0.48, 0.50)}}))
    line = recipe.fair_test_line(path)
    assert "+1.5 ± 0.7 (95% CI -4.9 to +7.9, n = 2) R@1, inconclusive against the paper's +1.86 (interim" in line
    assert ">= 3100" in line
    path.write_text(json.dumps({"seeds": {"0": seed(0.50, 0.51)}}))
    assert "+1.0 (n = 1) R@1, one seed so far: an example, no verdict" in recipe.fair_test_line(path)
    assert recipe.fair_test_line(tmp_path / "missing.json") is None
    path.write_text("{}")
    assert recipe.fair_test_line(path) is None
    assert recipe.fair_test_line() is not None  # the repository's own ladder is readable
