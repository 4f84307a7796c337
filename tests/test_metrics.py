import itertools

import numpy as np
import pytest

from afmrl.retrieval.metrics import recall_at_k


def brute_force_expected_recall(scores, positives, k):
    """Average hit@k over every tie-breaking order (all permutations of each row)."""
    total = 0.0
    for s, p in zip(scores, positives, strict=True):
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


# ---------------------------------------------------------------------------------------------
# Rank-based metrics: every value against a brute-force expectation over tie-breaking orders.
from afmrl.retrieval.metrics import (  # noqa: E402
    metrics_from_search,
    ranks_of_positives,
    retrieval_metrics,
)


def concrete_metrics(ranked_rel, n_pos, ks, map_k):
    """Metrics of one query for one concrete ranking (a 0/1 list, excluded items already removed)."""
    out = {}
    for k in ks:
        top = ranked_rel[:k]
        out[f"recall@{k}"] = float(any(top))
        out[f"recall_fraction@{k}"] = sum(top) / n_pos
    precision_sum = sum(sum(ranked_rel[: r + 1]) / (r + 1) for r in range(min(map_k, len(ranked_rel))) if ranked_rel[r])
    out[f"mAP@{map_k}"] = precision_sum / min(map_k, n_pos)
    first = ranked_rel.index(1)
    out["mrr"] = 1.0 / (first + 1)
    out["rank"] = float(first + 1)
    return out


def all_orderings(scores):
    """Every ordering of the items by decreasing score, ties in every order (equally likely)."""
    for perm in itertools.permutations(range(len(scores))):
        yield sorted(perm, key=lambda j: -scores[j])  # stable: ties keep the permutation's order


def tie_arrangements(scores, rel):
    """Every distinct 0/1 relevance list: per tie group, each choice of places for its positives."""
    groups = []
    for value in sorted(set(scores), reverse=True):
        members = [r for s, r in zip(scores, rel, strict=True) if s == value]
        groups.append((len(members), sum(members)))
    for choice in itertools.product(*(itertools.combinations(range(t), p) for t, p in groups)):
        ranked = []
        for (t, _), places in zip(groups, choice, strict=True):
            ranked += [int(i in places) for i in range(t)]
        yield ranked


def reference_metrics(scores, positives, ks, map_k, exhaustive):
    """Mean over queries of the uniform average over tie-breaking orders; -inf items are removed."""
    per_query = []
    for s_row, p_row in zip(scores, positives, strict=True):
        keep = [j for j in range(len(s_row)) if s_row[j] != -np.inf]
        s = [float(s_row[j]) for j in keep]
        rel = [int(p_row[j]) for j in keep]
        n_pos = sum(rel)
        if exhaustive:
            lists = [[rel[j] for j in order] for order in all_orderings(s)]
        else:
            lists = list(tie_arrangements(s, rel))
        values = [concrete_metrics(lst, n_pos, ks, map_k) for lst in lists]
        per_query.append({name: np.mean([v[name] for v in values]) for name in values[0]})
    return {name: np.array([q[name] for q in per_query]) for name in per_query[0]}


