"""IVF-PQ for galleries whose float32 vectors do not fit in memory, re-ranked exactly from disk.

A marketplace's catalog outgrows memory long before it outgrows disk: 100M listings of a
1536-dim encoder (Qwen2-VL-2B) are 614 GB as float32. ``faiss.IndexIVFPQ`` keeps only a
``pq_m``-byte code per vector in memory (by default dim / 8 bytes, 32x less than float32), but its scores
are approximate, too coarse both for the exact top-k and for a calibrated "same product" score
threshold. So the candidates it finds (``rerank_factor`` x k of them) are re-scored with the float
vectors, read from a memory-mapped ``.npy`` on disk (only those rows are read), and the exact
scores decide the order -- the usual "compressed index + exact re-ranking" arrangement. faiss's
own ``IndexRefineFlat`` holds the refinement vectors in memory (its mmap flag does not reach
them), hence this small module. Sizes and timings: docs/results/index_scale.md.

    index, params = build_ivfpq(vectors_memmap, checked_rows)   # trained on a sample, filled in chunks
    scores, rows = rerank_search(index, vectors_memmap, queries, k=10, factor=8)
"""

from __future__ import annotations

import math

import faiss
import numpy as np

from afmrl.retrieval.vectors import checked_rows

ADD_CHUNK = 65_536  # rows converted and added at a time
_RERANK_BUFFER = 2**26  # floats of candidate vectors gathered at once (256 MiB): bounds the queries per chunk


def default_pq_m(dim: int) -> int:
    """Bytes per code: the largest divisor of ``dim`` up to dim / 8, i.e. 8 dims per byte at most
    (32x smaller than float32); recall comes back from the re-ranking, not from the code size."""
    return max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)


def build_ivfpq(
    x, *, nlist: int | None = None, nprobe: int | None = None, pq_m: int | None = None, seed: int = 0
) -> tuple[faiss.Index, dict]:
    """An inner-product ``IndexIVFPQ`` over ``x`` ((n, dim), L2-normalised rows, may be a ``np.memmap``):
    trained on a seeded sample, filled ``ADD_CHUNK`` rows at a time, so no more than a chunk is ever
    converted to checked float32 (``afmrl.retrieval.vectors.checked_rows``)."""
    n, dim = x.shape
    pq_m = default_pq_m(dim) if pq_m is None else pq_m
    if pq_m < 1 or dim % pq_m:
        raise ValueError(f"pq_m must divide the dimension {dim}, got {pq_m}")
    nlist = nlist or min(max(1, int(round(4 * math.sqrt(n)))), max(1, n // 39))
    if not 1 <= nlist <= n:
        raise ValueError(f"nlist must be between 1 and the gallery size {n}, got {nlist}")
    # faiss wants >= 39 training points per centroid: fewer bits per sub-quantiser for small galleries
    nbits = 8 if n >= 39 * 256 else max(1, int(math.log2(max(2, n // 39))))
    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT)
    index.cp.spherical = True  # centroids on the sphere, like the data
    n_train = min(n, max(64 * nlist, 39 * 2**nbits))
    sample = np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False)) if n_train < n else None
    train = np.concatenate([checked_rows(x, s, min(s + ADD_CHUNK, n), rows=sample) for s in range(0, n, ADD_CHUNK)])
    index.train(train)
    del train
    for start in range(0, n, ADD_CHUNK):
        index.add(checked_rows(x, start, min(start + ADD_CHUNK, n)))
    index.nprobe = min(nprobe or 1, nlist)
    params = {
        "nlist": nlist,
        "nprobe": int(index.nprobe),
        "pq_m": pq_m,
        "nbits": nbits,
        "n_train": n_train,
        "code_bytes": math.ceil(pq_m * nbits / 8),
    }
    return index, params


def rerank_search(
    index: faiss.Index, vectors, queries: np.ndarray, k: int, factor: int
) -> tuple[np.ndarray, np.ndarray]:
    """faiss-style ``(scores, rows)`` of the top ``k``: ``factor * k`` candidates from ``index``, re-scored
    exactly with ``vectors[row]`` (float, memory-mapped or not; only the candidates' rows are read).
    Missing results are row -1 with score -inf."""
    nq = len(queries)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    found = np.full((nq, k), -1, dtype=np.int64)
    chunk = max(1, min(256, _RERANK_BUFFER // (k * factor * index.d)))
    for start in range(0, nq, chunk):
        q = queries[start : start + chunk]
        _, cand = index.search(q, k * factor)
        unique = np.unique(cand[cand >= 0])  # sorted: a forward pass over the file
        block = np.asarray(vectors[unique], dtype=np.float32)
        pos = np.searchsorted(unique, np.where(cand >= 0, cand, unique[0] if len(unique) else 0))
        exact = np.einsum("qcd,qd->qc", block[pos], q) if len(unique) else np.zeros(cand.shape, np.float32)
        exact = np.where(cand >= 0, exact, -np.inf)
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        width = order.shape[1]
        scores[start : start + len(q), :width] = np.take_along_axis(exact, order, axis=1)
        found[start : start + len(q), :width] = np.where(
            np.isfinite(scores[start : start + len(q), :width]), np.take_along_axis(cand, order, axis=1), -1
        )
    return scores, found
