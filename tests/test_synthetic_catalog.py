import hashlib
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from afmrl.embedded.synthetic_catalog import (
    ATTRIBUTE_KEYS,
    REDUNDANT_VALUES,
    SyntheticCatalogConfig,
    make_synthetic_catalog,
    vocabulary_corpus,
)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "catalog.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    return make_synthetic_catalog(tmp_path_factory.mktemp("cat") / "c", num_products=120, seed=3)


def test_same_arguments_give_identical_bytes_and_other_seed_differs(tmp_path, catalog):
    again = make_synthetic_catalog(tmp_path / "again", num_products=120, seed=3)
    assert tree_digest(again) == tree_digest(catalog)
    other = make_synthetic_catalog(tmp_path / "other", num_products=120, seed=4)
    assert (other / "catalog.jsonl").read_bytes() != (catalog / "catalog.jsonl").read_bytes()
    assert tree_digest(other)["images/L000000.png"] != tree_digest(catalog)["images/L000000.png"]


def test_products_listings_and_split(catalog):
    data = rows(catalog)
    by_product = defaultdict(list)
    for r in data:
        by_product[r["product_id"]].append(r)
        assert (catalog / r["image"]).is_file()
    assert len(by_product) == 120
    assert len({r["listing_id"] for r in data}) == len(data)
    for listings in by_product.values():
        assert 2 <= len(listings) <= 5
        assert len({r["split"] for r in listings}) == 1  # a product never straddles the split
        assert len({json.dumps(r["true_attributes"], sort_keys=True) for r in listings}) == 1
    families = defaultdict(set)
    for r in data:
        families[r["family_id"]].add(r["split"])
    assert all(len(s) == 1 for s in families.values())  # near-duplicates stay together
    test_share = np.mean([r["split"] == "test" for r in data])
    assert 0.15 < test_share < 0.45


def test_families_are_near_duplicates_differing_in_exactly_one_attribute(catalog):
    products = {}
    for r in rows(catalog):
        products[r["product_id"]] = (r["family_id"], tuple(r["true_attributes"][k] for k in ATTRIBUTE_KEYS))
    by_family = defaultdict(list)
    for family, attrs in products.values():
        by_family[family].append(attrs)
    multi = 0
    for members in by_family.values():
        distinct = sorted(set(members))
        multi += len(distinct) > 1
        for a in range(len(distinct)):
            for b in range(a + 1, len(distinct)):
                assert sum(x != y for x, y in zip(distinct[a], distinct[b], strict=True)) == 1
    assert multi >= len(by_family) * 0.8  # nearly every family has near-duplicates


def test_duplicate_skus_only_in_train_and_otherwise_unique(tmp_path):
    root = make_synthetic_catalog(tmp_path / "c", num_products=200, seed=0, duplicate_sku_fraction=0.05)
    signature_products = defaultdict(set)
    split_of = {}
    for r in rows(root):
        signature_products[json.dumps(r["true_attributes"], sort_keys=True)].add(r["product_id"])
        split_of[r["product_id"]] = r["split"]
    duplicated = [ps for ps in signature_products.values() if len(ps) > 1]
    assert len(duplicated) == round(0.05 * 200 * 0.7)
    assert all(len(ps) == 2 and all(split_of[p] == "train" for p in ps) for ps in duplicated)


def test_titles_are_noisy_and_partial(catalog):
    data = rows(catalog)
    mentions_everything = 0
    for r in data:
        t = r["true_attributes"]
        title = r["title"].lower()
        mentions_everything += (
            all(t[k] in title for k in ("brand", "color", "size")) and f"{t['secondary_color']} trim" in title
        )
    assert mentions_everything / len(data) < 0.05
    by_product = defaultdict(set)
    for r in data:
        by_product[r["product_id"]].add(r["title"])
    assert np.mean([len(v) > 1 for v in by_product.values()]) > 0.9  # listings of a product are titled differently


