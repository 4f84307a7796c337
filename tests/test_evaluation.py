import datasets
import numpy as np
import pytest

from afmrl.retrieval.evaluation import attribute_texts, evaluate_encoder


class HashEncoder:
    """A stand-in encoder: a fixed random vector per (image id, title, attributes) input, normalised."""

    def __init__(self, dim=16):
        self.dim = dim
        self.calls = []

    def _vec(self, *key):
        rng = np.random.default_rng(abs(hash(key)) % (2**32))
        v = rng.normal(size=self.dim)
        return v / np.linalg.norm(v)

    def encode(self, images, titles, attributes=None, **kwargs):
        self.calls.append((len(titles), attributes is not None))
        attrs = attributes or [None] * len(titles)
        return np.stack([self._vec(im, t, a) for im, t, a in zip(images, titles, attrs, strict=True)]).astype(
            np.float32
        )


def _catalog():
    rng = np.random.default_rng(0)
    products = [f"p{i}" for i in range(12) for _ in range(int(rng.integers(2, 5)))] + ["lonely"]
    return datasets.Dataset.from_dict(
        {
            "listing_id": [f"l{i}" for i in range(len(products))],
            "product_id": products,
            "title": [f"title {i}" for i in range(len(products))],
            "image": [f"img{i}" for i in range(len(products))],  # the stand-in encoder only hashes them
            "category": [f"c{int(p[1:]) % 3}" if p != "lonely" else "c0" for p in products],
            "attributes": [{"color": f"x{i % 5}"} for i in range(len(products))],
        }
    )


def brute_force(queries, gallery, q_labels, g_labels, exclude_self):
    scores = queries @ gallery.T
    if exclude_self:
        np.fill_diagonal(scores, -np.inf)
    hits = {1: [], 5: [], 10: []}
    rr = []
    for i in range(len(queries)):
        positive = (g_labels == q_labels[i]) & np.isfinite(scores[i])
        if not positive.any():
            continue
        order = np.argsort(-scores[i], kind="stable")
        first = int(np.flatnonzero(positive[order])[0]) + 1
        rr.append(1.0 / first)
        for k in hits:
            hits[k].append(first <= k)
    return {f"recall@{k}": float(np.mean(v)) for k, v in hits.items()} | {"mrr": float(np.mean(rr))}, len(rr)


def test_suite_matches_brute_force_and_counts_unscorable_queries():
    ds = _catalog()
    enc = HashEncoder()
    results = evaluate_encoder(enc, ds, ks=(1, 5, 10))
    products = np.asarray(ds["product_id"])
    mm = enc.encode(ds["image"], ds["title"])
    image_only = enc.encode(ds["image"], [None] * len(ds))
    text_only = enc.encode([None] * len(ds), ds["title"])
    expected, scored = brute_force(mm, mm, products, products, exclude_self=True)
    for key, value in expected.items():
        assert results["instance"][key] == pytest.approx(value, abs=1e-9), key
    assert results["instance"]["n_skipped"] == 1 and scored == len(ds) - 1  # "lonely" has no other listing
    expected_i2t, _ = brute_force(image_only, text_only, products, products, exclude_self=False)
    assert results["image_to_text"]["recall@1"] == pytest.approx(expected_i2t["recall@1"])
    expected_t2i, _ = brute_force(text_only, image_only, products, products, exclude_self=False)
    assert results["text_to_image"]["mrr"] == pytest.approx(expected_t2i["mrr"])
    expected_i2m, _ = brute_force(image_only, mm, products, products, exclude_self=True)
    assert results["image_to_multimodal"]["recall@5"] == pytest.approx(expected_i2m["recall@5"])
    categories = np.asarray(ds["category"])
    expected_coarse, _ = brute_force(mm, mm, categories, categories, exclude_self=True)
    assert results["coarse"]["mAP@1"] == pytest.approx(expected_coarse["recall@1"])
    assert 0.0 <= results["classification"]["accuracy"] <= 1.0


def test_query_attributes_change_only_the_queries():
    ds = _catalog()
    enc = HashEncoder()
    plain = evaluate_encoder(enc, ds, tasks=["instance"])
    enriched = evaluate_encoder(enc, ds, tasks=["instance"], query_attributes=attribute_texts(ds, "reference"))
    assert plain["instance"] != enriched["instance"]
    assert (len(ds), True) in enc.calls  # queries were re-encoded with attributes
    assert attribute_texts(ds, "none") is None
    with pytest.raises(ValueError, match="no column 'true_attributes'"):
        attribute_texts(ds, "true_attributes")
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_encoder(enc, ds, tasks=["instance", "bogus"])


def test_gallery_attributes_match_a_brute_force_computation():
    """Gallery = image + title + stored attributes; queries = image + title (+ their own attributes)."""
    ds = _catalog()
    enc = HashEncoder()
    stored = attribute_texts(ds, "reference")
    query_attrs = [f"color: q{i % 3}" for i in range(len(ds))]
    got = evaluate_encoder(enc, ds, tasks=["instance"], query_attributes=query_attrs, gallery_attributes=stored)
    rows = list(zip(ds["image"], ds["title"], strict=True))
    gallery = np.stack([enc._vec(im, t, a) for (im, t), a in zip(rows, stored, strict=True)])
    queries = np.stack([enc._vec(im, t, a) for (im, t), a in zip(rows, query_attrs, strict=True)])
    labels = np.asarray(ds["product_id"])
    expected, n = brute_force(queries, gallery, labels, labels, exclude_self=True)
    assert got["instance"]["n_queries"] == n
    for name, value in expected.items():
        assert got["instance"][name] == pytest.approx(value)
    # Without query attributes the queries are encoded plainly, not read from the annotated gallery.
    plain = evaluate_encoder(enc, ds, tasks=["instance"], gallery_attributes=stored)
    bare = np.stack([enc._vec(im, t, None) for im, t in rows])
    expected_plain, _ = brute_force(bare, gallery, labels, labels, exclude_self=True)
    assert plain["instance"]["recall@1"] == pytest.approx(expected_plain["recall@1"])
    with pytest.raises(ValueError, match="gallery attribute texts"):
        evaluate_encoder(enc, ds, tasks=["instance"], gallery_attributes=stored[:-1])


@pytest.mark.parametrize("with_gallery_attributes", [False, True])
def test_instance_retrieval_encodes_the_gallery_once_and_matches_the_suite(with_gallery_attributes):
    from afmrl.retrieval.evaluation import instance_retrieval

    ds = _catalog()
    stored = attribute_texts(ds, "reference") if with_gallery_attributes else None
    sources = {
        "none": None,
        "a": [f"color: q{i % 3}" for i in range(len(ds))],
        "b": [None if i % 2 else "size: m" for i in range(len(ds))],
    }
    enc = HashEncoder()
    got = instance_retrieval(enc, ds, sources, gallery_attributes=stored)
    # One gallery encoding, then one per source that needs its own queries.
    assert len(enc.calls) == 1 + 2 + int(with_gallery_attributes)
    for name, texts in sources.items():
        expected = evaluate_encoder(
            HashEncoder(), ds, tasks=["instance"], query_attributes=texts, gallery_attributes=stored
        )["instance"]
        assert got[name] == expected
    with pytest.raises(ValueError, match="a: 3 attribute texts"):
        instance_retrieval(enc, ds, {"a": ["x"] * 3})
