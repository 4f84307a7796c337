"""The catalog contract every stage reads: ``load`` (sources, checks, a ``datasets.Dataset``), ``rows`` (the
checks of one row and its images, ``CatalogError``), ``write`` (a catalog directory from a Dataset)::

    from afmrl.catalog import load_catalog
    train = load_catalog("data/catalog", split="train")          # a path, a hub id or a Dataset
    both = load_catalog(train_and_val_dataset, split=["train", "val"])
"""

from afmrl.catalog.load import group_by_product, load_catalog, use_title_column
from afmrl.catalog.rows import CatalogError
from afmrl.catalog.write import write_catalog_dir

__all__ = ["CatalogError", "group_by_product", "load_catalog", "use_title_column", "write_catalog_dir"]
