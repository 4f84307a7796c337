import logging

import datasets
import pytest

from agcl.data import GroupedBatchSampler, ProductPairDataset


def _catalog():
    products = ["a", "a", "a", "b", "b", "c", "d", "d"]
    return datasets.Dataset.from_dict(
        {
            "listing_id": [f"l{i}" for i in range(len(products))],
            "product_id": products,
            "title": ["t"] * len(products),
            "category": ["mug", "mug", "mug", "bag", "bag", "bag", "mug", "mug"],
            "attributes": [{"brand": "x", "category": "mug"}] * 3 + [{"brand": "y"}] * 2 + [{}] + [{"brand": "x"}] * 2,
        }
    )


def test_pairs_are_two_distinct_listings_of_one_product_and_singletons_are_counted(caplog):
    ds = _catalog()
    with caplog.at_level(logging.WARNING):
        pairs = ProductPairDataset(ds, seed=0)
    assert len(pairs) == 3 and pairs.skipped_single_listing == 1
    assert "1 of 4 products have a single listing" in caplog.text
    seen = set()
    for epoch in range(30):
        pairs.set_epoch(epoch)
        for i in range(len(pairs)):
            item = pairs[i]
            assert item["query"] != item["positive"]
            assert ds[item["query"]]["product_id"] == ds[item["positive"]]["product_id"]
            assert pairs[i] == item  # a pure function of (seed, epoch, index): resumes draw the same pairs
            seen.add((item["query"], item["positive"]))
    assert len(seen) > 6  # pairs are redrawn every epoch, not fixed


def test_no_pairs_at_all_is_an_error():
    ds = _catalog().select([0, 3, 5])
    with pytest.raises(ValueError, match="no product has two listings"):
        ProductPairDataset(ds)


def test_group_keys_from_a_column_or_attribute_values():
    pairs = ProductPairDataset(_catalog(), seed=0)
    assert pairs.product_groups("category") == ["mug", "bag", "mug"]
    assert pairs.product_groups("attributes:brand") == [("x",), ("y",), ("x",)]
    with pytest.raises(ValueError, match="no column 'family'"):
        pairs.product_groups("family:x")


def test_grouped_sampler_keeps_groups_contiguous_and_reshuffles_each_epoch():
    groups = [i % 7 for i in range(70)]
    sampler = GroupedBatchSampler(groups, seed=3)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(70))
        runs = [groups[order[0]]]
        for i in order[1:]:
            if groups[i] != runs[-1]:
                runs.append(groups[i])
        assert len(runs) == 7  # each group appears as one contiguous run
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]
    sampler.set_epoch(1)
    assert list(sampler) == orders[1]  # deterministic per (seed, epoch)


def test_candidate_attributes_are_appended_with_their_own_coin_and_queries_stay_as_they_were(
    tiny_encoder_dir, small_catalog_dir
):
    from afmrl.attributes import format_attributes
    from afmrl.catalog.load import load_catalog
    from afmrl.encoder.model import ProductEncoder
    from agcl.data import AGCLCollator

    encoder = ProductEncoder.from_pretrained(tiny_encoder_dir)
    catalog = load_catalog(small_catalog_dir, split="train")
    items = [{"query": 0, "positive": 1}, {"query": 2, "positive": 3}, {"query": 5, "positive": 6}]
    positives = [catalog[i["positive"]] for i in items]

    def collate(p_query, p_candidate):
        return AGCLCollator(
            encoder, catalog, query_attribute_probability=p_query, candidate_attribute_probability=p_candidate, seed=7
        )(items)

    plain = encoder.build_inputs([r["image"] for r in positives], [r["title"] for r in positives])
    annotated = encoder.build_inputs(
        [r["image"] for r in positives],
        [r["title"] for r in positives],
        [format_attributes(r["attributes"]) for r in positives],
    )
    assert collate(0.5, 0.0)["candidate"]["input_ids"].equal(plain["input_ids"])
    assert collate(0.5, 1.0)["candidate"]["input_ids"].equal(annotated["input_ids"])
    # The query's coins do not move when candidates get attributes (runs without the option are unchanged).
    assert collate(0.5, 1.0)["query"]["input_ids"].equal(collate(0.5, 0.0)["query"]["input_ids"])
    # The two sides draw independently: at 0.5 some pair appends on one side only.
    collator = AGCLCollator(
        encoder, catalog, query_attribute_probability=0.5, candidate_attribute_probability=0.5, seed=7
    )
    pairs = [{"query": q, "positive": q + 1} for q in range(0, 40, 2)]
    sides = {(collator._coin(p) < 0.5, collator._coin(p, "candidate") < 0.5) for p in pairs}
    assert {(True, False), (False, True)} <= sides


