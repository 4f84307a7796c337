"""Rank-based retrieval metrics, for evaluation and for the RAR reward (one implementation for both).

Instance Recall@K (hit rate, as in VLM2Vec / M5Product), recall_fraction@K (the share of a query's positives
in the top K: the AFMRL paper's RAR reward), mAP@K and MRR, from a dense (queries x gallery) score matrix
(``retrieval_metrics``) or from the top-D lists of ``afmrl.retrieval.index.VectorIndex.search``
(``metrics_from_search``, for galleries too large for a matrix; equal to the dense numbers for every K <= D).
Ties count as the exact expectation over all orderings of the tied items: attribute and title scores tie
massively, and breaking ties by gallery order, or optimistically, would reward a constant scorer, the very
solution an RL policy would find. A score of ``-inf`` means "not in this query's gallery". The derivations
(expected rank within a tie, the mAP@K normaliser, depth cut-offs) are in docs/metrics.md.

    m = retrieval_metrics(scores, positives, ks=(1, 5, 10))                     # means over queries
    r = metrics_from_search(idx, sc, q_labels, g_labels, ks=(50,), per_query=True)["recall_fraction@50"]
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_CHUNK_ELEMENTS = 1 << 22  # rows of the dense path are processed in chunks of about this many entries


# ---------------------------------------------------------------------------------------------
# Shared arithmetic on ranked lists: rows sorted by decreasing score, -inf (excluded/padding) last.
class _Ranked:
    """Tie-group bookkeeping for (Q, D) rows sorted by decreasing score."""

    def __init__(self, scores: np.ndarray, rel: np.ndarray, n_pos: np.ndarray, complete: np.ndarray):
        self.scores, self.rel, self.n_pos = scores, rel, n_pos
        self.complete = complete  # (Q,) True where the row lists the query's whole gallery
        q, d = scores.shape
        self.depth = d
        self.n_finite = np.isfinite(scores).sum(axis=1)
        pos = np.broadcast_to(np.arange(d), (q, d))
        new = np.ones((q, d), dtype=bool)
        new[:, 1:] = scores[:, 1:] != scores[:, :-1]
        last = np.ones((q, d), dtype=bool)
        last[:, :-1] = new[:, 1:]
        self.start = np.maximum.accumulate(np.where(new, pos, 0), axis=1)  # first position of the tie group
        # one past the last position of the tie group
        self.end = np.minimum.accumulate(np.where(last, pos + 1, d)[:, ::-1], axis=1)[:, ::-1]
        self.cum = np.zeros((q, d + 1), dtype=np.int64)
        np.cumsum(rel, axis=1, out=self.cum[:, 1:])  # cum[:, i] = positives among the first i places

    def _group(self, column: np.ndarray):
        """(a, t, p, above) of the tie group holding the 0-based place ``column`` (one per row)."""
        c = column[:, None]
        a = np.take_along_axis(self.start, c, axis=1)[:, 0]
        e = np.take_along_axis(self.end, c, axis=1)[:, 0]
        above = np.take_along_axis(self.cum, a[:, None], axis=1)[:, 0]
        p = np.take_along_axis(self.cum, e[:, None], axis=1)[:, 0] - above
        return a, e - a, p, above

    def hit_at(self, k: int) -> np.ndarray:
        """P(at least one positive in the top k)."""
        a, t, p, above = self._group(np.full(len(self.rel), k - 1))
        j = k - a  # places of the straddling tie group inside the top k
        i = np.arange(k)[None, :]
        ratio = np.where(i < j[:, None], (t - p)[:, None] - i, 1.0) / np.where(i < j[:, None], t[:, None] - i, 1.0)
        miss = np.prod(np.clip(ratio, 0.0, 1.0), axis=1)  # C(t-p, j) / C(t, j): no positive among j draws
        return np.where(above > 0, 1.0, 1.0 - miss)

    def positives_in_top(self, k: int) -> np.ndarray:
        """E[number of positives in the top k]."""
        a, t, p, above = self._group(np.full(len(self.rel), k - 1))
        return above + (k - a) * p / t

    def average_precision(self, k: int) -> np.ndarray:
        """E[sum_{r<=k} P(r) rel(r)], not yet normalised."""
        start, end = self.start[:, :k], self.end[:, :k]
        above = np.take_along_axis(self.cum, start, axis=1)
        p = np.take_along_axis(self.cum, end, axis=1) - above
        t = end - start
        j = np.arange(1, k + 1)[None, :] - start  # 1-based place inside the tie group
        # E[rel(r) * hits(r)] = P(rel(r)) * (above + 1 + E[positives among the j-1 earlier tied places | rel(r)])
        earlier = np.where(t > 1, (j - 1) * (p - 1) / np.maximum(t - 1, 1), 0.0)
        expected = p / t * (above + 1 + earlier)
        return (expected / np.arange(1, k + 1)).sum(axis=1)

    def first_positive(self):
        """(rank, reciprocal rank, cut flag) of the best positive; inf / 0 when none is listed."""
        has = self.rel.any(axis=1)
        column = np.where(has, self.rel.argmax(axis=1), 0)
        a, t, p, _ = self._group(column)
        rank, rr = _first_positive(has, a, t, p)
        return rank, rr, has & self.cut_by_depth(column)

    def cut_by_depth(self, column: np.ndarray | int) -> np.ndarray:
        """Rows of a partial list where place ``column`` is not known exactly: it lies past the last
        scored place, or in a tie group of two or more that reaches the last scored place (unseen
        gallery items may belong to it). Search one deeper than the largest K to see such ties."""
        column = np.broadcast_to(np.asarray(column), (len(self.rel),))[:, None]
        start = np.take_along_axis(self.start, column, axis=1)[:, 0]
        end = np.take_along_axis(self.end, column, axis=1)[:, 0]
        unknown = (column[:, 0] >= self.n_finite) | ((end >= self.n_finite) & (end - start >= 2))
        return ~self.complete & unknown


def _first_positive(has: np.ndarray, a: np.ndarray, t: np.ndarray, p: np.ndarray):
    """Expected rank and reciprocal rank of the first positive: ``a`` items above, then a tie group of
    ``t`` items with ``p`` positives (the module docstring's formulas). Rows without ``has``: inf, 0."""
    rank = np.where(has, a + (t + 1) / np.maximum(p + 1, 1), np.inf)
    rr = np.zeros(len(has))
    rows = np.flatnonzero(has)
    if len(rows):
        a, t, p = a[rows], t[rows], p[rows]
        width = int((t - p + 1).max())  # J takes values 1 .. t-p+1
        j = np.arange(1, width + 1)[None, :]
        # P(J=1) = p/t and P(J=j+1) / P(J=j) = (t-j-p+1) / (t-j)
        step = np.clip((t[:, None] - j[:, :-1] - p[:, None] + 1) / np.maximum(t[:, None] - j[:, :-1], 1), 0.0, 1.0)
        prob = (p / t)[:, None] * np.cumprod(np.concatenate([np.ones((len(rows), 1)), step], axis=1), axis=1)
        rr[rows] = (prob / (a[:, None] + j)).sum(axis=1)
    return rank, rr


def _best_positive_counts(scores: np.ndarray, rel: np.ndarray):
    """Per row of a dense matrix: (has a positive, items above the best positive, items tied with
    it, positives tied with it), by counting: no sort."""
    best = np.where(rel, scores, -np.inf).max(axis=1, keepdims=True)
    has = best[:, 0] > -np.inf
    tied = (scores == best) & has[:, None]
    return has, (scores > best).sum(axis=1), tied.sum(axis=1), (tied & rel).sum(axis=1)


def _check_ks(ks: Sequence[int], map_k: int | None) -> tuple[list[int], int | None]:
    ks = [ks] if isinstance(ks, (int, np.integer)) else list(ks)
    for k in [*ks, *([] if map_k is None else [map_k])]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every K must be a positive integer, got {k!r}")
    return [int(k) for k in ks], None if map_k is None else int(map_k)


def _per_query(ranked: _Ranked, ks: list[int], map_k: int | None, first=None) -> dict[str, np.ndarray]:
    """All metrics for each row of ``ranked``; K beyond the lists' length is clamped to it.
    ``first`` = (rank, rr) of the best positive when the caller knows them, else from the lists."""
    out: dict[str, np.ndarray] = {}
    d = ranked.depth
    n_pos = ranked.n_pos.astype(np.float64)
    cut = np.zeros(len(n_pos), dtype=bool)
    for k in ks:
        out[f"recall@{k}"] = ranked.hit_at(min(k, d))
        cut |= ranked.cut_by_depth(min(k, d) - 1)
    for k in ks:
        out[f"recall_fraction@{k}"] = ranked.positives_in_top(min(k, d)) / n_pos
    if map_k is not None:
        kk = min(map_k, d)
        out[f"mAP@{map_k}"] = ranked.average_precision(kk) / np.minimum(map_k, n_pos)
        cut |= ranked.cut_by_depth(kk - 1)
    if first is None:
        rank, rr, rank_cut = ranked.first_positive()
    else:
        (rank, rr), rank_cut = first, False
    out["mrr"] = rr
    out["rank"] = rank
    out["_cut"] = cut | rank_cut
    return out


def _finish(rows: dict[str, np.ndarray], valid: np.ndarray, per_query: bool) -> dict:
    cut = rows.pop("_cut")
    n = int(valid.sum())
    result: dict = {}
    for name, values in rows.items():
        if per_query:
            full = np.full(len(valid), np.nan)
            full[valid] = values
            result[name] = full
        elif name != "rank":
            result[name] = float(values.mean()) if n else float("nan")
    result["n_queries"] = n
    result["n_skipped"] = int(len(valid) - n)
    result["n_ties_cut_by_depth"] = int(cut.sum())
    return result


def _no_positive_error(n_pos: np.ndarray) -> ValueError:
    rows = np.flatnonzero(n_pos == 0)
    shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if len(rows) > 5 else "")
    return ValueError(
        f"{len(rows)} of {len(n_pos)} queries have no positive in the gallery (query rows {shown}); every "
        "query needs at least one positive (excluded -inf items do not count), or pass "
        "skip_queries_without_positive=True to drop them"
    )


