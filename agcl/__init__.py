"""Stage 1 of AFMRL: the catalog, the product encoder and Attribute-Guided Contrastive Learning.

Names are imported lazily so that `from agcl import load_catalog` does not pay for importing
torch and transformers.
"""

import importlib

_EXPORTS = {
    "CatalogError": "agcl.catalog",
    "load_catalog": "agcl.catalog",
    "group_by_product": "agcl.catalog",
    "SyntheticCatalogConfig": "agcl.synthetic_catalog",
    "make_synthetic_catalog": "agcl.synthetic_catalog",
    "load_mllm": "agcl.modeling",
    "load_processor": "agcl.modeling",
    "build_tiny_mllm": "agcl.tiny_models",
    "tiny_mllm_path": "agcl.tiny_models",
    "format_attributes": "agcl.attributes",
    "parse_attributes": "agcl.attributes",
    "BM25Scorer": "agcl.attributes",
    "EncoderConfig": "agcl.encoder",
    "ProductEncoder": "agcl.encoder",
    "AGCLLoss": "agcl.agcl_loss",
    "AGCLConfig": "agcl.config",
    "AGCLTrainer": "agcl.trainer",
    "GalleryIndex": "agcl.retrieval",
    "retrieval_metrics": "agcl.metrics",
    "metrics_from_search": "agcl.metrics",
    "evaluate_encoder": "agcl.evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'agcl' has no attribute {name!r}")
