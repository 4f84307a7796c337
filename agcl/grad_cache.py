"""Gradient caching for contrastive losses on large batches (GradCache, Gao et al. 2021, arXiv 2101.06983).

In-batch-negative losses such as AGCL want large batches, but an MLLM encoder's activations for
a large batch do not fit in memory. The loss, however, only needs the *embeddings* of the whole
batch; the encoder only needs d loss / d embedding. GradCache therefore

1. encodes every chunk under ``torch.no_grad()`` (no activations kept), recording each chunk's
   RNG state so that dropout (e.g. LoRA dropout) can be replayed identically,
2. computes the loss on the concatenated embeddings, made leaf tensors, and backpropagates it
   only as far as those leaves: this caches d loss / d embedding,
3. re-encodes each chunk with gradients under its recorded RNG state and calls
   ``emb.backward(cached_grad)``, accumulating the parameters' ``.grad`` chunk by chunk.

The parameters' gradients then equal those of encoding the same chunks with gradients and
calling ``loss.backward()`` once (tested to float64 precision with dropout active), at the cost
of one extra forward pass. This is the idea of sentence-transformers'
CachedMultipleNegativesRankingLoss, written as one function so that any loss (``AGCLLoss`` with
its product ids and attribute texts passed through ``loss_kwargs``) can use it.

Notes: each chunk's backward is a separate ``backward`` call, so under DDP wrap all but the
last chunk in ``model.no_sync()`` (or accumulate and sync once); a loss with a memory queue sees
the batch once (step 2), so it enqueues once, as without caching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


class RandContext:
    """Captures the CPU (and, if initialised, every CUDA device's) RNG state at construction;
    ``with ctx:`` replays from that state and restores the surrounding RNG state afterwards."""

    def __init__(self):
        self.cpu_state = torch.get_rng_state()
        use_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda_states = torch.cuda.get_rng_state_all() if use_cuda else []
        self._fork = None

    def __enter__(self):
        # fork_rng restores the outer state on exit, so a replay does not disturb the RNG stream
        # of whatever runs after (the next training step sees the same RNG as without caching).
        self._fork = torch.random.fork_rng(devices=list(range(len(self.cuda_states))))
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        if self.cuda_states:
            torch.cuda.set_rng_state_all(self.cuda_states)
        return self

    def __exit__(self, *exc):
        fork, self._fork = self._fork, None
        return fork.__exit__(*exc)


def split_into_chunks(batch: Any, chunk_size: int) -> list:
    """Split a tensor, a mapping of tensors/lists (e.g. a processor's output) or a list along
    the first dimension into chunks of at most ``chunk_size`` rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(batch, Mapping):
        n = len(next(iter(batch.values())))
        return [{k: v[i : i + chunk_size] for k, v in batch.items()} for i in range(0, n, chunk_size)]
    return [batch[i : i + chunk_size] for i in range(0, len(batch), chunk_size)]


def _encode_without_grad(encode: Callable, chunks: Sequence) -> tuple[list[torch.Tensor], list[RandContext]]:
    embeddings, states = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandContext())  # before the forward: the state its dropout draws from
            embeddings.append(encode(chunk))
    return embeddings, states


def cached_contrastive_backward(
    encode: Callable[[Any], torch.Tensor],
    query_chunks: Sequence,
    candidate_chunks: Sequence,
    loss_fn: Callable[..., torch.Tensor],
    *,
    encode_candidates: Callable[[Any], torch.Tensor] | None = None,
    **loss_kwargs,
) -> torch.Tensor:
    """Compute ``loss_fn(queries, candidates, **loss_kwargs)`` over all chunks and accumulate its
    parameter gradients into ``.grad`` with one chunk's activations alive at a time.

    Args:
        encode: chunk inputs -> (chunk_rows, dim) embeddings (already L2-normalised for AGCL).
        query_chunks, candidate_chunks: the batch's query / candidate inputs, split (e.g. with
            ``split_into_chunks``); their concatenation in order is the full batch.
        loss_fn: (queries (N, dim), candidates (N, dim), **loss_kwargs) -> scalar loss.
        encode_candidates: a different encoder call for candidates (default ``encode``).
        loss_kwargs: passed to ``loss_fn`` unchanged (product ids, attribute texts, step, ...).

    Returns the loss, detached. Call it where you would call ``loss.backward()``.
    """
    encode_candidates = encode if encode_candidates is None else encode_candidates
    passes = [(encode, query_chunks), (encode_candidates, candidate_chunks)]
    cached = [_encode_without_grad(fn, chunks) for fn, chunks in passes]
    leaves = [torch.cat(embs).detach().requires_grad_() for embs, _ in cached]
    with torch.enable_grad():
        loss = loss_fn(*leaves, **loss_kwargs)
        loss.backward()
    for (fn, chunks), (embs, states), leaf in zip(passes, cached, leaves, strict=True):
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)  # loss may ignore a side
        for chunk, state, g in zip(chunks, states, grad.split([e.shape[0] for e in embs]), strict=True):
            with state, torch.enable_grad():
                emb = fn(chunk)
            emb.backward(g)
    return loss.detach()
