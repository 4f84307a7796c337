"""A searchable index of a catalog: annotated by the generator, embedded by the encoder, with a match threshold.

What both stages are trained for, put to use: every listing is annotated once (stage 2's generator,
greedy, or the catalog's stored attributes), embedded as image + title + attributes by the frozen
stage-1 encoder, and indexed with faiss (``afmrl.retrieval.ProductGallery``: exact up to 100k vectors, IVF
tuned to a target recall of the exact top-k beyond, IVF-PQ re-ranked from disk once the vectors
outgrow memory). A query listing is annotated and embedded the same way -- the both-sides protocol
of ``rar.evaluation`` -- and answered with its nearest listings. ``calibrate`` picks the score above
which a result is called "the same product" for a target precision on a labelled split. Large
catalogs are annotated and embedded in shards over several processes (``deploy.sharding``).

    index = ProductIndex.build("data/catalog", encoder="outputs/rar-demo/encoder", generator="outputs/rar-demo")
    index.save("outputs/index")
    index = ProductIndex.load("outputs/index")        # a changed encoder is refused by fingerprint
    results = index.search(load_catalog("data/catalog", split="test"), k=10)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from afmrl.attributes import canonical_attributes, format_attributes
from afmrl.catalog import load_catalog
from afmrl.encoder.model import ProductEncoder, encode_catalog, load_frozen_encoder
from afmrl.retrieval.fingerprints import catalog_fingerprint, directory_fingerprint, encoder_fingerprints
from afmrl.retrieval.gallery import ProductGallery
from deploy.calibration import calibrate_by_category, calibrate_threshold, threshold_of
from deploy.matching import knn_graph, match_groups
from deploy.milvus_store import FIELDS, MilvusGallery
from rar.annotate import annotate

__all__ = ["INDEX_FILE", "ProductIndex", "check_listings"]

INDEX_FILE = "product_index.json"
GENERATOR_FILES = ("config.json", "adapter_config.json", "generation_config.json", "attribute_prompt.json")
META_COLUMNS = ("category", "split")  # kept per indexed listing: per-category thresholds, matching one split
ATTRIBUTES_FILE = "attributes.jsonl"


def check_listings(listings, split: str | None, attribute_column: str | None) -> None:
    if len(listings) == 0:
        raise ValueError(f"the catalog{'' if split is None else f' split {split!r}'} has no listings to index")
    if attribute_column is not None and attribute_column not in listings.column_names:
        raise ValueError(
            f"--attribute_column {attribute_column!r} is not a column of the catalog (columns: {listings.column_names})"
        )


class ProductIndex:
    """``gallery`` (a ``ProductGallery`` of the annotated listings) + their ``attributes`` + how queries are
    annotated and embedded (``config``: encoder, generator, attribute column, generation prompt, threshold)."""

    def __init__(
        self, gallery: ProductGallery, attributes: Sequence[str | None], config: dict, meta: dict | None = None
    ):
        if len(attributes) != gallery.size:
            raise ValueError(f"{len(attributes)} attribute texts for {gallery.size} indexed listings")
        self.gallery, self.attributes, self.config = gallery, list(attributes), dict(config)
        # per indexed listing: its category and split (None where the catalog had none)
        self.meta = {key: list((meta or {}).get(key) or [None] * gallery.size) for key in META_COLUMNS}
        self._encoder = None

    # ------------------------------------------------------------------ build, save, load
    @classmethod
    def configure(
        cls,
        encoder: str,
        *,
        generator: str | None = None,
        attribute_column: str | None = None,
        generation: dict | None = None,
        catalog: str | None = None,
        split: str | None = None,
    ) -> ProductIndex:
        """An index with nothing in it yet, only how listings are annotated and embedded: what
        ``annotate`` and ``embed`` use (``deploy.sharding`` builds from several such processes)."""
        index = cls.__new__(cls)
        index.gallery, index.attributes, index._encoder = None, [], None
        index.config = {
            "encoder": str(Path(encoder).resolve()),
            "generator": None if generator is None else str(generator),
            "attribute_column": attribute_column,
            "generation": dict(generation or {}),
            "threshold": None,
            "catalog": catalog,
            "split": split,
        }
        return index

    @classmethod
    def build(
        cls,
        catalog,
        encoder: str,
        *,
        split: str | None = None,
        generator: str | None = None,
        attribute_column: str | None = None,
        generation: dict | None = None,
        log_path=None,
        batch_size: int = 32,
        show_progress: bool | None = None,
        **index_options,
    ) -> ProductIndex:
        """Annotate, embed and index ``catalog`` (a path or a Dataset from ``load_catalog``; ``split`` selects
        rows) in this process; ``index_options`` go to ``from_vectors``."""
        ds = catalog if not isinstance(catalog, str | Path) else load_catalog(catalog, split=split)
        check_listings(ds, split, attribute_column)
        index = cls.configure(
            encoder,
            generator=generator,
            attribute_column=attribute_column,
            generation=generation,
            catalog=None if not isinstance(catalog, str | Path) else str(catalog),
            split=split,
        )
        attributes = index.annotate(ds, log_path=log_path, batch_size=batch_size, show_progress=show_progress)
        vectors = index.embed(ds, attributes, batch_size=batch_size, show_progress=show_progress)
        return index.from_vectors(ds, vectors, attributes, **index_options)

    def from_vectors(
        self,
        listings,
        vectors: np.ndarray,
        attributes: Sequence[str | None],
        *,
        index_type: str = "auto",
        target_recall: float = 0.98,
        recall_k: int = 10,
        memory_budget: int | None = None,
    ) -> ProductIndex:
        """The faiss index over ``vectors`` (row i = ``listings[i]`` annotated with ``attributes[i]``; may be
        memory-mapped), chosen by size (``afmrl.retrieval.index``) and tuned to ``target_recall`` of the exact top-k."""
        gallery = ProductGallery.from_embeddings(
            vectors,
            list(listings["listing_id"]),
            list(listings["product_id"]),
            index_type=index_type,
            recall_k=recall_k,
            target_recall=target_recall,
            memory_budget=memory_budget,
            encoder_fingerprint=encoder_fingerprints(self.config["encoder"]),
            catalog_fingerprint=catalog_fingerprint(listings),
            info={"catalog_source": self.config["catalog"], "catalog_split": self.config["split"]},
        )
        meta = {key: list(listings[key]) if key in listings.column_names else None for key in META_COLUMNS}
        return type(self)(gallery, attributes, self.config, meta)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.config.get("backend", {}).get("kind") == "milvus":  # the vectors, ids and texts live in Milvus
            (directory / INDEX_FILE).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
            return directory
        self.gallery.save(directory)
        with (directory / ATTRIBUTES_FILE).open("w", encoding="utf-8") as f:
            for i, (lid, text) in enumerate(zip(self.gallery.listing_ids, self.attributes, strict=True)):
                row = {"listing_id": lid, "attributes": text, **{key: self.meta[key][i] for key in META_COLUMNS}}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        (directory / INDEX_FILE).write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> ProductIndex:
        """Read a saved index; its encoder directory must still hold the weights it was built with."""
        directory = Path(directory)
        if not (directory / INDEX_FILE).is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} is not a product index: {INDEX_FILE} is missing "
                "(build one with recipes/index_catalog.py)"
            )
        config = json.loads((directory / INDEX_FILE).read_text(encoding="utf-8"))
        backend = config.get("backend", {})
        if backend.get("kind") == "milvus":
            gallery = MilvusGallery.open(backend["uri"], backend["collection"])
            columns = gallery._all()
            rows = [{f: columns[f][i] for f in FIELDS} for i in range(len(columns["row"]))]
        else:
            gallery = ProductGallery.load(directory)
            path = directory / ATTRIBUTES_FILE
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        if gallery.size == 0:
            raise ValueError(f"the product index {str(directory)!r} is empty")
        gallery.check_encoder(config["encoder"])  # retrained since the index was built -> ValueError (stale)
        meta = {key: [r.get(key) or None for r in rows] for key in META_COLUMNS}
        return cls(gallery, [r["attributes"] or None for r in rows], config, meta)

    # ------------------------------------------------------------------ a vector database's index, updated in place
    def stamps(self) -> dict[str, str]:
        """Short fingerprints of the encoder and generator this index embeds and annotates with now."""
        generator = self.config.get("generator")
        if generator and Path(generator).is_dir():
            made_by = directory_fingerprint(generator, GENERATOR_FILES)[:16]
        else:  # a hub id, a stored attribute column, or nothing
            made_by = str(generator or self.config.get("attribute_column") or "none")
        return {"encoder_fp": encoder_fingerprints(self.config["encoder"])["files"][:16], "generator_fp": made_by}

    def to_milvus(
        self,
        listings,
        vectors: np.ndarray,
        attributes: Sequence[str | None],
        *,
        uri: str,
        collection: str = "catalog",
        index_type: str = "FLAT",
    ) -> ProductIndex:
        """The index over ``vectors`` in a Milvus collection (``deploy.milvus_store``) instead of faiss."""
        info = {"encoder_fingerprint": encoder_fingerprints(self.config["encoder"]),
                "catalog_fingerprint": catalog_fingerprint(listings)}  # fmt: skip
        gallery = MilvusGallery.create(uri, collection, int(vectors.shape[1]), index_type=index_type, info=info)
        self.config["backend"] = {"kind": "milvus", "uri": uri, "collection": collection, "index_type": index_type}
        self.gallery = gallery
        self.add(listings, vectors=vectors, attributes=attributes)
        return self

    def _require_milvus(self, what: str) -> None:
        if self.config.get("backend", {}).get("kind") != "milvus":
            raise ValueError(f"{what} needs a vector database (index_catalog.py --backend milvus); the faiss index "
                             "is rebuilt: run recipes/index_catalog.py again")  # fmt: skip

    def add(
        self,
        listings,
        *,
        vectors: np.ndarray | None = None,
        attributes: Sequence[str | None] | None = None,
        batch_size: int = 32,
    ) -> int:
        """Annotate, embed and insert ``listings`` (a catalog Dataset) into a Milvus index, replacing listings with
        the same ids: no rebuild. Returns how many were written."""
        self._require_milvus("adding listings")
        if attributes is None:
            attributes = self.annotate(listings, batch_size=batch_size)
        if vectors is None:
            vectors = self.embed(listings, attributes, batch_size=batch_size)
        stamps = self.stamps()
        column = {key: list(listings[key]) if key in listings.column_names else [None] * len(listings)
                  for key in META_COLUMNS}  # fmt: skip
        ids, products = list(listings["listing_id"]), list(listings["product_id"])
        rows = [{"listing_id": str(ids[i]), "product_id": str(products[i]), "vector": vectors[i],
                 "attributes": attributes[i], **{key: column[key][i] for key in META_COLUMNS}, **stamps}
                for i in range(len(ids))]  # fmt: skip
        self.gallery.add(rows)
        self._reload_meta()
        return len(rows)

    def delete(self, listing_ids: Sequence[str]) -> int:
        """Remove listings from a Milvus index (absent ids are ignored); returns how many were there."""
        self._require_milvus("deleting listings")
        removed = self.gallery.delete(listing_ids)
        self._reload_meta()
        return removed

    def stale(self) -> list[str]:
        """The listings a changed encoder or generator made stale: embedded or annotated by other ones than now."""
        self._require_milvus("finding stale listings")
        stamps = self.stamps()
        return self.gallery.stale(stamps["encoder_fp"], stamps["generator_fp"])

    def _reload_meta(self) -> None:
        everything = self.gallery._all()
        self.attributes = [a or None for a in everything["attributes"]]
        self.meta = {key: [v or None for v in everything[key]] for key in META_COLUMNS}

    # ------------------------------------------------------------------ queries
    @property
    def encoder(self) -> ProductEncoder:
        if self._encoder is None:  # whole, on this process's GPU under accelerate launch (else the CPU)
            self._encoder = load_frozen_encoder(self.config["encoder"])
        return self._encoder

    def annotate(self, listings, *, log_path=None, batch_size: int = 32, show_progress: bool | None = None):
        """Each listing's canonical attribute text as this index annotates listings (None = none): greedy
        completions of its generator (``rar.annotate``, with the prompt it was trained with; resumable through
        ``log_path``), or the catalog's stored ``attribute_column``, or nothing."""
        config, generation = self.config, self.config["generation"]
        keys = generation.get("attribute_keys")
        if config["generator"] is None:
            column = config["attribute_column"]
            if column is None:
                return [None] * len(listings)
            if column not in listings.column_names:
                raise ValueError(
                    f"the index carries the catalog's {column!r} attributes, but these listings "
                    f"have no such column (columns: {listings.column_names})"
                )
            return [format_attributes(a, keys) or None for a in listings[column]]
        texts = annotate(
            listings,
            config["generator"],
            prompt_template=generation.get("prompt_template"),
            attribute_keys=keys,
            max_new_tokens=generation.get("max_new_tokens", 64),
            batch_size=batch_size,
            log_path=log_path,
            show_progress=show_progress,
        )
        return canonical_attributes(texts, keys)

    def embed(
        self, listings, attributes: Sequence[str | None], *, batch_size: int = 32, show_progress: bool | None = None
    ) -> np.ndarray:
        return encode_catalog(self.encoder, listings, attributes, batch_size=batch_size, show_progress=show_progress)

    def search(
        self,
        listings,
        k: int = 10,
        *,
        batch_size: int = 32,
        same_product_only: bool = False,
        show_progress: bool | None = None,
    ) -> list[dict]:
        """For each listing (a catalog Dataset): ``{"listing_id", "attributes", "results": [{"listing_id",
        "product_id", "score"}, ...]}``, best first. A listing that is itself indexed is left out of its own results.
        ``same_product_only`` keeps the results at or above the calibrated threshold."""
        threshold = self.config.get("threshold")
        if same_product_only and (threshold is None or threshold.get("score") is None):
            raise ValueError(
                "--same_product_only needs a calibrated threshold: run recipes/index_catalog.py with "
                "--calibration_split"
                + ("" if threshold is None else f" (no score reached precision {threshold['target_precision']})")
            )
        attributes = self.annotate(listings, batch_size=batch_size, show_progress=show_progress)
        vectors = self.embed(listings, attributes, batch_size=batch_size, show_progress=show_progress)
        own = self.gallery.rows_of([str(x) for x in listings["listing_id"]])  # -1 where not indexed
        category_of = dict(zip(map(str, listings["listing_id"]), listings["category"], strict=True)) if (
            "category" in listings.column_names) else {}  # fmt: skip
        scores, rows = self.gallery.search(vectors, k, exclude=own)
        found = self.gallery.describe(rows.ravel().tolist())  # the ids of the results only, from the store
        ids = np.asarray(found["listing_id"], dtype=object).reshape(rows.shape)
        products = np.asarray(found["product_id"], dtype=object).reshape(rows.shape)
        answers = []
        for i, (lid, text) in enumerate(zip(listings["listing_id"], attributes, strict=True)):
            results = [
                {"listing_id": ids[i, j], "product_id": products[i, j], "score": round(float(scores[i, j]), 6)}
                for j in range(rows.shape[1])
                if rows[i, j] >= 0
            ]
            if same_product_only:  # the query's category's own threshold where calibration gave one
                limit = threshold_of(threshold, category_of.get(str(lid)))
                results = [r for r in results if r["score"] >= limit]
            answers.append({"listing_id": str(lid), "attributes": text, "results": results})
        return answers

    def search_indexed(self, listing_ids: Sequence[str], k: int = 10) -> list[dict]:
        """``search`` for listings already in the index, from their stored vectors and attributes (nothing is
        annotated or embedded again): what a service asks when it wants the matches of a known listing."""
        rows = self.gallery.rows_of([str(x) for x in listing_ids])
        if (rows < 0).any():
            missing = [str(x) for x, r in zip(listing_ids, rows, strict=True) if r < 0]
            raise ValueError(f"listing {missing[0]!r} is not indexed ({len(missing)} of {len(rows)} are not)")
        scores, found = self.gallery.search(self.gallery.vectors(rows), k, exclude=rows)
        described = self.gallery.describe(found.ravel().tolist())
        ids = np.asarray(described["listing_id"], dtype=object).reshape(found.shape)
        products = np.asarray(described["product_id"], dtype=object).reshape(found.shape)
        position = dict(zip(self.gallery.listing_ids, range(self.gallery.size), strict=True))
        return [
            {"listing_id": str(lid), "attributes": self.attributes[position[str(lid)]],
             "results": [{"listing_id": ids[i, j], "product_id": products[i, j], "score": round(float(scores[i, j]), 6)}
                         for j in range(found.shape[1]) if found[i, j] >= 0]}
            for i, lid in enumerate(listing_ids)
        ]  # fmt: skip

    def calibrate(
        self,
        listings,
        *,
        k: int = 10,
        target_precision: float = 0.95,
        batch_size: int = 32,
        show_progress: bool | None = None,
    ) -> dict:
        """Choose the match threshold on labelled ``listings`` (``deploy.calibration``) and keep it in ``config``
        (saved with the index); returns the calibration with its precision/recall curve."""
        answers = self.search(listings, k, batch_size=batch_size, show_progress=show_progress)
        query_ids, query_products = [str(x) for x in listings["listing_id"]], [str(x) for x in listings["product_id"]]
        product_of = {
            **dict(zip(self.gallery.listing_ids, self.gallery.product_ids, strict=True)),
            **dict(zip(query_ids, query_products, strict=True)),
        }
        positives = self.gallery.positives_of(query_products, query_ids)
        calibration = calibrate_threshold(answers, product_of, positives.tolist(), target_precision=target_precision)
        self.config["threshold"] = {
            key: calibration[key] for key in ("score", "precision", "recall", "target_precision", "pairs", "positives")
        }
        self.config["threshold"]["k"] = k
        if "category" in listings.column_names:
            calibration["per_category"] = calibrate_by_category(answers, product_of, positives.tolist(),
                                                                list(listings["category"]),
                                                                target_precision=target_precision)  # fmt: skip
            self.config["threshold"]["per_category"] = calibration["per_category"]
        return calibration

    def match(
        self, *, k: int = 10, guard: str = "mutual", split: str | None = None, threshold: float | None = None
    ) -> dict:
        """Groups of identical listings among the indexed ones (those of ``split`` when given): each listing's top-k
        neighbours above the calibrated threshold (its category's own where calibration gave one; ``threshold``
        overrides both), chained into connected components under ``guard`` (``deploy.matching``). Returns
        ``{"listing_ids", "labels", "edges": (rows, cols, scores) kept, "thresholds"}`` with rows into
        ``listing_ids``."""
        if threshold is None and threshold_of(self.config.get("threshold")) is None:
            raise ValueError("matching needs a calibrated threshold: run recipes/index_catalog.py with "
                             "--calibration_split, or give --threshold")  # fmt: skip
        keep = np.arange(self.gallery.size)
        if split is not None:
            keep = np.flatnonzero(np.asarray(self.meta["split"], dtype=object) == split)
            if not len(keep):
                raise ValueError(f"no indexed listing is in split {split!r}")
        rows, cols, scores = knn_graph(self.gallery, k)
        if split is not None:  # edges between listings of the split only
            inside = np.zeros(self.gallery.size, dtype=bool)
            inside[keep] = True
            mask = inside[rows] & inside[cols]
            position = np.full(self.gallery.size, -1)
            position[keep] = np.arange(len(keep))
            rows, cols, scores = position[rows[mask]], position[cols[mask]], scores[mask]
        categories = [self.meta["category"][i] for i in keep]
        limits = np.asarray([threshold if threshold is not None else threshold_of(self.config["threshold"], c)
                             for c in categories], dtype=np.float64)  # fmt: skip
        labels, kept = match_groups(rows, cols, scores, len(keep), thresholds=limits, guard=guard)
        return {"listing_ids": [self.gallery.listing_ids[i] for i in keep], "labels": labels,
                "product_ids": [self.gallery.product_ids[i] for i in keep], "thresholds": limits,
                "edges": (rows[kept], cols[kept], scores[kept]), "all_edges": (rows, cols, scores)}  # fmt: skip
