"""What the retrieval-rank reward reads on every call, loaded once per process and checked.

``RetrievalRankReward`` is a picklable callable: TRL may copy it into every process before anything
is loaded. On its first call it builds a ``RankLookup``: the frozen stage-1 encoder (whole, even under
DeepSpeed ZeRO-3), the gallery (loaded, or built from the catalog), and the lookup catalog's rows
(titles, images, crops) indexed by ``listing_id``, each query listing's gallery row and product code,
and how many of its identical products the gallery holds. Everything that can disagree between the
catalog, the gallery and the encoder is checked here, once, with an error that names it.

    lookup = RankLookup.load("runs/agcl", catalog="data/catalog", gallery="runs/gallery")
    rows = lookup.catalog_rows(["L000123", "L000456"])
    images = lookup.fetch_images(rows.tolist())
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from afmrl.catalog import load_catalog
from afmrl.encoder.crops import listing_views, uses_crops
from afmrl.encoder.model import load_frozen_encoder
from afmrl.retrieval.fingerprints import catalog_fingerprint
from afmrl.retrieval.gallery import ProductGallery

logger = logging.getLogger(__name__)


def _lookup_catalog(catalog, gallery: ProductGallery | None, split: str | Sequence[str] | None):
    """The catalog the queries are looked up in: ``catalog``, else the one the gallery was built from."""
    if catalog is not None:
        return load_catalog(catalog, split=split, verify_images=False)
    source = gallery.info.get("catalog_source")
    if not source or not Path(source).exists():
        raise ValueError(
            "RetrievalRankReward needs catalog= to look up the query listings' images and titles: the gallery "
            + (
                f"was built from {source!r}, which no longer exists"
                if source
                else "records no catalog path (it was built from an in-memory dataset)"
            )
        )
    return load_catalog(source, split=gallery.info.get("catalog_split"), verify_images=False)


@dataclass
class RankLookup:
    """The loaded encoder and gallery, and per lookup-catalog row what ranking a query of it needs."""

    encoder: object
    image_cache: object | None  # the encoder's ImageCache across calls, or None
    listing_ids: list[str]
    gallery: ProductGallery
    row_of: dict[str, int]  # listing_id -> lookup-catalog row
    titles: list
    images: object | None  # the catalog's image column (a Dataset), read on demand
    image_column: str | None
    bboxes: list | None  # product-region boxes, when the encoder was trained with crops
    gallery_row: np.ndarray  # each catalog row's gallery row (-1: not in the gallery)
    code: np.ndarray  # each catalog row's product code in the gallery's numbering
    positives: np.ndarray  # each catalog row's identical listings in the gallery, itself excluded
    log_norm: float  # log of the gallery size (the "log" rank transform's scale)
    baseline_from_gallery: bool  # read attribute-free baselines from the gallery's vectors
    load_seconds: float

    @classmethod
    def load(
        cls,
        encoder,
        catalog=None,
        gallery=None,
        *,
        split: str | Sequence[str] | None = None,
        device: str | None = None,
        encoder_kwargs: dict | None = None,
        gallery_options: dict | None = None,
        image_cache_size: int = 256,
        baseline_from_gallery: bool = True,
        name: str = "retrieval_rank",
    ) -> RankLookup:
        start = time.perf_counter()
        encoder = load_frozen_encoder(encoder, device, **(encoder_kwargs or {}))
        if isinstance(gallery, str):
            gallery = ProductGallery.load(gallery)
        if isinstance(gallery, ProductGallery):
            gallery.check_encoder(encoder)
        ds = _lookup_catalog(catalog, gallery, split)
        built_here = gallery is None  # from these rows (or the splits of them that gallery_options names)
        if built_here:
            gallery = ProductGallery.build(ds, encoder, **(gallery_options or {}))
        for column in ("listing_id", "product_id", "title"):
            if column not in ds.column_names:
                raise ValueError(f"the lookup catalog has no column {column!r} (columns: {ds.column_names})")
        listing_ids = [str(x) for x in ds["listing_id"]]
        g_rows = gallery.rows_of(listing_ids)
        codes = gallery.codes_of(ds["product_id"])
        shared = g_rows >= 0
        disagree = shared & (gallery.product_codes[np.maximum(g_rows, 0)] != codes)
        if disagree.any():
            i = int(np.flatnonzero(disagree)[0])
            raise ValueError(
                f"listing {listing_ids[i]!r} has product_id {ds[i]['product_id']!r} in the lookup catalog but "
                f"{gallery.product_ids[g_rows[i]]!r} in the gallery ({int(disagree.sum())} listings disagree): the "
                "gallery was built from another version of the catalog; rebuild it"
            )
        if (
            not built_here
            and gallery.catalog_fingerprint is not None
            and catalog_fingerprint(ds) != gallery.catalog_fingerprint
        ):
            logger.warning(
                "%s: the lookup catalog (%d rows) is not the catalog the gallery (%d rows) was built from; the %d "
                "listings in both agree on product_id",
                name,
                len(ds),
                gallery.size,
                int(shared.sum()),
            )
        crops = uses_crops(encoder)
        if crops and "bbox" not in ds.column_names:
            logger.warning(
                "%s: the encoder was trained with product-region crops, but the lookup catalog has no "
                "'bbox' column: queries are encoded without crops",
                name,
            )
        image_column = "image" if "image" in ds.column_names else "images" if "images" in ds.column_names else None
        new_cache = getattr(encoder, "new_image_cache", None)
        return cls(
            encoder=encoder,
            image_cache=new_cache(image_cache_size) if callable(new_cache) and image_cache_size > 0 else None,
            listing_ids=listing_ids,
            gallery=gallery,
            row_of={lid: i for i, lid in enumerate(listing_ids)},
            titles=list(ds["title"]),
            images=ds.select_columns([image_column]) if image_column else None,
            image_column=image_column,
            bboxes=list(ds["bbox"]) if crops and "bbox" in ds.column_names else None,
            gallery_row=g_rows,
            code=codes,
            positives=gallery.positives_count(codes, g_rows),
            log_norm=math.log(max(gallery.size, 2)),
            # A gallery indexed with its listings' attributes holds no attribute-free vectors.
            baseline_from_gallery=baseline_from_gallery and not gallery.info.get("attribute_column"),
            load_seconds=time.perf_counter() - start,
        )

    def catalog_rows(self, listing_ids: Sequence) -> np.ndarray:
        """The lookup-catalog row of each listing id; a ValueError names one that is missing."""
        rows = [self.row_of.get(str(lid)) for lid in listing_ids]
        missing = [lid for lid, row in zip(listing_ids, rows, strict=True) if row is None]
        if missing:
            raise ValueError(
                f"{len(missing)} listing id(s) of the batch are not in the lookup catalog, e.g. {missing[0]!r}: the "
                "prompt dataset and the reward's catalog disagree (pass the catalog the prompts were built from)"
            )
        return np.asarray(rows, dtype=np.int64).reshape(len(rows))

    def fetch_images(self, rows: Sequence[int]) -> list:
        """Each distinct listing's image(s) read (and later decoded) once, shared by all its queries."""
        if self.images is None:
            return [None] * len(rows)
        distinct = list(dict.fromkeys(rows))
        fetched = dict(zip(distinct, self.images[distinct][self.image_column], strict=True))
        if self.bboxes is not None:  # the encoder sees each listing's product-region crop too
            cache = self.image_cache
            # Cropping decodes the photo: a listing whose image work is cached is not read again. Its entry is
            # marked most recently used first, so this call's new entries evict other listings, never it, as
            # long as the call's listings fit in the cache (otherwise every listing gets its crop).
            keep = cache is not None and len(distinct) <= cache.max_entries
            if keep:
                cache.touch(self.listing_ids[r] for r in distinct)
            fetched = {
                r: image if keep and self.listing_ids[r] in cache else listing_views(image, self.bboxes[r])
                for r, image in fetched.items()
            }
        return [fetched[r] for r in rows]