def test_candidate_attribute_probability_out_of_range_is_named(tmp_path):
    from agcl.config import AGCLConfig

    with pytest.raises(ValueError, match="--candidate_attribute_probability"):
        AGCLConfig(output_dir=str(tmp_path), candidate_attribute_probability=1.5)


def test_attribute_key_dropout_appends_subsets_of_the_line_and_keeps_bm25_whole(
    tiny_encoder_dir, small_catalog_dir, monkeypatch
):
    from afmrl.attributes import format_attributes, parse_attributes
    from afmrl.catalog.load import load_catalog
    from afmrl.encoder.model import ProductEncoder
    from agcl.data import AGCLCollator

    encoder = ProductEncoder.from_pretrained(tiny_encoder_dir)
    catalog = load_catalog(small_catalog_dir, split="train")
    items = [{"query": q, "positive": (q + 1) % len(catalog)} for q in range(0, min(len(catalog), 40))]
    seen = {}

    def spy(images, titles, attributes=None):  # what the collator appends, per side, in call order
        seen.setdefault("calls", []).append(attributes)
        return original(images, titles, attributes)

    original = encoder.build_inputs
    monkeypatch.setattr(encoder, "build_inputs", spy)
    batch = AGCLCollator(
        encoder,
        catalog,
        query_attribute_probability=1.0,
        candidate_attribute_probability=1.0,
        attribute_key_probability=0.5,
        seed=3,
    )(items)
    queries, candidates = seen["calls"]
    full = [format_attributes(catalog[i["query"]]["attributes"]) for i in items]
    assert batch["query_attributes"] == full  # BM25 and the filter read the whole line
    kept_fractions = []
    for line, whole in zip(queries, full, strict=True):
        pairs = parse_attributes(whole).attributes
        kept = parse_attributes(line).attributes if line else {}
        assert kept.items() <= pairs.items()  # a subset of the listing's own pairs, values unchanged
        kept_fractions.append(len(kept) / len(pairs))
    assert 0.3 < sum(kept_fractions) / len(kept_fractions) < 0.7  # about half the keys at 0.5
    assert any(0 < f < 1 for f in kept_fractions)
    assert candidates != queries
    # At probability 1 (the default) whole lines are appended, as before the option existed.
    seen.clear()
    AGCLCollator(encoder, catalog, query_attribute_probability=1.0, seed=3)(items)
    assert seen["calls"][0] == full


def test_attribute_key_probability_out_of_range_is_named(tmp_path):
    from agcl.config import AGCLConfig

    with pytest.raises(ValueError, match="--attribute_key_probability"):
        AGCLConfig(output_dir=str(tmp_path), attribute_key_probability=0.0)


def test_intra_product_text_side_is_the_title_the_attribute_line_or_both(tiny_encoder_dir, small_catalog_dir):
    from afmrl.attributes import format_attributes
    from afmrl.catalog.load import load_catalog
    from afmrl.encoder.model import ProductEncoder
    from agcl.data import AGCLCollator

    encoder = ProductEncoder.from_pretrained(tiny_encoder_dir)
    catalog = load_catalog(small_catalog_dir, split="train")
    catalog = catalog.map(lambda r, i: {"attributes": {} if i == 1 else r["attributes"]}, with_indices=True)
    items = [{"query": 0, "positive": 2}, {"query": 1, "positive": 3}]  # row 1 has no attributes
    rows = [catalog[i["query"]] for i in items]
    titles, lines = [r["title"] for r in rows], [format_attributes(r["attributes"]) or None for r in rows]
    assert lines[0] and lines[1] is None

    def text_side(mode):
        return AGCLCollator(encoder, catalog, with_modalities=True, modality_text=mode, seed=0)(items)[
            "query_text_only"
        ]

    expected = {
        "title": encoder.build_inputs([None, None], titles),
        "attributes": encoder.build_inputs([None, None], [None, titles[1]], lines),  # no line: its title
        "title+attributes": encoder.build_inputs([None, None], titles, lines),
    }
    for mode, reference in expected.items():
        assert text_side(mode)["input_ids"].equal(reference["input_ids"]), mode
    assert not expected["attributes"]["input_ids"].equal(expected["title"]["input_ids"])
    with pytest.raises(ValueError, match="modality_text"):
        AGCLCollator(encoder, catalog, with_modalities=True, modality_text="photo")


def test_intra_product_text_out_of_range_is_named(tmp_path):
    from agcl.config import AGCLConfig

    with pytest.raises(ValueError, match="--intra_product_text"):
        AGCLConfig(output_dir=str(tmp_path), intra_product_text="caption")