def test_teacher_rates_are_configurable_and_measurable(tmp_path):
    perfect = make_synthetic_catalog(
        tmp_path / "p",
        num_products=60,
        seed=0,
        teacher_omission_rate=0.0,
        teacher_error_rate=0.0,
        teacher_redundancy_rate=0.0,
    )
    assert all(r["attributes"] == r["true_attributes"] for r in rows(perfect))
    noisy = rows(
        make_synthetic_catalog(
            tmp_path / "n",
            num_products=300,
            seed=0,
            teacher_omission_rate=0.2,
            teacher_error_rate=0.25,
            teacher_redundancy_rate=0.5,
        )
    )
    pairs = [(r["attributes"], r["true_attributes"]) for r in noisy]
    omitted = np.mean([k not in a for a, t in pairs for k in ATTRIBUTE_KEYS])
    wrong = np.mean([a[k] != t[k] for a, t in pairs for k in ATTRIBUTE_KEYS if k in a])
    redundant = np.mean([k in a for a, _ in pairs for k in REDUNDANT_VALUES])
    assert omitted == pytest.approx(0.2, abs=0.03)
    assert wrong == pytest.approx(0.25, abs=0.03)
    assert redundant == pytest.approx(0.5, abs=0.05)


def test_multi_image_listings(tmp_path):
    root = make_synthetic_catalog(tmp_path / "m", num_products=6, seed=0, images_per_listing=3)
    for r in rows(root):
        assert "image" not in r and len(r["images"]) == 3
        assert all((root / p).is_file() for p in r["images"])


def test_invalid_arguments_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="min_listings"):
        SyntheticCatalogConfig(output_dir=str(tmp_path), min_listings=1)
    with pytest.raises(ValueError, match="teacher_error_rate"):
        make_synthetic_catalog(tmp_path, teacher_error_rate=2.0)


def test_recipe_cli_writes_the_same_catalog_as_the_function(tmp_path):
    from recipes.make_catalog import main

    main(["--output_dir", str(tmp_path / "cli"), "--num_products", "20", "--seed", "5"])
    direct = make_synthetic_catalog(tmp_path / "fn", num_products=20, seed=5)
    assert tree_digest(tmp_path / "cli") == tree_digest(direct)
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path / "bad"), "--num_products", "1"])


def test_vocabulary_corpus_covers_every_attribute_value(catalog):
    words = set(" ".join(vocabulary_corpus()).lower().replace(":", " ").split())
    for r in rows(catalog):
        assert set(r["title"].lower().split()) <= words
        for key, value in r["attributes"].items():
            assert set(f"{key} {value}".lower().split()) <= words


@pytest.mark.parametrize("option", [{"val_fraction": 0.3}, {"clutter": True}])
def test_options_change_only_what_they_are_for(tmp_path, catalog, option):
    """val_fraction relabels whole train families as 'val'; clutter redraws the pixels and adds `bbox`.
    Everything else is byte for byte the catalog without the option (their draws use their own streams)."""
    other = make_synthetic_catalog(tmp_path / "o", num_products=120, seed=3, **option)
    base, changed = rows(catalog), rows(other)
    assert len(base) == len(changed)
    for a, b in zip(base, changed, strict=True):
        if "val_fraction" in option:
            assert {**b, "split": a["split"]} == a and (
                b["split"] == a["split"] or (a["split"], b["split"]) == ("train", "val")
            )
        else:
            assert {k: v for k, v in b.items() if k != "bbox"} == a and len(b["bbox"]) == 4
    if "val_fraction" in option:
        val_families = {r["family_id"] for r in changed if r["split"] == "val"}
        assert val_families and all(r["split"] == "val" for r in changed if r["family_id"] in val_families)
    else:
        digests, clutter_digests = tree_digest(catalog), tree_digest(other)
        assert digests["images/L000000.png"] != clutter_digests["images/L000000.png"]


