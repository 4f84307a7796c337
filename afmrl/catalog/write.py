"""Write a catalog ``Dataset`` back out as a catalog directory (``catalog.jsonl`` + ``images/``).

Used when a stage produces a new version of a catalog (``recipes/extract_attributes.py`` writes
the generated attributes into a copy; CIT retrains AGCL on it). Whatever the source (a directory,
a saved dataset, a hub dataset with embedded image bytes), the copy is a plain catalog directory
that ``afmrl.catalog.load.load_catalog`` reads and that a person can inspect:

* every column is kept, in order; ``attributes``-like dict columns stay JSON objects;
* images become ``images/<row>-<k><ext>`` files next to ``catalog.jsonl``, hard-linked to the
  source file when possible (no extra disk), else copied; embedded bytes are written out;
* ``catalog.jsonl`` is written to a temporary name and renamed last, so a present file means a
  complete copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import datasets
from tqdm.auto import tqdm

__all__ = ["write_catalog_dir"]

IMAGE_COLUMNS = ("image", "images")


def _place(ref: dict, target: Path) -> str:
    """Put one image (a ``{"path", "bytes"}`` struct) at ``target`` (suffix added); return its name."""
    path, data = ref.get("path"), ref.get("bytes")
    suffix = Path(path).suffix if path else ".png"
    target = target.with_suffix(suffix or ".png")
    if target.exists():
        target.unlink()
    if data is not None:
        target.write_bytes(data)
    else:
        try:
            os.link(path, target)
        except OSError:  # another filesystem, or links not allowed
            shutil.copyfile(path, target)
    return target.name


def write_catalog_dir(
    catalog: datasets.Dataset,
    output_dir: str | Path,
    *,
    extra_columns: dict | None = None,
    show_progress: bool | None = None,
) -> Path:
    """Write ``catalog`` (from ``load_catalog``) to ``output_dir``; returns the directory.

    ``extra_columns`` ({name: one value per row}) are added to (or replace) the rows as written,
    values as they are (e.g. attribute dicts or None), without going through Arrow typing.
    """
    extra = dict(extra_columns or {})
    for name, values in extra.items():
        if len(values) != len(catalog):
            raise ValueError(f"extra column {name!r} has {len(values)} values for {len(catalog)} rows")
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    image_col = next((c for c in IMAGE_COLUMNS if c in catalog.column_names), None)
    if image_col == "image":
        catalog = catalog.cast_column("image", datasets.Image(decode=False))
    elif image_col == "images":
        catalog = catalog.cast_column("images", datasets.List(datasets.Image(decode=False)))
    tmp = out / "catalog.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for i, row in enumerate(tqdm(catalog, desc="writing catalog", disable=show_progress is False, unit="row")):
            if image_col == "image":
                row["image"] = "images/" + _place(row["image"], out / "images" / f"{i:07d}-0")
            elif image_col == "images":
                row["images"] = [
                    "images/" + _place(ref, out / "images" / f"{i:07d}-{k}") for k, ref in enumerate(row["images"])
                ]
            row.update({name: values[i] for name, values in extra.items()})
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out / "catalog.jsonl")
    return out
