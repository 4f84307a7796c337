"""The Milvus backend (deploy/milvus_store.py): Milvus Lite's exact (FLAT) search equals brute force and the faiss
index, adding and deleting listings in place equals a rebuild, a changed generator marks listings stale, and a
server that does not answer is one error line in seconds."""

import time

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from afmrl.catalog import load_catalog  # noqa: E402
from deploy import ProductIndex  # noqa: E402
from deploy.milvus_store import MilvusGallery, MilvusUnavailable, connect  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def unit_rows(n, dim, seed, prefix="L"):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return [{"listing_id": f"{prefix}{i}", "product_id": f"P{i // 3}", "vector": vectors[i], "category": "mug",
             "split": "test", "attributes": f"color: c{i}"} for i in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def milvus_db(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus") / "milvus.db")


def top_k(vectors, queries, k, exclude):
    scores = queries @ vectors.T
    scores[np.arange(len(queries)), exclude] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def test_flat_search_equals_brute_force_with_the_own_listing_left_out(milvus_db):
    rows = unit_rows(120, 16, seed=0)
    gallery = MilvusGallery.create(milvus_db, "exact", dim=16, index_type="FLAT")
    keys = gallery.add(rows)
    vectors = np.stack([r["vector"] for r in rows])
    assert keys == list(range(120)) and len(gallery) == 120
    scores, found = gallery.search(vectors[:40], k=7, exclude=keys[:40])
    want_scores, want_rows = top_k(vectors, vectors[:40], 7, np.arange(40))
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)
    assert (found == want_rows).mean() > 0.99  # equal up to ties
    assert gallery.describe([5, -1])["listing_id"] == ["L5", None]
    assert gallery.positives_of(["P0", "P0", "P39"], ["L0", "L200", "L117"]).tolist() == [2, 3, 2]
    np.testing.assert_allclose(gallery.vectors([3, 1]), vectors[[3, 1]], atol=1e-6)


def test_add_and_delete_in_place_equal_a_rebuild(milvus_db):
    rows = unit_rows(90, 8, seed=1)
    live = MilvusGallery.create(milvus_db, "live", dim=8)
    live.add(rows[:60])
    assert live.delete(["L3", "L4", "L999"]) == 2
    live.add(rows[60:])
    changed = {**rows[10], "vector": -rows[10]["vector"], "attributes": "color: new"}
    live.add([changed])  # the same listing id again replaces it
    rebuilt = MilvusGallery.create(milvus_db, "rebuilt", dim=8)
    rebuilt.add([r for r in rows if r["listing_id"] not in {"L3", "L4", "L10"}] + [changed])
    assert len(live) == len(rebuilt) == 88 and sorted(live.listing_ids) == sorted(rebuilt.listing_ids)
    queries = np.stack([r["vector"] for r in rows[:20]])
    for gallery in (live, rebuilt):
        scores, found = gallery.search(queries, k=5)
        ids = np.asarray(gallery.describe(found.ravel().tolist())["listing_id"]).reshape(found.shape)
        gallery.answer = (scores, ids)
    np.testing.assert_allclose(live.answer[0], rebuilt.answer[0], atol=1e-6)
    assert (live.answer[1] == rebuilt.answer[1]).all()
    assert dict(zip(live.listing_ids, live._all()["attributes"], strict=True))["L10"] == "color: new"


def test_a_server_that_does_not_answer_is_refused_in_seconds():
    started = time.time()
    with pytest.raises(MilvusUnavailable, match="127.0.0.1:9"):
        connect("http://127.0.0.1:9", timeout=2)
    assert time.time() - started < 60


@pytest.fixture(scope="module")
def both_indexes(small_catalog_dir, tiny_encoder_dir, milvus_db, tmp_path_factory):
    test = load_catalog(small_catalog_dir, split="test")
    faiss_index = ProductIndex.build(test, str(tiny_encoder_dir), attribute_column="attributes", batch_size=16)
    vectors = np.stack([faiss_index.gallery.vectors([i])[0] for i in range(faiss_index.gallery.size)])
    milvus_index = ProductIndex.configure(str(tiny_encoder_dir), attribute_column="attributes")
    milvus_index.to_milvus(test, vectors, faiss_index.attributes, uri=milvus_db, collection="catalog")
    out = tmp_path_factory.mktemp("milvus-index") / "index"
    milvus_index.save(out)
    return test, faiss_index, ProductIndex.load(out)


def test_a_milvus_index_searches_calibrates_and_matches_as_the_faiss_one(both_indexes):
    test, faiss_index, milvus_index = both_indexes
    assert milvus_index.gallery.listing_ids == faiss_index.gallery.listing_ids
    assert milvus_index.attributes == faiss_index.attributes and milvus_index.meta == faiss_index.meta
    queries = test.select(range(12))
    want, got = faiss_index.search(queries, k=5), milvus_index.search(queries, k=5)
    for a, b in zip(want, got, strict=True):
        assert [r["listing_id"] for r in a["results"]] == [r["listing_id"] for r in b["results"]]
        np.testing.assert_allclose([r["score"] for r in a["results"]], [r["score"] for r in b["results"]], atol=1e-5)
    c_faiss = faiss_index.calibrate(test, k=5, target_precision=0.3, batch_size=16)
    c_milvus = milvus_index.calibrate(test, k=5, target_precision=0.3, batch_size=16)
    assert c_milvus["score"] == pytest.approx(c_faiss["score"], abs=1e-5) and c_milvus["pairs"] == c_faiss["pairs"]
    assert milvus_index.match(k=5)["labels"].tolist() == faiss_index.match(k=5)["labels"].tolist()


def test_a_changed_generator_marks_listings_stale_and_the_faiss_index_refuses_updates(both_indexes):
    test, faiss_index, milvus_index = both_indexes
    assert milvus_index.stale() == []
    milvus_index.config["attribute_column"] = "other_attributes"  # as if another generator annotated from now on
    assert sorted(milvus_index.stale()) == sorted(milvus_index.gallery.listing_ids)
    first = test.select(range(3))
    milvus_index.add(first, attributes=["color: red"] * 3)  # re-annotated and re-embedded: no longer stale
    assert sorted(milvus_index.stale()) == sorted(set(milvus_index.gallery.listing_ids) - set(first["listing_id"]))
    milvus_index.config["attribute_column"] = "attributes"
    with pytest.raises(ValueError, match="vector database"):
        faiss_index.add(test.select(range(2)))


def test_index_catalog_backend_flags_are_one_error_line(load_recipe, small_catalog_dir, tiny_encoder_dir, capsys):
    recipe = load_recipe("index_catalog")
    common = ["--catalog", str(small_catalog_dir), "--encoder", str(tiny_encoder_dir), "--output_dir", "unused"]
    cases = [(["--backend", "milvus"], "--uri"), (["--backend", "milvus", "--uri", "x.db", "--milvus_index", "IVF"],
             "--milvus_index"), (["--backend", "milvus", "--uri", "http://127.0.0.1:9"], "127.0.0.1:9")]  # fmt: skip
    for argv, fragment in cases:
        started = time.time()
        with pytest.raises(SystemExit) as info:
            recipe.cli([*common, *argv])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert info.value.code == 2 and len(errors) == 1 and fragment in errors[0], err
        assert time.time() - started < 60


def test_index_catalog_writes_a_milvus_index_that_loads(load_recipe, small_catalog_dir, tiny_encoder_dir, tmp_path):
    recipe = load_recipe("index_catalog")
    out = tmp_path / "index"
    recipe.cli(["--catalog", str(small_catalog_dir), "--split", "test", "--encoder", str(tiny_encoder_dir),
                "--attribute_column", "attributes", "--output_dir", str(out), "--backend", "milvus", "--uri",
                str(out / "milvus.db"), "--calibration_split", "test", "--target_precision", "0.3"])  # fmt: skip
    index = ProductIndex.load(out)
    test = load_catalog(small_catalog_dir, split="test")
    assert index.config["backend"]["kind"] == "milvus" and sorted(index.gallery.listing_ids) == sorted(
        test["listing_id"]
    )
    assert index.config["threshold"]["score"] is not None and len(index.search(test.select(range(2)), k=3)) == 2
