"""Fingerprints that tell whether a saved gallery still matches its encoder and catalog.

- **encoder**: sha256 over ``encoder_config.json`` and the weight files of an encoder directory
  (``"files"``), over the config and state dict of an in-memory ``ProductEncoder``
  (``"weights"``), or an encoder's own ``fingerprint`` attribute (``"custom"``, for stand-ins).
- **catalog**: sha256 over (listing_id, product_id, title, image identity) per row, read from the
  Arrow columns without decoding an image; an image's identity is its path relative to the folder
  that holds all the catalog's images (a moved catalog keeps its fingerprint), or the sha256 of
  its bytes when the dataset embeds them.
- **training record** (``training_catalog.json``): the catalog fingerprint of the split a stage was
  trained on, written by the stage-1 and SFT recipes, so that ``recipes/rar_grpo.py`` refuses to reuse a
  stage output trained on another catalog.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

# Files of an encoder directory that decide what it computes (the weights and the input recipe).
_ENCODER_META_FILES = ("encoder_config.json", "adapter_config.json", "config.json")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_HASH_CHUNK = 1 << 22
ENCODER_FINGERPRINT_KINDS = ("files", "custom", "weights")  # checked in this order


# ---------------------------------------------------------------------------------------------
# Fingerprints
def _short(digest: str | None) -> str:
    return "none" if digest is None else f"{digest[:12]}…"


def encoder_files_fingerprint(directory: str | Path) -> str:
    """sha256 over an encoder directory's config files and weight files (names and contents)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"encoder directory {str(directory)!r} does not exist")
    if not (directory / "encoder_config.json").is_file():
        raise ValueError(f"{str(directory)!r} has no encoder_config.json: it is not a saved ProductEncoder")
    return directory_fingerprint(directory)


