"""ProductGallery: build once, save/load with identical search, and clear errors for a stale gallery."""

import pickle
import shutil
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import image_files

from afmrl.retrieval.gallery import ProductGallery, catalog_fingerprint, encoder_fingerprints


class StubEncoder:
    """A vector per (image name, title): ``img3`` and the decoded ``.../img3.png`` embed alike."""

    def __init__(self, dim=16, fingerprint="stub-v1"):
        self.embedding_dim = dim
        self.fingerprint = fingerprint

    def encode(self, images, titles, attributes=None, *, batch_size=32, show_progress=None):
        names = [Path(getattr(im, "filename", im)).stem for im in images]
        rows = [
            np.random.default_rng(zlib.crc32(f"{name}|{t}".encode())).normal(size=self.embedding_dim)
            for name, t in zip(names, titles, strict=True)
        ]
        x = np.stack(rows).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)


def _catalog(n=30):
    return datasets.Dataset.from_dict(
        {
            "listing_id": [f"L{i}" for i in range(n)],
            "product_id": [f"P{i // 3}" for i in range(n)],
            "title": [f"title {i}" for i in range(n)],
            "image": image_files(n),
        }
    )


def _clustered(n, dim=16, centres=40, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.normal(size=(n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_round_trip_gives_identical_search_and_checks_pass(tmp_path):
    ds, enc = _catalog(), StubEncoder()
    gallery = ProductGallery.build(ds, enc)
    assert gallery.index.index_type == "flat" and gallery.size == 30 and gallery.dim == 16
    assert gallery.encoder_fingerprint == {"custom": "stub-v1"}
    assert gallery.catalog_fingerprint == catalog_fingerprint(ds)
    gallery.save(tmp_path / "g")
    loaded = ProductGallery.load(tmp_path / "g", encoder=enc, catalog=ds)
    q = _clustered(7, seed=5)
    exclude = np.array([0, 5, -1, 29, 3, 3, -1])
    for a, b in zip(gallery.search(q, 10, exclude=exclude), loaded.search(q, 10, exclude=exclude), strict=True):
        np.testing.assert_array_equal(a, b)
    assert loaded.listing_ids == gallery.listing_ids and loaded.product_ids == gallery.product_ids
    np.testing.assert_array_equal(loaded.product_codes, gallery.product_codes)
    np.testing.assert_array_equal(loaded.rows_of(["L4", "nope"]), [4, -1])
    np.testing.assert_array_equal(loaded.positives_count(loaded.codes_of(["P1", "P1", "none"]), [4, -1, -1]), [2, 3, 0])
    np.testing.assert_allclose(loaded.vectors([2, 9]), enc.encode(["img2", "img9"], ["title 2", "title 9"]), atol=1e-6)
    again = pickle.loads(pickle.dumps(loaded))
    np.testing.assert_array_equal(again.search(q, 5)[1], loaded.search(q, 5)[1])


@pytest.mark.parametrize("index_type", ["ivf", "hnsw", "ivfpq"])
def test_approximate_index_is_tuned_and_round_trips(tmp_path, index_type):
    data = _clustered(4300)
    x, q = data[:4000], data[4000:]  # unseen queries from the same distribution
    ids = [f"L{i}" for i in range(len(x))]
    opts = {"ivf": {"nlist": 64}, "hnsw": {"hnsw_m": 8}, "ivfpq": {"nlist": 16}}[index_type]
    gallery = ProductGallery.from_embeddings(
        x, ids, [f"P{i // 4}" for i in range(len(x))], index_type=index_type, recall_k=20, target_recall=0.95, **opts
    )
    tuning = gallery.index.params["tuning"]
    assert tuning["recall"] >= tuning["goal"] == pytest.approx(0.975) and tuning["k"] == 20
    # measured independently on unseen queries
    exact = np.argsort(-(q @ x.T), axis=1)[:, :20]
    found = gallery.search(q, 20)[1]
    recall = np.mean([len(set(a) & set(b)) / 20 for a, b in zip(exact, found, strict=True)])
    assert recall >= 0.95
    gallery.save(tmp_path / "g")
    loaded = ProductGallery.load(tmp_path / "g")
    np.testing.assert_array_equal(loaded.search(q, 20)[1], found)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(loaded)).search(q, 20)[1], found)  # IVF-PQ: its memmap
    np.testing.assert_allclose(loaded.vectors([0, 3999]), x[[0, 3999]], atol=1e-6)
    assert ProductGallery.from_embeddings(x[:50], ids[:50], ids[:50]).index.index_type == "flat"


def test_mismatches_raise_clear_errors(tmp_path):
    ds, enc = _catalog(), StubEncoder()
    ProductGallery.build(ds, enc).save(tmp_path / "g")
    with pytest.raises(
        ValueError, match=r"encoder mismatch: the gallery was built with encoder fingerprint stub-v1.*stub-v2"
    ):
        ProductGallery.load(tmp_path / "g", encoder=StubEncoder(fingerprint="stub-v2"))
    with pytest.raises(ValueError, match=r"dimension mismatch: the gallery holds 16-dim vectors .* 8 dimensions"):
        ProductGallery.load(tmp_path / "g", encoder=StubEncoder(dim=8))
    retitled = ds.map(lambda r: {"title": r["title"] + "!" if r["listing_id"] == "L7" else r["title"]})
    with pytest.raises(ValueError, match=r"catalog mismatch: .*same listing and product ids: a title or image differs"):
        ProductGallery.load(tmp_path / "g", catalog=retitled)
    with pytest.raises(ValueError, match=r"catalog mismatch: .*first difference at row 0"):
        ProductGallery.load(tmp_path / "g", catalog=ds.select(range(29, -1, -1)))
    with pytest.raises(ValueError, match=r"catalog mismatch: .*\(29 rows there, 30 in the gallery\)"):
        ProductGallery.load(tmp_path / "g", catalog=ds.select(range(29)))
    (tmp_path / "g" / "index.faiss").unlink()
    ProductGallery.from_embeddings(_clustered(30, dim=8), ds["listing_id"], ds["product_id"]).index.save(tmp_path / "g")
    with pytest.raises(ValueError, match="dimension mismatch"):
        ProductGallery.load(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match="not a product gallery"):
        ProductGallery.load(tmp_path / "nowhere")


def test_catalog_fingerprint_ignores_location_but_not_content(tmp_path, small_catalog_dir):
    from afmrl.catalog.load import load_catalog

    moved = tmp_path / "moved"
    shutil.copytree(small_catalog_dir, moved)
    a = load_catalog(small_catalog_dir, verify_images=False)
    b = load_catalog(moved, verify_images=False)
    assert catalog_fingerprint(a) == catalog_fingerprint(b)
    a.save_to_disk(str(tmp_path / "saved"))  # embeds the image bytes
    c = datasets.load_from_disk(str(tmp_path / "saved"))
    assert catalog_fingerprint(c) == catalog_fingerprint(datasets.load_from_disk(str(tmp_path / "saved")))
    assert catalog_fingerprint(c) != catalog_fingerprint(a)  # bytes identity differs from path identity
    assert catalog_fingerprint(a.select(range(len(a) - 1))) != catalog_fingerprint(a)


def test_real_encoder_directory_fingerprints(tmp_path, tiny_model_dir, small_catalog_dir):
    from afmrl.catalog.load import load_catalog
    from afmrl.encoder.model import EncoderConfig, ProductEncoder

    dirs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        enc = ProductEncoder.from_backbone(EncoderConfig(backbone=str(tiny_model_dir), lora_r=2, lora_alpha=4))
        # a fresh LoRA B matrix is zero: give it weights so the two encoders really differ
        with torch.no_grad():
            for name, p in enc.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
        dirs.append(tmp_path / f"enc{seed}")
        enc.save_pretrained(dirs[-1])
    ds = load_catalog(small_catalog_dir, verify_images=False).select(range(12))
    gallery = ProductGallery.build(ds, str(dirs[0]))
    assert set(gallery.encoder_fingerprint) == {"files", "weights"}
    assert gallery.encoder_fingerprint["files"] == encoder_fingerprints(dirs[0])["files"]
    gallery.save(tmp_path / "g")
    ProductGallery.load(tmp_path / "g", encoder=dirs[0], catalog=ds)
    ProductGallery.load(tmp_path / "g", encoder=ProductEncoder.from_pretrained(dirs[0]))  # in memory: weights kind
    with pytest.raises(ValueError, match=rf"encoder fingerprint .* \(files\) but the encoder at {dirs[1]} has"):
        ProductGallery.load(tmp_path / "g", encoder=dirs[1])
    with pytest.raises(ValueError, match=r"\(weights\)"):
        ProductGallery.load(tmp_path / "g", encoder=ProductEncoder.from_pretrained(dirs[1]))


def test_a_gallery_of_several_splits_from_a_catalog_path_round_trips(tmp_path, small_catalog_dir):
    """split=[a, b] indexes the rows of both splits of a catalog directory (split by split), records the list,
    and ProductGallery.load checks the same rows again; one split differs from the union."""
    from afmrl.catalog.load import load_catalog

    class TitleEncoder(StubEncoder):  # real photos are unhashable: embed by title alone
        def encode(self, images, titles, attributes=None, **kwargs):
            return super().encode(list(titles), titles, **kwargs)

    enc = TitleEncoder()
    gallery = ProductGallery.build(small_catalog_dir, enc, split=["test", "train"])
    test, train = (load_catalog(small_catalog_dir, split=s) for s in ("test", "train"))
    assert gallery.listing_ids == list(test["listing_id"]) + list(train["listing_id"])
    assert gallery.info["catalog_split"] == ["test", "train"]
    gallery.save(tmp_path / "g")
    ProductGallery.load(tmp_path / "g", encoder=enc, catalog=small_catalog_dir)  # the recorded splits: passes
    with pytest.raises(ValueError, match="catalog"):
        ProductGallery.load(tmp_path / "g", encoder=enc, catalog=small_catalog_dir, split="train")
    in_memory = ProductGallery.build(load_catalog(small_catalog_dir), enc, split=["train", "test"])
    assert sorted(in_memory.listing_ids) == sorted(gallery.listing_ids)


def test_a_recall_below_the_goal_is_warned_at_the_callers_line(monkeypatch):
    """tune_search is reached through ProductGallery.from_embeddings / .tune_search: its warning names the
    caller's file, not a line inside rewards/."""
    from afmrl.retrieval.index import VectorIndex

    def blind_search(self, q, k, exclude=None):  # an index that never finds the true neighbours
        ids = np.tile(np.arange(k), (len(q), 1))
        return np.zeros(ids.shape, np.float32), ids

    x = _clustered(600)
    monkeypatch.setattr(VectorIndex, "search", blind_search)
    with pytest.warns(UserWarning, match="below the goal") as record:
        gallery = ProductGallery.from_embeddings(
            x, [f"L{i}" for i in range(600)], [f"P{i}" for i in range(600)], index_type="ivf", nlist=8, recall_k=5
        )
    assert record[0].filename == __file__
    with pytest.warns(UserWarning, match="below the goal") as record:
        gallery.tune_search(k=5)
    assert record[0].filename == __file__


def test_product_rows_equal_a_scan_and_survive_pickling():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    products = [f"P{int(x)}" for x in rng.integers(0, 9, size=40)]
    gallery = ProductGallery.from_embeddings(vectors, [f"L{i}" for i in range(40)], products)
    for copy in (gallery, pickle.loads(pickle.dumps(gallery))):
        for code in range(int(copy.product_codes.max()) + 1):
            np.testing.assert_array_equal(copy.product_rows(code), np.flatnonzero(copy.product_codes == code))
        assert len(copy.product_rows(-1)) == 0 and len(copy.product_rows(10_000)) == 0
