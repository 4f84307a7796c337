"""The catalog data layer: load a product catalog, check every row, return a ``datasets.Dataset``.

Every stage (AGCL training, attribute extraction, RAR, evaluation) reads catalogs through
``load_catalog`` so that a bad row fails here, with its line and field named, and never as a
traceback from deep inside a trainer. This module reads the sources; the checks of each row and
image are in ``afmrl.catalog.rows``.

Sources
    * a directory with ``catalog.jsonl`` (one JSON object per line) and its images;
    * a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
    * a Hugging Face hub id (only when the string is not a path: ``./x``, ``/x``, ``~/x`` are paths);
    * an in-memory ``datasets.Dataset`` or ``DatasetDict``.

Columns
    ``listing_id``  str, required, non-empty, unique across the whole source.
    ``product_id``  str, required, non-empty; same product_id = same product. Strict: an int is an
                    error (ids like 00123 silently lose their zeros when they pass through numbers).
    ``title``       str, required, non-empty after stripping whitespace.
    ``image``       str path or ``datasets.Image()`` -- or ``images``: a non-empty list of them.
                    Exactly one of the two per row, and the same one in every row.
    ``category``    str or null, optional.  ``split``: str or null, optional.
    ``bbox``        [x0, y0, x1, y1] or null, optional: the product's region in pixels of the listing's
                    first image (0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height); see ``afmrl.encoder.crops``.
    ``attributes``  object key -> value, or null, optional. Values may be strings, numbers or
                    booleans; numbers become ``str(v)``, booleans ``"true"``/``"false"``. Nulls,
                    lists and nested objects are rejected (for a Dataset whose attributes column is
                    an Arrow struct, null values are how Arrow spells "key absent" and are dropped).
    Any other column is kept. In catalog.jsonl an extra column holding objects (or mixed types)
    is stored like ``attributes``.

Decisions
    * ``attributes`` is stored as ``datasets.Json()``: Arrow structs would add a ``None`` entry for
      every key some other row has; Json keeps ``ds[i]["attributes"]`` exactly the file's object.
    * Image paths are relative to the catalog directory; absolute paths and paths that resolve
      (after symlinks) outside it are rejected. Dataset or hub sources without a directory resolve
      relative paths against the working directory. The column is returned as ``datasets.Image()``
      (``List(Image())`` for ``images``) holding absolute paths, so images decode lazily on row
      access. A saved Dataset(Dict) with string paths resolves them against the directory given
      (``save_to_disk`` itself embeds the bytes of ``Image()`` columns, so those need no files).
    * ``verify_images`` runs PIL ``verify()`` and then a decode at reduced size (``draft``):
      ``verify()`` alone passes a truncated JPEG; the draft decode catches it cheaply.
    * Blank lines in catalog.jsonl are skipped (a trailing newline or a separator is not an
      error); line numbers in messages count every line, blank ones included, starting at 1.
    * Field checks and listing_id uniqueness cover every row of the source; image checks cover
      only the rows of the requested ``split``. Dataset rows are named by 0-based row index.
    * A DatasetDict with ``split=None`` is concatenated (a ``split`` column with each split's
      name is added when missing) and listing_ids must be unique across its splits.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from afmrl.catalog.rows import (
    OPTIONAL_STR,
    REQUIRED,
    CatalogError,
    RowValidator,
    raise_problems,
    run_image_checks,
    type_name,
)
from afmrl.hub import HubRepoNotFound, download_hint, hub_offline, hub_unreachable

__all__ = ["CatalogError", "load_catalog", "group_by_product"]

CATALOG_FILE = "catalog.jsonl"
KNOWN = (*REQUIRED, "image", "images", *OPTIONAL_STR, "attributes", "bbox")
BAR_MIN_IMAGES = 1000  # below this a progress bar is noise
_BATCH = 1000


def _parse_jsonl(path: Path) -> tuple[list[tuple[int, dict]], list[str]]:
    """Parse catalog.jsonl line by line (bytes, so a bad byte is reported with its line)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CatalogError(path, [f"cannot read {path}: {e}"]) from e
    records, problems = [], []
    for n, raw in enumerate(data.split(b"\n"), start=1):
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]  # a UTF-8 byte-order mark, as some editors write
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{path.name} line {n}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            problems.append(f"{path.name} line {n}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{path.name} line {n}: expected a JSON object, found {type_name(obj)}")
            continue
        records.append((n, obj))
    return records, problems


