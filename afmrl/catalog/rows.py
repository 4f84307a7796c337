"""Row checks of the catalog data layer: every field of every row, and every image, before training.

``afmrl.catalog.load.load_catalog`` reads a source (catalog.jsonl, a saved or hub dataset) and hands each row to
``RowValidator``, which collects every problem it finds, each naming the line or row, the listing and the
field, rather than stopping at the first; image files are checked afterwards in a thread pool (existence,
staying inside the catalog directory, PIL ``verify()`` plus a reduced-size decode, the listing's box inside
its first image). ``raise_problems`` then raises one ``CatalogError`` that lists them all. The column rules
themselves are documented in ``afmrl.catalog.load``.

    v = RowValidator("catalog.jsonl", "line", root="data/shop", image_kinds={})
    row = v.row({"listing_id": "a", "product_id": "p", "title": "mug", "image": "a.jpg"}, 1, check_images=True)
"""

from __future__ import annotations

import io
import math
import os
from concurrent.futures import ThreadPoolExecutor

from PIL import Image as PILImage
from tqdm.auto import tqdm

REQUIRED = ("listing_id", "product_id", "title")
OPTIONAL_STR = ("category", "split")
MAX_LISTED = 20


class CatalogError(ValueError):
    """A catalog failed validation. ``.problems`` lists every problem found, one string each."""

    def __init__(self, source: str, problems: list[str]):
        self.source, self.problems = str(source), list(problems)
        if len(self.problems) == 1:
            msg = f"invalid catalog {self.source}: {self.problems[0]}"
        else:
            listed = [f"  - {p}" for p in self.problems[:MAX_LISTED]]
            if len(self.problems) > MAX_LISTED:
                listed.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
            msg = "\n".join([f"invalid catalog {self.source}: {len(self.problems)} problems", *listed])
        super().__init__(msg)


def type_name(value) -> str:
    return "null" if value is None else type(value).__name__


class RowValidator:
    """Checks rows (plain dicts) one by one, collecting problems and image checks to run later."""

    def __init__(self, label: str, unit: str, root: str | None, image_kinds: dict[str, str], attr_struct: bool = False):
        self.label, self.unit, self.root, self.attr_struct = label, unit, root, attr_struct
        self.image_kinds = image_kinds  # column -> "path" (str) or "feature" ({"bytes", "path"} dict)
        self.problems: list[str] = []
        self.seen: dict[str, str] = {}  # listing_id -> "line 3", for duplicate messages
        self.image_field: str | None = None  # the column this catalog uses, fixed by its first row
        self.jobs: list[tuple[str, str, object]] = []  # (where, field, path str or image dict)

    def row(self, rec: dict, n: int, check_images: bool) -> dict:
        """Validate one row; return it with ``attributes`` normalised and image paths absolute."""
        lid = rec.get("listing_id")
        named = f" (listing_id {lid!r})" if isinstance(lid, str) and lid else ""
        where = f"{self.label} {self.unit} {n}{named}"
        bad = self.problems.append
        for field in REQUIRED:
            value = rec.get(field)
            if value is None:
                bad(f"{where}: field '{field}' is missing")
            elif not isinstance(value, str):
                bad(f"{where}: field '{field}' must be a string, found {type_name(value)} ({value!r:.40})")
            elif not value.strip():
                bad(f"{where}: field '{field}' is empty")
        if isinstance(lid, str) and lid.strip():
            if lid in self.seen:
                bad(f"{where}: field 'listing_id' duplicates {self.seen[lid]}")
            else:
                self.seen[lid] = f"{self.unit} {n}"
        for field in OPTIONAL_STR:
            value = rec.get(field)
            if value is not None and not isinstance(value, str):
                bad(f"{where}: field '{field}' must be a string or null, found {type_name(value)}")
        out = dict(rec)
        if rec.get("attributes") is not None:
            out["attributes"] = self._attributes(rec["attributes"], where)
        present = [f for f in ("image", "images") if rec.get(f) is not None]
        if len(present) != 1:
            state = "are both set" if present else "are both missing"
            bad(f"{where}: fields 'image' and 'images' {state}; give exactly one")
            return out
        field = present[0]
        self.image_field = self.image_field or field
        if field != self.image_field:
            bad(f"{where}: field '{field}' is used, but earlier rows use '{self.image_field}'")
            return out
        values = rec[field] if field == "images" else [rec[field]]
        if field == "images" and (not isinstance(values, list) or not values):
            bad(f"{where}: field 'images' must be a non-empty list, found {values!r:.40}")
            return out
        bbox = rec.get("bbox")
        if bbox is not None and not _is_box(bbox):
            bad(
                f"{where}: field 'bbox' must be [x0, y0, x1, y1] in pixels with 0 <= x0 < x1 and 0 <= y0 < y1, "
                f"found {bbox!r:.60}"
            )
            bbox = None
        kind, checked = self.image_kinds.get(field, "path"), []
        for k, ref in enumerate(values):
            name = f"images[{k}]" if field == "images" else "image"
            if kind == "path":
                if not isinstance(ref, str) or not ref.strip():
                    bad(f"{where}: field '{name}' must be a non-empty path string, found {ref!r:.40}")
                    continue
                checked.append(os.path.abspath(os.path.join(self.root or os.getcwd(), ref)))
                ref = (ref, checked[-1], None, self.root, bbox if k == 0 else None)
            elif not isinstance(ref, dict) or (ref.get("bytes") is None and not ref.get("path")):
                bad(f"{where}: field '{name}' holds no image (neither bytes nor path)")
                continue
            else:  # a datasets.Image() value: embedded bytes, or a path datasets resolves itself
                ref = (
                    ref.get("path") or "<embedded bytes>",
                    ref.get("path"),
                    ref.get("bytes"),
                    None,
                    bbox if k == 0 else None,
                )
            if check_images:
                self.jobs.append((where, name, ref))
        if kind == "path":  # absolute paths, so that decoding does not depend on the working directory
            out[field] = checked if field == "images" else checked[0] if checked else None
        return out

    def _attributes(self, attrs, where: str):
        if not isinstance(attrs, dict):
            self.problems.append(f"{where}: field 'attributes' must be an object or null, found {attrs!r:.40}")
            return attrs
        clean = {}
        for key, value in attrs.items():
            if value is None and self.attr_struct:
                continue  # an Arrow struct spells "this row lacks the key" as None
            if isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, (int, float)) and math.isfinite(value):
                value = str(value)
            if not isinstance(key, str) or not key.strip():
                self.problems.append(f"{where}: field 'attributes' has an empty key")
            elif not isinstance(value, str):
                self.problems.append(
                    f"{where}: field 'attributes' key {key!r} must have a string, number or boolean "
                    f"value, found {type_name(value)}"
                )
            clean[key] = value
        return clean


