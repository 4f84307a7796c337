"""recipes/cit.py: one cyclic-iterative-training round (re-annotate with the generator, continue AGCL, compare)."""

import json

import pytest
from safetensors.torch import load_file

from afmrl.catalog.load import load_catalog


@pytest.mark.slow
def test_one_cit_round(load_recipe, warm_policy_dir, tiny_encoder_dir, small_catalog_dir, tmp_path):
    cit = load_recipe("cit")
    out = tmp_path / "cit"
    args = cit.CITArguments(
        generator=str(warm_policy_dir),
        encoder=str(tiny_encoder_dir),
        catalog=str(small_catalog_dir),
        fraction=0.5,
        epochs=4,
        output_dir=str(out),
        prompt_template=cit.CITArguments.prompt_template,
        batch_size=16,
    )
    results = cit.main(args)

    # Half of the train products, every one of their listings, re-annotated by the generator.
    train = load_catalog(small_catalog_dir, split="train")
    copy = load_catalog(out / "catalog")
    products = set(copy["product_id"])
    assert 0 < len(products) < len(set(train["product_id"]))
    assert sum(p in products for p in train["product_id"]) == len(copy)
    assert "attributes_previous" in copy.column_names
    generated = [json.loads(line) for line in (out / "catalog" / "generations.jsonl").read_text().splitlines()]
    assert len(generated) == len(copy)

    # The round continued the given encoder and changed it.
    before = load_file(tiny_encoder_dir / "model.safetensors")
    after = load_file(out / "encoder" / "model.safetensors")
    assert before.keys() == after.keys() and any(not (before[k] == after[k]).all() for k in before)

    assert set(results) == {
        f"{when}, {src}"
        for when in ("before CIT", "after one CIT round")
        for src in ("no attributes", "rar attributes")
    }
    assert all(0 <= m["recall@1"] <= 1 for m in results.values())
    assert json.loads((out / "cit_metrics.json").read_text()) == results
