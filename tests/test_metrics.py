import itertools

import numpy as np
import pytest

from agcl.metrics import recall_at_k


def brute_force_expected_recall(scores, positives, k):
    """Average hit@k over every tie-breaking order (all permutations of each row)."""
    total = 0.0
    for s, p in zip(scores, positives):
        orders = list(itertools.permutations(range(len(s))))
        hits = 0
        for perm in orders:
            ranked = sorted(perm, key=lambda j: -s[j])  # stable sort keeps perm order among ties
            hits += any(p[j] for j in ranked[:k])
        total += hits / len(orders)
    return total / len(scores)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 3])
def test_recall_matches_enumeration_over_tie_orders(seed, k):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 3, size=(4, 6)).astype(float)  # few values: many ties
    positives = rng.random((4, 6)) < 0.3
    positives[:, 0] |= ~positives.any(axis=1)
    scores[0, 1] = -np.inf  # an excluded item
    assert recall_at_k(scores, positives, k) == pytest.approx(brute_force_expected_recall(scores, positives, k))


def test_recall_without_ties_is_the_plain_hit_rate():
    scores = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    positives = np.array([[False, False, True], [False, True, False]])
    assert recall_at_k(scores, positives, 1) == 0.5
    assert recall_at_k(scores, positives, 2) == 1.0


def test_recall_rejects_queries_without_positive():
    with pytest.raises(ValueError, match="at least one positive"):
        recall_at_k(np.zeros((2, 3)), np.array([[True, False, False], [False] * 3]), 1)