def _is_box(bbox) -> bool:
    numbers = (
        isinstance(bbox, list | tuple)
        and len(bbox) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
    )
    return numbers and 0 <= bbox[0] < bbox[2] and 0 <= bbox[1] < bbox[3]


def _check_image(ref: tuple, verify: bool) -> str | tuple[str, str] | None:
    """Problem with one image (written name, absolute path, bytes, root to stay inside, the listing's box
    when this is its first image), or None; a box outside the image is ``("bbox", problem)``."""
    written, path, data, root, bbox = ref
    if root is not None:  # a string path from a catalog directory
        real, real_root = os.path.realpath(path), os.path.realpath(root)
        if os.path.isabs(written):
            return f"path {written!r} is absolute, i.e. outside the catalog directory {root}"
        if os.path.commonpath([real, real_root]) != real_root:
            return f"path {written!r} resolves to {real}, outside the catalog directory {root}"
    if data is None and not os.path.isfile(path):
        return f"image file not found: {path}"
    if not verify:
        return None
    try:
        for check in ("verify", "load"):
            with PILImage.open(path if data is None else io.BytesIO(data)) as im:
                if check == "verify" and bbox is not None and (bbox[2] > im.width or bbox[3] > im.height):
                    return "bbox", f"box {list(bbox)} reaches outside the {im.width}x{im.height} image {written!r}"
                if check == "verify":
                    im.verify()  # structure and checksums; raises SyntaxError/OSError/... when corrupt
                else:  # verify() passes a truncated JPEG; a decode catches it, at 1/8 scale via draft
                    im.draft(im.mode, (1, 1))
                    im.load()
    except Exception as e:  # PIL raises many types (incl. DecompressionBombError); all mean "unusable"
        return f"cannot read image {written!r}: {type(e).__name__}: {e}"
    return None


def run_image_checks(v: RowValidator, pool: ThreadPoolExecutor, bar: tqdm, verify: bool) -> None:
    jobs, v.jobs = v.jobs, []
    results = pool.map(lambda job: _check_image(job[2], verify), jobs)
    for (where, field, _), problem in zip(jobs, results, strict=True):
        bar.update(1)
        if isinstance(problem, tuple):
            field, problem = problem
        if problem:
            v.problems.append(f"{where}: field '{field}': {problem}")


def raise_problems(
    v: RowValidator, source: str, rows_kept: int, split: tuple[str, ...] | None, splits_seen: set
) -> None:
    if split is None:
        if not rows_kept and not v.problems:
            v.problems.append("the catalog has no listings")
    elif not v.problems:
        seen = ", ".join(repr(s) for s in sorted(splits_seen)) or "none"
        for name in split:
            if name not in splits_seen:
                v.problems.append(f"no listings have field 'split' == {name!r} (splits present: {seen})")
    if v.problems:
        raise CatalogError(source, v.problems)