def test_a_listing_teacher_knows_brand_and_size_only_from_the_title(tmp_path, catalog):
    """teacher_sees='listing': the invisible keys (brand, size) appear only when that listing's title states
    them; every other attribute, title, image and split is byte for byte the oracle teacher's catalog."""
    listing = rows(make_synthetic_catalog(tmp_path / "l", num_products=120, seed=3, teacher_sees="listing"))
    kept = dropped = 0
    for a, b in zip(rows(catalog), listing, strict=True):
        assert {k: v for k, v in b.items() if k != "attributes"} == {k: v for k, v in a.items() if k != "attributes"}
        visible = {k: v for k, v in a["attributes"].items() if k not in ("brand", "size")}
        assert {k: v for k, v in b["attributes"].items() if k not in ("brand", "size")} == visible
        title = b["title"].lower()
        stated = {
            "brand": b["true_attributes"]["brand"] in title.split(),
            "size": f"size {b['true_attributes']['size'].lower()}" in title,
        }
        for key in ("brand", "size"):
            if key in b["attributes"]:
                assert stated[key] and b["attributes"][key] == a["attributes"][key]
                kept += 1
            elif key in a["attributes"]:
                assert not stated[key]
                dropped += 1
    assert kept > 50 and dropped > 50
    with pytest.raises(ValueError, match="teacher_sees"):
        SyntheticCatalogConfig(output_dir=str(tmp_path), teacher_sees="everything")


def test_world_options_fine_details_varying_keys_and_larger_families(tmp_path, catalog):
    """logo_scale and pattern_period redraw the pixels only; varying_keys and max_family_size shape the families."""
    fine = make_synthetic_catalog(tmp_path / "fine", num_products=120, seed=3, logo_scale=0.08, pattern_period=0.1)
    assert rows(fine) == rows(catalog)
    assert tree_digest(fine)["images/L000000.png"] != tree_digest(catalog)["images/L000000.png"]
    world = rows(make_synthetic_catalog(tmp_path / "w", num_products=120, seed=3, varying_keys=["color"],
                                        min_family_size=6, max_family_size=8, duplicate_sku_fraction=0.2))  # fmt: skip
    members = defaultdict(set)
    for r in world:
        members[r["family_id"]].add(json.dumps(r["true_attributes"], sort_keys=True))
    sizes = [len(m) for m in members.values()]
    assert max(sizes) > 4 and sum(s >= 6 for s in sizes) >= len(sizes) - 1  # the last family takes the remainder
    for family in members.values():
        truths = [json.loads(m) for m in family]
        assert all({k for k in ATTRIBUTE_KEYS if len({t[k] for t in truths}) > 1} <= {"color"} for _ in truths)
    products = {r["product_id"]: json.dumps(r["true_attributes"], sort_keys=True) for r in world}
    duplicates = len(products) - len(set(products.values()))
    assert 10 <= duplicates <= 20  # 20% of the train products re-listed under new ids


def test_teacher_confusions_are_habits_that_sft_would_copy(tmp_path):
    habit = {"teacher_confusions": "pattern:dotted>checked", "teacher_confusion_rate": 1.0}
    clean = {"teacher_error_rate": 0.0, "teacher_omission_rate": 0.0}
    data = rows(make_synthetic_catalog(tmp_path / "c", num_products=200, seed=1, **habit, **clean))
    dotted = [r for r in data if r["true_attributes"]["pattern"] == "dotted"]
    assert dotted and all(r["attributes"]["pattern"] == "checked" for r in dotted)
    others = [r for r in data if r["true_attributes"]["pattern"] != "dotted"]
    assert all(r["attributes"]["pattern"] == r["true_attributes"]["pattern"] for r in others)
    for bad in ("pattern:plaid>dotted", "shade:red>blue", "pattern:dotted>dotted", "pattern:dotted>"):
        with pytest.raises(ValueError, match="teacher_confusions"):
            SyntheticCatalogConfig(output_dir=str(tmp_path), teacher_confusions=bad)
    with pytest.raises(ValueError, match="max_family_size"):
        SyntheticCatalogConfig(output_dir=str(tmp_path), varying_keys=["size"], max_family_size=5)  # 4 sizes


