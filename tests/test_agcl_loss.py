"""AGCLLoss against literal references: InfoNCE baseline, DESIGN's w_ij formula, filter masks,
memory queue, intra-product term, errors, and cross-process gathering (2 gloo ranks)."""

import gc
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from agcl.loss import FILTERS, AGCLLoss

TAU = 0.02
WORDS = ["red", "blue", "cotton", "wool", "round", "square", "logo", "plain", "large", "small"]


def unit(n, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)


def texts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(1, 5), replace=False)) for _ in range(n)]


def overlap_bm25(queries, documents):
    """A deliberately asymmetric stand-in for BM25: shared words / distinct query words, x2."""
    rows = []
    for q in queries:
        qs = set(q.split())
        rows.append([2.0 * len(qs & set(d.split())) / max(len(qs), 1) for d in documents])
    return np.array(rows, dtype=np.float32)


def infonce(q, c, tau=TAU):
    return F.cross_entropy(q @ c.T / tau, torch.arange(q.shape[0]))


def design_reference(q, c, B, tau=TAU, lam=1.0, mask=None):
    """-log(w_ii e^{s_ii/τ} / Σ_j w_ij e^{s_ij/τ}) with w_ij = exp(λ(1 + tanh B_ij)), literally."""
    q, c, B = q.double(), c.double(), torch.as_tensor(B).double()
    s = q @ c.T
    w = torch.exp(lam * (1 + torch.tanh(B)))
    terms = w * torch.exp(s / tau)
    if mask is not None:
        terms = terms.masked_fill(mask, 0.0)
    n = q.shape[0]
    return -(terms[range(n), range(n)] / terms.sum(1)).log().mean()


# --------------------------------------------------------------------------- baseline equivalence
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plain_settings_equal_infonce(dtype):
    q, c = unit(6, seed=1, dtype=dtype), unit(6, seed=2, dtype=dtype)
    loss = AGCLLoss(hard_negative_weighting=False)
    torch.testing.assert_close(loss(q, c), infonce(q, c), atol=1e-6, rtol=0)
    sym = AGCLLoss(hard_negative_weighting=False, symmetric=True)
    torch.testing.assert_close(sym(q, c), (infonce(q, c) + infonce(c, q)) / 2, atol=1e-6, rtol=0)
    assert set(FILTERS) == {"none", "absolute", "relative", "attribute", "dynamic"}


@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_weighting_equals_design_formula(lam):
    q, c = unit(7, seed=3), unit(7, seed=4)
    qa, ca = texts(7, 1), texts(7, 2)
    loss = AGCLLoss(bm25=overlap_bm25, weighting_scale=lam)(q, c, query_attributes=qa, candidate_attributes=ca)
    torch.testing.assert_close(loss, design_reference(q, c, overlap_bm25(qa, ca), lam=lam), atol=1e-6, rtol=0)


def test_symmetric_weighting_uses_candidate_side_bm25():
    q, c = unit(5, seed=5), unit(5, seed=6)
    qa, ca = texts(5, 3), texts(5, 4)
    assert not np.allclose(overlap_bm25(ca, qa), overlap_bm25(qa, ca).T)  # the test would be vacuous
    got = AGCLLoss(bm25=overlap_bm25, symmetric=True)(q, c, query_attributes=qa, candidate_attributes=ca)
    want = (design_reference(q, c, overlap_bm25(qa, ca)) + design_reference(c, q, overlap_bm25(ca, qa))) / 2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_default_bm25_is_in_batch_bm25scorer():
    from afmrl.attributes import BM25Scorer

    q, c = unit(4, seed=7), unit(4, seed=8)
    qa = ["color: red; material: cotton", "color: blue", "color: red; shape: round", "logo: star"]
    ca = ["color: red", "color: blue; material: wool", "shape: round", "logo: star; color: red"]
    got = AGCLLoss()(q, c, query_attributes=qa, candidate_attributes=ca)
    want = design_reference(q, c, BM25Scorer(qa + ca).score(qa, ca))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- filters