def _extra_feature(values: list):
    """Feature of an extra column: Arrow's inference, or Json for objects and mixed types."""
    import pyarrow as pa

    if any(isinstance(x, dict) for x in values):
        return datasets.Json()
    try:
        return datasets.Features.from_arrow_schema(pa.schema([("x", pa.array(values).type)]))["x"]
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return datasets.Json()


def _image_feature(field: str):
    return datasets.List(datasets.Image()) if field == "images" else datasets.Image()


def _from_jsonl(path: Path, split, verify: bool, workers) -> datasets.Dataset:
    records, problems = _parse_jsonl(path)
    v = RowValidator(path.name, "line", str(path.parent), {})
    v.problems.extend(problems)
    if split is not None and records and not any("split" in r for _, r in records):
        raise CatalogError(path, [f"split {_named(split)} requested, but no line has the field 'split'"])
    selected = [split is None or r.get("split") in split for _, r in records]
    rows = [v.row(r, n, check_images=s) for (n, r), s in zip(records, selected, strict=True)]
    rows = [row for row, s in zip(rows, selected, strict=True) if s]
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=len(v.jobs), desc="Checking images", disable=len(v.jobs) < BAR_MIN_IMAGES) as bar,
    ):
        run_image_checks(v, pool, bar, verify)
    raise_problems(
        v,
        str(path),
        len(rows),
        split,
        {r.get("split") for _, r in records if isinstance(r.get("split"), str)},
    )
    features = {c: datasets.Value("string") for c in REQUIRED}
    features[v.image_field] = _image_feature(v.image_field)
    columns = list(dict.fromkeys(k for _, r in records for k in r))  # first-seen order
    for c in columns:
        if c in OPTIONAL_STR:
            features[c] = datasets.Value("string")
        elif c == "attributes":
            features[c] = datasets.Json()
        elif c == "bbox":
            features[c] = datasets.List(datasets.Value("float64"))
        elif c not in KNOWN:
            features[c] = _extra_feature([row.get(c) for row in rows])
    order = [c for c in KNOWN if c in features] + [c for c in columns if c not in KNOWN]
    feats = datasets.Features({c: features[c] for c in order})
    return datasets.Dataset.from_list([{c: row.get(c) for c in order} for row in rows], features=feats)


def _column_kinds(ds: datasets.Dataset, label: str) -> tuple[dict[str, str], bool]:
    """Column-level type checks for a Dataset (one message per column, not one per row)."""
    feats, problems, kinds = ds.features, [], {}
    string = ("string", "large_string")
    for c in REQUIRED + OPTIONAL_STR:
        f = feats.get(c)
        if c in REQUIRED and f is None:
            problems.append(f"{label}: required field '{c}' is not a column (columns: {ds.column_names})")
        elif f is not None and getattr(f, "dtype", None) not in (*string, "null"):
            problems.append(f"{label}: field '{c}' must be a string column, found {f}")
    for c in ("image", "images"):
        f = feats.get(c)
        inner = getattr(f, "feature", None) if c == "images" else f
        if f is None:
            continue
        if c == "images" and not isinstance(f, (datasets.List, datasets.LargeList)):
            inner = None
        if isinstance(inner, datasets.Image):
            kinds[c] = "feature"
        elif getattr(inner, "dtype", None) in (*string, "null"):
            kinds[c] = "path"
        else:
            what = "string paths or Image()" if c == "image" else "a list of string paths or of Image()"
            problems.append(f"{label}: field '{c}' must hold {what}, found {f}")
    if "image" not in feats and "images" not in feats:
        problems.append(f"{label}: fields 'image' and 'images' are both missing; give exactly one")
    attrs = feats.get("attributes")
    if not (attrs is None or isinstance(attrs, (datasets.Json, dict)) or getattr(attrs, "dtype", 0) == "null"):
        problems.append(f"{label}: field 'attributes' must be a Json or struct column, found {attrs}")
    if problems:
        raise CatalogError(label, problems)
    return kinds, isinstance(attrs, dict)


