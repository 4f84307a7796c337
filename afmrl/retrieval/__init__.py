"""Retrieval over encoded catalogs: one vector index and one search tuner, the encoded gallery, metrics, evaluation.

``index`` (``VectorIndex``: faiss flat / IVF / HNSW / IVF-PQ chosen by size; ``ivfpq`` and ``vectors`` its
parts), ``tuning`` (``tune_search``: the cheapest nprobe / efSearch that still finds the exact top-k; every
approximate index is tuned by it), ``gallery`` (``ProductGallery``: vectors + listing and product ids +
fingerprints of the encoder and catalog that made them, ``checks``, ``fingerprints``), ``metrics`` (Recall@K,
mAP, MRR with exact tie handling) and ``evaluation`` (the paper's task suite)::

    from afmrl.retrieval import ProductGallery
    gallery = ProductGallery.build("data/catalog", "outputs/agcl-demo", split="test")
    scores, rows = gallery.search(query_vectors, k=10)

Names are imported lazily.
"""

from afmrl._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "VectorIndex": "afmrl.retrieval.index",
        "resolve_index_type": "afmrl.retrieval.index",
        "tune_search": "afmrl.retrieval.tuning",
        "exact_top_k": "afmrl.retrieval.tuning",
        "ProductGallery": "afmrl.retrieval.gallery",
        "catalog_fingerprint": "afmrl.retrieval.fingerprints",
        "encoder_fingerprints": "afmrl.retrieval.fingerprints",
        "check_training_record": "afmrl.retrieval.fingerprints",
        "write_training_record": "afmrl.retrieval.fingerprints",
        "retrieval_metrics": "afmrl.retrieval.metrics",
        "metrics_from_search": "afmrl.retrieval.metrics",
        "evaluate_encoder": "afmrl.retrieval.evaluation",
        "instance_retrieval": "afmrl.retrieval.evaluation",
    },
)
