"""Stage 1 of AFMRL: Attribute-Guided Contrastive Learning of a product encoder.

``loss`` (``AGCLLoss``: InfoNCE with BM25 attribute weighting of hard negatives and false-negative filters),
``config`` (``AGCLConfig``, the recipe's flags), ``data`` (listing pairs, batches that keep near-duplicates
together), ``trainer`` (``AGCLTrainer``, a transformers ``Trainer``), ``grad_cache`` (large batches in chunks).
The encoder it trains, the catalog it reads and the evaluation it reports are in ``afmrl``::

    python recipes/agcl_train.py --config recipes/configs/agcl_demo.yaml

Names are imported lazily.
"""

from afmrl._lazy import lazy_exports

__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "AGCLLoss": "agcl.loss",
        "AGCLConfig": "agcl.config",
        "AGCLTrainer": "agcl.trainer",
    },
)
