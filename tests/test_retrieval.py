"""Tests for afmrl.retrieval.index.VectorIndex: exact = numpy, approximate ~ exact, exclusion, persistence, errors."""

import json

import faiss
import numpy as np
import pytest

from afmrl.retrieval.index import VectorIndex
from afmrl.retrieval.metrics import metrics_from_search, retrieval_metrics


def normalised(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def gaussian_mixture(n, dim, centers=100, spread=2.0, seed=0):
    """Unit vectors around random centres; spread 2 makes neighbourhoods overlap (IVF needs many probes)."""
    rng = np.random.default_rng(seed)
    means = normalised(rng.standard_normal((centers, dim)))
    x = means[rng.integers(0, centers, n)] + spread * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return normalised(x)


def brute_force(queries, gallery, k, exclude=None):
    scores = queries @ gallery.T
    if exclude is not None:
        scores[np.arange(len(queries)), exclude] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def assert_same_topk(got_scores, got_idx, ref_scores, ref_idx):
    np.testing.assert_allclose(got_scores, ref_scores, atol=1e-5)
    # indices must agree wherever the score is not within float error of a neighbour's
    gaps = np.abs(np.diff(ref_scores, axis=1))
    clear = np.ones(ref_idx.shape, dtype=bool)
    clear[:, 1:] &= gaps > 1e-5
    clear[:, :-1] &= gaps > 1e-5
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(got_idx[clear], ref_idx[clear])


@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(1)
    return normalised(rng.standard_normal((500, 32))), normalised(rng.standard_normal((40, 32)))


@pytest.fixture(scope="module")
def mixture():
    x = gaussian_mixture(20_400, 64, seed=0)
    gallery, queries = x[:20_000], x[20_000:]  # held-out queries from the same distribution
    _, exact = brute_force(queries, gallery, 10)
    return gallery, queries, exact


def test_flat_topk_equals_numpy(small):
    gallery, queries = small
    index = VectorIndex.build(gallery, index_type="flat")
    assert (index.index_type, index.size, index.dim, len(index)) == ("flat", 500, 32, 500)
    scores, idx = index.search(queries, 10)
    assert scores.dtype == np.float32 and idx.dtype == np.int64 and scores.shape == idx.shape == (40, 10)
    assert_same_topk(scores, idx, *brute_force(queries, gallery, 10))


def test_auto_is_flat_up_to_exact_max_size_then_ivf(small):
    gallery, _ = small
    assert VectorIndex.build(gallery).index_type == "flat"
    assert VectorIndex.build(gallery, exact_max_size=500).index_type == "flat"
    assert VectorIndex.build(gallery, exact_max_size=499).index_type == "ivf"


def test_exclusion_drops_exactly_the_own_row_and_keeps_k(small):
    gallery, _ = small
    index = VectorIndex.build(gallery)
    own = np.arange(0, 500, 10)
    queries = gallery[own]
    scores, idx = index.search(queries, 7, exclude=own)
    assert idx.shape == (50, 7)
    assert not (idx == own[:, None]).any()
    assert_same_topk(scores, idx, *brute_force(queries, gallery, 7, exclude=own))
    plain_scores, plain_idx = index.search(queries, 8)
    assert (plain_idx[:, 0] == own).all()  # without exclusion each query finds itself first...
    np.testing.assert_array_equal(idx, plain_idx[:, 1:])  # ...and exclusion just removes it
    # -1 excludes nothing; a row outside the top k+1 leaves the plain top k
    far = np.argsort(queries[:1] @ gallery.T)[0, :1]  # the least similar row
    _, i_none = index.search(queries[:2], 5, exclude=[-1, -1])
    _, i_far = index.search(queries[:1], 5, exclude=far)
    np.testing.assert_array_equal(i_none, index.search(queries[:2], 5)[1])
    np.testing.assert_array_equal(i_far, index.search(queries[:1], 5)[1])


def test_small_gallery_is_padded():
    gallery = normalised(np.eye(3, 4) + 0.1)
    index = VectorIndex.build(gallery, ids=["a", "b", "c"])
    scores, idx = index.search(gallery, 5)
    assert (idx[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all() and (idx[:, :3] >= 0).all()
    scores, idx = index.search(gallery, 3, exclude=[0, 1, 2])
    assert (idx[:, 2] == -1).all() and np.isneginf(scores[:, 2]).all()
    assert not (idx == np.arange(3)[:, None]).any()
    assert index.ids_for(idx)[0].tolist() == [index.ids[idx[0, 0]], index.ids[idx[0, 1]], None]


@pytest.mark.parametrize("index_type", ["ivf", "hnsw"])
def test_approximate_indexes_reach_high_recall_with_defaults(mixture, index_type):
    gallery, queries, exact = mixture
    threads = faiss.omp_get_max_threads()
    index = VectorIndex.build(gallery, index_type=index_type)
    _, idx = index.search(queries, 10)
    recall = (idx[:, :, None] == exact[:, None, :]).any(axis=2).mean()
    assert recall >= 0.95, (index, recall)
    assert faiss.omp_get_max_threads() == threads  # never changed globally
    if index_type == "ivf":
        assert index.params["nlist"] == min(round(4 * np.sqrt(20_000)), 20_000 // 39)
        assert 1 <= index.nprobe < index.params["nlist"]  # calibrated, not exhaustive
        assert index.params["tuning"]["recall"] >= 0.975 and index.params["tuning"]["k"] == 10


def test_ivf_with_explicit_parameters(mixture):
    gallery, queries, exact = mixture
    # nprobe = nlist probes every list: exhaustive
    index = VectorIndex.build(gallery[:5000], index_type="ivf", nlist=16, nprobe=16)
    _, idx = index.search(queries, 10)
    _, ref = brute_force(queries, gallery[:5000], 10)
    assert (idx[:, :, None] == ref[:, None, :]).any(axis=2).mean() > 0.999
    index.nprobe = 2
    assert index.index.nprobe == 2 and index.params["nprobe"] == 2
    with pytest.raises(ValueError, match="nprobe must be between 1 and nlist=16"):
        index.nprobe = 17


@pytest.mark.parametrize("index_type", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip(tmp_path, index_type):
    gallery = gaussian_mixture(3000, 16, centers=20, seed=2)
    queries = gaussian_mixture(50, 16, centers=20, seed=3)
    ids = [f"L{i}" for i in range(len(gallery))]
    index = VectorIndex.build(gallery, ids=ids, index_type=index_type, metadata={"encoder": "abc123"})
    before = index.search(queries, 12, exclude=np.arange(50))
    target = index.save(tmp_path / "gallery", metadata={"step": 7, "dims": [16]})
    info = json.loads((target / "gallery.json").read_text())
    assert {"ids", "dim", "index_type", "size", "metadata"} <= info.keys()
    loaded = VectorIndex.load(tmp_path / "gallery")
    assert (loaded.index_type, loaded.size, loaded.dim, loaded.ids) == (index_type, 3000, 16, ids)
    assert loaded.metadata == {"encoder": "abc123", "step": 7, "dims": [16]}
    assert loaded.params == index.params and loaded.nprobe == index.nprobe and loaded.ef_search == index.ef_search
    after = loaded.search(queries, 12, exclude=np.arange(50))
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])


def test_load_errors_name_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        VectorIndex.load(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="lacks index.faiss and gallery.json"):
        VectorIndex.load(tmp_path / "empty")
    VectorIndex.build(normalised(np.eye(4))).save(tmp_path / "half")
    (tmp_path / "half" / "gallery.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks gallery.json"):
        VectorIndex.load(tmp_path / "half")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        VectorIndex.build(normalised(np.eye(4))).save(tmp_path / "bad", metadata={"x": object()})


def test_input_errors_name_the_problem(small):
    gallery, queries = small
    index = VectorIndex.build(gallery)
    with pytest.raises(ValueError, match="query dim 16 does not match the index dim 32"):
        index.search(queries[:, :16], 5)
    bad = queries.copy()
    bad[3, 7] = np.nan
    with pytest.raises(ValueError, match="queries has NaN or infinite values in row 3"):
        index.search(bad, 5)
    bad_gallery = gallery.copy()
    bad_gallery[11] = np.nan
    with pytest.raises(ValueError, match="embeddings has NaN or infinite values in row 11"):
        VectorIndex.build(bad_gallery)
    with pytest.raises(ValueError, match="unknown index_type 'annoy'; valid: flat, ivf, hnsw, ivfpq, auto"):
        VectorIndex.build(gallery, index_type="annoy")
    with pytest.raises(ValueError, match="row 0 has L2 norm 2.0000.*normalize=True"):
        VectorIndex.build(gallery * 2)
    assert VectorIndex.build(gallery * 2, normalize=True).search(queries, 3)[1].shape == (40, 3)
    with pytest.raises(ValueError, match="2-D"):
        index.search(queries[0], 5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        index.search(queries, 0)
    with pytest.raises(ValueError, match="exclude must be 40 integer"):
        index.search(queries, 5, exclude=[0, 1])
    with pytest.raises(ValueError, match="exclude\\[0\\] = 500 is not a gallery row"):
        index.search(queries, 5, exclude=np.full(40, 500))
    with pytest.raises(ValueError, match="'L1' appears more than once"):
        VectorIndex.build(gallery[:3], ids=["L0", "L1", "L1"])
    with pytest.raises(ValueError, match="2 ids for 3 embeddings"):
        VectorIndex.build(gallery[:3], ids=["L0", "L1"])


def test_dtype_conversion_and_torch_queries(small):
    torch = pytest.importorskip("torch")
    gallery, queries = small
    index = VectorIndex.build(gallery.astype(np.float64))
    ref = index.search(queries, 5)
    for q in (
        queries.astype(np.float64),
        np.asfortranarray(queries),
        torch.from_numpy(queries).to(torch.bfloat16),
    ):
        scores, idx = index.search(q, 5)
        np.testing.assert_allclose(scores, ref[0], atol=2e-2)
    np.testing.assert_array_equal(index.search(torch.from_numpy(queries), 5)[1], ref[1])


def test_evaluation_from_index_matches_dense_metrics():
    """End to end: VectorIndex.search + metrics_from_search == dense retrieval_metrics."""
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(150), 4)  # 150 products, 4 listings each
    centres = normalised(rng.standard_normal((150, 24)))
    gallery = normalised(centres[labels] + 0.15 * rng.standard_normal((600, 24)))
    own = np.arange(0, 600, 3)
    index = VectorIndex.build(gallery)
    scores, idx = index.search(gallery[own], 11, exclude=own)  # one deeper than the largest K
    got = metrics_from_search(idx, scores, labels[own], labels, ks=(1, 5, 10), map_k=10, exclude=own)
    dense = (gallery[own] @ gallery.T).astype(np.float64)
    dense[np.arange(len(own)), own] = -np.inf
    ref = retrieval_metrics(dense, labels[own, None] == labels[None, :], ks=(1, 5, 10), map_k=10)
    assert got["n_ties_cut_by_depth"] == 0
    for name in ("recall@1", "recall@5", "recall@10", "recall_fraction@10", "mAP@10"):
        assert got[name] == pytest.approx(ref[name], abs=1e-6), name
    assert 0.3 < got["recall@1"] < 1.0  # a non-trivial problem


def test_auto_picks_ivfpq_once_the_float_vectors_exceed_the_memory_budget(small):
    gallery, _ = small
    size = gallery.nbytes  # 500 x 32 float32
    assert VectorIndex.build(gallery, exact_max_size=499, memory_budget=size).index_type == "ivf"
    assert VectorIndex.build(gallery, exact_max_size=499, memory_budget=size - 1).index_type == "ivfpq"
    with pytest.raises(ValueError, match="pq_m must divide the dimension 32, got 5"):
        VectorIndex.build(gallery, index_type="ivfpq", pq_m=5)
    with pytest.raises(ValueError, match="normalise them first"):
        VectorIndex.build(gallery, index_type="ivfpq", normalize=True)


def test_ivfpq_from_a_memmap_in_chunks_reranks_exactly_and_round_trips(mixture, tmp_path, monkeypatch):
    import afmrl.retrieval.ivfpq

    gallery, queries, _ = mixture
    gallery = gallery[:3000]
    path = tmp_path / "vectors.npy"
    np.save(path, gallery)
    on_disk = np.load(path, mmap_mode="r")
    monkeypatch.setattr(afmrl.retrieval.ivfpq, "ADD_CHUNK", 1000)  # three chunks
    index = VectorIndex.build(on_disk, index_type="ivfpq", nlist=8, nprobe=8, pq_m=32, rerank_factor=50)
    assert index.params["code_bytes"] == 24 and index.rerank_vectors is on_disk  # 256 B -> 32 x 6 bits; no copy
    in_memory = VectorIndex.build(gallery, index_type="ivfpq", nlist=8, nprobe=8, pq_m=32, rerank_factor=50)
    scores, idx = index.search(queries, 10, exclude=np.full(len(queries), 3))
    np.testing.assert_array_equal(idx, in_memory.search(queries, 10, exclude=np.full(len(queries), 3))[1])
    # every list probed and 500 candidates re-scored exactly: the exact top-10 with exact scores
    assert_same_topk(scores, idx, *brute_force(queries, gallery, 10, exclude=np.full(len(queries), 3)))
    index.nprobe = 1  # fewer candidates: still exact scores, for the rows found
    scores, idx = index.search(queries, 10)
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", gallery[idx], queries), atol=1e-5)
    index.save(tmp_path / "index", metadata={"encoder": "e"})
    loaded = VectorIndex.load(tmp_path / "index")
    assert isinstance(loaded.rerank_vectors, np.memmap) and loaded.nprobe == 1
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], idx)
    index.save(tmp_path)  # the memmap's own file: left as it is
    assert np.load(path).shape == (3000, 64)
    (tmp_path / "index" / "vectors.npy").unlink()
    with pytest.raises(FileNotFoundError, match="lacks vectors.npy"):
        VectorIndex.load(tmp_path / "index")
    bad = np.array(gallery)
    bad[2321] = np.nan
    with pytest.raises(ValueError, match="embeddings has NaN or infinite values in row 2321"):
        VectorIndex.build(bad, index_type="ivfpq", nlist=8)