def directory_fingerprint(directory: str | Path, meta_files: Sequence[str] = _ENCODER_META_FILES) -> str:
    """sha256 over a saved model directory's ``meta_files`` and weight files (names and contents): an encoder's, or
    a generator's (``deploy`` stamps each indexed listing with both, to find the ones a new model made stale)."""
    directory = Path(directory)
    names = [n for n in meta_files if (directory / n).is_file()]
    names += sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES))
    h = hashlib.sha256()
    for name in names:
        h.update(f"\0{name}\0".encode())
        with open(directory / name, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def encoder_weights_fingerprint(encoder) -> str:
    """sha256 over an in-memory encoder's config (when it has one) and its state dict."""
    import torch

    h = hashlib.sha256()
    config = getattr(encoder, "config", None)
    if config is not None:
        try:
            from dataclasses import asdict

            h.update(json.dumps(asdict(config), sort_keys=True, default=str).encode())
        except TypeError:
            h.update(repr(config).encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        if not isinstance(tensor, torch.Tensor):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"\0{name}\0{t.dtype}\0{tuple(tensor.shape)}\0".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _fingerprint_of(encoder, kind: str) -> str | None:
    """One kind of fingerprint of ``encoder`` (a directory or an object), None when not computable."""
    if isinstance(encoder, str | os.PathLike):
        return encoder_files_fingerprint(encoder) if kind == "files" else None
    if kind == "files":
        source = getattr(encoder, "_afmrl_source_dir", None)
        return encoder_files_fingerprint(source) if source is not None and Path(source).is_dir() else None
    custom = getattr(encoder, "fingerprint", None)
    if kind == "custom":
        return None if custom is None else str(custom() if callable(custom) else custom)
    if kind == "weights" and custom is None and hasattr(encoder, "state_dict"):
        return encoder_weights_fingerprint(encoder)
    return None


def encoder_fingerprints(encoder, kinds: Sequence[str] = ENCODER_FINGERPRINT_KINDS) -> dict[str, str]:
    """The fingerprints computable for ``encoder`` (a directory or an object), restricted to ``kinds``.

    A path gives ``"files"``; an object with a ``fingerprint`` attribute (str or callable) gives
    ``"custom"``; any other object with ``state_dict`` gives ``"weights"``. An object loaded from a
    directory may carry it as ``_afmrl_source_dir`` (the reward sets it) to add ``"files"``.
    """
    out = {}
    for kind in kinds:
        value = _fingerprint_of(encoder, kind)
        if value is not None:
            out[kind] = value
    return out


def catalog_fingerprint(catalog) -> str:
    """sha256 over (listing_id, product_id, title, image identity) of every row, in row order.

    Reads the Arrow columns (no image is decoded). See the module docstring for image identity.
    """
    import datasets

    if not isinstance(catalog, datasets.Dataset):
        raise TypeError(
            f"catalog_fingerprint needs a datasets.Dataset (from load_catalog), got {type(catalog).__name__}"
        )
    table = catalog.with_format("arrow")
    image_col = "image" if "image" in catalog.column_names else "images" if "images" in catalog.column_names else None
    ids = table["listing_id"].to_pylist()
    products = table["product_id"].to_pylist()
    titles = table["title"].to_pylist()
    # structs {bytes, path} (Image feature), strings, or lists of either
    images = table[image_col].to_pylist() if image_col else [None] * len(ids)

    def parts(value) -> list:
        if value is None:
            return []
        if isinstance(value, list):
            return [x for v in value for x in parts(v)]
        return [value]

    paths = [p for v in images for p in parts(v) if isinstance(p, str)]
    paths += [
        p.get("path") for v in images for p in parts(v) if isinstance(p, dict) and p.get("path") and not p.get("bytes")
    ]
    root = ""
    if paths:
        try:
            root = os.path.commonpath([os.path.dirname(p) for p in paths])
        except ValueError:  # mixed absolute and relative paths
            root = ""

    prefix = root.rstrip(os.sep) + os.sep if root else ""

    def identity(entry) -> str:
        if isinstance(entry, dict):
            if entry.get("bytes"):
                return "sha256:" + hashlib.sha256(entry["bytes"]).hexdigest()
            entry = entry.get("path")
        if isinstance(entry, str):
            if root and entry.startswith(prefix):
                return entry[len(prefix) :]
            return os.path.relpath(entry, root) if root else entry
        return "" if entry is None else repr(entry)

    h = hashlib.sha256(f"{len(ids)} rows\n".encode())
    for lid, pid, title, image in zip(ids, products, titles, images, strict=True):
        ident = "|".join(identity(p) for p in parts(image))
        h.update(json.dumps([lid, pid, title, ident], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def catalog_source(catalog) -> str | None:
    """Where a catalog came from, to record beside what was built from it: the resolved path, or None for an
    in-memory Dataset."""
    import datasets

    return None if isinstance(catalog, datasets.Dataset | datasets.DatasetDict) else str(Path(catalog).resolve())


# ---------------------------------------------------------------------------------------------
# Which catalog a stage was trained on
TRAINING_RECORD = "training_catalog.json"


def write_training_record(directory: str | Path, dataset, *, catalog: str, split: str | None) -> Path:
    """Save beside a trained stage (encoder, SFT policy) which catalog split it was trained on, so that a later
    run can tell whether it may reuse it (``check_training_record``)."""
    path = Path(directory) / TRAINING_RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "catalog": str(catalog),
        "split": split,
        "rows": len(dataset),
        "fingerprint": catalog_fingerprint(dataset),
    }
    path.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return path


def check_training_record(directory: str | Path, catalog: str, *, flag: str) -> bool:
    """Raise ValueError when the stage saved in ``directory`` was trained on another catalog than ``catalog``
    (a path) -- compared by the fingerprint of the split it names. False when it has no record (made before
    records existed, or by other code): nothing to compare."""
    path = Path(directory) / TRAINING_RECORD
    if not path.is_file():
        return False
    record = json.loads(path.read_text(encoding="utf-8"))
    from afmrl.catalog.load import CatalogError, load_catalog

    try:
        current = catalog_fingerprint(load_catalog(catalog, split=record.get("split")))
    except CatalogError:  # e.g. the split does not exist in this catalog
        current = None
    if current != record.get("fingerprint"):
        raise ValueError(
            f"{flag} {str(directory)!r} exists and would be reused, but it was trained on split "
            f"{record.get('split')!r} "
            f"of another catalog ({record.get('catalog')}, fingerprint {_short(record.get('fingerprint'))}; this "
            f"run's {catalog}: {_short(current)}): choose another --output_dir, or delete it to train it again"
        )
    return True
