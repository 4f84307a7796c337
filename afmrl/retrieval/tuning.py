"""The one search tuner: the cheapest nprobe / efSearch of an approximate index that still finds the exact top-k.

Every approximate index (IVF, IVF-PQ, HNSW) is tuned here, when ``VectorIndex.build`` makes it (the exact top-10 at
recall 0.95 by default) and when ``ProductGallery`` asks for the reward's top-50 at 0.98. An index that misses its
exact top-K makes the reward score the index's misses instead of the policy's attributes. ``tune_search`` measures
recall of the exact top-k on leave-one-out gallery queries (the reward's own situation: a query's listing is
excluded) and sets the smallest ``nprobe`` / ``efSearch`` (and, for IVF-PQ, re-ranking depth) that reaches the
goal. ``exact_top_k`` is the ground truth, read in chunks so that the vectors may be memory-mapped.

    result = tune_search(index, k=50, target_recall=0.98)   # index: a VectorIndex; also gallery.tune_search(...)
    print(result["param"], result["value"], result["recall"])
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import faiss
import numpy as np

__all__ = ["exact_top_k", "faiss_flat", "tune_search"]


def tune_search(
    index,
    k: int = 50,
    target_recall: float = 0.98,
    queries: np.ndarray | None = None,
    num_queries: int = 512,
    seed: int = 0,
    rows: Sequence[int] | None = None,
) -> dict:
    """Set the smallest nprobe (IVF) / efSearch (HNSW) whose recall of the exact top-``k`` reaches
    ``target_recall`` on ``index`` (a ``VectorIndex``); returns what it measured (also in ``index.params["tuning"]``).

    Without ``queries``, ``num_queries`` gallery rows are the queries and each one's own row is
    excluded (leave-one-out, as the reward excludes a query's own listing): drawn uniformly, or
    from ``rows`` -- pass the gallery rows of the listings your prompts query when they are not
    a uniform sample of the gallery (a recall measured on one region of the space says little
    about another: ``benchmarks/reward_cost.py`` shows IVF tuned on uniform rows missing a
    quarter of the top-50 of queries from a small dense region). The sample's queries are gallery
    rows, a little easier than unseen ones, so it aims halfway between the target and 1. A flat index is exact:
    nothing to tune. IVF-PQ also raises its re-ranking depth (from the one it was built with, doubling up to 128)
    when probing every list is not enough; its exact top-k comes from its memory-mapped vectors, read in chunks.
    """
    kind = index.index_type
    if kind == "flat":
        return {"recall": 1.0, "k": k}
    n = index.size
    k = int(min(k, n - 1 if queries is None else n))
    if k < 1:
        return {"recall": 1.0, "k": k}
    rng = np.random.default_rng(seed)
    base = index.rerank_vectors if index.rerank_vectors is not None else index.vectors(np.arange(n))
    if queries is None:
        pool = np.arange(n) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
        sample = np.sort(rng.choice(pool, min(len(pool), num_queries), replace=False))
        q, exclude = np.ascontiguousarray(base[sample], dtype=np.float32), sample
    else:
        q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
        exclude = None
    truth = exact_top_k(q, base, k, exclude)
    goal = 1.0 - (1.0 - target_recall) / 2
    if kind in ("ivf", "ivfpq"):
        nlist = index.index.nlist
        ladder = sorted({min(nlist, max(1, int(round(2 ** (i / 2))))) for i in range(2 * int(math.log2(nlist)) + 3)})
    else:
        ladder = sorted({max(k, int(round(k * 2 ** (i / 2)))) for i in range(0, 14)})
    recall, value = 0.0, ladder[-1]
    # IVF-PQ: when probing more lists is not enough, re-rank more of its candidates
    start = index.params.get("rerank_factor", 8)
    factors = (start, *(f for f in (16, 32, 64, 128) if f > start)) if kind == "ivfpq" else (None,)
    for factor in factors:
        if factor is not None:
            index.params["rerank_factor"] = factor
        for value in ladder:
            if kind != "hnsw":
                index.nprobe = value
            else:
                index.ef_search = value
            _, found = index.search(q, k, exclude=exclude)
            recall = _overlap(found, truth)
            if recall >= goal:
                break
        if recall >= goal:
            break
    del base
    result = {
        "param": "ef_search" if kind == "hnsw" else "nprobe",
        "value": int(value),
        "recall": recall,
        "goal": goal,
        "target_recall": target_recall,
        "k": k,
        "queries": len(q),
    }
    if kind == "ivfpq":
        result["rerank_factor"] = index.params["rerank_factor"]
    if recall < goal:
        warnings.warn(
            f"{kind} gallery: recall of the exact top-{k} is {recall:.3f} at the largest "
            f"{result['param']}={value}, below the goal {goal:.3f}; use a flat index or more lists",
            stacklevel=_outside_this_package(),
        )
    index.params["tuning"] = result
    return result


def _outside_this_package() -> int:
    """The warnings stacklevel of the first caller outside afmrl/retrieval/ (tune_search is reached through
    VectorIndex.build and ProductGallery; the warning should point at the user's line)."""
    import os
    import sys
    from pathlib import Path

    here, frame, level = str(Path(__file__).resolve().parent) + os.sep, sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(here):
        frame, level = frame.f_back, level + 1
    return level


def faiss_flat(vectors: np.ndarray) -> faiss.Index:
    """An exact inner-product index over ``vectors`` (used as ground truth when tuning)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def exact_top_k(
    queries: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None, chunk: int = 262_144
) -> np.ndarray:
    """Rows of the exact top-``k`` of ``base`` (read ``chunk`` rows at a time, so it may be memory-mapped) by
    inner product for each query; ``exclude[i]`` is a row left out of query i's results (-1: none)."""
    nq, extra = len(queries), 0 if exclude is None else 1
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for start in range(0, len(base), chunk):
        block = np.ascontiguousarray(base[start : start + chunk], dtype=np.float32)
        s, i = faiss.knn(queries, block, min(k + extra, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i + start], axis=1)
        if exclude is not None:
            best_s = np.where(best_i == np.asarray(exclude)[:, None], -np.inf, best_s)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    return np.where(np.isfinite(best_s), best_i, -1)


def _overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (exact top-k rows) present in ``found``."""
    found = np.sort(found, axis=1)
    pos = np.clip(np.stack([np.searchsorted(f, t) for f, t in zip(found, truth, strict=True)]), 0, found.shape[1] - 1)
    hit = np.take_along_axis(found, pos, axis=1) == truth
    valid = truth >= 0
    return float((hit & valid).sum() / max(valid.sum(), 1))