# ---------------------------------------------------------------------------------------------
# Dense score matrices.
def _check_dense(scores, positives) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be equal 2-D shapes")
    if scores.shape[1] == 0:
        raise ValueError("the gallery is empty")
    nan = np.isnan(scores).any(axis=1)
    if nan.any():
        raise ValueError(f"scores has NaN in query row {int(np.flatnonzero(nan)[0])}; use -inf to exclude an item")
    return scores, positives & (scores > -np.inf)


def _dense_per_query(scores, rel, ks, map_k) -> dict[str, np.ndarray]:
    """Sort only what the metrics read: every item scored at or above the K_max-th score (so the
    tie group straddling place K_max is whole), plus the best positive's tie group by counting."""
    q, n = scores.shape
    k_max = min(max([*ks, *([] if map_k is None else [map_k])]), n)
    parts: list[dict[str, np.ndarray]] = []
    step = max(1, _CHUNK_ELEMENTS // n)
    for lo in range(0, q, step):
        s, r = scores[lo : lo + step], rel[lo : lo + step]
        kth = -np.partition(-s, k_max - 1, axis=1)[:, k_max - 1 : k_max]
        m = int((s >= kth).sum(axis=1).max())
        top = np.argpartition(-s, m - 1, axis=1)[:, :m] if m < n else np.broadcast_to(np.arange(n), s.shape)
        top_s = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-top_s, axis=1, kind="stable")
        ranked = _Ranked(
            np.take_along_axis(top_s, order, axis=1),
            np.take_along_axis(np.take_along_axis(r, top, axis=1), order, axis=1),
            r.sum(axis=1),
            complete=np.ones(len(s), dtype=bool),
        )
        has, a, t, p = _best_positive_counts(s, r)
        parts.append(_per_query(ranked, ks, map_k, first=_first_positive(has, a, t, p)))
    if not parts:
        return {}
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def retrieval_metrics(
    scores: np.ndarray,
    positives: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int | None = 10,
    *,
    skip_queries_without_positive: bool = False,
    per_query: bool = False,
) -> dict:
    """Recall@K, recall_fraction@K, mAP@``map_k`` and MRR from a dense score matrix.

    scores: (num_queries, num_gallery), higher is better, ``-inf`` excludes an item (the query
    itself). positives: boolean, same shape. Ties are broken in expectation (module docstring).
    K larger than the gallery is clamped to its size. Returns a dict with ``recall@K``,
    ``recall_fraction@K`` (each K in ``ks``), ``mAP@{map_k}``, ``mrr``, ``n_queries``,
    ``n_skipped`` and ``n_ties_cut_by_depth`` (always 0 here). With ``per_query=True`` each metric
    is an array over queries (NaN for skipped ones) and ``rank`` (expected rank of the best
    positive) is added. Queries without a positive raise ValueError unless
    ``skip_queries_without_positive=True`` leaves them out.
    """
    ks, map_k = _check_ks(ks, map_k)
    scores, rel = _check_dense(scores, positives)
    n_pos = rel.sum(axis=1)
    valid = n_pos > 0
    if not valid.all() and not skip_queries_without_positive:
        raise _no_positive_error(n_pos)
    rows = _dense_per_query(scores[valid], rel[valid], ks, map_k)
    if not rows:  # nothing to evaluate: keep the keys
        rows = {name: np.zeros(0) for name in _per_query_names(ks, map_k)}
        rows["_cut"] = np.zeros(0, dtype=bool)
    return _finish(rows, valid, per_query)