def test_a_confusion_drawn_per_product_is_the_same_on_every_listing_of_a_sku(tmp_path):
    """A deterministic teacher: a confusion into a word the key never otherwise holds, drawn once per product, so the
    listings of one SKU (duplicate products included) agree; drawn per listing, they disagree. Nothing else moves."""
    common = dict(num_products=300, seed=2, duplicate_sku_fraction=0.2, teacher_error_rate=0.0,
                  teacher_omission_rate=0.0, teacher_confusions="pattern:dotted>spotted",
                  teacher_confusion_rate=0.5)  # fmt: skip
    per_product = rows(make_synthetic_catalog(tmp_path / "p", teacher_confusion_unit="product", **common))
    per_listing = rows(make_synthetic_catalog(tmp_path / "l", **common))

    def written(data) -> dict:
        out: dict = {}
        for r in data:
            if r["true_attributes"]["pattern"] == "dotted":
                sku = json.dumps(r["true_attributes"], sort_keys=True)
                out.setdefault(sku, set()).add(r["attributes"]["pattern"])
        return out

    skus = written(per_product)
    assert len(skus) > 10 and all(len(v) == 1 for v in skus.values())  # one word per SKU
    assert {next(iter(v)) for v in skus.values()} == {"spotted", "dotted"}  # about half the products confused
    assert any(len(v) == 2 for v in written(per_listing).values())
    assert [r["title"] for r in per_product] == [r["title"] for r in per_listing]  # the stream is untouched
    with pytest.raises(ValueError, match="teacher_confusion_unit"):
        SyntheticCatalogConfig(output_dir=str(tmp_path), teacher_confusion_unit="sku")


def test_a_named_world_is_cached_under_its_options_so_a_redrawn_world_is_rebuilt(tmp_path, monkeypatch):
    import afmrl.embedded as embedded

    monkeypatch.setitem(embedded.WORLDS, "small", {"num_products": 12, "val_fraction": 0.0})
    first = embedded.resolve_catalog("embedded:small:3", tmp_path)
    assert embedded.resolve_catalog("embedded:small:3", tmp_path) == first  # built once, then reused
    monkeypatch.setitem(embedded.WORLDS, "small", {"num_products": 16, "val_fraction": 0.0})
    second = embedded.resolve_catalog("embedded:small:3", tmp_path)
    assert second != first
    assert sum(1 for _ in open(f"{second}/catalog.jsonl")) > sum(1 for _ in open(f"{first}/catalog.jsonl"))
    with pytest.raises(ValueError, match="unknown embedded world"):
        embedded.resolve_catalog("embedded:nowhere", tmp_path)


@pytest.mark.parametrize("world", ["paper", "paper-draft3", "paper-draft2", "paper-draft1", "verbose"])
def test_every_named_world_is_valid_and_deterministic_at_a_small_size(tmp_path, world):
    """The fair test's worlds (afmrl.embedded.WORLDS) at 40 products: their options pass the generator's checks, the
    same seed gives the same bytes, and a paper world has what it promises (112 px photos, families that differ in
    pattern or logo, a teacher with listing-level keys on every line)."""
    from afmrl.embedded import WORLDS

    options = {**WORLDS[world], "num_products": 40}
    first = make_synthetic_catalog(tmp_path / "a", seed=7, **options)
    assert tree_digest(make_synthetic_catalog(tmp_path / "b", seed=7, **options)) == tree_digest(first)
    data = rows(first)
    assert all({"condition", "shipping", "style"} <= set(r["attributes"]) for r in data)  # every line verbose
    if world.startswith("paper"):
        from PIL import Image

        assert Image.open(first / data[0]["image"]).size == (112, 112)
        by_family: dict = {}
        for r in data:
            by_family.setdefault(r["family_id"], set()).add(json.dumps(r["true_attributes"], sort_keys=True))
        varying = set()
        for members in by_family.values():
            truths = [json.loads(m) for m in members]
            varying |= {k for k in truths[0] if len({t[k] for t in truths}) > 1}
        assert varying and varying <= {"pattern", "logo"}


