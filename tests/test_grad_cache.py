"""GradCache equals the uncached computation: same loss and parameter gradients, dropout active."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agcl.grad_cache import RandContext, cached_contrastive_backward, split_into_chunks
from agcl.loss import AGCLLoss

N = 7


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 8)
        )

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def overlap_bm25(queries, documents):
    return np.array([[len(set(q.split()) & set(d.split())) for d in documents] for q in queries], dtype=float)


def make():
    torch.manual_seed(0)
    enc = Encoder().double().train()
    xq, xc = torch.randn(N, 6, dtype=torch.float64), torch.randn(N, 6, dtype=torch.float64)
    kwargs = dict(
        product_ids=["a", "b", "a", "c", "d", "b", "e"],
        query_attributes=["red cotton", "blue", "red round", "logo", "wool", "blue big", "red"],
        candidate_attributes=["red", "blue wool", "round", "logo red", "wool", "big", "cotton"],
    )
    loss_fn = AGCLLoss(temperature=0.1, bm25=overlap_bm25, false_negative_filter="attribute")
    return enc, xq, xc, kwargs, loss_fn


def reference(enc, q_chunks, c_chunks, loss_fn, kwargs):
    """Uncached: encode the same chunks with gradients (same RNG order), one loss.backward()."""
    enc.zero_grad()
    q = torch.cat([enc(x) for x in q_chunks])
    c = torch.cat([enc(x) for x in c_chunks])
    loss = loss_fn(q, c, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters()}


def cached(enc, q_chunks, c_chunks, loss_fn, kwargs):
    enc.zero_grad()
    loss = cached_contrastive_backward(enc, q_chunks, c_chunks, loss_fn, **kwargs)
    assert not loss.requires_grad
    return loss, {n: p.grad.clone() for n, p in enc.named_parameters()}


@pytest.mark.parametrize("chunk_size", [3, N, 100])
def test_cached_equals_uncached_with_dropout(chunk_size):
    enc, xq, xc, kwargs, loss_fn = make()
    assert not torch.equal(enc(xq), enc(xq))  # dropout is really active
    q_chunks, c_chunks = split_into_chunks(xq, chunk_size), split_into_chunks(xc, chunk_size)
    assert len(q_chunks) == -(-N // chunk_size)
    torch.manual_seed(1)
    want_loss, want = reference(enc, q_chunks, c_chunks, loss_fn, kwargs)
    torch.manual_seed(1)
    got_loss, got = cached(enc, q_chunks, c_chunks, loss_fn, kwargs)
    torch.testing.assert_close(got_loss, want_loss, atol=1e-10, rtol=0)
    for name in want:
        assert want[name].abs().sum() > 0, name
        torch.testing.assert_close(got[name], want[name], atol=1e-10, rtol=1e-9, msg=name)
    assert loss_fn.last_stats["masked_per_query"] > 0  # the attribute filter was exercised
    if chunk_size >= N:  # one chunk: plain full-batch encoding, nothing chunk-specific
        torch.manual_seed(1)
        enc.zero_grad()
        plain = loss_fn(enc(xq), enc(xc), **kwargs)
        plain.backward()
        torch.testing.assert_close(got_loss, plain.detach(), atol=1e-10, rtol=0)
        for name, p in enc.named_parameters():
            torch.testing.assert_close(got[name], p.grad, atol=1e-10, rtol=1e-9)


def test_rng_stream_after_caching_matches_uncached_and_separate_candidate_encoder():
    enc, xq, xc, _, _ = make()
    enc_c = lambda x: enc(x + 1.0)  # noqa: E731 - a different candidate-side call
    sym = AGCLLoss(temperature=0.1, hard_negative_weighting=False, symmetric=True)
    qc, cc = split_into_chunks(xq, 2), split_into_chunks(xc, 2)
    torch.manual_seed(2)
    enc.zero_grad()
    want = sym(torch.cat([enc(x) for x in qc]), torch.cat([enc_c(x) for x in cc]))
    want.backward()
    want_grads, after_ref = [p.grad.clone() for p in enc.parameters()], torch.rand(3)
    torch.manual_seed(2)
    enc.zero_grad()
    got = cached_contrastive_backward(enc, qc, cc, sym, encode_candidates=enc_c)
    torch.testing.assert_close(torch.rand(3), after_ref)  # the replay did not shift the RNG
    torch.testing.assert_close(got, want.detach(), atol=1e-10, rtol=0)
    for g, p in zip(want_grads, enc.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g, atol=1e-10, rtol=1e-9)


def test_rand_context_replays_and_restores():
    torch.manual_seed(3)
    ctx = RandContext()
    first = torch.rand(4)
    after = torch.get_rng_state()
    with ctx:
        torch.testing.assert_close(torch.rand(4), first)
    assert torch.equal(torch.get_rng_state(), after)


def test_split_into_chunks():
    batch = {"input_ids": torch.arange(10).reshape(5, 2), "texts": list("abcde")}
    chunks = split_into_chunks(batch, 2)
    assert [c["texts"] for c in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert torch.equal(torch.cat([c["input_ids"] for c in chunks]), batch["input_ids"])
    assert split_into_chunks([1, 2, 3], 5) == [[1, 2, 3]]
    with pytest.raises(ValueError, match="chunk_size"):
        split_into_chunks([1], 0)
