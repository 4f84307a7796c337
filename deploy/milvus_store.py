"""A Milvus collection as the index of a catalog: the same vectors, ids and fingerprints, beyond one machine.

``recipes/index_catalog.py --backend milvus --uri URI`` writes what the faiss backend keeps in files into a Milvus
collection, one entity per listing: its vector, listing and product id, category, split, attribute text and the
short fingerprints of the encoder and generator that made it. A local file URI (``outputs/index/milvus.db``) runs
Milvus Lite in-process (``pip install "afmrl[milvus]"``); an ``http://`` URL reaches a Milvus server or cluster with
the same code. ``MilvusGallery`` answers ``ProductIndex`` as ``afmrl.retrieval.ProductGallery`` does (search with a
listing's own entity excluded, rows, product counts, vectors), so search, calibration and matching run unchanged,
and it adds what a live catalog needs: ``add`` and ``delete`` listings without a rebuild, and ``stale`` listings
(embedded by another encoder or annotated by another generator than the index's current ones). Search results carry
their ids from Milvus; the full id lists (``listing_ids``, ``product_ids``) are read only when calibration or
matching asks for every listing.

    gallery = MilvusGallery.create("outputs/index/milvus.db", "catalog", dim=64, index_type="FLAT")
    gallery.add(rows)                      # dicts: listing_id, product_id, vector, category, split, attributes, ...
    scores, pks = gallery.search(queries, k=10, exclude=gallery.rows_of(query_ids))
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["INDEX_TYPES", "MilvusGallery", "MilvusUnavailable", "connect"]

INDEX_TYPES = {"FLAT": {}, "IVF_FLAT": {"nlist": 128}, "HNSW": {"M": 16, "efConstruction": 200}}
SEARCH_PARAMS = {"FLAT": {}, "IVF_FLAT": {"nprobe": 16}, "HNSW": {"ef": 128}}
FIELDS = ("listing_id", "product_id", "category", "split", "attributes", "encoder_fp", "generator_fp")
_TEXT = 2048
INFO_PROPERTY = "afmrl.info"  # a collection property: the encoder and catalog fingerprints, the index type


class MilvusUnavailable(ValueError):
    """Milvus cannot be reached: its package is missing, or the server at the URI does not answer."""


def connect(uri: str, timeout: float = 10.0):
    """A ``MilvusClient`` for ``uri``: a local ``.db`` file (Milvus Lite, in-process) or a server URL. A server that
    does not answer fails within ``timeout`` seconds with ``MilvusUnavailable`` naming the URI."""
    try:
        from pymilvus import MilvusClient
    except ImportError:
        raise MilvusUnavailable('the Milvus backend needs pymilvus (and milvus-lite for a local file): pip install -e '
                                '".[milvus]"') from None  # fmt: skip
    if "://" not in uri:
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    try:
        return MilvusClient(uri, timeout=timeout)
    except Exception as err:  # pymilvus raises MilvusException (and others) for an unreachable server
        raise MilvusUnavailable(f"--uri {uri!r}: Milvus did not answer ({type(err).__name__}: {err})") from None


class MilvusGallery:
    """One Milvus collection holding a catalog's vectors (inner product on L2-normalised vectors = cosine)."""

    def __init__(self, client, collection: str, uri: str):
        self.client, self.collection, self.uri = client, collection, uri
        described = client.describe_collection(collection)
        self.dim = next(f["params"]["dim"] for f in described["fields"] if f["name"] == "vector")
        self.info = json.loads((described.get("properties") or {}).get(INFO_PROPERTY) or "{}")
        self.index_type = self.info.get("index_type", "FLAT")
        self.encoder_fingerprint = self.info.get("encoder_fingerprint", {})
        self.catalog_fingerprint = self.info.get("catalog_fingerprint")
        self._ids = None
        client.load_collection(collection)

    # ------------------------------------------------------------------ create, open
    @classmethod
    def create(cls, uri: str, collection: str, dim: int, *, index_type: str = "FLAT", info: dict | None = None,
               overwrite: bool = True) -> MilvusGallery:  # fmt: skip
        """A new, empty collection (an existing one of that name is dropped with ``overwrite``)."""
        from pymilvus import DataType, MilvusClient

        if index_type not in INDEX_TYPES:
            raise ValueError(f"--milvus_index must be one of {', '.join(INDEX_TYPES)}, got {index_type!r}")
        client = connect(uri)
        if client.has_collection(collection):
            if not overwrite:
                raise ValueError(f"Milvus collection {collection!r} already exists at {uri!r}")
            client.drop_collection(collection)
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        for name in FIELDS:
            schema.add_field(name, DataType.VARCHAR, max_length=_TEXT)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        params = client.prepare_index_params()
        params.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=INDEX_TYPES[index_type])
        properties = {INFO_PROPERTY: json.dumps({**(info or {}), "index_type": index_type})}
        client.create_collection(collection, schema=schema, index_params=params, properties=properties)
        return cls(client, collection, uri)

    @classmethod
    def open(cls, uri: str, collection: str) -> MilvusGallery:
        client = connect(uri)
        if not client.has_collection(collection):
            raise FileNotFoundError(f"Milvus at {uri!r} has no collection {collection!r}")
        return cls(client, collection, uri)

    # ------------------------------------------------------------------ writes
    def add(self, rows: Sequence[dict], batch: int = 2048) -> list[int]:
        """Insert listings (dicts with ``listing_id``, ``product_id``, ``vector`` and optionally the other
        ``FIELDS``); a listing id already present is replaced. Returns their row keys."""
        fresh = self.size == 0
        if not fresh:  # replace listings already there
            self.delete([r["listing_id"] for r in rows])
        start = 0 if fresh else self._next_row()
        entities = []
        for i, r in enumerate(rows):
            vector = np.asarray(r["vector"], dtype=np.float32)
            if vector.shape != (self.dim,):
                raise ValueError(f"listing {r['listing_id']!r}: a {vector.shape} vector for a {self.dim}-dim index")
            text = {name: "" if r.get(name) is None else str(r[name])[:_TEXT] for name in FIELDS}
            entities.append({"row": start + i, "vector": vector.tolist(), **text})
        for offset in range(0, len(entities), batch):
            self.client.insert(self.collection, entities[offset : offset + batch])
        self.client.flush(self.collection)
        self._ids = None
        return list(range(start, start + len(entities)))

    def delete(self, listing_ids: Sequence[str]) -> int:
        """Remove these listings (absent ones are ignored); returns how many were there."""
        rows = [int(r) for r in self.rows_of(listing_ids) if r >= 0]
        if rows:
            self.client.delete(self.collection, ids=rows)
            self.client.flush(self.collection)
            self._ids = None
        return len(rows)

    def _next_row(self) -> int:
        found = self.client.query(self.collection, filter="row >= 0", output_fields=["row"])
        return max((int(e["row"]) for e in found), default=-1) + 1

    # ------------------------------------------------------------------ reads
    @property
    def size(self) -> int:
        found = self.client.query(self.collection, filter="", output_fields=["count(*)"])  # deletions counted
        return int(found[0]["count(*)"])

    def __len__(self) -> int:
        return self.size

    def _query(self, expr: str, fields: Sequence[str]) -> list[dict]:
        return list(self.client.query(self.collection, filter=expr, output_fields=list(fields)))

    def rows_of(self, listing_ids: Sequence[str]) -> np.ndarray:
        """The row key of each listing id, -1 where the listing is not indexed."""
        wanted = [str(x) for x in listing_ids]
        found = {}
        for start in range(0, len(wanted), 1000):
            chunk = wanted[start : start + 1000]
            found.update((e["listing_id"], int(e["row"])) for e in self._query(
                f"listing_id in {json.dumps(chunk)}", ["row", "listing_id"]))  # fmt: skip
        return np.asarray([found.get(x, -1) for x in wanted], dtype=np.int64)

    def describe(self, rows: Sequence[int], fields: Sequence[str] = ("listing_id", "product_id")) -> dict[str, list]:
        """The ``fields`` of these row keys (-1 gives None)."""
        keys = sorted({int(r) for r in rows if r >= 0})
        found = {}
        for start in range(0, len(keys), 1000):
            chunk = keys[start : start + 1000]
            found.update((int(e["row"]), e) for e in self._query(f"row in {chunk}", ["row", *fields]))
        return {name: [found[int(r)][name] if int(r) in found else None for r in rows] for name in fields}

    def _all(self) -> dict[str, list]:
        if self._ids is None:
            entities = sorted(self._query("row >= 0", ["row", *FIELDS]), key=lambda e: int(e["row"]))
            self._ids = {"row": [int(e["row"]) for e in entities], **{f: [e[f] for e in entities] for f in FIELDS}}
        return self._ids

    @property
    def listing_ids(self) -> list[str]:
        return self._all()["listing_id"]

    @property
    def product_ids(self) -> list[str]:
        return self._all()["product_id"]

    @property
    def row_keys(self) -> np.ndarray:
        """Every entity's row key, ascending (they have gaps after deletions)."""
        return np.asarray(self._all()["row"], dtype=np.int64)

    def positives_of(self, product_ids: Sequence[str], exclude_listing_ids: Sequence[str]) -> np.ndarray:
        """How many indexed listings share each product id, the listing itself not counted."""
        counts = {}
        for product in set(map(str, product_ids)):
            counts[product] = [e["listing_id"] for e in self._query(f"product_id == {json.dumps(product)}",
                                                                    ["listing_id"])]  # fmt: skip
        return np.asarray([len(counts[str(p)]) - (str(lid) in counts[str(p)]) for p, lid in
                           zip(product_ids, exclude_listing_ids, strict=True)], dtype=np.int64)  # fmt: skip

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        rows = [int(r) for r in rows]
        found = {}
        for start in range(0, len(rows), 1000):
            chunk = rows[start : start + 1000]
            found.update((int(e["row"]), e["vector"]) for e in self._query(f"row in {chunk}", ["row", "vector"]))
        return np.asarray([found[r] for r in rows], dtype=np.float32).reshape(len(rows), self.dim)

    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[int] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` row keys by inner product, ``(scores, rows)`` each (num_queries, k); ``exclude[i]`` (a row key,
        -1 for none) is left out of query i's results. Missing results are row -1 with score -inf."""
        queries = np.asarray(queries, dtype=np.float32)
        extra = 0 if exclude is None else 1
        limit = max(1, min(int(k) + extra, 16384))
        params = {"metric_type": "IP", "params": SEARCH_PARAMS[self.index_type]}
        hits = self.client.search(self.collection, data=queries.tolist(), limit=limit, search_params=params)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        for i, found in enumerate(hits):
            own = -1 if exclude is None else int(exclude[i])
            kept = [(float(h["distance"]), int(h["row"])) for h in found if int(h["row"]) != own][:k]
            for j, (score, row) in enumerate(kept):
                scores[i, j], rows[i, j] = score, row
        return scores, rows

    def stale(self, encoder_fp: str, generator_fp: str) -> list[str]:
        """Listings embedded by another encoder or annotated by another generator than these (short fingerprints)."""
        expr = f"encoder_fp != {json.dumps(encoder_fp)} or generator_fp != {json.dumps(generator_fp)}"
        return [e["listing_id"] for e in self._query(expr, ["listing_id"])]

    def check_encoder(self, encoder, *, label: str | None = None) -> None:
        from afmrl.retrieval.checks import check_encoder

        check_encoder(self, encoder, label=label)
