"""Deployment: annotate, embed and index a catalog with the two trained stages, search it, decide matches.

``ProductIndex`` (``deploy.product_index``) is the Python API under ``recipes/index_catalog.py`` and
``recipes/search.py``; ``deploy.calibration`` picks the "same product" score threshold.
"""

from deploy.calibration import calibrate_threshold, plot_precision_recall
from deploy.product_index import ProductIndex

__all__ = ["ProductIndex", "calibrate_threshold", "plot_precision_recall"]