def test_title_silent_keys_are_never_stated_and_leave_the_catalog_unchanged_when_empty(tmp_path):
    """Near-duplicates that differ in what sellers do not write: no title states a silent key (so no embedder reads it
    from the title), a listing's teacher still sees it in the photo; an empty list is byte for byte the default."""
    silent = rows(
        make_synthetic_catalog(tmp_path / "s", num_products=80, seed=4, title_silent_keys=["pattern", "logo"])
    )
    for r in silent:
        truth = r["true_attributes"]
        assert truth["pattern"] not in r["title"] and f"{truth['logo']} logo" not in r["title"]
    written = sum("pattern" in r["attributes"] for r in silent) / len(silent)
    assert written > 0.7  # the teacher still reads it off the photo (less its omissions)
    assert not any(r["title"].split().count("plain") for r in silent if r["true_attributes"]["pattern"] == "solid")
    plain = make_synthetic_catalog(tmp_path / "p", num_products=80, seed=4)
    assert tree_digest(make_synthetic_catalog(tmp_path / "e", num_products=80, seed=4, title_silent_keys=[])) == (
        tree_digest(plain)
    )
    said = rows(plain)
    assert any(r["true_attributes"]["pattern"] in r["title"] for r in said)  # the default's titles do state it
    with pytest.raises(ValueError, match="title_silent_keys"):
        SyntheticCatalogConfig(output_dir=str(tmp_path), title_silent_keys=["material"])


def test_equal_ink_leaves_only_the_detail_to_tell_patterns_and_logo_shapes_apart():
    """Without it each pattern and logo shape has its own mean colour, which any downsampling keeps (the fair test's
    third pilot: a 56 px embedder told family-mates apart by it); with it the means agree and the photos still
    differ in their detail."""
    from PIL import Image

    from afmrl.embedded.photos import render_product_image

    def photo(equal_ink, **attrs):
        attrs = {"category": "phone case", "color": "red", "secondary_color": "blue", "pattern": "solid",
                 "logo": "none", **attrs}  # fmt: skip
        return render_product_image(attrs, np.random.default_rng(0), 112, logo_scale=0.1, pattern_period=0.04,
                                    equal_ink=equal_ink)  # fmt: skip

    def mean(image):
        return np.asarray(image.resize((1, 1), Image.Resampling.BOX), dtype=float).ravel()

    for equal_ink, spread in ((False, 10.0), (True, 1.0)):
        means = [mean(photo(equal_ink, pattern=p)) for p in ("solid", "striped", "dotted", "checked", "zigzag")]
        worst = max(float(np.abs(a - b).max()) for a in means for b in means)
        assert (worst > spread) if not equal_ink else (worst < spread), (equal_ink, worst)
        shapes = [
            mean(photo(equal_ink, logo=s, secondary_color="red")) for s in ("star", "circle", "triangle", "cross")
        ]
        worst = max(float(np.abs(a - b).max()) for a in shapes for b in shapes)
        assert (worst > 0.5) if not equal_ink else (worst < 0.2), (equal_ink, worst)
    striped, dotted = (np.asarray(photo(True, pattern=p), dtype=float) for p in ("striped", "dotted"))
    assert np.abs(striped - dotted).mean() > 5  # the detail is still there for a view that resolves it


