import pytest
import torch
from PIL import Image

from afmrl.catalog.load import load_catalog
from afmrl.embedded.synthetic_catalog import make_synthetic_catalog
from afmrl.encoder.model import EncoderConfig, ProductEncoder
from afmrl.retrieval.evaluation import evaluate_encoder
from agcl.config import AGCLConfig
from agcl.trainer import AGCLTrainer, check_attribute_options


def _args(tmp_path, **overrides):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        num_train_epochs=8,
        learning_rate=1e-3,
        temperature=0.05,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=5,
        seed=0,
        disable_tqdm=True,
    )
    return AGCLConfig(**(base | overrides))


def test_short_agcl_run_improves_instance_recall(tiny_model_dir, tmp_path):
    catalog = make_synthetic_catalog(tmp_path / "catalog", num_products=200, seed=1)
    train = load_catalog(catalog, split="train")
    test = load_catalog(catalog, split="test")
    torch.manual_seed(0)
    encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=0, freeze_vision=False))
    before = evaluate_encoder(encoder, test, tasks=["instance"])["instance"]["recall@1"]
    trainer = AGCLTrainer(
        model=encoder,
        args=_args(
            tmp_path,
            false_negative_filter="attribute",
            weight_positive=False,
            per_device_train_batch_size=32,
            num_train_epochs=6,
        ),
        train_dataset=train,
    )
    trainer.train()
    after = evaluate_encoder(encoder, test, tasks=["instance"])["instance"]["recall@1"]
    assert after > before + 0.05, (before, after)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    trainer.save_model()
    reloaded = ProductEncoder.from_pretrained(tmp_path / "out")
    assert evaluate_encoder(reloaded, test, tasks=["instance"])["instance"]["recall@1"] == pytest.approx(
        after, abs=1e-6
    )
    assert (tmp_path / "out" / "bm25_idf.json").is_file()


def test_gradient_cache_gives_the_same_gradients_as_one_pass(tiny_model_dir, small_catalog_dir, tmp_path):
    train = load_catalog(small_catalog_dir, split="train")
    grads = {}
    for chunk in (None, 3):
        torch.manual_seed(0)
        encoder = ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=0))
        trainer = AGCLTrainer(
            model=encoder,
            args=_args(
                tmp_path,
                per_device_train_batch_size=8,
                gradient_cache_chunk_size=chunk,
                query_attribute_probability=0.0,
                false_negative_filter="relative",
            ),
            train_dataset=train,
        )
        items = [trainer.train_dataset.groups[i] for i in range(8)]
        batch = trainer.data_collator([{"query": rows[0], "positive": rows[1]} for rows in items])
        encoder.zero_grad()
        trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which this test bypasses
        loss = trainer.training_step(encoder, batch)
        grads[chunk] = (loss.item(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None})
    (loss_a, g_a), (loss_b, g_b) = grads[None], grads[3]
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for name in g_a:
        torch.testing.assert_close(g_b[name], g_a[name], atol=1e-5, rtol=1e-4)


def test_weighting_without_attribute_column_names_flag_and_column(small_catalog_dir):
    train = load_catalog(small_catalog_dir, split="train").remove_columns(["attributes"])
    args = AGCLConfig(
        output_dir="unused", hard_negative_weighting=True, false_negative_filter="none", query_attribute_probability=0.0
    )
    with pytest.raises(ValueError, match=r"--hard_negative_weighting.*'attributes'"):
        check_attribute_options(args, train)
    ok = AGCLConfig(
        output_dir="unused",
        hard_negative_weighting=False,
        false_negative_filter="relative",
        query_attribute_probability=0.0,
    )
    check_attribute_options(ok, train)  # nothing needs attributes: no error


def test_unknown_filter_lists_the_valid_ones():
    with pytest.raises(ValueError, match="none.*absolute.*relative.*attribute.*dynamic"):
        AGCLConfig(output_dir="unused", false_negative_filter="fuzzy")


def test_recipe_reports_user_errors_without_traceback(tmp_path, load_recipe, capsys):
    """In process (tests/test_entry_points_bad_data.py runs the recipe as a real process too)."""
    bad = tmp_path / "cat"
    bad.mkdir()
    Image.new("RGB", (8, 8)).save(bad / "a.png")
    (bad / "catalog.jsonl").write_text(
        '{"listing_id": "a", "product_id": "p", "title": "", "image": "a.png", "split": "train"}\n'
    )
    recipe = load_recipe("agcl_train")
    for argv, fragments in (
        (["--catalog", str(bad), "--output_dir", str(tmp_path / "o")], ("line 1", "'title'")),
        (["--false_negative_filter", "fuzzy"], ("fuzzy", "dynamic")),
        (["--save_sentence_transformer", "true", "--moe_experts", "2"], ("moe_experts=2", "sentence-transformers")),
    ):
        with pytest.raises(SystemExit) as info:
            recipe.cli(["--config", "recipes/configs/agcl_demo.yaml", *argv])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "Traceback" not in err, err[-2000:]
        assert all(f in err for f in fragments), err[-2000:]


