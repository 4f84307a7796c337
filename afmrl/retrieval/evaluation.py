"""The retrieval task suite of the paper (and MOON's zero-shot directions) on a catalog split.

Tasks (every listing of the split is a query once; positives share its ``product_id`` unless said):

- ``instance``: fine-grained identical-product retrieval, listing (image + title [+ attributes])
  → the other listings (image + title); the query itself is excluded. Recall@K, mAP@K, MRR.
- ``coarse``: the same embeddings, positives = same ``category``; mAP@1 (= precision@1).
- ``image_to_text`` / ``text_to_image``: image-only queries against title-only gallery and back;
  the listing's own counterpart counts as a positive (it is another modality, not itself).
- ``image_to_multimodal``: image-only query → image + title gallery, the query's listing excluded.
- ``classification``: accuracy of the nearest category name (embedded as text) per listing.

Queries whose product has no other listing in the split cannot be scored on instance tasks: they
are counted in ``n_skipped``, never silently dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import datasets
import numpy as np

from afmrl.attributes import format_attributes
from afmrl.encoder.crops import catalog_views
from afmrl.retrieval.index import VectorIndex
from afmrl.retrieval.metrics import metrics_from_search

TASKS = ("instance", "coarse", "image_to_text", "text_to_image", "image_to_multimodal", "classification")


def attribute_texts(
    ds: datasets.Dataset, source: str | None, key_order: Sequence[str] | None = None
) -> list[str] | None:
    """Attribute text per listing from ``source``: None/"none", "reference" (= `attributes`) or a column."""
    if source in (None, "none"):
        return None
    column = "attributes" if source == "reference" else source
    if column not in ds.column_names:
        raise ValueError(
            f"--query_attributes {source!r}: the catalog has no column {column!r} (columns: {ds.column_names})"
        )
    return [format_attributes(a, key_order) for a in ds[column]]


def _search_metrics(queries, gallery, query_labels, gallery_labels, ks, map_k, exclude=None, mrr_depth=None) -> dict:
    index = VectorIndex.build(gallery, index_type="auto")
    # MRR needs the rank of the first positive wherever it is: the whole gallery unless capped.
    wanted = index.size if mrr_depth is None else max(*ks, map_k, mrr_depth)
    depth = min(wanted, index.size - (exclude is not None))
    scores, indices = index.search(queries, depth, exclude=exclude)
    ks = tuple(k for k in ks if k <= depth)
    metrics = metrics_from_search(
        indices,
        scores,
        np.asarray(query_labels),
        np.asarray(gallery_labels),
        ks=ks,
        map_k=min(map_k, depth),
        exclude=exclude,
        skip_queries_without_positive=True,
    )
    return {k: (float(v) if isinstance(v, float | np.floating) else int(v)) for k, v in metrics.items()}


def _instance(
    encoder, images, titles, products, gallery, query_attributes, gallery_has_attributes, enc, ks, map_k, mrr_depth
) -> dict:
    """Instance retrieval against already encoded gallery vectors; the query is excluded from its own ranking.
    Plain queries reuse the gallery vectors unless those carry attributes."""
    if query_attributes is None and not gallery_has_attributes:
        queries = gallery
    else:
        queries = encoder.encode(
            images,
            titles,
            query_attributes,
            **enc,
            desc="queries" + (" (+attributes)" if query_attributes is not None else ""),
        )
    return _search_metrics(
        queries, gallery, products, products, ks, map_k, exclude=np.arange(len(products)), mrr_depth=mrr_depth
    )


def instance_retrieval(
    encoder,
    ds: datasets.Dataset,
    query_attribute_sets: Mapping[str, Sequence[str | None] | None],
    *,
    gallery_attributes: Sequence[str | None] | None = None,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    batch_size: int = 32,
    show_progress: bool | None = None,
    mrr_depth: int | None = None,
) -> dict[str, dict]:
    """The ``instance`` task for several sources of query attributes (name -> texts, or None for
    none) against ONE encoding of the gallery; returns ``{name: metrics}``."""
    if len(ds) < 2:
        raise ValueError(f"evaluation needs at least 2 listings, the split has {len(ds)}")
    for name, texts in [("gallery_attributes", gallery_attributes), *query_attribute_sets.items()]:
        if texts is not None and len(texts) != len(ds):
            raise ValueError(f"{name}: {len(texts)} attribute texts for {len(ds)} listings")
    images, titles = catalog_views(ds, encoder), list(ds["title"])
    products = np.asarray(ds["product_id"])
    enc = {"show_progress": show_progress, "batch_size": batch_size}
    gallery_texts = None if gallery_attributes is None else list(gallery_attributes)
    gallery = encoder.encode(
        images, titles, gallery_texts, **enc, desc="gallery (image+title" + ("+attributes)" if gallery_texts else ")")
    )
    return {
        name: _instance(
            encoder,
            images,
            titles,
            products,
            gallery,
            None if texts is None else list(texts),
            gallery_texts is not None,
            enc,
            ks,
            map_k,
            mrr_depth,
        )
        for name, texts in query_attribute_sets.items()
    }


def evaluate_encoder(
    encoder,
    ds: datasets.Dataset,
    *,
    query_attributes: list[str | None] | None = None,
    tasks: Sequence[str] = TASKS,
    ks: Sequence[int] = (1, 5, 10),
    map_k: int = 10,
    batch_size: int = 32,
    show_progress: bool | None = None,
    mrr_depth: int | None = None,
    gallery_attributes: list[str | None] | None = None,
) -> dict[str, dict]:
    """Run the task suite; returns ``{task: {metric: value}}`` with fractions in [0, 1].

    ``gallery_attributes`` (one text or None per listing) are appended to the image + title
    embeddings used as the gallery (and as the multimodal side of every task), as when a catalog's
    stored attributes are indexed with it; instance queries then get only ``query_attributes``.

    ``mrr`` is over the whole gallery by default; set ``mrr_depth`` on galleries too large to rank
    fully (a positive deeper than that then counts 0: MRR@mrr_depth).
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid: {list(TASKS)}")
    if len(ds) < 2:
        raise ValueError(f"evaluation needs at least 2 listings, the split has {len(ds)}")
    images, titles = catalog_views(ds, encoder), list(ds["title"])
    products = np.asarray(ds["product_id"])
    own = np.arange(len(ds))
    enc = {"show_progress": show_progress, "batch_size": batch_size}
    if gallery_attributes is not None and len(gallery_attributes) != len(ds):
        raise ValueError(f"{len(gallery_attributes)} gallery attribute texts for {len(ds)} listings")
    multimodal = encoder.encode(
        images,
        titles,
        gallery_attributes,
        **enc,
        desc="gallery (image+title" + ("+attributes)" if gallery_attributes else ")"),
    )
    results: dict[str, dict] = {}

    if "instance" in tasks:
        results["instance"] = _instance(
            encoder,
            images,
            titles,
            products,
            multimodal,
            query_attributes,
            gallery_attributes is not None,
            enc,
            ks,
            map_k,
            mrr_depth,
        )
    has_category = "category" in ds.column_names and all(c is not None for c in ds["category"])
    if "coarse" in tasks and has_category:
        categories = np.asarray(ds["category"])
        coarse = _search_metrics(multimodal, multimodal, categories, categories, (1,), 1, exclude=own)
        results["coarse"] = {"mAP@1": coarse["mAP@1"], "n_queries": coarse["n_queries"]}
    needs_single = {"image_to_text", "text_to_image", "image_to_multimodal"} & set(tasks)
    if needs_single:
        image_only = encoder.encode(images, [None] * len(ds), **enc, desc="image only")
        text_only = encoder.encode([None] * len(ds), titles, **enc, desc="title only")
        if "image_to_text" in tasks:
            results["image_to_text"] = _search_metrics(
                image_only, text_only, products, products, ks, map_k, mrr_depth=mrr_depth
            )
        if "text_to_image" in tasks:
            results["text_to_image"] = _search_metrics(
                text_only, image_only, products, products, ks, map_k, mrr_depth=mrr_depth
            )
        if "image_to_multimodal" in tasks:
            results["image_to_multimodal"] = _search_metrics(
                image_only, multimodal, products, products, ks, map_k, exclude=own, mrr_depth=mrr_depth
            )
    if "classification" in tasks and has_category:
        names = sorted(set(ds["category"]))
        label_emb = encoder.encode([None] * len(names), names, **enc, desc="category names")
        predicted = np.asarray(names)[np.argmax(multimodal @ label_emb.T, axis=1)]
        results["classification"] = {"accuracy": float(np.mean(predicted == np.asarray(ds["category"])))}
    return results


def format_results(results: dict[str, dict]) -> str:
    """A readable table: one line per task, metrics in percent."""
    lines = []
    for task, metrics in results.items():
        cells = [
            f"{name} {100 * value:5.1f}"
            for name, value in metrics.items()
            if isinstance(value, float) and not name.startswith("n_")
        ]
        counts = [f"{name}={value}" for name, value in metrics.items() if name.startswith("n_") and value]
        lines.append(f"{task:<20} " + "  ".join(cells) + (f"   ({', '.join(counts)})" if counts else ""))
    return "\n".join(lines)
