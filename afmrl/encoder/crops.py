"""Product-region crops (MOON, arXiv 2508.11999): the encoder sees the whole photo and the product's region.

Marketplace photos put the product on busy scenes; MOON detects the core product region and feeds
its crop beside the full image. Here a listing's region is the catalog's optional ``bbox`` column,
``[x0, y0, x1, y1]`` in pixels of the listing's first image (checked by ``load_catalog``; written by
hand, by a detector, or by a grounding MLLM through ``recipes/extract_attributes.py --task bbox``).
An encoder built with ``crop_views=True`` (``EncoderConfig``; ``agcl_train.py --crop_views``)
receives, for every listing with a box, its image(s) followed by the crop: one more image in the
same multi-image input the encoder already takes. Listings without a box are seen as before.
Everything that shows catalog images to an encoder (training batches, evaluation, the reward's
gallery and queries) goes through ``listing_views`` / ``catalog_views`` here (whole catalogs are embedded with
``afmrl.encoder.model.encode_catalog``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)


def uses_crops(encoder) -> bool:
    """Whether ``encoder`` (a ``ProductEncoder`` or any object with a ``config``) wants crop views."""
    return bool(getattr(getattr(encoder, "config", None), "crop_views", False))


def listing_views(image, bbox: Sequence[float] | None, crop: bool = True):
    """The images the encoder sees for one listing: ``image`` (one image or a list) unchanged, or, with
    ``crop`` and a ``bbox``, a list of its images followed by the first one's crop to ``bbox``."""
    if not crop or bbox is None or image is None:
        return image
    images = list(image) if isinstance(image, list | tuple) else [image]
    if not images:
        return image
    x0, y0, x1, y1 = (float(v) for v in bbox)
    return [*images, images[0].crop((round(x0), round(y0), round(x1), round(y1)))]


def catalog_views(ds, encoder=None) -> list:
    """Every listing's images of a catalog Dataset (``image`` or ``images`` column) as ``encoder`` sees them: with
    crop views when it uses them (``uses_crops``) and the catalog has a ``bbox`` column."""
    crop = uses_crops(encoder)
    images = list(ds["image"]) if "image" in ds.column_names else list(ds["images"])
    if crop and "bbox" not in ds.column_names:
        logger.warning(
            "the encoder was trained with product-region crops, but this catalog has no 'bbox' column: "
            "its listings are encoded without crops"
        )
    if not crop or "bbox" not in ds.column_names:
        return images
    return [listing_views(im, box) for im, box in zip(images, ds["bbox"], strict=True)]
