"""The RAR gallery: a catalog encoded ONCE by the frozen stage-1 encoder, with the facts to check it.

The retrieval-rank reward (``rewards.retrieval_rank``) ranks every sampled completion's query
against the same gallery, so the gallery is built once, before RL, and never re-encoded during
it: embeddings of image + title (no attributes, as in evaluation) in an ``agcl.retrieval.
GalleryIndex``, beside each row's ``listing_id`` and ``product_id``.

A stale gallery is the quiet way to ruin a run (the encoder was retrained, the catalog was
re-annotated or re-split), so a ``ProductGallery`` carries two fingerprints and ``load`` checks
them:

- the **encoder fingerprint**: sha256 over ``encoder_config.json`` and the weight files of an
  encoder directory (``"files"``; reading the files costs a few seconds per GB, once), or over
  the config and state dict of an in-memory ``ProductEncoder`` (``"weights"``; depends on the
  dtype it was loaded in), or an encoder's own ``fingerprint`` attribute (``"custom"``; for
  stand-in encoders). A gallery records every kind it could compute when it was built; a check
  compares the kinds both sides have.
- the **catalog fingerprint**: sha256 over (listing_id, product_id, title, image identity) per
  row, read from the Arrow columns without decoding an image. An image's identity is its path
  relative to the folder that holds all the catalog's images (so a catalog moved or mounted
  elsewhere keeps its fingerprint), or the sha256 of its bytes when the dataset embeds them.

Index choice: exact (``IndexFlatIP``) up to ``exact_max_size`` rows (100k by default), IVF above
it, IVF-PQ once the float32 vectors would not fit in memory (``index_type="auto"``; ``agcl.retrieval.
resolve_index_type``); ``"flat"``, ``"ivf"``, ``"ivfpq"`` and ``"hnsw"`` force one, and ``index_options``
pass through to ``GalleryIndex.build`` (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ...).
An approximate index is then tuned by ``tune_search``: the smallest ``nprobe`` / ``efSearch``
whose recall of the exact top-``recall_k`` (50, the reward's K) reaches ``target_recall`` (0.98)
on leave-one-out gallery queries -- the reward's own situation, since a query's listing is
excluded from its results.

Typical use::

    gallery = ProductGallery.build("data/catalog", "runs/agcl", split="train")
    gallery.save("runs/gallery")
    gallery = ProductGallery.load("runs/gallery", encoder="runs/agcl", catalog="data/catalog")
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from agcl.crops import catalog_views, uses_crops
from agcl.retrieval import GalleryIndex, resolve_index_type
from rewards.fingerprints import (  # noqa: F401  (re-exported: the gallery's public vocabulary)
    ENCODER_FINGERPRINT_KINDS,
    _as_catalog,
    _fingerprint_of,
    _short,
    catalog_fingerprint,
    encoder_fingerprints,
)

logger = logging.getLogger(__name__)

GALLERY_FILE = "product_gallery.json"
GALLERY_FORMAT = "afmrl-product-gallery"
FORMAT_VERSION = 1


class ProductGallery:
    """Encoded catalog + listing/product ids + fingerprints. Build with ``build`` or ``from_embeddings``.

    Attributes: ``index`` (``GalleryIndex``), ``listing_ids`` (list[str]), ``product_ids``
    (list[str]), ``product_codes`` (int64 per row; equal codes = same product),
    ``encoder_fingerprint`` (dict kind -> sha256), ``catalog_fingerprint`` (sha256 or None),
    ``info`` (JSON-serialisable facts: catalog source and split, index parameters, ...).
    """

    def __init__(
        self,
        index: GalleryIndex,
        listing_ids: Sequence[str],
        product_ids: Sequence[str],
        *,
        encoder_fingerprint: dict[str, str] | None = None,
        catalog_fingerprint: str | None = None,
        info: dict | None = None,
    ):
        listing_ids = [str(x) for x in listing_ids]
        product_ids = [str(x) for x in product_ids]
        if not (len(listing_ids) == len(product_ids) == index.size):
            raise ValueError(
                f"{len(listing_ids)} listing ids and {len(product_ids)} product ids for {index.size} gallery vectors"
            )
        self.index = index
        self.listing_ids = listing_ids
        self.product_ids = product_ids
        self.encoder_fingerprint = dict(encoder_fingerprint or {})
        self.catalog_fingerprint = catalog_fingerprint
        self.info = dict(info or {})
        self._derive()

    def _derive(self) -> None:
        self._row_of = {lid: i for i, lid in enumerate(self.listing_ids)}
        if len(self._row_of) != len(self.listing_ids):
            raise ValueError("gallery listing ids must be unique")
        names, codes = np.unique(np.asarray(self.product_ids, dtype=object).astype(str), return_inverse=True)
        self.product_codes = codes.astype(np.int64)
        self._code_of = {name: i for i, name in enumerate(names.tolist())}
        self._product_sizes = np.bincount(self.product_codes, minlength=len(names)).astype(np.int64)
        self._reconstructable = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_embeddings(
        cls,
        embeddings: np.ndarray,
        listing_ids: Sequence[str],
        product_ids: Sequence[str],
        *,
        encoder_fingerprint: dict[str, str] | None = None,
        catalog_fingerprint: str | None = None,
        index_type: str = "auto",
        exact_max_size: int = 100_000,
        recall_k: int = 50,
        target_recall: float | None = 0.98,
        tune_rows: Sequence[int] | None = None,
        info: dict | None = None,
        **index_options: Any,
    ) -> ProductGallery:
        """A gallery over given L2-normalised embeddings (e.g. computed elsewhere, or synthetic).

        ``index_options`` go to ``GalleryIndex.build``. An approximate index is tuned to
        ``target_recall`` of the exact top-``recall_k`` unless ``target_recall`` is None or the
        caller fixed ``nprobe`` (IVF) / ``ef_search`` (HNSW); ``tune_rows`` go to ``tune_search(rows=...)``.
        """
        n, dim = (len(embeddings), None) if not hasattr(embeddings, "shape") else embeddings.shape[:2]
        resolved = resolve_index_type(n, dim or 0, index_type, exact_max_size, index_options.get("memory_budget"))
        fixed = (resolved in ("ivf", "ivfpq") and index_options.get("nprobe") is not None) or (
            resolved == "hnsw" and "ef_search" in index_options
        )
        tune = resolved in ("ivf", "ivfpq", "hnsw") and target_recall is not None and not fixed
        if tune and resolved == "ivf":
            index_options["nprobe"] = 1  # skip GalleryIndex's top-10 calibration: tune_search replaces it
        index = GalleryIndex.build(
            embeddings, ids=None, index_type=resolved, exact_max_size=exact_max_size, **index_options
        )
        gallery = cls(
            index,
            listing_ids,
            product_ids,
            encoder_fingerprint=encoder_fingerprint,
            catalog_fingerprint=catalog_fingerprint,
            info=info,
        )
        if tune:
            gallery.tune_search(k=recall_k, target_recall=target_recall, rows=tune_rows)
        return gallery

    @classmethod
    def build(
        cls,
        catalog,
        encoder,
        *,
        split: str | None = None,
        index_type: str = "auto",
        exact_max_size: int = 100_000,
        recall_k: int = 50,
        target_recall: float | None = 0.98,
        batch_size: int = 32,
        show_progress: bool | None = None,
        index_options: dict | None = None,
        encoder_kwargs: dict | None = None,
        attribute_column: str | None = None,
        key_order: Sequence[str] | None = None,
    ) -> ProductGallery:
        """Encode ``catalog`` (a Dataset from ``load_catalog`` or a path; ``split`` selects rows)
        with ``encoder`` (a ``ProductEncoder``, an encoder directory, or any object with
        ``encode(images, titles, attributes=None, ...)``) and index it.

        Embeddings are of image + title, without attributes, unless ``attribute_column`` names a
        column of attribute dicts (e.g. the catalog's stored ``attributes``): then each listing's
        canonical attribute text (in ``key_order``) is appended, the way a marketplace whose
        catalog is already annotated would index it. ``encoder_kwargs`` go to
        ``ProductEncoder.from_pretrained`` when ``encoder`` is a path.
        """
        ds, source = _as_catalog(catalog, split=split, verify_images=True)
        attribute_texts = None
        if attribute_column is not None:
            if attribute_column not in ds.column_names:
                raise ValueError(f"attribute_column {attribute_column!r} is not a column of the catalog "
                                 f"(columns: {ds.column_names})")
            from agcl.attributes import format_attributes

            attribute_texts = [format_attributes(a, key_order) or None for a in ds[attribute_column]]
        encoder_source = None
        if isinstance(encoder, str | os.PathLike):
            from agcl.encoder import ProductEncoder

            encoder_source = str(Path(encoder).resolve())
            fingerprint = encoder_fingerprints(encoder_source)
            encoder = ProductEncoder.from_pretrained(encoder_source, **(encoder_kwargs or {}))
        else:
            fingerprint = {}
        # "weights" too, so that an in-memory copy of the encoder can be checked later
        fingerprint.update(encoder_fingerprints(encoder, kinds=("files", "custom", "weights")))
        embeddings = encoder.encode(
            catalog_views(ds, uses_crops(encoder)), list(ds["title"]), attribute_texts, batch_size=batch_size,
            show_progress=show_progress,
        )
        info = {
            "catalog_source": source,
            "catalog_split": split,
            "encoder_source": encoder_source,
            "embedding_dim": int(embeddings.shape[1]),
            "attribute_column": attribute_column,
        }
        return cls.from_embeddings(
            embeddings,
            list(ds["listing_id"]),
            list(ds["product_id"]),
            encoder_fingerprint=fingerprint,
            catalog_fingerprint=catalog_fingerprint(ds),
            index_type=index_type,
            exact_max_size=exact_max_size,
            recall_k=recall_k,
            target_recall=target_recall,
            info=info,
            **(index_options or {}),
        )

    # ------------------------------------------------------------------ properties and lookups
    @property
    def size(self) -> int:
        return self.index.size

    @property
    def dim(self) -> int:
        return self.index.dim

    def __len__(self) -> int:
        return self.index.size

    def __repr__(self) -> str:
        fp = ", ".join(f"{k}={_short(v)}" for k, v in self.encoder_fingerprint.items()) or "none"
        return (
            f"ProductGallery({self.index!r}, products={len(self._product_sizes)}, encoder[{fp}], "
            f"catalog={_short(self.catalog_fingerprint)})"
        )

    def rows_of(self, listing_ids: Sequence[str]) -> np.ndarray:
        """Gallery row of each listing id, -1 where the listing is not in the gallery."""
        get = self._row_of.get
        return np.fromiter((get(str(x), -1) for x in listing_ids), dtype=np.int64, count=len(listing_ids))

    def codes_of(self, product_ids: Sequence[str]) -> np.ndarray:
        """Product code of each product id (the labels of ``product_codes``), -1 when absent."""
        get = self._code_of.get
        return np.fromiter((get(str(x), -1) for x in product_ids), dtype=np.int64, count=len(product_ids))

    def positives_count(self, codes: np.ndarray, exclude_rows: np.ndarray | None = None) -> np.ndarray:
        """Number of gallery rows with each product code, minus the excluded row when it is one."""
        codes = np.asarray(codes, dtype=np.int64)
        counts = np.where(codes >= 0, self._product_sizes[np.maximum(codes, 0)], 0)
        if exclude_rows is not None:
            ex = np.asarray(exclude_rows, dtype=np.int64)
            counts = counts - ((ex >= 0) & (self.product_codes[np.maximum(ex, 0)] == codes))
        return counts

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """The stored embeddings of gallery ``rows`` (float32, (len(rows), dim)); IVF-PQ reads them from its
        re-ranking vectors (on disk when memory-mapped)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.index.rerank_vectors is not None:
            return np.asarray(self.index.rerank_vectors[rows], dtype=np.float32)
        if self.index.index_type == "ivf" and not self._reconstructable:
            self.index.index.make_direct_map()
            self._reconstructable = True
        return self.index.index.reconstruct_batch(rows).reshape(len(rows), self.dim)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[int] | None = None):
        """``GalleryIndex.search``: (scores, rows), each (num_queries, k)."""
        return self.index.search(queries, k, exclude=exclude)

    # ------------------------------------------------------------------ approximate search tuning
    def tune_search(
        self,
        k: int = 50,
        target_recall: float = 0.98,
        queries: np.ndarray | None = None,
        num_queries: int = 512,
        seed: int = 0,
        rows: Sequence[int] | None = None,
    ) -> dict:
        """Set the smallest nprobe (IVF) / efSearch (HNSW) whose recall of the exact top-``k`` reaches
        ``target_recall``; returns what it measured (also stored in ``index.params["tuning"]``).

        Without ``queries``, ``num_queries`` gallery rows are the queries and each one's own row is
        excluded (leave-one-out, as the reward excludes a query's own listing): drawn uniformly, or
        from ``rows`` -- pass the gallery rows of the listings your prompts query when they are not
        a uniform sample of the gallery (a recall measured on one region of the space says little
        about another: ``benchmarks/reward_cost.py`` shows IVF tuned on uniform rows missing a
        quarter of the top-50 of queries from a small dense region). The sample aims
        halfway between the target and 1 (as ``GalleryIndex``'s calibration), so that the recall
        on unseen queries clears the target. A flat index is exact: nothing to tune. IVF-PQ also raises
        its re-ranking depth (from the one it was built with, doubling up to 128) when probing every
        list is not enough; its exact top-k comes from its memory-mapped vectors, read in chunks.
        """
        kind = self.index.index_type
        if kind == "flat":
            return {"recall": 1.0, "k": k}
        n = self.size
        k = int(min(k, n - 1 if queries is None else n))
        if k < 1:
            return {"recall": 1.0, "k": k}
        rng = np.random.default_rng(seed)
        base = self.index.rerank_vectors if self.index.rerank_vectors is not None else self.vectors(np.arange(n))
        if queries is None:
            pool = np.arange(n) if rows is None else np.unique(np.asarray(rows, dtype=np.int64))
            sample = np.sort(rng.choice(pool, min(len(pool), num_queries), replace=False))
            q, exclude = np.ascontiguousarray(base[sample], dtype=np.float32), sample
        else:
            q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
            exclude = None
        truth = exact_top_k(q, base, k, exclude)
        goal = 1.0 - (1.0 - target_recall) / 2
        if kind in ("ivf", "ivfpq"):
            nlist = self.index.index.nlist
            ladder = sorted({min(nlist, max(1, int(round(2 ** (i / 2))))) for i in range(2 * int(math.log2(nlist)) + 3)})
        else:
            ladder = sorted({max(k, int(round(k * 2 ** (i / 2)))) for i in range(0, 14)})
        recall, value = 0.0, ladder[-1]
        # IVF-PQ: when probing more lists is not enough, re-rank more of its candidates
        start = self.index.params.get("rerank_factor", 8)
        factors = (start, *(f for f in (16, 32, 64, 128) if f > start)) if kind == "ivfpq" else (None,)
        for factor in factors:
            if factor is not None:
                self.index.params["rerank_factor"] = factor
            for value in ladder:
                if kind != "hnsw":
                    self.index.nprobe = value
                else:
                    self.index.ef_search = value
                _, found = self.index.search(q, k, exclude=exclude)
                recall = _overlap(found, truth)
                if recall >= goal:
                    break
            if recall >= goal:
                break
        del base
        result = {"param": "ef_search" if kind == "hnsw" else "nprobe", "value": int(value), "recall": recall,
                  "goal": goal, "target_recall": target_recall, "k": k, "queries": len(q)}
        if kind == "ivfpq":
            result["rerank_factor"] = self.index.params["rerank_factor"]
        if recall < goal:
            warnings.warn(
                f"{kind} gallery: recall of the exact top-{k} is {recall:.3f} at the largest "
                f"{result['param']}={value}, below the goal {goal:.3f}; use a flat index or more lists",
                stacklevel=2,
            )
        self.index.params["tuning"] = result
        return result

    # ------------------------------------------------------------------ checks
    def check_encoder(self, encoder, *, label: str | None = None) -> None:
        """Raise ValueError when ``encoder`` (an object or a directory) is not the one that built the gallery.

        Checks the embedding dimension (objects with ``embedding_dim``), then the fingerprints of
        the kinds both sides have. A directory checked against a gallery that has no ``"files"``
        fingerprint is loaded to compute its ``"weights"`` one. Without any common kind the
        check cannot be made: a warning says so.
        """
        where = label or (f"the encoder at {os.fspath(encoder)}" if isinstance(encoder, str | os.PathLike)
                          else f"the given {type(encoder).__name__}")
        dim = getattr(encoder, "embedding_dim", None)
        if dim is not None and int(dim) != self.dim:
            raise ValueError(
                f"dimension mismatch: the gallery holds {self.dim}-dim vectors but {where} embeds into {int(dim)} "
                "dimensions; rebuild the gallery with this encoder"
            )
        stored = self.encoder_fingerprint
        if not stored:
            warnings.warn("this gallery records no encoder fingerprint: the encoder cannot be checked", stacklevel=2)
            return
        for kind in ENCODER_FINGERPRINT_KINDS:  # the first kind both sides have decides; the cheap ones come first
            if kind not in stored:
                continue
            given = _fingerprint_of(encoder, kind)
            if given is None:
                continue
            if given != stored[kind]:
                raise ValueError(
                    f"encoder mismatch: the gallery was built with encoder fingerprint {_short(stored[kind])} ({kind}) "
                    f"but {where} has {_short(given)}; rebuild the gallery with this encoder "
                    "(ProductGallery.build) or pass the encoder it was built with"
                )
            return
        if isinstance(encoder, str | os.PathLike):  # the gallery knows only in-memory fingerprints: load to compare
            from agcl.encoder import ProductEncoder

            return self.check_encoder(ProductEncoder.from_pretrained(encoder), label=where)
        warnings.warn(
            f"cannot check {where} against the gallery: no fingerprint kind in common with the gallery's {sorted(stored)}",
            stacklevel=2,
        )

    def check_catalog(self, catalog, *, split: str | None = None) -> None:
        """Raise ValueError when ``catalog`` (Dataset or path) is not the catalog the gallery was built from."""
        ds, source = _as_catalog(catalog, split=split)
        where = f"the catalog at {source}" if source else "the given catalog"
        if self.catalog_fingerprint is None:
            warnings.warn("this gallery records no catalog fingerprint: the catalog cannot be checked", stacklevel=2)
            return
        given = catalog_fingerprint(ds)
        if given == self.catalog_fingerprint:
            return
        detail = ""
        if len(ds) != self.size:
            detail = f" ({len(ds)} rows there, {self.size} in the gallery)"
        else:
            ids = ds["listing_id"]
            products = ds["product_id"]
            for i, (lid, pid) in enumerate(zip(ids, products, strict=True)):
                if lid != self.listing_ids[i] or pid != self.product_ids[i]:
                    detail = (f" (first difference at row {i}: listing {lid!r} / product {pid!r} there, "
                              f"{self.listing_ids[i]!r} / {self.product_ids[i]!r} in the gallery)")
                    break
            else:
                detail = " (same listing and product ids: a title or image differs)"
        raise ValueError(
            f"catalog mismatch: the gallery was built from a catalog with fingerprint {_short(self.catalog_fingerprint)} "
            f"but {where} has {_short(given)}{detail}; rebuild the gallery from this catalog"
        )

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` + ``gallery.json`` (GalleryIndex) and ``product_gallery.json``."""
        directory = Path(directory)
        meta = {"encoder_fingerprint": self.encoder_fingerprint, "catalog_fingerprint": self.catalog_fingerprint}
        self.index.save(directory, metadata=meta)
        record = {
            "format": GALLERY_FORMAT,
            "format_version": FORMAT_VERSION,
            "dim": self.dim,
            "size": self.size,
            "encoder_fingerprint": self.encoder_fingerprint,
            "catalog_fingerprint": self.catalog_fingerprint,
            "info": self.info,
            "listing_ids": self.listing_ids,
            "product_ids": self.product_ids,
        }
        (directory / GALLERY_FILE).write_text(json.dumps(record), encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path, encoder=None, catalog=None, *, split: str | None = None) -> ProductGallery:
        """Read a saved gallery; with ``encoder`` and/or ``catalog`` check that they are the ones it was built from.

        Raises FileNotFoundError for a missing directory/file and ValueError (naming what differs)
        for a dimension, encoder or catalog mismatch. ``split`` selects the rows of a catalog
        path, as at build time (default: the split recorded at build time).
        """
        directory = Path(directory)
        path = directory / GALLERY_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} is not a product gallery: {GALLERY_FILE} is missing (write one with ProductGallery.save)"
            )
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != GALLERY_FORMAT:
            raise ValueError(f"{path} does not describe an {GALLERY_FORMAT} (field 'format')")
        index = GalleryIndex.load(directory)
        if index.dim != record["dim"] or index.size != record["size"]:
            raise ValueError(
                f"dimension mismatch: {directory / 'index.faiss'} holds {index.size} x {index.dim} vectors but "
                f"{GALLERY_FILE} says {record['size']} x {record['dim']}: the files come from different saves"
            )
        gallery = cls(
            index,
            record["listing_ids"],
            record["product_ids"],
            encoder_fingerprint=record.get("encoder_fingerprint"),
            catalog_fingerprint=record.get("catalog_fingerprint"),
            info=record.get("info"),
        )
        if encoder is not None:
            gallery.check_encoder(encoder)
        if catalog is not None:
            gallery.check_catalog(catalog, split=split if split is not None else gallery.info.get("catalog_split"))
        return gallery

    # ------------------------------------------------------------------ pickling (faiss objects are not picklable)
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("index", "_row_of", "_code_of", "_reconstructable")}
        idx = self.index
        rerank = idx.rerank_vectors
        if isinstance(rerank, np.memmap) and rerank.filename:  # the file, not its contents
            rerank = ("mmap", str(rerank.filename))
        state["_index_state"] = (faiss.serialize_index(idx.index), idx.index_type, idx.ids, idx.metadata, idx.params,
                                 rerank)
        return state

    def __setstate__(self, state: dict) -> None:
        blob, index_type, ids, metadata, params, rerank = state.pop("_index_state")
        if isinstance(rerank, tuple):
            rerank = np.load(rerank[1], mmap_mode="r")
        self.__dict__.update(state)
        index = faiss.deserialize_index(blob)
        if index_type in ("ivf", "ivfpq"):
            index.nprobe = params.get("nprobe", index.nprobe)
        elif index_type == "hnsw":
            index.hnsw.efSearch = params.get("ef_search", index.hnsw.efSearch)
        self.index = GalleryIndex(index, index_type, ids=ids, metadata=metadata, params=params, rerank_vectors=rerank)
        self._derive()


def faiss_flat(vectors: np.ndarray) -> faiss.Index:
    """An exact inner-product index over ``vectors`` (used as ground truth when tuning)."""
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return index


def exact_top_k(queries: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None,
                chunk: int = 262_144) -> np.ndarray:
    """Rows of the exact top-``k`` of ``base`` (read ``chunk`` rows at a time, so it may be memory-mapped) by
    inner product for each query; ``exclude[i]`` is a row left out of query i's results (-1: none)."""
    nq, extra = len(queries), 0 if exclude is None else 1
    best_s = np.full((nq, 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    for start in range(0, len(base), chunk):
        block = np.ascontiguousarray(base[start:start + chunk], dtype=np.float32)
        s, i = faiss.knn(queries, block, min(k + extra, len(block)), metric=faiss.METRIC_INNER_PRODUCT)
        best_s, best_i = np.concatenate([best_s, s], axis=1), np.concatenate([best_i, i + start], axis=1)
        if exclude is not None:
            best_s = np.where(best_i == np.asarray(exclude)[:, None], -np.inf, best_s)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, axis=1), np.take_along_axis(best_i, order, axis=1)
    return np.where(np.isfinite(best_s), best_i, -1)


def _overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row of ``truth`` (exact top-k rows) present in ``found``."""
    found = np.sort(found, axis=1)
    pos = np.clip(
        np.stack([np.searchsorted(f, t) for f, t in zip(found, truth, strict=True)]), 0, found.shape[1] - 1
    )
    hit = np.take_along_axis(found, pos, axis=1) == truth
    valid = truth >= 0
    return float((hit & valid).sum() / max(valid.sum(), 1))