def _from_dataset(ds: datasets.Dataset, label: str, root: str | None, split, verify, workers):
    kinds, attr_struct = _column_kinds(ds, label)
    if split is not None and "split" not in ds.column_names:
        raise CatalogError(label, [f"split {_named(split)} requested, but the dataset has no field 'split'"])
    v = RowValidator(label, "row", root, kinds, attr_struct)
    keep, new_attrs, new_images, splits_seen = [], [], [], set()
    json_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Json)]
    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(desc="Checking images", disable=len(ds) < BAR_MIN_IMAGES) as bar,
    ):
        i = 0
        for batch in ds.with_format("arrow").iter(batch_size=_BATCH):  # Arrow: images stay undecoded
            for rec in batch.to_pylist():
                for c in json_cols:
                    rec[c] = json.loads(rec[c]) if isinstance(rec[c], str) else rec[c]
                splits_seen.add(rec.get("split"))  # str or None: the column type was checked
                selected = split is None or rec.get("split") in split
                out = v.row(rec, i, check_images=selected)
                if selected:
                    keep.append(i)
                    new_attrs.append(out.get("attributes"))
                    new_images.append(out.get(v.image_field or "image"))
                i += 1
            run_image_checks(v, pool, bar, verify)  # per batch: embedded image bytes never pile up
    raise_problems(v, label, len(keep), split, splits_seen - {None})
    if len(keep) != len(ds):
        ds = ds.select(keep)
    order, field = ds.column_names, v.image_field
    other = "images" if field == "image" else "image"
    if other in order:  # a column no row uses (rows were checked to use exactly `field`)
        ds, order = ds.remove_columns(other), [c for c in order if c != other]
    replace = {}
    if kinds.get(field) == "path":
        replace[field] = (new_images, _image_feature(field))
    if "attributes" in order and not isinstance(ds.features["attributes"], datasets.Json):
        replace["attributes"] = (new_attrs, datasets.Json())
    if replace:
        if ds._indices is not None:  # add_column needs flat data; in memory, never beside the source
            ds = ds.flatten_indices(keep_in_memory=True)
        for c, (values, feat) in replace.items():
            encoded = datasets.Features({c: feat}).encode_batch({c: values})[c]
            ds = ds.remove_columns(c).add_column(c, encoded, feature=feat)
        ds = ds.select_columns(order)
    return ds


def _from_dict(dd: datasets.DatasetDict, label: str, root, split, verify, workers) -> datasets.Dataset:
    missing = [name for name in split or () if name not in dd]
    if missing:
        raise CatalogError(label, [f"no split {missing[0]!r}; available splits: {', '.join(map(repr, dd))}"])
    if split is not None and len(split) == 1:
        return _from_dataset(dd[split[0]], f"{label}[{split[0]}]", root, None, verify, workers)
    parts, seen, dupes = [], {}, []
    for name, part in dd.items():
        if split is not None and name not in split:
            continue
        if "split" not in part.column_names:
            part = part.add_column("split", [name] * len(part), feature=datasets.Value("string"))
        parts.append(_from_dataset(part, f"{label}[{name}]", root, None, verify, workers))
        for i, lid in enumerate(parts[-1].with_format("arrow")["listing_id"].to_pylist()):
            if lid in seen:  # the same listing in two splits: leakage between train and test
                dupes.append(f"{label}[{name}] row {i}: field 'listing_id' {lid!r} duplicates {seen[lid]}")
            seen.setdefault(lid, f"{label}[{name}] row {i}")
    if dupes:
        raise CatalogError(label, dupes)
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as e:
        raise CatalogError(label, [f"its splits have different columns or types: {e}"]) from e


def _named(split: tuple[str, ...]) -> str:
    return repr(split[0]) if len(split) == 1 else "s " + ", ".join(map(repr, split))


def load_catalog(
    source, split: str | Sequence[str] | None = None, *, verify_images: bool = True, num_proc: int | None = None
) -> datasets.Dataset:
    """Load and validate a catalog (see the module docstring for sources, columns and rules).

    Args:
        source: catalog directory, saved-dataset directory, hub id, or a Dataset / DatasetDict.
        split: keep only this split (the ``split`` column, or the DatasetDict split), or the rows of several (a
            list: split by split in the order named, each in the source's row order); None = all.
        verify_images: open and decode every image of the selected rows (existence and the
            catalog-directory check run regardless).
        num_proc: threads for image checks (default: ``ThreadPoolExecutor``'s); also passed to
            ``datasets.load_dataset`` for hub ids.

    Raises:
        CatalogError: listing every problem found, each naming the line/row and the field.
    """
    if split is not None:
        split = (split,) if isinstance(split, str) else tuple(dict.fromkeys(split))
    ds = _load(source, split, verify_images, num_proc)
    if split is not None and len(split) > 1 and "split" in ds.column_names:  # split by split, as named
        position = {name: i for i, name in enumerate(split)}
        ranks = [position[s] for s in ds.with_format("arrow")["split"].to_pylist()]
        if ranks != sorted(ranks):
            ds = ds.select(sorted(range(len(ds)), key=ranks.__getitem__))
    return ds


