"""A gallery of product embeddings, searchable by inner product, saved beside its encoder fingerprint.

The stage-1 encoder is frozen and the gallery is encoded once (DESIGN.md); this module is the
index those embeddings live in, for evaluation (``afmrl.retrieval.metrics.metrics_from_search``) and for the
RAR reward. Embeddings are L2-normalised float32, so inner product is cosine similarity.

Index types (``VectorIndex.build(..., index_type=...)``):

- ``"flat"``  — exact search (``IndexFlatIP``). About 0.2 s for 1k queries over 100k x 256 on
  two threads, so it is the right choice for every gallery that fits in memory up to ~100k.
- ``"ivf"``   — ``IndexIVFFlat`` with ``METRIC_INNER_PRODUCT`` and spherical k-means.
  ``nlist`` defaults to round(4 * sqrt(N)) (at most N // 39, faiss's minimum of training points
  per centroid), trained on a seeded sample of at most 64 * nlist vectors. ``nprobe`` defaults
  to a *tuned* value (below). A fixed fraction of nlist cannot promise high recall: on 20k x 64
  vectors it needs nprobe 8 for well-separated clusters and 128+ for diffuse ones.
- ``"hnsw"``  — ``IndexHNSWFlat`` (M = ``hnsw_m``, efConstruction = max(40, 2M), efSearch =
  ``ef_search``, tuned when not given). No training, fast queries, more memory.
- ``"ivfpq"`` — ``IndexIVFPQ``: IVF whose vectors are product-quantised to ``pq_m`` bytes each
  (8 bits per sub-quantiser) instead of 4 x dim, for galleries whose float32 vectors do not fit
  in memory. Built in chunks, so ``embeddings`` may be a ``np.memmap`` larger than memory; its
  ``rerank_factor`` x k candidates are re-scored exactly with ``embeddings`` (read from disk when
  memory-mapped; saved as ``vectors.npy``), see ``afmrl.retrieval.ivfpq``. Measured in docs/results/index_scale.md.
- ``"auto"``  — flat up to ``exact_max_size`` vectors, IVF beyond, IVF-PQ once the float32
  vectors would take more than ``memory_budget`` bytes (default: half the machine's memory).

Every approximate index is tuned by one tuner, ``afmrl.retrieval.tuning.tune_search``, unless its ``nprobe`` /
``ef_search`` is given: the cheapest setting whose recall of the exact top-``recall_k`` (10) reaches
``target_recall`` (0.95) on leave-one-out gallery queries. ``ProductGallery`` asks for the reward's top-50 at 0.98.

Search never changes faiss's global thread count (``faiss.omp_set_num_threads``); set it yourself
if you need to.

Typical use::

    index = VectorIndex.build(gallery_embeddings, ids=listing_ids)
    scores, rows = index.search(query_embeddings, k=50, exclude=query_rows_in_gallery)
    index.save("runs/gallery", metadata={"encoder": encoder_fingerprint})
    index = VectorIndex.load("runs/gallery")   # index.metadata["encoder"] to check it is current
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from afmrl.retrieval.ivfpq import build_ivfpq, rerank_search
from afmrl.retrieval.tuning import tune_search
from afmrl.retrieval.vectors import as_float32_matrix, checked_rows, save_vectors

INDEX_TYPES = ("flat", "ivf", "hnsw", "ivfpq", "auto")
BUILT_TYPES = INDEX_TYPES[:-1]
INDEX_FILE = "index.faiss"
VECTORS_FILE = "vectors.npy"  # IVF-PQ's float vectors for exact re-ranking, memory-mapped
META_FILE = "gallery.json"
FORMAT_VERSION = 1


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def resolve_index_type(
    n: int, dim: int, index_type: str = "auto", exact_max_size: int = 100_000, memory_budget: int | None = None
) -> str:
    """The index ``"auto"`` picks for ``n`` vectors of ``dim`` floats: flat up to ``exact_max_size``, IVF
    while the float32 vectors fit in ``memory_budget`` bytes (default: half the physical memory), IVF-PQ beyond."""
    if index_type not in INDEX_TYPES:
        raise ValueError(f"unknown index_type {index_type!r}; valid: {', '.join(INDEX_TYPES)}")
    if index_type != "auto":
        return index_type
    if n <= exact_max_size:
        return "flat"
    budget = physical_memory_bytes() // 2 if memory_budget is None else memory_budget
    return "ivf" if 4 * n * dim <= budget else "ivfpq"


class VectorIndex:
    """Inner-product search over L2-normalised gallery embeddings. Build with ``VectorIndex.build``."""

    def __init__(
        self,
        index: faiss.Index,
        index_type: str,
        ids: Sequence[str] | None = None,
        metadata: dict | None = None,
        params: dict | None = None,
        rerank_vectors: np.ndarray | None = None,
    ):
        if index_type not in BUILT_TYPES:
            raise ValueError(f"index_type must be one of {', '.join(map(repr, BUILT_TYPES))} here, got {index_type!r}")
        if ids is not None and len(ids) != index.ntotal:
            raise ValueError(f"{len(ids)} ids for {index.ntotal} gallery vectors")
        self.index = index
        self.index_type = index_type
        self.ids = None if ids is None else [str(i) for i in ids]
        self.metadata = dict(metadata or {})
        self.params = dict(params or {})
        if rerank_vectors is not None and rerank_vectors.shape != (index.ntotal, index.d):
            raise ValueError(f"rerank_vectors has shape {rerank_vectors.shape}, the index {index.ntotal} x {index.d}")
        self.rerank_vectors = rerank_vectors

    # ------------------------------------------------------------------ building
    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        ids: Sequence[str] | None = None,
        index_type: str = "auto",
        exact_max_size: int = 100_000,
        nlist: int | None = None,
        nprobe: int | None = None,
        hnsw_m: int = 32,
        ef_search: int | None = None,
        *,
        pq_m: int | None = None,
        rerank_factor: int = 8,
        memory_budget: int | None = None,
        recall_k: int = 10,
        target_recall: float | None = 0.95,
        tune_rows: Sequence[int] | None = None,
        normalize: bool = False,
        metadata: dict | None = None,
        seed: int = 0,
    ) -> VectorIndex:
        """Index ``embeddings`` (N, dim), row i has id ``ids[i]`` (default: none, use row numbers).

        Rows must be L2-normalised (norm 1 within 1e-3) unless ``normalize=True`` normalises them.
        ``nlist``/``nprobe`` concern IVF and IVF-PQ, ``pq_m`` (bytes per code, a divisor of dim) and
        ``rerank_factor`` IVF-PQ, ``hnsw_m``/``ef_search`` HNSW, ``memory_budget`` the choice of ``"auto"``. An
        approximate index whose ``nprobe`` / ``ef_search`` is not given is tuned to ``target_recall`` of the exact
        top-``recall_k`` (``tune_search``, on leave-one-out queries drawn from ``tune_rows`` when given; None: no
        tuning, nprobe 1 / efSearch 128). ``metadata`` (JSON-serialisable) is kept and saved.
        """
        if not hasattr(embeddings, "shape") or len(embeddings.shape) != 2:
            embeddings = as_float32_matrix(embeddings, "embeddings")
        n, dim = embeddings.shape
        if n == 0:
            raise ValueError("embeddings is empty: a gallery needs at least one vector")
        index_type = resolve_index_type(n, dim, index_type, exact_max_size, memory_budget)
        if index_type != "ivfpq":  # the others hold every float32 vector in memory anyway
            embeddings = checked_rows(embeddings, 0, n, normalize=normalize)
        if ids is not None:
            ids = [str(i) for i in ids]
            if len(ids) != n:
                raise ValueError(f"{len(ids)} ids for {n} embeddings")
            if len(set(ids)) != n:
                seen, dup = set(), None
                for i in ids:
                    if i in seen:
                        dup = i
                        break
                    seen.add(i)
                raise ValueError(f"ids must be unique; {dup!r} appears more than once")
        x, rerank = embeddings, None
        params: dict[str, Any] = {}
        if index_type == "flat":
            index = faiss.IndexFlatIP(dim)
            index.add(x)
        elif index_type == "ivf":
            index, params = cls._build_ivf(x, nlist, nprobe, seed)
        elif index_type == "ivfpq":
            if normalize:
                raise ValueError("an IVF-PQ index re-ranks with the vectors as given: normalise them first")
            if rerank_factor < 1:
                raise ValueError(f"rerank_factor must be >= 1, got {rerank_factor}")
            index, params = build_ivfpq(x, nlist=nlist, nprobe=nprobe, pq_m=pq_m, seed=seed)
            params["rerank_factor"] = int(rerank_factor)
            rerank = x if isinstance(x, np.ndarray) and x.dtype == np.float32 else checked_rows(x, 0, n)
        else:
            if hnsw_m < 2 or (ef_search is not None and ef_search < 1):
                raise ValueError(f"hnsw_m must be >= 2 and ef_search >= 1, got {hnsw_m} and {ef_search}")
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = max(40, 2 * hnsw_m)
            index.hnsw.efSearch = ef_search or 128
            index.add(x)
            params = {"hnsw_m": hnsw_m, "ef_construction": index.hnsw.efConstruction, "ef_search": index.hnsw.efSearch}
        built = cls(index, index_type, ids=ids, metadata=metadata, params=params, rerank_vectors=rerank)
        given = ef_search if index_type == "hnsw" else nprobe
        if index_type != "flat" and given is None and target_recall is not None:
            tune_search(built, k=recall_k, target_recall=target_recall, rows=tune_rows, seed=seed)
        return built

    @staticmethod
    def _build_ivf(x, nlist, nprobe, seed):
        n, dim = x.shape
        max_nlist = max(1, n // 39)
        if nlist is None:
            nlist = min(max(1, int(round(4 * math.sqrt(n)))), max_nlist)
        elif not 1 <= nlist <= n:
            raise ValueError(f"nlist must be between 1 and the gallery size {n}, got {nlist}")
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # centroids on the sphere, like the data
        rng = np.random.default_rng(seed)
        n_train = min(n, 64 * nlist)
        train = x if n_train == n else x[np.sort(rng.choice(n, n_train, replace=False))]
        index.train(train)
        index.add(x)
        if nprobe is not None and not 1 <= nprobe <= nlist:
            raise ValueError(f"nprobe must be between 1 and nlist={nlist}, got {nprobe}")
        index.nprobe = nprobe or 1  # tuned by the caller when not given
        return index, {"nlist": nlist, "nprobe": int(index.nprobe), "n_train": n_train}

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def size(self) -> int:
        return self.index.ntotal

    def __len__(self) -> int:
        return self.index.ntotal

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params.items() if k != "tuning")
        return f"VectorIndex({self.index_type}, size={self.size}, dim={self.dim}{', ' + extra if extra else ''})"

    @property
    def nprobe(self) -> int | None:
        return self.index.nprobe if self.index_type in ("ivf", "ivfpq") else None

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.index_type not in ("ivf", "ivfpq"):
            raise ValueError(f"nprobe applies to IVF indexes, this one is {self.index_type!r}")
        if not 1 <= value <= self.index.nlist:
            raise ValueError(f"nprobe must be between 1 and nlist={self.index.nlist}, got {value}")
        self.index.nprobe = int(value)
        self.params["nprobe"] = int(value)

    @property
    def ef_search(self) -> int | None:
        return self.index.hnsw.efSearch if self.index_type == "hnsw" else None

    @ef_search.setter
    def ef_search(self, value: int) -> None:
        if self.index_type != "hnsw":
            raise ValueError(f"ef_search applies to HNSW indexes, this one is {self.index_type!r}")
        if value < 1:
            raise ValueError(f"ef_search must be >= 1, got {value}")
        self.index.hnsw.efSearch = int(value)
        self.params["ef_search"] = int(value)

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """The stored vectors of ``rows`` (float32, (len(rows), dim)); IVF-PQ reads them from its re-ranking
        vectors (on disk when memory-mapped)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.rerank_vectors is not None:
            return np.asarray(self.rerank_vectors[rows], dtype=np.float32)
        if self.index_type == "ivf" and not getattr(self, "_direct_map", False):
            self.index.make_direct_map()
            self._direct_map = True
        return self.index.reconstruct_batch(rows).reshape(len(rows), self.dim)

    def ids_for(self, indices: np.ndarray) -> np.ndarray:
        """Map gallery rows (as returned by ``search``) to ids; -1 (padding) maps to None."""
        if self.ids is None:
            raise ValueError("this index was built without ids")
        indices = np.asarray(indices)
        table = np.array([*self.ids, None], dtype=object)  # row -1 lands on the trailing None
        return table[indices]

    # ------------------------------------------------------------------ search
    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` gallery rows by inner product: ``(scores, indices)``, each (num_queries, k).

        Rows are sorted by decreasing score. ``exclude[i]`` is a gallery row dropped from query
        i's results (its own listing when the gallery contains it; -1 for none): the index is
        searched for k+1 and exactly k columns are kept. Missing results (a gallery smaller than
        k, or an approximate index that found fewer) are padded with index -1 and score -inf.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        q = as_float32_matrix(queries, "queries")
        if q.shape[1] != self.dim:
            raise ValueError(f"query dim {q.shape[1]} does not match the index dim {self.dim}")
        nq = len(q)
        if exclude is None:
            scores, indices = self._search(q, k)
        else:
            ex = np.asarray(exclude)
            if ex.shape != (nq,) or not (np.issubdtype(ex.dtype, np.integer) or nq == 0):
                raise ValueError(
                    f"exclude must be {nq} integer gallery rows (one per query, -1 for none), got shape {ex.shape} "
                    f"dtype {ex.dtype}"
                )
            ex = ex.astype(np.int64)
            if ((ex < -1) | (ex >= self.size)).any():
                bad = int(np.flatnonzero((ex < -1) | (ex >= self.size))[0])
                raise ValueError(f"exclude[{bad}] = {int(ex[bad])} is not a gallery row (0..{self.size - 1}) or -1")
            scores, indices = self._search(q, k + 1)
            hit = (indices == ex[:, None]) & (ex[:, None] >= 0)
            drop = np.where(hit.any(axis=1), hit.argmax(axis=1), k)  # the excluded row, else the extra one
            keep = np.ones(indices.shape, dtype=bool)
            keep[np.arange(nq), drop] = False
            scores = scores[keep].reshape(nq, k)
            indices = indices[keep].reshape(nq, k)
        scores = np.where(indices < 0, -np.inf, scores).astype(np.float32)
        return scores, indices.astype(np.int64)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.rerank_vectors is None:
            return self.index.search(q, k)
        return rerank_search(self.index, self.rerank_vectors, q, k, self.params.get("rerank_factor", 8))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path, metadata: dict | None = None) -> Path:
        """Write ``index.faiss`` and ``gallery.json`` (ids, dim, index_type, size, params, metadata).

        ``metadata`` is merged over the index's own (``self.metadata``) and must be
        JSON-serialisable; store what tells a stale gallery apart, e.g. an encoder fingerprint.
        """
        if metadata is not None:
            self.metadata.update(metadata)
        info = {
            "format_version": FORMAT_VERSION,
            "index_type": self.index_type,
            "dim": self.dim,
            "size": self.size,
            "params": self.params,
            "faiss_version": faiss.__version__,
            "metadata": self.metadata,
            "ids": self.ids,
        }
        try:
            text = json.dumps(info)
        except TypeError as err:
            raise TypeError(f"gallery metadata must be JSON-serialisable: {err}") from err
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        if self.rerank_vectors is not None:
            save_vectors(self.rerank_vectors, directory / VECTORS_FILE)
        (directory / META_FILE).write_text(text)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> VectorIndex:
        """Read an index written by ``save``; a missing directory or file is a FileNotFoundError naming it."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"gallery index directory {str(directory)!r} does not exist")
        missing = [name for name in (INDEX_FILE, META_FILE) if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"gallery index directory {str(directory)!r} lacks {' and '.join(missing)} (written by "
                "VectorIndex.save)"
            )
        info = json.loads((directory / META_FILE).read_text())
        index = faiss.read_index(str(directory / INDEX_FILE))
        if index.d != info["dim"] or index.ntotal != info["size"]:
            raise ValueError(
                f"{directory / INDEX_FILE} holds {index.ntotal} x {index.d} vectors but {META_FILE} says "
                f"{info['size']} x {info['dim']}: the two files come from different saves"
            )
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError(f"{directory / INDEX_FILE} is not an inner-product index")
        params = info.get("params", {})
        if info["index_type"] in ("ivf", "ivfpq"):
            index.nprobe = params.get("nprobe", index.nprobe)
        elif info["index_type"] == "hnsw":
            index.hnsw.efSearch = params.get("ef_search", index.hnsw.efSearch)
        rerank = None
        if info["index_type"] == "ivfpq":
            if not (directory / VECTORS_FILE).is_file():
                raise FileNotFoundError(
                    f"the IVF-PQ index {str(directory)!r} lacks {VECTORS_FILE} (its vectors for re-ranking)"
                )
            rerank = np.load(directory / VECTORS_FILE, mmap_mode="r")
        return cls(
            index,
            info["index_type"],
            ids=info.get("ids"),
            metadata=info.get("metadata"),
            params=params,
            rerank_vectors=rerank,
        )
