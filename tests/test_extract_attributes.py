"""recipes/extract_attributes.py: batched annotation into a catalog copy, resumable, nothing dropped silently."""

import hashlib
import json

import pytest

from afmrl.attributes import parse_attributes
from afmrl.catalog.load import CatalogError, load_catalog

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def recipe(load_recipe):
    return load_recipe("extract_attributes")


def run(recipe, model, catalog, out, **kw):
    args = recipe.ExtractArguments(
        model=str(model), catalog=str(catalog), output_dir=str(out), batch_size=4, max_new_tokens=32, **kw
    )
    return recipe.main(args)


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_annotates_a_copy_and_resumes(recipe, warm_policy_dir, small_catalog_dir, tmp_path):
    source_digest = digest(small_catalog_dir / "catalog.jsonl")
    # An "interrupted" run (6 listings), then the full one (10): only the 4 missing are generated.
    out = tmp_path / "annotated"
    first = run(recipe, warm_policy_dir, small_catalog_dir, out, limit=6)
    assert first["n_generated"] == 6 and first["n_resumed"] == 0
    second = run(recipe, warm_policy_dir, small_catalog_dir, out, limit=10)
    assert second["n_generated"] == 4 and second["n_resumed"] == 6
    log = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(log) == 10 and len({r["listing_id"] for r in log}) == 10

    # The same completions as one uninterrupted run (greedy decoding is deterministic).
    whole = tmp_path / "whole"
    run(recipe, warm_policy_dir, small_catalog_dir, whole, limit=10)
    assert {r["listing_id"]: r["completion"] for r in log} == {
        r["listing_id"]: r["completion"]
        for r in map(json.loads, (whole / "generations.jsonl").read_text().splitlines())
    }

    copy = load_catalog(out)  # a valid catalog directory, images included
    source = load_catalog(small_catalog_dir).select(range(10))
    assert copy["listing_id"] == source["listing_id"] and copy["title"] == source["title"]
    assert copy["attributes_previous"] == source["attributes"]  # the teacher's column is kept beside
    by_id = {r["listing_id"]: r["completion"] for r in log}
    for lid, attrs in zip(copy["listing_id"], copy["attributes"], strict=True):
        expected = parse_attributes(by_id[lid]).attributes
        assert (attrs or {}) == expected
    summary = json.loads((out / "extraction_summary.json").read_text())
    assert summary["n_unparsable"] == sum(a is None for a in copy["attributes"])
    assert copy[0]["image"].size == source[0]["image"].size
    assert digest(small_catalog_dir / "catalog.jsonl") == source_digest  # the source is untouched


def test_a_torn_last_line_is_regenerated(recipe, warm_policy_dir, small_catalog_dir, tmp_path):
    out = tmp_path / "a"
    run(recipe, warm_policy_dir, small_catalog_dir, out, limit=4, column="generated")
    lines = (out / "generations.jsonl").read_text().splitlines()
    (out / "generations.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # killed mid-write
    summary = run(recipe, warm_policy_dir, small_catalog_dir, out, limit=4, column="generated")
    assert summary["n_resumed"] == 3 and summary["n_generated"] == 1
    copy = load_catalog(out)
    assert "generated" in copy.column_names and "attributes" in copy.column_names  # a new column, teacher kept


def test_bad_catalog_fails_before_the_model_loads(recipe, monkeypatch, tmp_path):
    monkeypatch.setattr(recipe, "load_generator", lambda *a, **k: pytest.fail("model loaded before the catalog check"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "catalog.jsonl").write_text('{"listing_id": "L1", "product_id": "P1", "title": "x", "image": "nope.png"}\n')
    with pytest.raises(CatalogError, match="line 1"):
        run(recipe, "tiny-qwen2-vl", bad, tmp_path / "out")


def test_title_task_writes_enriched_titles_and_counts_empty_ones(recipe, small_catalog_dir, tmp_path, monkeypatch):
    """--task title: the title prompt goes to the model, each completion's first non-empty line becomes
    `enriched_title`, an empty completion becomes null and is counted; the original title is untouched."""
    completions = iter(["  red  mug with a star logo \nsecond line", "", '"blue striped bottle"', "\n\n  green cap  "])
    seen_prompts = []

    def fake_generate(model, processor, prompts, *, on_batch, **options):
        seen_prompts.extend(str(p[0]["content"]) for p in prompts["prompt"])
        on_batch(0, [next(completions) for _ in range(len(prompts))])

    monkeypatch.setattr(recipe, "load_generator", lambda *a, **k: (None, None))
    monkeypatch.setattr("rar.annotate.generate_attributes", fake_generate)
    out = tmp_path / "titles"
    summary = run(recipe, "tiny-qwen2-vl", small_catalog_dir, out, limit=4, task="title")
    copy, source = load_catalog(out), load_catalog(small_catalog_dir).select(range(4))
    assert copy["enriched_title"] == ["red mug with a star logo", None, "blue striped bottle", "green cap"]
    assert copy["title"] == source["title"] and "attributes_previous" not in copy.column_names
    assert summary["task"] == "title" and summary["column"] == "enriched_title" and summary["n_unparsable"] == 1
    assert all("Rewrite the title" in p and title in p for p, title in zip(seen_prompts, source["title"], strict=True))


def test_unknown_task_is_refused_before_the_model_loads(recipe, small_catalog_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(recipe, "load_generator", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ValueError, match="--task"):
        run(recipe, "tiny-qwen2-vl", small_catalog_dir, tmp_path / "o", task="caption")