def tied_problem(seed, num_queries, num_gallery, levels=4):
    """Integer scores (many ties), several positives per query, the query's own column excluded."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(num_queries, num_gallery)).astype(float)
    positives = rng.random((num_queries, num_gallery)) < 0.3
    rows = np.arange(num_queries)
    scores[rows, rows] = -np.inf  # query i is gallery item i: excluded...
    positives[rows, rows] = True  # ...even though it is "positive" to itself
    lonely = ~(positives & (scores > -np.inf)).any(axis=1)
    positives[lonely, (rows[lonely] + 1) % num_gallery] = True
    return scores, positives


def assert_matches_reference(got, ref, num_queries):
    for name, values in ref.items():
        np.testing.assert_allclose(got[name], values, rtol=1e-12, atol=1e-12, err_msg=name)
    assert got["n_queries"] == num_queries and got["n_skipped"] == 0


@pytest.mark.parametrize("seed", range(4))
def test_metrics_equal_enumeration_over_all_orders(seed):
    scores, positives = tied_problem(seed, num_queries=5, num_gallery=7, levels=3)
    ks, map_k = (1, 2, 3, 9), 4
    ref = reference_metrics(scores, positives, ks, map_k, exhaustive=True)
    got = retrieval_metrics(scores, positives, ks=ks, map_k=map_k, per_query=True)
    assert_matches_reference(got, ref, 5)
    np.testing.assert_allclose(ranks_of_positives(scores, positives), ref["rank"], rtol=1e-12)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("map_k", [1, 5, 14])
def test_metrics_equal_enumeration_over_tie_arrangements(seed, map_k):
    scores, positives = tied_problem(100 + seed, num_queries=8, num_gallery=13)
    ks = (1, 3, 5, 10, 20)
    ref = reference_metrics(scores, positives, ks, map_k, exhaustive=False)
    got = retrieval_metrics(scores, positives, ks=ks, map_k=map_k, per_query=True)
    assert_matches_reference(got, ref, 8)
    np.testing.assert_allclose(ranks_of_positives(scores, positives), ref["rank"], rtol=1e-12)
    means = retrieval_metrics(scores, positives, ks=ks, map_k=map_k)
    for name, values in ref.items():
        if name != "rank":
            assert means[name] == pytest.approx(values.mean(), abs=1e-12), name
    for k in ks:
        assert recall_at_k(scores, positives, k) == pytest.approx(ref[f"recall@{k}"].mean(), abs=1e-12)


def test_all_tied_rows_and_large_ties():
    """A constant scorer: every metric is the chance level, computed without enumerating orders."""
    n, n_pos = 50, 5
    positives = np.zeros((1, n), dtype=bool)
    positives[0, :n_pos] = True
    got = retrieval_metrics(np.zeros((1, n)), positives, ks=(1, 10), map_k=10)
    assert got["recall@1"] == pytest.approx(n_pos / n)
    assert got["recall_fraction@10"] == pytest.approx(10 / n)
    from math import comb

    assert got["recall@10"] == pytest.approx(1 - comb(n - n_pos, 10) / comb(n, 10))
    expected_rr = sum(comb(n - j, n_pos - 1) / comb(n, n_pos) / j for j in range(1, n - n_pos + 2))
    assert got["mrr"] == pytest.approx(expected_rr)
    # E[AP@10]: each place r holds a positive w.p. n_pos/n; given that, E[hits(r)] = 1 + (r-1)(n_pos-1)/(n-1)
    ap = sum(n_pos / n * (1 + (r - 1) * (n_pos - 1) / (n - 1)) / r for r in range(1, 11)) / min(10, n_pos)
    assert got["mAP@10"] == pytest.approx(ap)
    assert ranks_of_positives(np.zeros((1, n)), positives)[0] == pytest.approx((n + 1) / (n_pos + 1))


def test_hand_computed_example():
    # best positive (score 2) tied with one negative, below one negative (score 3)
    scores = np.array([[3.0, 2.0, 2.0, 1.0]])
    positives = np.array([[False, True, False, False]])
    got = retrieval_metrics(scores, positives, ks=(1, 2, 3), map_k=3, per_query=True)
    assert got["rank"][0] == 2.5 and ranks_of_positives(scores, positives)[0] == 2.5
    assert got["mrr"][0] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert (got["recall@1"][0], got["recall@2"][0], got["recall@3"][0]) == (0.0, 0.5, 1.0)
    assert got["mAP@3"][0] == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_map_normaliser_is_min_of_k_and_positives():
    scores = -np.arange(20, dtype=float)[None, :]  # item j at rank j+1
    five = np.zeros((1, 20), dtype=bool)
    five[0, [0, 10, 11, 12, 13]] = True  # one positive at rank 1, four far below
    assert retrieval_metrics(scores, five, ks=(1,), map_k=5)["mAP@5"] == pytest.approx(1 / 5)
    many = np.zeros((1, 20), dtype=bool)
    many[0, :15] = True  # 15 positives ranked first: perfect at K=10
    assert retrieval_metrics(scores, many, ks=(1,), map_k=10)["mAP@10"] == pytest.approx(1.0)
    assert retrieval_metrics(scores, many, ks=(10,), map_k=10)["recall_fraction@10"] == pytest.approx(10 / 15)


def test_queries_without_positive_raise_or_are_skipped():
    scores, positives = tied_problem(7, num_queries=6, num_gallery=9)
    positives[2] = False
    positives[4] = False
    positives[4, 4] = True  # its only positive is its own excluded column: still none
    with pytest.raises(ValueError, match=r"2 of 6 queries have no positive.*rows 2, 4.*skip_queries_without_positive"):
        retrieval_metrics(scores, positives)
    with pytest.raises(ValueError, match="no positive"):
        ranks_of_positives(scores, positives)
    got = retrieval_metrics(scores, positives, per_query=True, skip_queries_without_positive=True)
    assert got["n_queries"] == 4 and got["n_skipped"] == 2
    assert np.isnan(got["mrr"][[2, 4]]).all() and np.isfinite(got["mrr"][[0, 1, 3, 5]]).all()
    keep = [0, 1, 3, 5]
    ref = retrieval_metrics(scores[keep], positives[keep])
    means = retrieval_metrics(scores, positives, skip_queries_without_positive=True)
    for name in ("recall@1", "recall@5", "mAP@10", "mrr"):
        assert means[name] == pytest.approx(ref[name])
    ranks = ranks_of_positives(scores, positives, skip_queries_without_positive=True)
    assert np.isnan(ranks[[2, 4]]).all()


def test_bad_inputs_are_named():
    scores, positives = tied_problem(0, 3, 5)
    scores[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN in query row 1"):
        retrieval_metrics(scores, positives)
    with pytest.raises(ValueError, match="equal 2-D shapes"):
        retrieval_metrics(np.zeros((2, 3)), np.zeros((2, 4), dtype=bool))
    with pytest.raises(ValueError, match="positive integer"):
        retrieval_metrics(np.zeros((2, 3)), np.ones((2, 3), dtype=bool), ks=(0,))


# ---------------------------------------------------------------------------------------------
# The search-result path gives the dense path's numbers without an N x N matrix.
def search_problem(seed, num_queries=10, num_gallery=40, tied=True):
    """Queries are the first gallery items (exclude = own row); positives share a label."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, size=num_gallery)
    labels[:num_queries] = labels[num_queries : 2 * num_queries]  # every query has another positive
    raw = (
        rng.integers(0, 5, size=(num_queries, num_gallery)).astype(float)
        if tied
        else rng.standard_normal((num_queries, num_gallery))
    )
    dense = raw.copy()
    rows = np.arange(num_queries)
    dense[rows, rows] = -np.inf
    positives = labels[:num_queries, None] == labels[None, :]
    return raw, dense, positives, labels[:num_queries], labels, rows