def _per_query_names(ks, map_k):
    names = [f"{m}@{k}" for m in ("recall", "recall_fraction") for k in ks]
    return names + ([f"mAP@{map_k}"] if map_k is not None else []) + ["mrr", "rank"]


def ranks_of_positives(
    scores: np.ndarray, positives: np.ndarray, *, skip_queries_without_positive: bool = False
) -> np.ndarray:
    """Expected 1-based rank of each query's best positive: 1 + a + (tied negatives) / (p + 1).

    ``a`` counts the items scored strictly above the best positive (all negatives), ``p`` the
    positives tied with it. Fractional when the best positive ties with negatives; see the
    module docstring for why. ``-inf`` excludes an item. Queries without a positive raise
    ValueError, or get NaN with ``skip_queries_without_positive=True``.
    """
    scores, rel = _check_dense(scores, positives)
    n_pos = rel.sum(axis=1)
    if not (n_pos > 0).all() and not skip_queries_without_positive:
        raise _no_positive_error(n_pos)
    has, above, tied, p = _best_positive_counts(scores, rel)  # no sort needed
    return np.where(has, 1.0 + above + (tied - p) / (p + 1.0), np.nan)


def recall_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Expected fraction of queries with at least one positive among their top ``k``.

    scores: (num_queries, num_gallery), higher is better; use ``-inf`` for excluded items
    (e.g. the query itself), which never count as hits. positives: boolean array of the same
    shape. Queries without any positive are an error: they have no defined recall.
    Equal to ``retrieval_metrics(scores, positives, ks=(k,))[f"recall@{k}"]``.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return retrieval_metrics(scores, positives, ks=(k,), map_k=None)[f"recall@{k}"]