def test_recipe_continues_training_from_a_saved_encoder(tiny_model_dir, small_catalog_dir, tmp_path):
    import sys as _sys

    _sys.path.insert(0, "recipes")
    import agcl_train
    from trl import ModelConfig, TrlParser

    from agcl.config import AGCLScriptArguments

    start = ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=4, lora_alpha=8))
    start.save_pretrained(tmp_path / "start")
    parser = TrlParser((AGCLScriptArguments, AGCLConfig, ModelConfig))
    args = parser.parse_args_and_config(
        [
            "--catalog",
            str(small_catalog_dir),
            "--init_encoder",
            str(tmp_path / "start"),
            "--output_dir",
            str(tmp_path / "continued"),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--eval_split",
            "none",
            "--use_cpu",
            "true",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--model_name_or_path",
            "ignored-because-init_encoder-is-set",
            "--save_sentence_transformer",
            "true",
        ]
    )
    trainer = agcl_train.main(*args)
    assert trainer.state.global_step == 2
    exported = tmp_path / "continued" / "sentence-transformer"
    assert (exported / "modules.json").is_file() and (exported / "model.safetensors").is_file()
    continued = ProductEncoder.from_pretrained(tmp_path / "continued")
    assert continued.config.lora_r == 4  # the saved encoder's settings, not the command line's model flags
    test = load_catalog(small_catalog_dir, split="test")
    images, titles = list(test["image"][:4]), list(test["title"][:4])
    before = ProductEncoder.from_pretrained(tmp_path / "start").encode(images, titles)
    assert not (abs(continued.encode(images, titles) - before) < 1e-6).all()  # the adapter trained further


def test_recipe_trains_on_the_title_column_it_is_given(tiny_model_dir, small_catalog_dir, tmp_path, load_recipe):
    """--title_column enriched_title: the encoder's training inputs carry the enriched titles, not the originals."""
    import json
    import shutil

    import trl

    from agcl.config import AGCLScriptArguments

    catalog = tmp_path / "catalog"
    shutil.copytree(small_catalog_dir, catalog)
    rows = [json.loads(line) for line in (catalog / "catalog.jsonl").read_text().splitlines()]
    for row in rows:
        row["enriched_title"] = f"zzenriched {row['title']}"
    (catalog / "catalog.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = load_recipe("agcl_train")
    parser = trl.TrlParser((AGCLScriptArguments, AGCLConfig, trl.ModelConfig))
    args = parser.parse_args_and_config(
        [
            "--config",
            "recipes/configs/agcl_demo.yaml",
            "--catalog",
            str(catalog),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--output_dir",
            str(tmp_path / "out"),
            "--eval_split",
            "none",
            "--title_column",
            "enriched_title",
        ]
    )
    trainer, encoder, _, _ = recipe.setup(*args)
    assert trainer.catalog["title"] == [f"zzenriched {t}" for t in trainer.catalog["title_original"]]
    seen = []
    build = encoder.build_inputs
    encoder.build_inputs = lambda images, titles, *a, **k: seen.extend(titles) or build(images, titles, *a, **k)
    next(iter(trainer.get_train_dataloader()))
    titles = [t for t in seen if t is not None]  # None: the image-only and attribute-line passes of the intra term
    assert titles and all(t.startswith("zzenriched ") for t in titles)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_gradients(tiny_model_dir, small_catalog_dir, tmp_path, reentrant):
    """--activation_checkpointing on a LoRA encoder: same loss and gradients, every adapter still gets one.

    Reentrant checkpointing reaches the adapters only when the (frozen) embeddings' output requires
    grad, so both modes are checked.
    """
    train = load_catalog(small_catalog_dir, split="train")
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = ProductEncoder.from_backbone(
            EncoderConfig(backbone=str(tiny_model_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0)
        )
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # LoRA's B starts at zero, which would leave every A without a gradient
            for param in encoder.parameters():
                if param.requires_grad:
                    param.add_(0.05 * torch.randn(param.shape, generator=gen))
        trainer = AGCLTrainer(
            model=encoder,
            args=_args(tmp_path, per_device_train_batch_size=8, query_attribute_probability=0.0),
            train_dataset=train,
        )
        if checkpointing:
            encoder.activation_checkpointing_enable({"use_reentrant": reentrant})
            assert encoder.is_activation_checkpointing
        items = [trainer.train_dataset.groups[i] for i in range(8)]
        batch = trainer.data_collator([{"query": rows[0], "positive": rows[1]} for rows in items])
        encoder.train()
        trainer.current_gradient_accumulation_steps = 1
        loss = trainer.training_step(encoder, batch)
        grads[checkpointing] = (loss.item(), {n: p.grad for n, p in encoder.named_parameters() if p.requires_grad})
    (loss_a, g_a), (loss_b, g_b) = grads[False], grads[True]
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert g_a.keys() == g_b.keys() and len(g_a) > 0
    for name in g_a:
        assert g_b[name] is not None and g_b[name].abs().sum() > 0, name
        torch.testing.assert_close(g_b[name], g_a[name], atol=1e-5, rtol=1e-4)


def test_recipe_trains_with_activation_checkpointing(tiny_model_dir, small_catalog_dir, tmp_path, load_recipe):
    """The paper-scale recipe turns on --activation_checkpointing; the Trainer then calls it on the encoder."""
    from trl import ModelConfig, TrlParser

    from agcl.config import AGCLScriptArguments

    agcl_train = load_recipe("agcl_train")
    parser = TrlParser((AGCLScriptArguments, AGCLConfig, ModelConfig))
    args = parser.parse_args_and_config(
        [
            "--catalog",
            str(small_catalog_dir),
            "--model_name_or_path",
            str(tiny_model_dir),
            "--use_peft",
            "true",
            "--lora_r",
            "4",
            "--activation_checkpointing",
            "true",
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "2",
            "--per_device_train_batch_size",
            "8",
            "--eval_split",
            "none",
            "--use_cpu",
            "true",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
        ]
    )
    trainer = agcl_train.main(*args)
    assert trainer.state.global_step == 2 and trainer.model.is_activation_checkpointing
