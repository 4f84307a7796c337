"""Retrieval metrics on score matrices.

Scores from attribute matching or exact title matching tie massively, and a metric that breaks
ties by gallery order would reward whatever order the file happens to have. ``recall_at_k``
therefore returns the *expected* hit rate under uniformly random tie-breaking, computed exactly.
"""

from __future__ import annotations

from math import comb

import numpy as np


def recall_at_k(scores: np.ndarray, positives: np.ndarray, k: int) -> float:
    """Expected fraction of queries with at least one positive among their top ``k``.

    scores: (num_queries, num_gallery), higher is better; use ``-inf`` for excluded items
    (e.g. the query itself). positives: boolean array of the same shape. Queries without any
    positive are an error: they have no defined recall.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positives = np.asarray(positives, dtype=bool)
    if scores.shape != positives.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and positives {positives.shape} must be equal 2-D shapes")
    if not positives.any(axis=1).all():
        raise ValueError("every query needs at least one positive in the gallery")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, scores.shape[1])
    # The k-th largest score of each row is the tie threshold.
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    above, tied = scores > kth, scores == kth
    pos_above = (positives & above).any(axis=1)
    n_above = above.sum(axis=1)
    n_tied = tied.sum(axis=1)
    pos_tied = (positives & tied).sum(axis=1)
    hits = np.empty(len(scores))
    for q in range(len(scores)):
        if pos_above[q]:
            hits[q] = 1.0
        else:  # draw (k - n_above) of the tied items at random; miss if none is positive
            draw, t, p = k - int(n_above[q]), int(n_tied[q]), int(pos_tied[q])
            hits[q] = 1.0 - comb(t - p, draw) / comb(t, draw)
    return float(hits.mean())
