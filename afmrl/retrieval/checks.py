"""Is this the encoder and the catalog a gallery was built from? Checked before RL, in seconds.

A stale gallery is the quiet way to ruin a run: the encoder was retrained, or the catalog was
re-annotated or re-split, and the reward silently ranks against vectors of another model or
another catalog. ``check_encoder`` compares the embedding size and the encoder fingerprints both
sides have (``afmrl.retrieval.fingerprints``); ``check_catalog`` compares the catalog fingerprint and names
the first row that differs. Both raise ``ValueError`` with what to do.

    check_encoder(gallery, "runs/agcl")        # also gallery.check_encoder(...)
    check_catalog(gallery, "data/catalog", split="train")
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

from afmrl.catalog.load import load_catalog
from afmrl.retrieval.fingerprints import (
    ENCODER_FINGERPRINT_KINDS,
    _fingerprint_of,
    _short,
    catalog_fingerprint,
    catalog_source,
)

__all__ = ["check_catalog", "check_encoder"]


def check_encoder(gallery, encoder, *, label: str | None = None) -> None:
    """Raise ValueError when ``encoder`` (an object or a directory) is not the one that built the gallery.

    Checks the embedding dimension (objects with ``embedding_dim``), then the fingerprints of
    the kinds both sides have. A directory checked against a gallery that has no ``"files"``
    fingerprint is loaded to compute its ``"weights"`` one. Without any common kind the
    check cannot be made: a warning says so.
    """
    where = label or (
        f"the encoder at {os.fspath(encoder)}"
        if isinstance(encoder, str | os.PathLike)
        else f"the given {type(encoder).__name__}"
    )
    dim = getattr(encoder, "embedding_dim", None)
    if dim is not None and int(dim) != gallery.dim:
        raise ValueError(
            f"dimension mismatch: the gallery holds {gallery.dim}-dim vectors but {where} embeds into {int(dim)} "
            "dimensions; rebuild the gallery with this encoder"
        )
    stored = gallery.encoder_fingerprint
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
        from afmrl.encoder.model import ProductEncoder

        return check_encoder(gallery, ProductEncoder.from_pretrained(encoder), label=where)
    warnings.warn(
        f"cannot check {where} against the gallery: no fingerprint kind in common with the gallery's {sorted(stored)}",
        stacklevel=2,
    )


def check_catalog(gallery, catalog, *, split: str | Sequence[str] | None = None) -> None:
    """Raise ValueError when ``catalog`` (Dataset or path) is not the catalog the gallery was built from."""
    ds, source = load_catalog(catalog, split=split, verify_images=False), catalog_source(catalog)
    where = f"the catalog at {source}" if source else "the given catalog"
    if gallery.catalog_fingerprint is None:
        warnings.warn("this gallery records no catalog fingerprint: the catalog cannot be checked", stacklevel=2)
        return
    given = catalog_fingerprint(ds)
    if given == gallery.catalog_fingerprint:
        return
    detail = ""
    if len(ds) != gallery.size:
        detail = f" ({len(ds)} rows there, {gallery.size} in the gallery)"
    else:
        ids = ds["listing_id"]
        products = ds["product_id"]
        for i, (lid, pid) in enumerate(zip(ids, products, strict=True)):
            if lid != gallery.listing_ids[i] or pid != gallery.product_ids[i]:
                detail = (
                    f" (first difference at row {i}: listing {lid!r} / product {pid!r} there, "
                    f"{gallery.listing_ids[i]!r} / {gallery.product_ids[i]!r} in the gallery)"
                )
                break
        else:
            detail = " (same listing and product ids: a title or image differs)"
    raise ValueError(
        "catalog mismatch: the gallery was built from a catalog with fingerprint "
        f"{_short(gallery.catalog_fingerprint)} "
        f"but {where} has {_short(given)}{detail}; rebuild the gallery from this catalog"
    )
