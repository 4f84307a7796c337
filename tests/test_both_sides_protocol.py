"""The deployment protocol of rar.evaluation: every listing (query and gallery) carries the generator's attributes."""

import numpy as np
import pytest

from afmrl.attributes import canonical_attributes
from afmrl.catalog.load import load_catalog
from afmrl.encoder.crops import catalog_views
from afmrl.encoder.model import ProductEncoder
from rar.evaluation import evaluate_attribute_sources


@pytest.fixture(scope="module")
def encoder_and_split(tiny_encoder_dir, small_catalog_dir, one_thread):
    return ProductEncoder.from_pretrained(tiny_encoder_dir), load_catalog(small_catalog_dir, split="test")


def test_an_empty_generator_equals_the_no_attribute_protocol_exactly(encoder_and_split):
    encoder, ds = encoder_and_split
    empty = canonical_attributes(["", "<|im_end|>", "no attributes here"] * (len(ds) // 3) + [""] * (len(ds) % 3))
    assert set(empty) == {None}
    both = evaluate_attribute_sources(encoder, ds, {"no_attributes": None, "empty": empty}, protocol="both_sides")
    query_side = evaluate_attribute_sources(encoder, ds, {"no_attributes": None}, protocol="query_side")
    assert {k: v for k, v in both["empty"].items() if k != "valid_fraction"} == both["no_attributes"]
    assert both["no_attributes"] == query_side["no_attributes"]
    assert both["empty"]["valid_fraction"] == 0.0


def test_both_sides_equals_a_brute_force_ranking_of_annotated_listings(encoder_and_split):
    encoder, ds = encoder_and_split
    texts = canonical_attributes([str(a) for a in ds["attributes"]])
    assert sum(t is not None for t in texts) > len(ds) // 2
    result = evaluate_attribute_sources(encoder, ds, {"teacher": texts}, protocol="both_sides")["teacher"]

    vectors = encoder.encode(catalog_views(ds), list(ds["title"]), texts, show_progress=False)
    scores = vectors @ vectors.T
    np.fill_diagonal(scores, -np.inf)  # a query never retrieves itself
    products = np.asarray(ds["product_id"])
    has_positive = np.array([(products == p).sum() > 1 for p in products])
    top1 = products[scores.argmax(axis=1)] == products
    assert result["n_queries"] == has_positive.sum()
    assert result["recall@1"] == pytest.approx(top1[has_positive].mean(), abs=1e-12)

    query_side = evaluate_attribute_sources(encoder, ds, {"teacher": texts}, protocol="query_side")["teacher"]
    assert query_side["mrr"] != result["mrr"]  # the gallery side differs, so the ranking does


def test_both_sides_takes_no_separate_gallery_texts(encoder_and_split):
    encoder, ds = encoder_and_split
    with pytest.raises(ValueError, match="both_sides"):
        evaluate_attribute_sources(encoder, ds, {"x": None}, protocol="both_sides", gallery_attributes=[None] * len(ds))
    with pytest.raises(ValueError, match="protocol"):
        evaluate_attribute_sources(encoder, ds, {"x": None}, protocol="gallery_only")