def _load(source, split: tuple[str, ...] | None, verify: bool, workers: int | None) -> datasets.Dataset:
    num_proc = workers
    if isinstance(source, datasets.Dataset):
        return _from_dataset(source, "in-memory dataset", None, split, verify, workers)
    if isinstance(source, datasets.DatasetDict):
        return _from_dict(source, "in-memory dataset", None, split, verify, workers)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        return _from_jsonl(path, split, verify, workers)
    if path.is_dir():
        if (path / CATALOG_FILE).is_file():
            return _from_jsonl(path / CATALOG_FILE, split, verify, workers)
        if not any((path / f).is_file() for f in ("dataset_dict.json", "state.json")):
            raise CatalogError(path, [f"the directory has neither {CATALOG_FILE} nor a saved dataset"])
        loaded = datasets.load_from_disk(str(path))
        root = str(path.resolve())
        if isinstance(loaded, datasets.DatasetDict):
            return _from_dict(loaded, str(path), root, split, verify, workers)
        return _from_dataset(loaded, str(path), root, split, verify, workers)
    looks_like_path = text.startswith((".", "/", "~", "\\")) or os.path.isabs(text) or text.endswith(".jsonl")
    if looks_like_path or path.exists():
        raise CatalogError(text, [f"no such catalog directory: {text}"])
    try:  # a hub id: ask the hub once first, so that no network means one clear line, not a minute of retries
        reason = hub_unreachable(text, "dataset")
    except HubRepoNotFound as e:
        raise CatalogError(text, [f"not a local catalog, and {e}"]) from None
    if split is not None and len(split) > 1:  # the hub's splits one by one, each checked
        return datasets.concatenate_datasets([_load(text, (name,), verify, workers) for name in split])
    split = None if split is None else split[0]
    try:
        if reason:
            with hub_offline():  # a cached copy still loads
                loaded = datasets.load_dataset(text, split=split, num_proc=num_proc)
        else:
            loaded = datasets.load_dataset(text, split=split, num_proc=num_proc)
    except Exception as e:  # unknown split, bad files, ...: say what datasets said
        if reason:
            raise CatalogError(
                text,
                [
                    f"not a local catalog, not in the local cache, and the hub {reason}: "
                    f"{download_hint(text, 'dataset')}"
                ],
            ) from None
        raise CatalogError(text, [f"could not load hub dataset {text!r} (split {split!r}): {e}"]) from e
    if isinstance(loaded, datasets.DatasetDict):
        return _from_dict(loaded, text, None, None, verify, workers)
    return _from_dataset(loaded, f"{text}[{split}]", None, None, verify, workers)


def group_by_product(dataset: datasets.Dataset) -> dict[str, list[int]]:
    """Map product_id -> row indices (in row order), from the column (no row decoding)."""
    ids: Iterable = dataset.with_format("arrow")["product_id"].to_pylist()
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(ids):
        groups.setdefault(pid, []).append(i)
    return groups


def use_title_column(
    ds: datasets.Dataset, column: str, *, flag: str = "--title_column"
) -> tuple[datasets.Dataset, int]:
    """``ds`` with ``column``'s text as its ``title`` (the original kept as ``title_original``); rows where
    ``column`` is null or blank keep their own title. Returns ``(dataset, rows that kept their own title)``."""
    if column == "title":
        return ds, 0
    if column not in ds.column_names:
        raise ValueError(f"{flag} {column!r}: the catalog has no such column (columns: {ds.column_names})")
    titles, replacements = ds["title"], ds[column]
    bad = [i for i, v in enumerate(replacements) if v is not None and not isinstance(v, str)]
    if bad:
        raise ValueError(
            f"{flag} {column!r}: row {bad[0]} (listing_id {ds[bad[0]]['listing_id']!r}) holds a "
            f"{type(replacements[bad[0]]).__name__}, not text ({len(bad)} such rows)"
        )
    merged = [new if new and new.strip() else old for new, old in zip(replacements, titles, strict=True)]
    kept = sum(not (new and new.strip()) for new in replacements)
    ds = ds.rename_column("title", "title_original").add_column("title", merged)
    return ds, kept