def test_equal_ink_keys_even_out_the_pattern_alone_and_keep_the_logos_ink(tmp_path):
    """``equal_ink_keys ["pattern"]``: patterns share one mean colour, logo shapes keep their own ink (the fair test's
    fourth draft: no view reads an equal-ink logo); a key outside pattern and logo is refused."""
    from PIL import Image

    from afmrl.embedded.photos import render_product_image

    def mean(**attrs):
        attrs = {"category": "phone case", "color": "red", "secondary_color": "blue", "pattern": "solid",
                 "logo": "none", **attrs}  # fmt: skip
        image = render_product_image(attrs, np.random.default_rng(0), 112, logo_scale=0.1, pattern_period=0.1,
                                     equal_ink=True, equal_ink_keys=("pattern",))  # fmt: skip
        return np.asarray(image.resize((1, 1), Image.Resampling.BOX), dtype=float).ravel()

    def spread(means):
        return max(float(np.abs(a - b).max()) for a in means for b in means)

    assert spread([mean(pattern=p) for p in ("solid", "striped", "dotted", "checked", "zigzag")]) < 1.0
    assert spread([mean(logo=s, secondary_color="red") for s in ("star", "circle", "triangle", "cross")]) > 0.5
    with pytest.raises(ValueError, match="equal_ink_keys"):
        SyntheticCatalogConfig(output_dir=str(tmp_path), equal_ink_keys=["color"])


def test_title_key_rates_set_how_often_a_title_states_a_key(tmp_path):
    """A rate replaces the usual one for its key (the fair test's grounded but rare fine-key words); silent wins; a
    bad rate is refused."""
    rated = rows(make_synthetic_catalog(tmp_path / "r", num_products=300, seed=4, title_key_rates="pattern:0.1"))
    usual = rows(make_synthetic_catalog(tmp_path / "u", num_products=300, seed=4))

    def stated(data):
        words = {"solid": "plain"}
        return sum(words.get(r["true_attributes"]["pattern"], r["true_attributes"]["pattern"]) in r["title"].split()
                   for r in data) / len(data)  # fmt: skip

    assert 0.05 < stated(rated) < 0.15 and stated(usual) > 0.45
    silent = rows(make_synthetic_catalog(tmp_path / "s", num_products=80, seed=4, title_key_rates="pattern:1.0",
                                         title_silent_keys=["pattern"]))  # fmt: skip
    assert stated(silent) == 0.0
    for bad in ("pattern:1.5", "shade:0.1", "pattern:lots"):
        with pytest.raises(ValueError, match="title_key_rates"):
            make_synthetic_catalog(tmp_path / "x", num_products=10, title_key_rates=bad)


def test_families_can_vary_in_two_keys_at_once(tmp_path):
    """family_key_count 2: a family holds products of many pattern x logo pairs (near-duplicates by the dozen), each
    still differing from some family-mate in one key; bad counts are refused."""
    data = rows(make_synthetic_catalog(tmp_path / "f", num_products=60, seed=3, varying_keys=["pattern", "logo"],
                                       family_key_count=2, min_family_size=12, max_family_size=20,
                                       duplicate_sku_fraction=0.0))  # fmt: skip
    by_family: dict = {}
    for r in data:
        by_family.setdefault(r["family_id"], {})[r["product_id"]] = r["true_attributes"]
    big = [members for members in by_family.values() if len(members) >= 12]
    assert big
    for members in big:
        truths = list(members.values())
        assert {k for k in truths[0] if len({t[k] for t in truths}) > 1} == {"pattern", "logo"}
        assert len({(t["pattern"], t["logo"]) for t in truths}) == len(truths)  # distinct products
    for bad in ({"family_key_count": 3}, {"family_key_count": 2, "varying_keys": ["logo"]},
                {"family_key_count": 2, "varying_keys": ["pattern", "logo"], "max_family_size": 26}):  # fmt: skip
        with pytest.raises(ValueError, match="family_key_count|max_family_size"):
            make_synthetic_catalog(tmp_path / "x", num_products=10, **bad)