@pytest.mark.parametrize("seed", range(4))
def test_search_path_equals_dense_path_on_full_lists(seed):
    raw, dense, positives, qlab, glab, own = search_problem(seed)
    rng = np.random.default_rng(seed)
    # full lists in a shuffled order, still holding the query's own row: exclude drops it
    indices = np.stack([rng.permutation(raw.shape[1]) for _ in range(len(raw))])
    scores = np.take_along_axis(raw, indices, axis=1)
    ks, map_k = (1, 3, 5, 10), 7
    a = retrieval_metrics(dense, positives, ks=ks, map_k=map_k, per_query=True)
    b = metrics_from_search(indices, scores, qlab, glab, ks=ks, map_k=map_k, exclude=own, per_query=True)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-12, err_msg=name)
    assert b["n_ties_cut_by_depth"] == 0
    np.testing.assert_allclose(b["rank"], ranks_of_positives(dense, positives))


def test_search_path_on_truncated_lists_without_ties():
    raw, dense, positives, qlab, glab, own = search_problem(11, num_queries=30, num_gallery=300, tied=False)
    depth = 10
    order = np.argsort(-dense, axis=1)[:, :depth]  # what VectorIndex.search(..., k=10, exclude=own) returns
    scores = np.take_along_axis(dense, order, axis=1)
    a = retrieval_metrics(dense, positives, ks=(1, 5, 10), map_k=10, per_query=True)
    b = metrics_from_search(order, scores, qlab, glab, ks=(1, 5, 10), map_k=10, exclude=own, per_query=True)
    for name in ("recall@1", "recall@5", "recall@10", "recall_fraction@5", "recall_fraction@10", "mAP@10"):
        np.testing.assert_allclose(b[name], a[name], rtol=1e-12, err_msg=name)
    found = a["rank"] <= depth
    assert 0 < found.sum() < len(found)
    np.testing.assert_allclose(b["mrr"][found], a["mrr"][found])
    assert (b["mrr"][~found] == 0).all() and np.isinf(b["rank"][~found]).all()  # MRR@depth
    assert b["n_ties_cut_by_depth"] == 0
    with pytest.raises(ValueError, match="deeper than the 10 search results"):
        metrics_from_search(order, scores, qlab, glab, ks=(1, 20), map_k=10, exclude=own)


def test_search_path_flags_ties_cut_by_the_depth():
    raw, dense, positives, qlab, glab, own = search_problem(3, num_queries=12, num_gallery=60)
    order = np.argsort(-dense, axis=1, kind="stable")[:, :11]  # integer scores: ties run past place 11
    scores = np.take_along_axis(dense, order, axis=1)
    got = metrics_from_search(order, scores, qlab, glab, ks=(1, 10), map_k=10, exclude=own)
    assert 0 < got["n_ties_cut_by_depth"] <= 12


def test_search_path_input_checks():
    _, dense, _, qlab, glab, own = search_problem(0)
    order = np.argsort(-dense, axis=1)[:, :10]
    scores = np.take_along_axis(dense, order, axis=1)
    with pytest.raises(ValueError, match="swap indices and scores"):
        metrics_from_search(scores, order, qlab, glab)
    with pytest.raises(ValueError, match="gallery rows"):
        metrics_from_search(order + 100, scores, qlab, glab)
    other = qlab + 100  # labels absent from the gallery
    with pytest.raises(ValueError, match="no positive"):
        metrics_from_search(order, scores, other, glab, exclude=own)
    got = metrics_from_search(order, scores, other, glab, exclude=own, skip_queries_without_positive=True)
    assert got["n_queries"] == 0 and got["n_skipped"] == len(qlab) and np.isnan(got["mrr"])


def test_string_labels_and_padding():
    glab = np.array(["P1", "P2", "P1", "P3"])
    indices = np.array([[2, 1, -1, -1], [3, 0, 1, 2]])  # query 0 found 2 items only: gallery exhausted below
    scores = np.array([[0.9, 0.5, -np.inf, -np.inf], [0.8, 0.7, 0.6, 0.1]])
    got = metrics_from_search(indices, scores, ["P1", "P2"], glab, ks=(1, 4), map_k=4, per_query=True)
    assert got["recall@1"].tolist() == [1.0, 0.0]
    assert got["rank"].tolist() == [1.0, 3.0]
    assert got["recall_fraction@4"].tolist() == [0.5, 1.0]
