"""Attribute-Guided Contrastive Learning (AGCL) loss, stage 1 of AFMRL.

AFMRL (Findings of ACL 2026, arXiv 2604.20135) trains the product embedder with an InfoNCE
loss whose logits are re-weighted by how similar the attribute texts of query i and candidate j
are (BM25 score B_ij), and whose negatives are cleaned of likely false negatives:

    w_ij = exp(1 + tanh(B_ij))
    L_i  = -log( w_ii e^{s_ii/τ} / ( w_ii e^{s_ii/τ} + Σ_{j∈N_i} w_ij e^{s_ij/τ} ) )

which is cross-entropy over z_ij = s_ij/τ + λ·tanh(B_ij) (λ = ``weighting_scale`` = 1 in the
paper; the +1 cancels between numerator and denominator). Negatives whose attributes overlap
with the query get a larger weight, i.e. attribute-similar products are the hard negatives.

Relation to other losses: with ``hard_negative_weighting=False`` and ``false_negative_filter=
"none"`` this is exactly InfoNCE / sentence-transformers' MultipleNegativesRankingLoss with
scale 1/τ (``symmetric=True``: MultipleNegativesSymmetricRankingLoss / CLIP). The filters are
those of GISTEmbed (arXiv 2402.16829) / NV-Retriever (arXiv 2407.15831) ("relative"), a fixed
threshold ("absolute"), product/attribute identity ("attribute") and MOON2.0's dynamic filter
(arXiv 2511.12449, "dynamic"). The memory queue of past candidates is MOON's temporal negatives
(arXiv 2508.11999), cross-device gathering its spatial negatives; ``intra_product_weight`` adds
MOON2.0's intra-product (image <-> text of the same listing) alignment.

Inputs: ``query_embeddings`` and ``candidate_embeddings`` of shape (batch, dim), row i of each
being two listings of the same product (the positive pair), both already L2-normalised: s = q c^T
is used as the cosine similarity as-is (nothing is renormalised here, so an unnormalised encoder
silently gets a dot-product loss). Optional per-row metadata: product ids, attribute texts (for
BM25), attribute signatures (for the "attribute" filter). Output: a scalar loss.

Masking: a filtered negative's logit is set to -inf. The positive (target) logit is never masked,
so every row keeps a finite log-sum-exp, and masked_fill passes zero gradient to the masked
entries: no NaNs (the tests check gradients under heavy masking).

Distributed (``gather_across_processes`` and torch.distributed initialised with world size R):
candidates (and, for ``symmetric``, queries; and the image/text embeddings) are all-gathered
with gradients; each rank's loss is the mean over its *local* rows scored against *all* global
columns. Because all_gather's backward sums the column gradients over ranks, the gradient of
rank r's loss w.r.t. its own embeddings summed over ranks is R times the gradient of the
single-process full-batch loss; DDP's gradient averaging (÷R) therefore gives exactly the
full-batch gradient, and the mean of the ranks' losses is the full-batch loss. Exact when every
rank has the same local batch size (unequal sizes are supported, then each rank's mean weights
its rows by 1/n_r).

Memory queue (``memory_queue_size`` > 0): after each training-mode forward the (gathered,
detached) candidates and their metadata are appended FIFO, oldest dropped. In the next forwards
the queue entries are extra negative columns of the query->candidate direction (not of the
candidate->query one), with the same BM25 weighting and filter as in-batch candidates. A queue
entry with the *same product_id as the query* is masked under every filter, "none" included:
it is a past listing of the query's own product, a certain false negative, and unlike the
in-batch case there is no baseline equivalence to preserve.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

FILTERS = ("none", "absolute", "relative", "attribute", "dynamic")


class _Side(NamedTuple):
    """Rows of one side of the similarity matrix with their per-row metadata."""

    emb: torch.Tensor
    product_ids: list | None = None
    signatures: list | None = None
    attributes: list | None = None


def _same(a: Sequence | None, b: Sequence | None, device) -> torch.Tensor | None:
    """Bool (len(a), len(b)) matrix of a[i] == b[j]; None values never match anything."""
    if a is None or b is None:
        return None
    codes: dict = {}
    lists = [
        [-1 - k - start if x is None else codes.setdefault(x, len(codes)) for k, x in enumerate(xs)]
        for xs, start in ((a, 0), (b, len(a)))
    ]
    ca, cb = (torch.tensor(x, dtype=torch.long, device=device) for x in lists)
    return ca[:, None] == cb[None, :]


def _as_list(x: Sequence | None) -> list | None:
    return None if x is None else list(x)


def _cat_meta(parts: list) -> list | None:
    return None if any(p is None for p in parts) else [x for p in parts for x in p]


class AGCLLoss(nn.Module):
    """AGCL contrastive loss (see the module docstring for the formula and semantics).

    Args:
        temperature: τ; logits are s/τ. 0.02 as in VLM2Vec / AFMRL.
        hard_negative_weighting: add λ·tanh(B_ij) to every logit (positive included), B = BM25
            between attribute texts. Needs ``query_attributes`` and ``candidate_attributes``.
        weighting_scale: λ above (1.0 = the paper's w_ij = exp(1 + tanh B_ij)).
        weight_positive: apply the weight to the positive too (True: the formula as written, with
            w_ii). False weights only the negatives (w_ii = e, as in hard-negative weighting of
            Robinson et al., ICLR 2021): the positive listing shares the most attributes with the
            query, so weighting it as well gives it the largest bonus and makes attribute-similar
            negatives *easier* than in InfoNCE; weighting negatives only acts as an attribute-aware
            margin that near-duplicates must clear.
        bm25: callable ``(queries: list[str], documents: list[str]) -> (len(q), len(d))`` array or
            tensor, e.g. ``afmrl.attributes.BM25Scorer(train_attribute_texts).score``. None: a
            BM25Scorer is fit on each batch's own attribute texts (in-batch IDF; pass a scorer fit
            on the training corpus for the paper's setting).
        false_negative_filter: one of ``FILTERS``. "absolute": mask s_ij > filter_threshold.
            "relative": mask s_ij > s_ii - filter_margin. "attribute": mask candidates with the
            query's product_id or attribute signature. "dynamic": φ_ij = σ(κ(s_ii - s_ij - m̄)),
            mask φ_ij < dynamic_threshold, m̄ decaying linearly with ``step``. Similarities used
            by filters are detached; the positive is never masked.
        filter_threshold: δ of "absolute".
        filter_margin: margin of "relative".
        dynamic_threshold, dynamic_kappa: threshold on φ and its sharpness κ ("dynamic").
        dynamic_margin_start, dynamic_margin_end, dynamic_margin_decay_steps: m̄ goes linearly
            from start (step 0) to end (step >= decay_steps) ("dynamic").
        symmetric: average the query->candidate and candidate->query losses. The c->q direction
            uses its own BM25 (bm25(candidate texts, query texts); BM25 is not symmetric) and its
            own filter mask (relative / dynamic filters compare with s_jj of the candidate row).
        gather_across_processes: all-gather columns over torch.distributed ranks (with grads).
        memory_queue_size: number of past candidates kept as extra negatives (0 = off).
        intra_product_weight: weight of the symmetric image<->text InfoNCE (same index positive)
            between ``image_embeddings`` and ``text_embeddings`` when both are given.

    After each forward ``last_stats`` holds floats for logging: loss parts, mean number of
    masked entries per query (q->c), mean tanh(B), dynamic margin and queue size.
    """

    def __init__(
        self,
        temperature: float = 0.02,
        hard_negative_weighting: bool = True,
        weighting_scale: float = 1.0,
        weight_positive: bool = True,
        bm25: Callable[[list[str], list[str]], object] | None = None,
        false_negative_filter: str = "none",
        filter_threshold: float = 0.9,
        filter_margin: float = 0.1,
        dynamic_threshold: float = 0.6,
        dynamic_kappa: float = 20.0,
        dynamic_margin_start: float = 0.2,
        dynamic_margin_end: float = 0.0,
        dynamic_margin_decay_steps: int = 1000,
        symmetric: bool = False,
        gather_across_processes: bool = True,
        memory_queue_size: int = 0,
        intra_product_weight: float = 0.0,
    ):
        super().__init__()
        if false_negative_filter not in FILTERS:
            raise ValueError(f"false_negative_filter={false_negative_filter!r} is not one of {list(FILTERS)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if memory_queue_size < 0 or dynamic_margin_decay_steps < 0:
            raise ValueError("memory_queue_size and dynamic_margin_decay_steps must be >= 0")
        self.temperature, self.hard_negative_weighting = float(temperature), bool(hard_negative_weighting)
        self.weighting_scale, self.bm25 = float(weighting_scale), bm25
        self.weight_positive = bool(weight_positive)
        self.false_negative_filter = false_negative_filter
        self.filter_threshold, self.filter_margin = float(filter_threshold), float(filter_margin)
        self.dynamic_threshold, self.dynamic_kappa = float(dynamic_threshold), float(dynamic_kappa)
        self.dynamic_margin_start, self.dynamic_margin_end = float(dynamic_margin_start), float(dynamic_margin_end)
        self.dynamic_margin_decay_steps = int(dynamic_margin_decay_steps)
        self.symmetric, self.gather_across_processes = bool(symmetric), bool(gather_across_processes)
        self.memory_queue_size, self.intra_product_weight = int(memory_queue_size), float(intra_product_weight)
        self.last_stats: dict[str, float] = {}
        self.reset_queue()

    # ----------------------------------------------------------------------------- queue
    def reset_queue(self) -> None:
        """Empty the memory queue (e.g. between CIT rounds, when old embeddings are stale)."""
        self.queue = _Side(torch.empty(0, 0), [], [], [])

    @property
    def queue_size(self) -> int:
        return self.queue.emb.shape[0]

    def _enqueue(self, side: _Side) -> None:
        n, cap = side.emb.shape[0], self.memory_queue_size
        meta = [list(m) if m is not None else [None] * n for m in side[1:]]
        old = self.queue if self.queue_size else _Side(side.emb.new_empty(0, side.emb.shape[1]), [], [], [])
        emb = torch.cat([old.emb.to(side.emb), side.emb.detach()])[-cap:]
        self.queue = _Side(emb, *[(o + m)[-cap:] for o, m in zip(old[1:], meta, strict=True)])

    # ----------------------------------------------------------------------------- filters
    def dynamic_margin(self, step: int) -> float:
        """m̄ of the dynamic filter at ``step`` (linear decay, then constant)."""
        frac = 1.0 if self.dynamic_margin_decay_steps == 0 else min(max(step, 0) / self.dynamic_margin_decay_steps, 1.0)
        return self.dynamic_margin_start + (self.dynamic_margin_end - self.dynamic_margin_start) * frac

    def false_negative_mask(
        self,
        similarities: torch.Tensor,
        *,
        positive_indices: torch.Tensor | None = None,
        row_product_ids: Sequence | None = None,
        col_product_ids: Sequence | None = None,
        row_signatures: Sequence | None = None,
        col_signatures: Sequence | None = None,
        step: int = 0,
    ) -> torch.Tensor:
        """Bool (n, m) mask, True = negative dropped, for cosine ``similarities`` (n, m).

        Row i's positive is column ``positive_indices[i]`` (default i) and is never masked.
        """
        sim = similarities.detach()
        n = sim.shape[0]
        labels = torch.arange(n, device=sim.device) if positive_indices is None else positive_indices
        positive = sim.gather(1, labels[:, None])
        rule = self.false_negative_filter
        if rule == "none":
            mask = torch.zeros_like(sim, dtype=torch.bool)
        elif rule == "absolute":
            mask = sim > self.filter_threshold
        elif rule == "relative":
            mask = sim > positive - self.filter_margin
        elif rule == "dynamic":
            phi = torch.sigmoid(self.dynamic_kappa * (positive - sim - self.dynamic_margin(step)))
            mask = phi < self.dynamic_threshold
        else:  # attribute
            same = [
                m
                for m in (
                    _same(row_product_ids, col_product_ids, sim.device),
                    _same(row_signatures, col_signatures, sim.device),
                )
                if m is not None
            ]
            if not same:
                raise ValueError('false_negative_filter="attribute" needs product ids or attribute signatures')
            mask = same[0] if len(same) == 1 else same[0] | same[1]
        mask = mask.clone()
        mask[torch.arange(n, device=sim.device), labels] = False
        return mask

    # ----------------------------------------------------------------------------- forward
    def forward(
        self,
        query_embeddings: torch.Tensor,
        candidate_embeddings: torch.Tensor,
        *,
        product_ids: Sequence[str] | None = None,
        candidate_product_ids: Sequence[str] | None = None,
        query_attributes: Sequence[str] | None = None,
        candidate_attributes: Sequence[str] | None = None,
        query_signatures: Sequence[str | None] | None = None,
        candidate_signatures: Sequence[str | None] | None = None,
        image_embeddings: torch.Tensor | None = None,
        text_embeddings: torch.Tensor | None = None,
        step: int = 0,
    ) -> torch.Tensor:
        q, c = query_embeddings, candidate_embeddings
        if candidate_product_ids is None:
            candidate_product_ids = product_ids  # pairs are two listings of the same product
        self._validate(
            q,
            c,
            product_ids,
            candidate_product_ids,
            query_attributes,
            candidate_attributes,
            query_signatures,
            candidate_signatures,
            image_embeddings,
            text_embeddings,
        )
        q_side = _Side(q, _as_list(product_ids), _as_list(query_signatures), _as_list(query_attributes))
        c_side = _Side(
            c, _as_list(candidate_product_ids), _as_list(candidate_signatures), _as_list(candidate_attributes)
        )
        intra = self.intra_product_weight > 0 and image_embeddings is not None
        local = [c_side] + ([q_side] if self.symmetric else [])
        if intra:
            local += [_Side(text_embeddings), _Side(image_embeddings)]
        gathered, offset = self._gather(local)
        g_c, g_q = gathered[0], gathered[1] if self.symmetric else None

        cols, n_batch_cols = g_c, g_c.emb.shape[0]
        if self.queue_size:
            qu = self.queue
            cols = _Side(
                torch.cat([g_c.emb, qu.emb.to(g_c.emb)]),
                *[_cat_meta([a, b]) for a, b in zip(g_c[1:], qu[1:], strict=True)],
            )
        loss_q2c, masked, mean_tanh = self._direction(q_side, cols, offset, step, n_batch_cols)
        loss = loss_q2c
        stats = {"loss_q2c": loss_q2c.detach(), "masked_per_query": masked, "mean_tanh_bm25": mean_tanh}
        if self.symmetric:
            loss_c2q = self._direction(c_side, g_q, offset, step, g_q.emb.shape[0])[0]
            loss = (loss_q2c + loss_c2q) / 2
            stats["loss_c2q"] = loss_c2q.detach()
        if intra:
            labels = torch.arange(q.shape[0], device=q.device) + offset
            t_all, i_all = gathered[-2].emb, gathered[-1].emb
            loss_intra = (
                F.cross_entropy(image_embeddings @ t_all.T / self.temperature, labels)
                + F.cross_entropy(text_embeddings @ i_all.T / self.temperature, labels)
            ) / 2
            loss = loss + self.intra_product_weight * loss_intra
            stats["loss_intra"] = loss_intra.detach()
        stats["loss"] = loss.detach()
        values = torch.stack([v.double() for v in stats.values()]).tolist()  # one device sync
        self.last_stats = dict(zip(stats, values, strict=True))
        self.last_stats["dynamic_margin"] = self.dynamic_margin(step)
        if self.training and self.memory_queue_size > 0:
            self._enqueue(g_c)
        self.last_stats["queue_size"] = float(self.queue_size)
        return loss

    def _direction(self, rows: _Side, cols: _Side, offset: int, step: int, n_batch_cols: int):
        """Mean cross-entropy of ``rows`` against ``cols``; row i's positive is column offset + i.

        Columns from ``n_batch_cols`` on are memory-queue entries.
        """
        sim = rows.emb @ cols.emb.T
        labels = torch.arange(sim.shape[0], device=sim.device) + offset
        logits = sim / self.temperature
        mean_tanh = torch.zeros((), device=sim.device)
        if self.hard_negative_weighting:
            tanh_b = torch.tanh(self._bm25_matrix(rows.attributes, cols.attributes, sim))
            if not self.weight_positive:
                tanh_b = tanh_b.index_put(
                    (torch.arange(sim.shape[0], device=sim.device), labels),
                    torch.zeros((), dtype=tanh_b.dtype, device=tanh_b.device),
                )
            logits = logits + self.weighting_scale * tanh_b
            mean_tanh = tanh_b.mean()
        mask = self.false_negative_mask(
            sim,
            positive_indices=labels,
            row_product_ids=rows.product_ids,
            col_product_ids=cols.product_ids,
            row_signatures=rows.signatures,
            col_signatures=cols.signatures,
            step=step,
        )
        if sim.shape[1] > n_batch_cols:  # queue columns: a past listing of the query's product
            same = _same(rows.product_ids, cols.product_ids[n_batch_cols:] if cols.product_ids else None, sim.device)
            if same is not None:
                mask[:, n_batch_cols:] |= same
        # -inf rather than a large finite value: exact zero weight, and the finite positive keeps
        # log-sum-exp and its gradient finite (masked_fill gives the masked entries zero gradient).
        logits = logits.masked_fill(mask, float("-inf"))
        return F.cross_entropy(logits, labels), mask.sum(1).double().mean(), mean_tanh

    def _bm25_matrix(self, row_texts: list, col_texts: list, like: torch.Tensor) -> torch.Tensor:
        if any(t is None for t in row_texts) or any(t is None for t in col_texts):
            raise ValueError(
                "hard_negative_weighting needs attribute texts for every row "
                "(query_attributes / candidate_attributes), including queued candidates"
            )
        scorer = self.bm25
        if scorer is None:  # in-batch IDF fallback; lazy import keeps agcl_loss free of text utils
            from afmrl.attributes import BM25Scorer

            scorer = BM25Scorer(row_texts + col_texts).score
        b = scorer(row_texts, col_texts)
        b = b.detach() if isinstance(b, torch.Tensor) else torch.from_numpy(np.asarray(b))
        b = b.to(device=like.device, dtype=like.dtype)
        if b.shape != like.shape:
            raise ValueError(
                f"bm25 returned shape {tuple(b.shape)}, expected {tuple(like.shape)} (len(queries), len(candidates))"
            )
        return b

    # ----------------------------------------------------------------------------- helpers
    def _world(self) -> tuple[int, int]:
        if self.gather_across_processes and dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _gather(self, sides: list[_Side]) -> tuple[list[_Side], int]:
        """All-gather every side over ranks (embeddings with gradients, metadata as objects).

        Returns the gathered sides and this rank's row offset into them.
        """
        rank, world = self._world()
        if world == 1:
            return sides, 0
        n = sides[0].emb.shape[0]
        metas: list = [None] * world
        dist.all_gather_object(metas, (n, [tuple(s[1:]) for s in sides]))
        sizes, top = [m[0] for m in metas], max(m[0] for m in metas)
        # The differentiable all-gather that torch.distributed.nn.functional.all_gather's deprecation
        # notice points to; its backward reduce-scatters (sums) the gradients over ranks.
        from torch.distributed._functional_collectives import all_gather_single

        out = []
        for k, side in enumerate(sides):
            # all-gather needs equal shapes: pad to the largest local batch, slice after.
            padded = all_gather_single(F.pad(side.emb, (0, 0, 0, top - n)), 0, dist.group.WORLD)
            emb = torch.cat([padded[r * top : r * top + s] for r, s in enumerate(sizes)])
            meta = [_cat_meta([m[1][k][f] for m in metas]) for f in range(3)]
            out.append(_Side(emb, *meta))
        return out, sum(sizes[:rank])

    def _validate(self, q, c, pids, cpids, qattr, cattr, qsig, csig, img, txt) -> None:
        if q.dim() != 2 or q.shape != c.shape:
            raise ValueError(
                "query_embeddings and candidate_embeddings must be (batch, dim) with the same "
                f"shape, got {tuple(q.shape)} and {tuple(c.shape)}"
            )
        n = q.shape[0]
        for name, seq in (
            ("product_ids", pids),
            ("candidate_product_ids", cpids),
            ("query_attributes", qattr),
            ("candidate_attributes", cattr),
            ("query_signatures", qsig),
            ("candidate_signatures", csig),
        ):
            if seq is not None and len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries, but the batch has {n} rows")
        if self.hard_negative_weighting and (qattr is None or cattr is None):
            raise ValueError(
                "hard_negative_weighting needs attribute texts (query_attributes / "
                "candidate_attributes); pass them or set hard_negative_weighting=False"
            )
        if (qsig is None) != (csig is None):
            raise ValueError("query_signatures and candidate_signatures must be given together")
        if self.false_negative_filter == "attribute" and pids is None and qsig is None:
            raise ValueError(
                'false_negative_filter="attribute" needs product_ids or query_signatures / candidate_signatures'
            )
        if self.queue_size and self.queue.emb.shape[1] != q.shape[1]:
            raise ValueError(
                f"memory queue holds dim {self.queue.emb.shape[1]} embeddings, batch has "
                f"dim {q.shape[1]}; call reset_queue()"
            )
        if self.intra_product_weight > 0 and (img is None) != (txt is None):
            raise ValueError("intra_product_weight needs both image_embeddings and text_embeddings")
        if img is not None and txt is not None and not (img.shape == txt.shape and img.shape[0] == n):
            raise ValueError(
                "image_embeddings and text_embeddings must both be (batch, dim), got "
                f"{tuple(img.shape)} and {tuple(txt.shape)} for batch {n}"
            )
