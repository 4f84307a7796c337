"""The RAR gallery: a catalog encoded ONCE by the frozen stage-1 encoder, with the facts to check it.

The retrieval-rank reward (``rewards.retrieval_rank``) ranks every sampled completion's query
against the same gallery, so the gallery is built once, before RL, and never re-encoded during
it: embeddings of image + title (no attributes, as in evaluation) in an ``afmrl.retrieval.index.
VectorIndex``, beside each row's ``listing_id`` and ``product_id``.

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
it, IVF-PQ once the float32 vectors would not fit in memory (``index_type="auto"``; ``afmrl.retrieval.index.
resolve_index_type``); ``"flat"``, ``"ivf"``, ``"ivfpq"`` and ``"hnsw"`` force one, and ``index_options``
pass through to ``VectorIndex.build`` (``nlist``, ``nprobe``, ``hnsw_m``, ``ef_search``, ...).
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
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from afmrl.catalog.load import load_catalog
from afmrl.retrieval.checks import check_catalog, check_encoder
from afmrl.retrieval.fingerprints import (
    _short,
    catalog_fingerprint,
    catalog_source,
    encoder_fingerprints,
)
from afmrl.retrieval.index import VectorIndex
from afmrl.retrieval.tuning import tune_search

logger = logging.getLogger(__name__)

GALLERY_FILE = "product_gallery.json"
GALLERY_FORMAT = "afmrl-product-gallery"
FORMAT_VERSION = 1


class ProductGallery:
    """Encoded catalog + listing/product ids + fingerprints. Build with ``build`` or ``from_embeddings``.

    Attributes: ``index`` (``VectorIndex``), ``listing_ids`` (list[str]), ``product_ids``
    (list[str]), ``product_codes`` (int64 per row; equal codes = same product),
    ``encoder_fingerprint`` (dict kind -> sha256), ``catalog_fingerprint`` (sha256 or None),
    ``info`` (JSON-serialisable facts: catalog source and split, index parameters, ...).
    """

    def __init__(
        self,
        index: VectorIndex,
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
        self._rows_by_code = np.argsort(self.product_codes, kind="stable")  # a product's rows, contiguous
        self._code_starts = np.concatenate([[0], np.cumsum(self._product_sizes)])

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

        ``index_options`` go to ``VectorIndex.build``. An approximate index is tuned (``tune_search``) to
        ``target_recall`` of the exact top-``recall_k`` unless ``target_recall`` is None or the
        caller fixed ``nprobe`` (IVF) / ``ef_search`` (HNSW); ``tune_rows`` go to ``tune_search(rows=...)``.
        """
        index = VectorIndex.build(
            embeddings,
            ids=None,
            index_type=index_type,
            exact_max_size=exact_max_size,
            recall_k=recall_k,
            target_recall=target_recall,
            tune_rows=tune_rows,
            **index_options,
        )
        return cls(
            index,
            listing_ids,
            product_ids,
            encoder_fingerprint=encoder_fingerprint,
            catalog_fingerprint=catalog_fingerprint,
            info=info,
        )

    @classmethod
    def build(
        cls,
        catalog,
        encoder,
        *,
        split: str | Sequence[str] | None = None,
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
        """Encode ``catalog`` (a Dataset from ``load_catalog`` or a path; ``split``, one name or several, selects rows)
        with ``encoder`` (a ``ProductEncoder``, an encoder directory, or any object with
        ``encode(images, titles, attributes=None, ...)``) and index it.

        Embeddings are of image + title, without attributes, unless ``attribute_column`` names a
        column of attribute dicts (e.g. the catalog's stored ``attributes``): then each listing's
        canonical attribute text (in ``key_order``) is appended, the way a marketplace whose
        catalog is already annotated would index it. ``encoder_kwargs`` go to
        ``ProductEncoder.from_pretrained`` when ``encoder`` is a path.
        """
        ds, source = load_catalog(catalog, split=split), catalog_source(catalog)
        attribute_texts = None
        if attribute_column is not None:
            if attribute_column not in ds.column_names:
                raise ValueError(
                    f"attribute_column {attribute_column!r} is not a column of the catalog (columns: {ds.column_names})"
                )
            from afmrl.attributes import format_attributes

            attribute_texts = [format_attributes(a, key_order) or None for a in ds[attribute_column]]
        from afmrl.encoder.model import ProductEncoder, encode_catalog  # torch: only when encoding

        encoder_source = None
        if isinstance(encoder, str | os.PathLike):
            encoder_source = str(Path(encoder).resolve())
            fingerprint = encoder_fingerprints(encoder_source)
            encoder = ProductEncoder.from_pretrained(encoder_source, **(encoder_kwargs or {}))
        else:
            fingerprint = {}
        # "weights" too, so that an in-memory copy of the encoder can be checked later
        fingerprint.update(encoder_fingerprints(encoder, kinds=("files", "custom", "weights")))
        embeddings = encode_catalog(encoder, ds, attribute_texts, batch_size=batch_size, show_progress=show_progress)
        info = {
            "catalog_source": source,
            "catalog_split": split if split is None or isinstance(split, str) else list(split),
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

    def product_rows(self, code: int) -> np.ndarray:
        """The gallery rows of product ``code`` (ascending; empty for -1 or an unknown code), without a scan."""
        if not 0 <= code < len(self._product_sizes):
            return np.zeros(0, dtype=np.int64)
        return self._rows_by_code[self._code_starts[code] : self._code_starts[code + 1]]

    def describe(self, rows: Sequence[int], fields: Sequence[str] = ("listing_id", "product_id")) -> dict[str, list]:
        """The listing and product ids of gallery ``rows`` (-1 gives None): what a search answers with."""
        columns = {"listing_id": self.listing_ids, "product_id": self.product_ids}
        return {name: [columns[name][r] if r >= 0 else None for r in rows] for name in fields}

    def positives_of(self, product_ids: Sequence[str], listing_ids: Sequence[str]) -> np.ndarray:
        """How many gallery listings share each product id, the listing itself (when indexed) not counted."""
        return self.positives_count(self.codes_of(product_ids), exclude_rows=self.rows_of(listing_ids))

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """The stored embeddings of gallery ``rows`` (``VectorIndex.vectors``)."""
        return self.index.vectors(rows)

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[int] | None = None):
        """``VectorIndex.search``: (scores, rows), each (num_queries, k)."""
        return self.index.search(queries, k, exclude=exclude)

    def tune_search(self, k: int = 50, target_recall: float = 0.98, **options) -> dict:
        """``afmrl.retrieval.tuning.tune_search`` on this gallery's index (the reward's top-50 at 0.98 by default):
        the smallest nprobe / efSearch whose recall of the exact top-``k`` reaches ``target_recall``."""
        return tune_search(self.index, k=k, target_recall=target_recall, **options)

    # ------------------------------------------------------------------ checks (afmrl.retrieval.checks)
    def check_encoder(self, encoder, *, label: str | None = None) -> None:
        """Raise ValueError when ``encoder`` (an object or a directory) is not the one that built the gallery."""
        check_encoder(self, encoder, label=label)

    def check_catalog(self, catalog, *, split: str | Sequence[str] | None = None) -> None:
        """Raise ValueError when ``catalog`` (Dataset or path) is not the catalog the gallery was built from."""
        check_catalog(self, catalog, split=split)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss`` + ``gallery.json`` (VectorIndex) and ``product_gallery.json``."""
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
    def load(
        cls, directory: str | Path, encoder=None, catalog=None, *, split: str | Sequence[str] | None = None
    ) -> ProductGallery:
        """Read a saved gallery; with ``encoder`` and/or ``catalog`` check that they are the ones it was built from.

        Raises FileNotFoundError for a missing directory/file and ValueError (naming what differs)
        for a dimension, encoder or catalog mismatch. ``split`` selects the rows of a catalog
        path, as at build time (default: the split recorded at build time).
        """
        directory = Path(directory)
        path = directory / GALLERY_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} is not a product gallery: {GALLERY_FILE} is missing (write one with "
                "ProductGallery.save)"
            )
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != GALLERY_FORMAT:
            raise ValueError(f"{path} does not describe an {GALLERY_FORMAT} (field 'format')")
        index = VectorIndex.load(directory)
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
        state = {k: v for k, v in self.__dict__.items() if k not in ("index", "_row_of", "_code_of")}
        idx = self.index
        rerank = idx.rerank_vectors
        if isinstance(rerank, np.memmap) and rerank.filename:  # the file, not its contents
            rerank = ("mmap", str(rerank.filename))
        state["_index_state"] = (
            faiss.serialize_index(idx.index),
            idx.index_type,
            idx.ids,
            idx.metadata,
            idx.params,
            rerank,
        )
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
        self.index = VectorIndex(index, index_type, ids=ids, metadata=metadata, params=params, rerank_vectors=rerank)
        self._derive()