# ---------------------------------------------------------------------------------------------
# Search results (top-D lists), for galleries without a dense matrix.
def _label_counts(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """How many gallery items carry each query's label (no N x N comparison)."""
    uniq, counts = np.unique(gallery_labels, return_counts=True)
    if len(uniq) == 0:
        return np.zeros(len(query_labels), dtype=np.int64)
    where = np.clip(np.searchsorted(uniq, query_labels), 0, len(uniq) - 1)
    return np.where(uniq[where] == query_labels, counts[where], 0)


def metrics_from_search(
    indices: np.ndarray,
    scores: np.ndarray,
    query_labels: Sequence,
    gallery_labels: Sequence,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int | None = 10,
    *,
    exclude: Sequence[int] | None = None,
    skip_queries_without_positive: bool = False,
    per_query: bool = False,
) -> dict:
    """The metrics of ``retrieval_metrics`` from top-D search results, e.g. ``VectorIndex.search``.

    indices: (Q, D) integer gallery rows, -1 for padding; scores: (Q, D) their scores (any order
    within a row; ties are handled as in the dense path). A gallery item is a positive of query
    i when ``gallery_labels[item] == query_labels[i]`` (e.g. product ids); the number of
    positives per query is counted over the whole gallery, minus ``exclude[i]`` (the query's own
    row in the gallery, -1 for none), which is also dropped from the lists if present. Every K
    must be <= D unless the lists hold the whole gallery. Exact where a full dense evaluation
    would be, except for queries counted in ``n_ties_cut_by_depth`` (a tie group reaching past
    the depth: search deeper) and for MRR/rank of queries with no positive in their top D
    (reciprocal rank 0, rank inf: MRR@D).
    """
    ks, map_k = _check_ks(ks, map_k)
    indices = np.asarray(indices)
    scores = np.asarray(scores, dtype=np.float64)
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(
            f"indices must be integer gallery rows, got dtype {indices.dtype} (did you swap indices and scores?)"
        )
    if indices.shape != scores.shape or indices.ndim != 2:
        raise ValueError(f"indices {indices.shape} and scores {scores.shape} must be equal 2-D shapes")
    query_labels = np.asarray(query_labels)
    gallery_labels = np.asarray(gallery_labels)
    nq, depth = indices.shape
    n_gallery = len(gallery_labels)
    if query_labels.shape != (nq,):
        raise ValueError(f"query_labels has shape {query_labels.shape}, expected ({nq},)")
    if ((indices < -1) | (indices >= n_gallery)).any():
        raise ValueError(f"indices must be gallery rows in 0..{n_gallery - 1} or -1 (padding)")
    if np.isnan(scores).any():
        raise ValueError(f"scores has NaN in query row {int(np.flatnonzero(np.isnan(scores).any(axis=1))[0])}")
    listed = indices >= 0
    rel = listed & (gallery_labels[np.where(listed, indices, 0)] == query_labels[:, None])
    n_pos = _label_counts(query_labels, gallery_labels)
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64)
        if ex.shape != (nq,) or ((ex < -1) | (ex >= n_gallery)).any():
            raise ValueError(f"exclude must hold {nq} gallery rows (or -1), one per query")
        n_pos = n_pos - ((ex >= 0) & (gallery_labels[np.maximum(ex, 0)] == query_labels))
        listed &= indices != ex[:, None]
        rel &= listed
    scores = np.where(listed, scores, -np.inf)
    rel &= scores > -np.inf  # -inf in a search list is padding, never a hit
    n_listable = n_gallery - (0 if exclude is None else (ex >= 0).astype(np.int64))
    complete = listed.sum(axis=1) >= n_listable
    too_deep = [k for k in [*ks, *([] if map_k is None else [map_k])] if k > depth]
    if too_deep and not complete.all():
        raise ValueError(
            f"K={max(too_deep)} is deeper than the {depth} search results per query; search with k >= {max(too_deep)}"
        )
    valid = n_pos > 0
    if not valid.all() and not skip_queries_without_positive:
        raise _no_positive_error(n_pos)
    order = np.argsort(-scores[valid], axis=1, kind="stable")
    ranked = _Ranked(
        np.take_along_axis(scores[valid], order, axis=1),
        np.take_along_axis(rel[valid], order, axis=1),
        n_pos[valid],
        complete=complete[valid],
    )
    rows = _per_query(ranked, ks, map_k)
    return _finish(rows, valid, per_query)
