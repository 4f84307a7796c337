"""The RAR reward: how much a completion's attributes help its listing find its identical products.

AFMRL stage 2 (arXiv 2604.20135, "RAR"): the stage-1 encoder is frozen and the gallery is encoded
once (``afmrl.retrieval.gallery.ProductGallery``). For every sampled completion the generated attributes
are parsed and appended to the query listing's image and title, the query is re-embedded, the
gallery is ranked with the query's own listing excluded, and the listings with the same
``product_id`` are the true identical products. The default reward is the improvement of the true
product's reciprocal rank over the same query without attributes (``mode="rank_improvement"``);
the paper's Recall@K (``"recall_at_k"``) and plain MRR (``"mrr"``) are the other modes. Unparsable
output scores ``invalid_reward`` below every valid reward of the mode (the paper's eta = -0.1 below the floor of
its [0, 1] Recall@K; -1.1 in ``rank_improvement``, whose valid rewards reach down to -1), never an exception; a
query whose product has no other gallery listing scores None (not applicable). All queries of a call go through
one encoder forward and one search, with the G completions' shared image encoded once. ``margin_weight`` adds a dense
similarity-margin term beside the rank term (after Embed-RL, arXiv 2602.13823, whose frozen embedder rewards its
reasoner): the cosine of the query to its nearest true listing minus the cosine to its nearest other product, which
moves with every line even where the rank does not.

    reward = RetrievalRankReward(encoder="runs/agcl", gallery="runs/gallery", catalog="data/catalog")
    trainer = GRPOTrainer(..., reward_funcs=[reward])   # logs retrieval_rank/rank, recall@1, mrr, ...

Modes, rank transforms, search depth, ties, special cases, cost, processes and logged metrics, with
the reasons for each default: docs/stage2.md.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np

from afmrl.attributes import format_attributes, normalize_key, parse_attributes
from afmrl.retrieval.gallery import ProductGallery
from afmrl.retrieval.metrics import metrics_from_search
from rewards.attribute_rewards import completion_text
from rewards.rank_lookup import RankLookup

logger = logging.getLogger(__name__)

MODES = ("rank_improvement", "recall_at_k", "mrr")
# The lowest reward a valid (parsed, ranked) completion can get in each mode: 1/r_with - 1/r_without > -1, a Recall@K
# or a reciprocal rank >= 0. Unparsable output scores below it (ETA below by default), never among valid lines.
VALID_FLOOR = {"rank_improvement": -1.0, "recall_at_k": 0.0, "mrr": 0.0}
ETA = 0.1  # the paper's eta: -0.1, that far below the floor of its [0, 1] reward
RANK_TRANSFORMS = ("reciprocal", "log")
REWARD_NAME = "retrieval_rank"


@dataclass
class RankDetails:
    """Everything ``RetrievalRankReward.score`` computed, one entry per completion.

    Rank fields are NaN where the completion was not scored (unparsable or unscorable query).
    """

    rewards: list
    valid: np.ndarray
    scorable: np.ndarray
    attributes: list[str]
    num_attributes: np.ndarray
    rank: np.ndarray
    rank_without_attributes: np.ndarray
    reciprocal_rank: np.ndarray
    reciprocal_rank_without_attributes: np.ndarray
    recall_fraction: np.ndarray
    hit_at_1: np.ndarray
    hit_at_k: np.ndarray
    margin: np.ndarray  # cosine to the nearest true listing minus cosine to the nearest other product
    timings: dict = field(default_factory=dict)

    @property
    def scored(self) -> np.ndarray:
        return self.valid & self.scorable & np.isfinite(self.rank)


class RetrievalRankReward:
    """Retrieval-rank reward for TRL (see the module docstring). A plain picklable callable.

    Args:
        encoder: the frozen stage-1 encoder: a directory saved by ``ProductEncoder.save_pretrained``
            or an object with ``encode(images, titles, attributes=None, batch_size=..., show_progress=...)``.
        catalog: the catalog for query lookups (Dataset from ``load_catalog``, or a path).
        gallery: a ``ProductGallery`` or a directory saved by ``ProductGallery.save``. Without it
            the gallery is built from ``catalog`` on the first call (in every process).
        mode: "rank_improvement", "recall_at_k" or "mrr".
        k: K of recall_at_k and of the logged Recall@K.
        rank_transform: "reciprocal" or "log" (rank_improvement only).
        rank_depth: search depth for ranks; D = max(k, rank_depth), misses count as rank D + 1.
        invalid_reward: reward of unparsable output; default ``VALID_FLOOR[mode] - ETA`` (-1.1 in rank_improvement,
            -0.1, the paper's eta, in recall_at_k and mrr). A value not below every valid reward of the mode is refused:
            a valid line that lowers the rank must never score below junk.
        unscorable_reward: reward of a query whose product has no other gallery listing (None = N/A).
        split: rows of the catalog to use (one split name or several), also for a built gallery;
            ``gallery_options={"split": ...}`` indexes fewer of them (the prompts may lie outside it).
        known_keys: when given, attribute keys outside it are dropped before re-embedding.
        key_order: attribute key order of the canonical text (``format_attributes``).
        max_attribute_chars: the canonical text is cut at the last whole pair within this many
            characters (the encoder does not truncate; a rambling policy must not blow up memory).
        baseline_from_gallery: use the gallery vector as the attribute-free query of listings in it
            (ignored for a gallery built with ``attribute_column``: its vectors carry attributes).
        baseline_cache_size: listings whose baseline ranks are remembered across calls.
        batch_size: encoder batch size.
        image_cache_size: listings whose processed image and vision-tower output are kept across
            calls (``afmrl.encoder.model.ImageCache``); 0 = no image cache. Used only with an encoder that
            has ``new_image_cache`` (``ProductEncoder``).
        device: where a path-given encoder is loaded (default: the current CUDA device, else CPU).
        encoder_kwargs: passed to ``ProductEncoder.from_pretrained`` (e.g. ``dtype``).
        gallery_options: passed to ``ProductGallery.build`` when the gallery is built here.
        name: the reward's ``__name__`` (the prefix of its logs); default "retrieval_rank".
        margin_weight: w of the dense term ``w * (cos(q, nearest true listing) - cos(q, nearest other product))``
            added to every valid reward (0 = the rank term alone, the paper's). The margin lies in [-2, 2], so the
            default ``invalid_reward`` moves down by ``2 w`` and junk still scores below every valid line.
    """

    __name__ = REWARD_NAME  # instances carry it too (TRL reads reward_func.__name__)

    def __init__(
        self,
        encoder,
        catalog=None,
        gallery=None,
        *,
        mode: str = "rank_improvement",
        k: int = 50,
        rank_transform: str = "reciprocal",
        rank_depth: int = 100,
        invalid_reward: float | None = None,
        unscorable_reward: float | None = None,
        split: str | Sequence[str] | None = None,
        known_keys: Sequence[str] | None = None,
        key_order: Sequence[str] | None = None,
        max_attribute_chars: int | None = 1024,
        baseline_from_gallery: bool = True,
        baseline_cache_size: int = 100_000,
        batch_size: int = 64,
        image_cache_size: int = 256,
        device: str | None = None,
        encoder_kwargs: dict | None = None,
        gallery_options: dict | None = None,
        name: str | None = None,
        margin_weight: float = 0.0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if rank_transform not in RANK_TRANSFORMS:
            raise ValueError(f"rank_transform must be one of {RANK_TRANSFORMS}, got {rank_transform!r}")
        for label, value in (("k", k), ("rank_depth", rank_depth), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
        if isinstance(margin_weight, bool) or not isinstance(margin_weight, int | float):
            raise ValueError(f"margin_weight must be a number >= 0, got {margin_weight!r}")
        if not (math.isfinite(margin_weight) and margin_weight >= 0):
            raise ValueError(f"margin_weight must be a finite number >= 0, got {margin_weight!r}")
        floor = VALID_FLOOR[mode] - 2.0 * margin_weight  # the margin term reaches down to -2 w
        if invalid_reward is None:
            invalid_reward = floor - ETA
        if not math.isfinite(invalid_reward):
            raise ValueError(f"invalid_reward must be finite, got {invalid_reward!r}")
        if invalid_reward >= floor:
            raise ValueError(
                f"invalid_reward={invalid_reward!r} would not sit below every valid {mode} reward (valid rewards "
                f"reach down to {floor}): use a value below it, e.g. the default {floor - ETA}"
            )
        if unscorable_reward is not None and not math.isfinite(unscorable_reward):
            raise ValueError(f"unscorable_reward must be finite or None, got {unscorable_reward!r}")
        if encoder is None:
            raise ValueError(
                "RetrievalRankReward needs encoder= (the frozen stage-1 encoder: a directory or an object)"
            )
        if catalog is None and gallery is None:
            raise ValueError(
                "RetrievalRankReward needs catalog= (query lookups) and/or gallery= (see the module docstring)"
            )
        if isinstance(image_cache_size, bool) or not isinstance(image_cache_size, int) or image_cache_size < 0:
            raise ValueError(f"image_cache_size must be a non-negative integer, got {image_cache_size!r}")
        if max_attribute_chars is not None and max_attribute_chars < 1:
            raise ValueError(f"max_attribute_chars must be positive or None, got {max_attribute_chars!r}")
        self.__name__ = name or REWARD_NAME
        self.encoder = os.fspath(encoder) if isinstance(encoder, os.PathLike) else encoder
        self.catalog = os.fspath(catalog) if isinstance(catalog, os.PathLike) else catalog
        self.gallery = os.fspath(gallery) if isinstance(gallery, os.PathLike) else gallery
        self.mode = mode
        self.margin_weight = float(margin_weight)
        self.k = int(k)
        self.rank_transform = rank_transform
        self.rank_depth = int(rank_depth)
        self.depth = max(self.k, self.rank_depth)
        self.invalid_reward = float(invalid_reward)
        self.unscorable_reward = None if unscorable_reward is None else float(unscorable_reward)
        self.split = split
        self.known_keys = None if known_keys is None else frozenset(normalize_key(x) for x in known_keys)
        self.key_order = None if key_order is None else list(key_order)
        self.max_attribute_chars = max_attribute_chars
        self.baseline_from_gallery = bool(baseline_from_gallery)
        self.baseline_cache_size = int(baseline_cache_size)
        self.batch_size = int(batch_size)
        self.image_cache_size = int(image_cache_size)
        self.device = device
        self.encoder_kwargs = dict(encoder_kwargs or {})
        self.gallery_options = dict(gallery_options or {})
        self._state = None
        self._baselines: OrderedDict = OrderedDict()
        self.counters = self._new_counters()
        self.last_timings: dict[str, float] = {}

    @staticmethod
    def _new_counters() -> dict[str, int]:
        return {
            "calls": 0,
            "completions": 0,
            "invalid": 0,
            "unscorable": 0,
            "encoded_queries": 0,
            "encoded_baselines": 0,
            "gallery_baselines": 0,
            "baseline_cache_hits": 0,
            "encoder_failures": 0,
        }

    def __repr__(self) -> str:
        def show(x):
            return repr(x) if isinstance(x, str) or x is None else type(x).__name__

        return (
            f"RetrievalRankReward(encoder={show(self.encoder)}, catalog={show(self.catalog)}, "
            f"gallery={show(self.gallery)}, mode={self.mode!r}, k={self.k}, rank_transform={self.rank_transform!r}, "
            f"rank_depth={self.rank_depth}, invalid_reward={self.invalid_reward}, margin_weight={self.margin_weight})"
        )

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_state"] = None  # loaded state; in-memory arguments stay in encoder/catalog/gallery
        state["_baselines"] = OrderedDict()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # ------------------------------------------------------------------ loading
    def _ensure_loaded(self) -> RankLookup:
        if self._state is None:
            self._state = RankLookup.load(
                self.encoder,
                self.catalog,
                self.gallery,
                split=self.split,
                device=self.device,
                encoder_kwargs=self.encoder_kwargs,
                gallery_options=self.gallery_options,
                image_cache_size=self.image_cache_size,
                baseline_from_gallery=self.baseline_from_gallery,
                name=self.__name__,
            )
        return self._state

    # ------------------------------------------------------------------ parsing
    def _canonical(self, text: str) -> tuple[str | None, int]:
        """(canonical attribute text or None when unusable, number of pairs kept)."""
        attrs = parse_attributes(text).attributes
        if self.known_keys is not None:
            attrs = {key: value for key, value in attrs.items() if key in self.known_keys}
        if not attrs:
            return None, 0
        try:
            canon = format_attributes(attrs, self.key_order)
        except Exception:  # the parser's output always formats; stay safe anyway
            return None, 0
        limit = self.max_attribute_chars
        if limit is not None and len(canon) > limit:
            cut = canon.rfind("; ", 0, limit + 1)
            canon = canon[:cut] if cut > 0 else canon[:limit]
        return canon, canon.count("; ") + 1

    # ------------------------------------------------------------------ ranking
    def _rank_stats(
        self, gallery: ProductGallery, queries: np.ndarray, exclude: np.ndarray, codes: np.ndarray
    ) -> np.ndarray:
        """(Q, 6) rows of (rank, reciprocal rank, recall_fraction@k, hit@1, hit@k, margin), via
        afmrl.retrieval.metrics; the margin from the same search (``_margins``)."""
        d = self.depth
        search_depth = min(d + 1, gallery.size)
        scores, rows = gallery.search(queries, search_depth, exclude=exclude)
        kk = min(self.k, search_depth)
        m = metrics_from_search(
            rows,
            scores,
            codes,
            gallery.product_codes,
            ks=(1, kk),
            map_k=None,
            exclude=exclude,
            skip_queries_without_positive=True,
            per_query=True,
        )
        rank = m["rank"]
        found = np.isfinite(rank)
        floor = 1.0 / (d + 1)
        out = np.empty((len(queries), 6))
        out[:, 0] = np.where(found, np.minimum(rank, d + 1), d + 1)
        out[:, 1] = np.where(found, np.maximum(m["mrr"], floor), floor)
        out[:, 2] = m[f"recall_fraction@{kk}"]
        out[:, 3] = m["recall@1"]
        out[:, 4] = m[f"recall@{kk}"]
        out[:, 5] = self._margins(gallery, queries, scores, rows, exclude, codes)
        return np.nan_to_num(out, nan=0.0, posinf=d + 1, neginf=0.0)

    @staticmethod
    def _margins(
        gallery: ProductGallery,
        queries: np.ndarray,
        scores: np.ndarray,
        rows: np.ndarray,
        exclude: np.ndarray,
        codes: np.ndarray,
    ) -> np.ndarray:
        """cos(q, nearest true listing) - cos(q, nearest listing of another product), the query's own listing
        excluded. Both come from the search's sorted scores; a true listing deeper than the search is scored
        exactly from the stored vectors; when the search holds no other product (a product with more listings than
        the depth), its last score stands in for the nearest other one (an upper bound, so a lower margin)."""
        hit = rows >= 0
        row_codes = np.where(hit, gallery.product_codes[np.maximum(rows, 0)], -1)
        same = hit & (row_codes == codes[:, None])
        other = hit & ~same
        last = np.where(hit.any(axis=1), scores[np.arange(len(rows)), np.maximum(hit.sum(axis=1) - 1, 0)], 0.0)
        s_other = np.where(other.any(axis=1), scores[np.arange(len(rows)), other.argmax(axis=1)], last)
        s_true = np.where(same.any(axis=1), scores[np.arange(len(rows)), same.argmax(axis=1)], np.nan)
        for i in np.flatnonzero(~same.any(axis=1)):
            members = gallery.product_rows(int(codes[i]))
            members = members[members != exclude[i]]
            if len(members):
                s_true[i] = float((gallery.vectors(members) @ queries[i]).max())
        return s_true - s_other

    def score(self, listing_ids: Sequence, completions: Sequence) -> RankDetails:
        """Rank every completion's query; returns per-completion details and the rewards.

        Parse each distinct completion once, encode each distinct (listing, attribute text) query once
        together with the attribute-free baselines not yet known, search once, then assemble."""
        t0 = time.perf_counter()
        n = len(completions)
        if len(listing_ids) != n:
            raise ValueError(f"{len(listing_ids)} listing ids for {n} completions")
        st = self._ensure_loaded()
        t_load = time.perf_counter()
        cat_rows = st.catalog_rows(listing_ids)
        texts, num_attrs = self._parse_completions(completions)
        valid = np.fromiter((t is not None for t in texts), dtype=bool, count=n)
        scorable = st.positives[cat_rows] > 0
        need = valid & scorable
        t_parse = time.perf_counter()

        plan = self._plan_queries(st, cat_rows, texts, need)
        queries, query_rows = self._embed_queries(st, plan)
        t_encode = time.perf_counter()
        ok = np.isfinite(queries).all(axis=1)
        stats = np.zeros((len(queries), 6))
        if ok.any():
            stats[ok] = self._rank_stats(
                st.gallery, queries[ok], st.gallery_row[query_rows[ok]], st.code[query_rows[ok]]
            )
        t_search = time.perf_counter()

        with_attr, without = self._per_completion(plan, stats, ok, query_rows, cat_rows, need)
        failed = need & ~(np.isfinite(with_attr[:, 0]) & np.isfinite(without[:, 0]))
        scored = need & ~failed
        rewards = self._rewards(st, with_attr, without, valid, scored, failed)
        t_end = time.perf_counter()

        self._count(n, valid, scorable, failed, plan)
        timings = {
            "load": t_load - t0,
            "parse": t_parse - t_load,
            "encode": t_encode - t_parse,
            "search": t_search - t_encode,
            "assemble": t_end - t_search,
            "total": t_end - t0,
        }
        self.last_timings = timings
        return RankDetails(
            rewards=rewards,
            valid=valid,
            scorable=scorable,
            attributes=[t or "" for t in texts],
            num_attributes=num_attrs,
            rank=np.where(scored, with_attr[:, 0], np.nan),
            rank_without_attributes=np.where(scored, without[:, 0], np.nan),
            reciprocal_rank=np.where(scored, with_attr[:, 1], np.nan),
            reciprocal_rank_without_attributes=np.where(scored, without[:, 1], np.nan),
            recall_fraction=np.where(scored, with_attr[:, 2], np.nan),
            hit_at_1=np.where(scored, with_attr[:, 3], np.nan),
            hit_at_k=np.where(scored, with_attr[:, 4], np.nan),
            margin=np.where(scored, with_attr[:, 5], np.nan),
            timings=timings,
        )

    # ------------------------------------------------------------------ the steps of score
    def _parse_completions(self, completions: Sequence) -> tuple[list[str | None], np.ndarray]:
        """Canonical attribute text (None = unparsable) and pair count per completion; each distinct text once."""
        parsed: dict[str, tuple[str | None, int]] = {}
        texts: list[str | None] = []
        num_attrs = np.zeros(len(completions), dtype=np.int64)
        for i, completion in enumerate(completions):
            raw = completion_text(completion)
            hit = parsed.get(raw)
            if hit is None:
                hit = parsed[raw] = self._canonical(raw)
            texts.append(hit[0])
            num_attrs[i] = hit[1]
        return texts, num_attrs

    def _plan_queries(self, st: RankLookup, cat_rows: np.ndarray, texts: list, need: np.ndarray) -> SimpleNamespace:
        """The distinct enriched queries (``uid`` per completion), and the attribute-free baselines: cached,
        read from the gallery, or to encode."""
        uid_of: dict[tuple[int, str], int] = {}
        uid = np.full(len(texts), -1, dtype=np.int64)
        for i in np.flatnonzero(need):
            uid[i] = uid_of.setdefault((int(cat_rows[i]), texts[i]), len(uid_of))
        base_rows = [int(r) for r in dict.fromkeys(cat_rows[need].tolist())]
        cached = {r: self._baselines[r] for r in base_rows if r in self._baselines}
        for r in cached:
            self._baselines.move_to_end(r)
        todo = np.array([r for r in base_rows if r not in cached], dtype=np.int64)
        in_gallery = st.gallery_row[todo] >= 0 if st.baseline_from_gallery else np.zeros(len(todo), dtype=bool)
        return SimpleNamespace(
            uid=uid,
            q_rows=np.fromiter((r for r, _ in uid_of), dtype=np.int64, count=len(uid_of)),
            q_texts=[t for _, t in uid_of],
            cached=cached,
            base_from_gallery=todo[in_gallery],
            base_encode=todo[~in_gallery],
        )

    def _embed_queries(self, st: RankLookup, plan: SimpleNamespace) -> tuple[np.ndarray, np.ndarray]:
        """One encoder call (enriched queries, then attribute-free queries of listings outside the gallery), then
        the gallery's own vectors as the other baselines; returns the query vectors and their catalog rows."""
        enc_rows = np.concatenate([plan.q_rows, plan.base_encode])
        if len(enc_rows):
            cache = (
                {}
                if st.image_cache is None
                else {"image_keys": [st.listing_ids[r] for r in enc_rows.tolist()], "image_cache": st.image_cache}
            )
            embeddings = st.encoder.encode(
                st.fetch_images(enc_rows.tolist()),
                [st.titles[r] for r in enc_rows.tolist()],
                plan.q_texts + [None] * len(plan.base_encode),
                batch_size=self.batch_size,
                show_progress=False,
                **cache,
            )
            embeddings = np.asarray(embeddings, dtype=np.float32).reshape(len(enc_rows), -1)
        else:
            embeddings = np.zeros((0, st.gallery.dim), dtype=np.float32)
        queries = np.concatenate([embeddings, st.gallery.vectors(st.gallery_row[plan.base_from_gallery])])
        return queries, np.concatenate([enc_rows, plan.base_from_gallery])

    def _per_completion(
        self,
        plan: SimpleNamespace,
        stats: np.ndarray,
        ok: np.ndarray,
        query_rows: np.ndarray,
        cat_rows: np.ndarray,
        need: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, 6) rank statistics of each completion's query with its attributes and without (NaN where none);
        newly ranked baselines enter the LRU cache."""
        n_q = len(plan.q_rows)
        base_stats = dict(plan.cached)
        for j, r in enumerate(query_rows[n_q:].tolist()):
            if ok[n_q + j]:
                base_stats[r] = self._baselines[r] = stats[n_q + j]
        while len(self._baselines) > self.baseline_cache_size:
            self._baselines.popitem(last=False)
        width = stats.shape[1]
        with_attr = np.full((len(cat_rows), width), np.nan)
        without = np.full((len(cat_rows), width), np.nan)
        idx = np.flatnonzero(need)
        if len(idx):
            u = plan.uid[idx]
            with_attr[idx] = np.where(ok[:n_q][u][:, None], stats[:n_q][u], np.nan)
            without[idx] = np.stack([base_stats.get(int(r), np.full(width, np.nan)) for r in cat_rows[idx]])
        return with_attr, without

    def _rewards(
        self,
        st: RankLookup,
        with_attr: np.ndarray,
        without: np.ndarray,
        valid: np.ndarray,
        scored: np.ndarray,
        failed: np.ndarray,
    ) -> list:
        if self.mode == "rank_improvement":
            if self.rank_transform == "reciprocal":
                value = with_attr[:, 1] - without[:, 1]
            else:
                value = (np.log(without[:, 0]) - np.log(with_attr[:, 0])) / st.log_norm
        elif self.mode == "recall_at_k":
            value = with_attr[:, 2]
        else:
            value = with_attr[:, 1]
        if self.margin_weight:
            value = value + self.margin_weight * with_attr[:, 5]
        rewards: list = []
        for i in range(len(value)):
            if scored[i] and math.isfinite(value[i]):
                rewards.append(float(value[i]))
            elif not valid[i] or failed[i] or scored[i]:
                rewards.append(self.invalid_reward)
            else:  # valid output, query cannot be ranked
                rewards.append(self.unscorable_reward)
        return rewards

    def _count(
        self, n: int, valid: np.ndarray, scorable: np.ndarray, failed: np.ndarray, plan: SimpleNamespace
    ) -> None:
        c = self.counters
        c["calls"] += 1
        c["completions"] += n
        c["invalid"] += int((~valid).sum())
        c["unscorable"] += int((~scorable).sum())
        c["encoded_queries"] += len(plan.q_rows)
        c["encoded_baselines"] += len(plan.base_encode)
        c["gallery_baselines"] += len(plan.base_from_gallery)
        c["baseline_cache_hits"] += len(plan.cached)
        c["encoder_failures"] += int(failed.sum())

    # ------------------------------------------------------------------ TRL entry point
    def __call__(
        self, prompts=None, completions=None, listing_id=None, log_metric=None, log_extra=None, **kwargs
    ) -> list:
        if completions is None:
            raise TypeError(
                "RetrievalRankReward is called by TRL as reward(prompts=..., completions=..., listing_id=...)"
            )
        if listing_id is None:
            raise ValueError(
                "RetrievalRankReward needs a 'listing_id' column in the prompt dataset (TRL passes every column to "
                f"rewards); got the columns {sorted(k for k in kwargs if k not in ('trainer_state', 'completion_ids'))}"
            )
        details = self.score(listing_id, completions)
        if log_metric is not None or log_extra is not None:
            self._log(details, log_metric, log_extra)
        return details.rewards

    def _log(self, d: RankDetails, log_metric, log_extra) -> None:
        name, n = self.__name__, len(d.rewards)
        if log_metric is not None and n:
            metrics = {"invalid_rate": float(np.mean(~d.valid)), "unscorable_rate": float(np.mean(~d.scorable))}
            if d.valid.any():
                metrics["num_attributes"] = float(d.num_attributes[d.valid].mean())
            s = d.scored
            if s.any():
                metrics.update(
                    {
                        "rank": float(d.rank[s].mean()),
                        "rank_without_attributes": float(d.rank_without_attributes[s].mean()),
                        "recall@1": float(d.hit_at_1[s].mean()),
                        f"recall@{self.k}": float(d.hit_at_k[s].mean()),
                        "mrr": float(d.reciprocal_rank[s].mean()),
                        "margin": float(d.margin[s].mean()),
                    }
                )
            for key, value in metrics.items():
                if math.isfinite(value):
                    log_metric(f"{name}/{key}", value)
        if log_extra is not None:
            log_extra(f"{name}/attributes", list(d.attributes))
            log_extra(f"{name}/rank", [float(r) if math.isfinite(r) else None for r in d.rank])
