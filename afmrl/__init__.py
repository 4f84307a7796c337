"""afmrl: the ground floor every AFMRL stage shares -- catalogs, the product encoder, retrieval, the embedded default.

The stages sit on top of it (``agcl`` trains the encoder, ``rar`` and ``rewards`` train the attribute generator,
``deploy`` indexes and matches a catalog); ``afmrl`` imports none of them. Names are imported lazily, so that
``from afmrl import load_catalog`` does not pay for torch and transformers::

    from afmrl import ProductEncoder, ProductGallery, load_catalog

    test = load_catalog("data/catalog", split="test")
    gallery = ProductGallery.build(test, ProductEncoder.from_pretrained("outputs/agcl-demo"))
    scores, rows = gallery.search(query_vectors, k=10)
"""

from afmrl._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        # catalog: load, check, write
        "CatalogError": "afmrl.catalog.rows",
        "load_catalog": "afmrl.catalog.load",
        "group_by_product": "afmrl.catalog.load",
        "write_catalog_dir": "afmrl.catalog.write",
        # attribute text
        "format_attributes": "afmrl.attributes",
        "parse_attributes": "afmrl.attributes",
        "canonical_attributes": "afmrl.attributes",
        "BM25Scorer": "afmrl.attributes",
        # models
        "load_mllm": "afmrl.modeling",
        "load_processor": "afmrl.modeling",
        # the product encoder
        "EncoderConfig": "afmrl.encoder.config",
        "ProductEncoder": "afmrl.encoder.model",
        "encode_catalog": "afmrl.encoder.model",
        # retrieval
        "VectorIndex": "afmrl.retrieval.index",
        "ProductGallery": "afmrl.retrieval.gallery",
        "tune_search": "afmrl.retrieval.tuning",
        "catalog_fingerprint": "afmrl.retrieval.fingerprints",
        "encoder_fingerprints": "afmrl.retrieval.fingerprints",
        "retrieval_metrics": "afmrl.retrieval.metrics",
        "metrics_from_search": "afmrl.retrieval.metrics",
        "evaluate_encoder": "afmrl.retrieval.evaluation",
        "instance_retrieval": "afmrl.retrieval.evaluation",
        # the embedded default
        "SyntheticCatalogConfig": "afmrl.embedded.synthetic_catalog",
        "make_synthetic_catalog": "afmrl.embedded.synthetic_catalog",
        "resolve_catalog": "afmrl.embedded",
        "resolve_model": "afmrl.embedded",
        "build_tiny_mllm": "afmrl.embedded.tiny_models",
        "tiny_mllm_path": "afmrl.embedded.tiny_models",
    },
)