# Hand-built cosine similarities; values kept away from every threshold used below.
SIM = torch.tensor(
    [[0.80, 0.95, 0.72, 0.10], [0.45, 0.60, 0.55, 0.92], [0.30, 0.20, 0.93, 0.85], [0.99, 0.40, 0.10, 0.70]],
    dtype=torch.float64,
)


def as_mask(entries, shape=(4, 4)):
    m = torch.zeros(shape, dtype=torch.bool)
    for i, j in entries:
        m[i, j] = True
    return m


def test_absolute_filter_mask():
    got = AGCLLoss(false_negative_filter="absolute").false_negative_mask(SIM)
    assert torch.equal(got, as_mask([(0, 1), (1, 3), (3, 0)]))  # s_22 = 0.93 > 0.9 but is the positive


def test_relative_filter_mask():
    got = AGCLLoss(false_negative_filter="relative").false_negative_mask(SIM)
    assert torch.equal(got, as_mask([(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (3, 0)]))


def test_dynamic_filter_masks_follow_the_decaying_margin():
    loss = AGCLLoss(false_negative_filter="dynamic")
    assert loss.dynamic_margin(0) == pytest.approx(0.2)
    assert loss.dynamic_margin(500) == pytest.approx(0.1)
    assert loss.dynamic_margin(1000) == loss.dynamic_margin(5000) == pytest.approx(0.0)
    # φ < 0.6  <=>  s_ij > s_ii - m̄ - logit(0.6)/κ  (logit(0.6)/20 = 0.0203)
    start = [(0, 1), (0, 2), (1, 0), (1, 2), (1, 3), (2, 3), (3, 0)]
    middle = [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (3, 0)]
    end = [(0, 1), (1, 3), (3, 0)]
    for step, entries in ((0, start), (500, middle), (1000, end), (10**6, end)):
        assert torch.equal(loss.false_negative_mask(SIM, step=step), as_mask(entries)), step
    # and literally from the formula, on random similarities
    s = unit(6, seed=9) @ unit(6, seed=10).T
    phi = torch.sigmoid(20 * (s.diag()[:, None] - s - 0.2))
    want = (phi < 0.6) & ~torch.eye(6, dtype=torch.bool)
    assert torch.equal(loss.false_negative_mask(s, step=0), want)


def test_attribute_filter_mask():
    loss = AGCLLoss(false_negative_filter="attribute")
    pids = ["a", "b", "a", "c"]
    sigs = ["red", "blue", None, "blue"]
    by_pid = [(0, 2), (2, 0)]
    by_sig = [(1, 3), (3, 1)]
    assert torch.equal(loss.false_negative_mask(SIM, row_product_ids=pids, col_product_ids=pids), as_mask(by_pid))
    assert torch.equal(loss.false_negative_mask(SIM, row_signatures=sigs, col_signatures=sigs), as_mask(by_sig))
    both = loss.false_negative_mask(
        SIM, row_product_ids=pids, col_product_ids=pids, row_signatures=sigs, col_signatures=[None] * 4
    )  # None never matches
    assert torch.equal(both, as_mask(by_pid))
    both = loss.false_negative_mask(
        SIM, row_product_ids=pids, col_product_ids=pids, row_signatures=sigs, col_signatures=sigs
    )
    assert torch.equal(both, as_mask(by_pid + by_sig))
    with pytest.raises(ValueError, match="attribute"):
        loss.false_negative_mask(SIM)


def test_filters_never_mask_an_offset_positive_and_none_masks_nothing():
    s = SIM[:2]  # rows 0,1 whose positives sit at columns 2,3 (as on a rank with offset 2)
    labels = torch.tensor([2, 3])
    for rule in FILTERS:
        kw = {"row_product_ids": ["x", "x"], "col_product_ids": ["x"] * 4} if rule == "attribute" else {}
        m = AGCLLoss(
            false_negative_filter=rule, filter_threshold=-2.0, dynamic_threshold=1.1, filter_margin=5.0
        ).false_negative_mask(s, positive_indices=labels, **kw)
        assert not m[0, 2] and not m[1, 3], rule
        assert m.sum() == (0 if rule == "none" else 6), rule


@pytest.mark.parametrize("rule", ["absolute", "relative", "dynamic", "attribute"])
def test_filtered_loss_equals_reference_with_entries_removed(rule):
    q, c = unit(8, seed=11), unit(8, seed=12)
    c[3] = F.normalize(q[0] + 0.05 * c[3], dim=0)  # a near-duplicate of query 0 among the negatives
    qa, ca = texts(8, 5), texts(8, 6)
    pids = ["p0", "p1", "p2", "p0", "p4", "p5", "p1", "p7"]
    loss = AGCLLoss(bm25=overlap_bm25, false_negative_filter=rule, filter_threshold=0.5, filter_margin=0.3)
    mask = loss.false_negative_mask(q @ c.T, row_product_ids=pids, col_product_ids=pids, step=3)
    assert mask.any() and not mask.diagonal().any()
    got = loss(q, c, product_ids=pids, query_attributes=qa, candidate_attributes=ca, step=3)
    torch.testing.assert_close(got, design_reference(q, c, overlap_bm25(qa, ca), mask=mask), atol=1e-6, rtol=0)
    assert loss.last_stats["masked_per_query"] == pytest.approx(mask.sum().item() / 8)


@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_finite_under_heavy_masking(symmetric):
    q, c = unit(6, seed=13).requires_grad_(), unit(6, seed=14).requires_grad_()
    loss = AGCLLoss(bm25=overlap_bm25, false_negative_filter="absolute", filter_threshold=-2.0, symmetric=symmetric)
    out = loss(q, c, query_attributes=texts(6, 7), candidate_attributes=texts(6, 8))
    out.backward()
    assert out.item() == 0.0  # only the positive is left in every row
    assert loss.last_stats["masked_per_query"] == 5
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()
    q.grad = c.grad = None
    AGCLLoss(hard_negative_weighting=False, false_negative_filter="relative", filter_margin=0.5, temperature=0.01)(
        q, c
    ).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


# --------------------------------------------------------------------------- memory queue
def test_queue_is_a_capped_fifo_and_skips_eval_mode():
    loss = AGCLLoss(hard_negative_weighting=False, memory_queue_size=5)
    batches = [unit(2, seed=20 + k) for k in range(3)]
    for k, c in enumerate(batches):
        loss(
            unit(2, seed=30 + k),
            c,
            product_ids=[f"b{k}i0", f"b{k}i1"],
            candidate_attributes=["x", "y"],
            query_attributes=["x", "y"],
        )
    assert loss.queue_size == 5 and loss.last_stats["queue_size"] == 5
    torch.testing.assert_close(loss.queue.emb, torch.cat(batches)[1:])
    assert loss.queue.product_ids == ["b0i1", "b1i0", "b1i1", "b2i0", "b2i1"]
    assert loss.queue.attributes == ["y", "x", "y", "x", "y"] and loss.queue.signatures == [None] * 5
    assert not loss.queue.emb.requires_grad
    loss.eval()
    loss(unit(2, seed=40), unit(2, seed=41))
    assert loss.queue.product_ids[-1] == "b2i1"
    loss.reset_queue()
    assert loss.queue_size == 0


def test_queue_entries_are_weighted_negatives_and_same_product_entries_are_masked():
    loss = AGCLLoss(bm25=overlap_bm25, memory_queue_size=6)
    c0, a0 = unit(4, seed=50), texts(4, 9)
    loss(
        unit(4, seed=51),
        c0,
        product_ids=["old0", "old1", "old2", "old3"],
        query_attributes=texts(4, 10),
        candidate_attributes=a0,
    )
    q, c, qa, ca = unit(4, seed=52), unit(4, seed=53), texts(4, 11), texts(4, 12)
    pids = ["new0", "old2", "new2", "new3"]  # query 1 is the product of queue entry 2
    got = loss(q, c, product_ids=pids, query_attributes=qa, candidate_attributes=ca)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[1, 4 + 2] = True
    cols = torch.cat([c, c0])
    B = overlap_bm25(qa, ca + a0)
    s = q @ cols.T
    terms = torch.exp(1 + torch.tanh(torch.as_tensor(B).double())) * torch.exp(s / TAU)
    terms = terms.masked_fill(mask, 0.0)
    want = -(terms[range(4), range(4)] / terms.sum(1)).log().mean()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert loss.last_stats["masked_per_query"] == 0.25
    assert loss.queue.product_ids == ["old2", "old3"] + pids


def test_queue_plain_equals_infonce_with_extra_columns_and_not_in_reverse_direction():
    loss = AGCLLoss(hard_negative_weighting=False, memory_queue_size=3, symmetric=True)
    c0 = unit(3, seed=60)
    loss(unit(3, seed=61), c0)
    q, c = unit(3, seed=62), unit(3, seed=63)
    want = (infonce(q, torch.cat([c, c0])) + infonce(c, q)) / 2
    torch.testing.assert_close(loss(q, c), want, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- intra-product term
def test_intra_product_term_equals_reference():
    q, c, img, txt = (unit(5, seed=70 + k) for k in range(4))
    loss = AGCLLoss(hard_negative_weighting=False, intra_product_weight=0.3)
    got = loss(q, c, image_embeddings=img, text_embeddings=txt)
    want = infonce(q, c) + 0.3 * (infonce(img, txt) + infonce(txt, img)) / 2
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert loss.last_stats["loss_intra"] == pytest.approx(((infonce(img, txt) + infonce(txt, img)) / 2).item())
    assert set(loss.last_stats) >= {"loss", "loss_q2c", "masked_per_query", "mean_tanh_bm25", "dynamic_margin"}
    torch.testing.assert_close(loss(q, c), infonce(q, c), atol=1e-6, rtol=0)  # no image/text given: no term


# --------------------------------------------------------------------------- errors
def test_clear_errors():
    q, c = unit(3), unit(3, seed=1)
    with pytest.raises(ValueError, match="not one of.*'relative'.*'dynamic'"):
        AGCLLoss(false_negative_filter="gist")
    with pytest.raises(ValueError, match=r"hard_negative_weighting needs attribute texts \(query_attributes"):
        AGCLLoss()(q, c)
    with pytest.raises(ValueError, match="hard_negative_weighting needs attribute texts"):
        AGCLLoss()(q, c, query_attributes=["a"] * 3)
    with pytest.raises(ValueError, match='false_negative_filter="attribute"'):
        AGCLLoss(hard_negative_weighting=False, false_negative_filter="attribute")(q, c)
    with pytest.raises(ValueError, match=r"\(3, 8\) and \(4, 8\)"):
        AGCLLoss(hard_negative_weighting=False)(q, unit(4))
    with pytest.raises(ValueError, match="product_ids has 2 entries"):
        AGCLLoss(hard_negative_weighting=False)(q, c, product_ids=["a", "b"])
    with pytest.raises(ValueError, match=r"bm25 returned shape \(3, 2\), expected \(3, 3\)"):
        AGCLLoss(bm25=lambda a, b: np.zeros((3, 2)))(q, c, query_attributes=["a"] * 3, candidate_attributes=["b"] * 3)
    with pytest.raises(ValueError, match=r"\(3, 8\) and \(3, 4\)"):
        AGCLLoss(hard_negative_weighting=False, intra_product_weight=1.0)(
            q, c, image_embeddings=q, text_embeddings=unit(3, d=4)
        )
    with pytest.raises(ValueError, match="together"):
        AGCLLoss(hard_negative_weighting=False)(q, c, query_signatures=["s"] * 3)


# --------------------------------------------------------------------------- distributed (gloo)
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _check_equal_shards(rank, world)
        _check_unequal_shards(rank, world)
        gc.collect()  # free autograd graphs holding the group now, not at exit (else gloo may abort)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check_equal_shards(rank, world):
    """Full AGCL (weighting, relative filter, symmetric, queue, intra): Σ_ranks grads = R x full grad."""
    n, N = 3, 3 * world
    torch.manual_seed(0)
    enc = torch.nn.Linear(10, 8).double()
    pids = [f"p{i % 4}" for i in range(N)]  # repeated products across ranks
    qa, ca = texts(N, 1), texts(N, 2)
    kw = dict(
        temperature=0.1,
        bm25=overlap_bm25,
        false_negative_filter="relative",
        filter_margin=0.2,
        symmetric=True,
        memory_queue_size=4,
        intra_product_weight=0.5,
    )
    dist_loss, full_loss = AGCLLoss(**kw), AGCLLoss(**kw, gather_across_processes=False)
    local = slice(rank * n, (rank + 1) * n)

    def run(loss_fn, x, rows, step):
        enc.zero_grad()
        e = [F.normalize(enc(x[k, rows]), dim=-1) for k in range(4)]
        out = loss_fn(
            e[0],
            e[1],
            product_ids=pids[rows],
            query_attributes=qa[rows],
            candidate_attributes=ca[rows],
            image_embeddings=e[2],
            text_embeddings=e[3],
            step=step,
        )
        out.backward()
        return out.detach(), [p.grad.clone() for p in enc.parameters()]

    for step in range(2):  # the second step also checks the queues filled identically
        x = torch.randn(4, N, 10, dtype=torch.float64)  # same on every rank (same seed)
        loss_r, grads_r = run(dist_loss, x, local, step)
        ref, ref_grads = run(full_loss, x, slice(0, N), step)
        dist.all_reduce(loss_r)
        torch.testing.assert_close(loss_r / world, ref, atol=1e-10, rtol=0)
        for g, g_ref in zip(grads_r, ref_grads, strict=True):
            dist.all_reduce(g)
            torch.testing.assert_close(g, world * g_ref, atol=1e-10, rtol=1e-9)
        assert dist_loss.queue.product_ids == full_loss.queue.product_ids
        torch.testing.assert_close(dist_loss.queue.emb, full_loss.queue.emb)


def _check_unequal_shards(rank, world):
    """Local batches of 2 and 4 rows: each rank's loss is the mean over its rows against all columns."""
    sizes = [2 + 2 * r for r in range(world)]
    N, start = sum(sizes), sum(sizes[:rank])
    q, c = unit(N, seed=80).requires_grad_(), unit(N, seed=81).requires_grad_()
    rows = slice(start, start + sizes[rank])
    out = AGCLLoss(hard_negative_weighting=False, symmetric=True)(q[rows], c[rows])
    out.backward()
    labels = torch.arange(N)
    ce = lambda a, b: F.cross_entropy(a @ b.T / TAU, labels, reduction="none")  # noqa: E731
    per_row = (ce(q, c) + ce(c, q)) / 2
    bounds = np.cumsum([0] + sizes)
    torch.testing.assert_close(out, per_row[rows].mean(), atol=1e-10, rtol=0)
    q_ref, c_ref = q.detach().clone().requires_grad_(), c.detach().clone().requires_grad_()
    per_row = (ce(q_ref, c_ref) + ce(c_ref, q_ref)) / 2
    sum(per_row[a:b].mean() for a, b in zip(bounds[:-1], bounds[1:], strict=True)).backward()
    for g, g_ref in ((q.grad, q_ref.grad), (c.grad, c_ref.grad)):
        dist.all_reduce(g)
        torch.testing.assert_close(g, g_ref, atol=1e-9, rtol=1e-9)


@pytest.mark.slow
def test_gather_across_two_gloo_processes_matches_full_batch():
    mp.spawn(_dist_worker, args=(2, _free_port()), nprocs=2, join=True)


def test_weighting_negatives_only_leaves_the_positive_logit_alone():
    torch.manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(5, 8, dtype=torch.float64), dim=-1)
    b = torch.rand(5, 5, dtype=torch.float64) * 3
    texts = [str(i) for i in range(5)]
    loss = AGCLLoss(temperature=0.05, bm25=lambda rows, cols: b, weight_positive=False)
    got = loss(q, c, query_attributes=texts, candidate_attributes=texts)
    logits = q @ c.T / 0.05 + torch.tanh(b) * (1 - torch.eye(5, dtype=torch.float64))
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(5))
    torch.testing.assert_close(got, expected)
    literal = AGCLLoss(temperature=0.05, bm25=lambda rows, cols: b)(
        q, c, query_attributes=texts, candidate_attributes=texts
    )
    assert not torch.isclose(literal, got)
