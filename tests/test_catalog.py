"""Tests for afmrl.catalog.load: every bad case names its row and field; good catalogs load lazily."""

import io
import json
import os

import datasets
import pytest
from PIL import Image

from afmrl.catalog.load import CatalogError, group_by_product, load_catalog


def png(path, color=(200, 30, 30), fmt="PNG", size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path, fmt)
    return path


def rows(n=4):
    """n listings, two per product, alternating train/test, attributes with differing keys."""
    out = []
    for i in range(n):
        out.append(
            {
                "listing_id": f"L{i}",
                "product_id": f"P{i // 2}",
                "title": f"red mug {i}",
                "image": f"img/{i}.png",
                "category": "mug",
                "attributes": {"color": "red"} if i % 2 else {"size": "M", "material": "ceramic"},
                "split": "train" if i < n // 2 else "test",
            }
        )
    return out


def write_catalog(root, records=None, lines=None, raw=None):
    """Write catalog.jsonl (records as JSON, or literal lines, or raw bytes) and all referenced images."""
    root.mkdir(parents=True, exist_ok=True)
    records = rows() if records is None and lines is None and raw is None else records or []
    for r in records:
        for p in ([r["image"]] if isinstance(r.get("image"), str) else []) + [
            x for x in r.get("images") or [] if isinstance(x, str)
        ]:
            if not os.path.isabs(p) and ".." not in p and "missing" not in p:
                png(root / p)
    if raw is None:
        raw = "\n".join(lines if lines is not None else [json.dumps(r) for r in records]).encode() + b"\n"
    (root / "catalog.jsonl").write_bytes(raw)
    return root


def bad(root, match, **kwargs):
    with pytest.raises(CatalogError, match=match) as info:
        load_catalog(root, **kwargs)
    return info.value


# ------------------------------------------------------------------ good catalogs


def test_good_catalog_loads_with_lazy_images(tmp_path):
    ds = load_catalog(write_catalog(tmp_path / "c"))
    assert ds.column_names == [
        "listing_id",
        "product_id",
        "title",
        "image",
        "category",
        "split",
        "attributes",
    ]
    assert isinstance(ds.features["image"], datasets.Image)
    stored = ds.data.table.column("image").to_pylist()  # Arrow holds the path, not decoded bytes
    assert stored[0] == {"bytes": None, "path": str(tmp_path / "c" / "img" / "0.png")}
    im = ds[0]["image"]
    assert isinstance(im, Image.Image) and im.size == (8, 8)
    assert ds[1]["listing_id"] == "L1" and ds[1]["product_id"] == "P0"


def test_multi_image_listings_load_lazily_as_lists(tmp_path):
    recs = rows(2)
    for i, r in enumerate(recs):
        del r["image"]
        r["images"] = [f"img/{i}a.png", f"img/{i}b.png", f"img/{i}c.png"][: 2 + i]
    ds = load_catalog(write_catalog(tmp_path, recs))
    assert "image" not in ds.column_names
    assert ds.features["images"] == datasets.List(datasets.Image())
    assert [x["path"] for x in ds.data.table.column("images").to_pylist()[1]] == [
        str(tmp_path / "img" / f"1{c}.png") for c in "abc"
    ]
    assert all(x["bytes"] is None for x in ds.data.table.column("images").to_pylist()[0])
    ims = ds[1]["images"]
    assert len(ims) == 3 and all(isinstance(im, Image.Image) for im in ims)


def test_extra_columns_are_kept(tmp_path):
    recs = rows()
    for i, r in enumerate(recs):
        r["family_id"] = i * 10
        r["true_attributes"] = {"color": "red"} if i else {"color": "red", "logo": "star"}
    ds = load_catalog(write_catalog(tmp_path, recs))
    assert ds["family_id"][:] == [0, 10, 20, 30]
    assert ds[0]["true_attributes"] == {"color": "red", "logo": "star"}
    assert ds[1]["true_attributes"] == {"color": "red"}  # no None filled in for 'logo'


def test_attributes_round_trip_exactly(tmp_path):
    recs = rows()
    recs[2]["attributes"] = {"size": 42, "weight": 1.5, "waterproof": True}
    recs[3]["attributes"] = None
    ds = load_catalog(write_catalog(tmp_path, recs))
    assert ds[0]["attributes"] == {"size": "M", "material": "ceramic"}
    assert ds[1]["attributes"] == {"color": "red"}
    assert ds[2]["attributes"] == {"size": "42", "weight": "1.5", "waterproof": "true"}
    assert ds[3]["attributes"] is None


def test_split_selection_returns_only_that_split(tmp_path):
    root = write_catalog(tmp_path)
    ds = load_catalog(root, split="test")
    assert ds["listing_id"][:] == ["L2", "L3"] and set(ds["split"][:]) == {"test"}
    assert len(load_catalog(root)) == 4


def test_blank_lines_are_skipped_and_counted(tmp_path):
    recs = rows(2)
    write_catalog(tmp_path, recs)  # writes the images
    recs[1]["title"] = " "
    lines = ["", json.dumps(recs[0]), "   ", json.dumps(recs[1])]
    bad(
        write_catalog(tmp_path, lines=lines),
        r"catalog\.jsonl line 4 \(listing_id 'L1'\): field 'title' is empty",
    )
    recs[1]["title"] = "ok"
    assert len(load_catalog(write_catalog(tmp_path, lines=["", json.dumps(recs[0]), "", json.dumps(recs[1])]))) == 2


def test_save_to_disk_dataset_round_trip(tmp_path):
    ds = load_catalog(write_catalog(tmp_path / "c"))
    ds.save_to_disk(str(tmp_path / "saved"))
    back = load_catalog(tmp_path / "saved", split="train")
    assert back["listing_id"][:] == ["L0", "L1"]
    assert back[0]["attributes"] == {"size": "M", "material": "ceramic"}
    assert isinstance(back[1]["image"], Image.Image)


def test_saved_dataset_with_string_paths_resolves_relative_to_saved_dir(tmp_path):
    saved = tmp_path / "saved"
    recs = rows()
    datasets.Dataset.from_list(recs).save_to_disk(str(saved))  # attributes inferred as a struct
    for r in recs:
        png(saved / r["image"])
    ds = load_catalog(saved)
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.data.table.column("image").to_pylist()[2]["path"] == str(saved.resolve() / "img" / "2.png")
    assert ds[1]["attributes"] == {"color": "red"}  # the struct's None for absent keys is dropped
    assert ds.column_names == list(recs[0])


def test_save_to_disk_datasetdict_with_split_selection(tmp_path):
    ds = load_catalog(write_catalog(tmp_path / "c")).remove_columns("split")
    datasets.DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2, 3])}).save_to_disk(str(tmp_path / "dd"))
    test = load_catalog(tmp_path / "dd", split="test")
    assert test["listing_id"][:] == ["L2", "L3"] and isinstance(test[0]["image"], Image.Image)
    both = load_catalog(tmp_path / "dd")
    assert both["split"][:] == ["train", "train", "test", "test"]
    bad(tmp_path / "dd", r"no split 'val'; available splits: 'train', 'test'", split="val")


def test_in_memory_dataset_with_bad_row_raises(tmp_path):
    good = load_catalog(write_catalog(tmp_path))
    assert len(load_catalog(good, split="train")) == 2
    broken = good.map(lambda r: {"title": "  " if r["listing_id"] == "L2" else r["title"]})
    bad(broken, r"row 2 \(listing_id 'L2'\): field 'title' is empty")


def test_group_by_product_matches_brute_force(tmp_path):
    recs = rows(9)
    for i, r in enumerate(recs):
        r["product_id"] = f"P{(i * 7) % 4}"
    ds = load_catalog(write_catalog(tmp_path, recs))
    expected = {}
    for i in range(len(ds)):
        expected.setdefault(ds[i]["product_id"], []).append(i)
    got = group_by_product(ds)
    assert got == expected and list(got) == list(expected)
    assert group_by_product(ds.select([8, 1])) == {"P0": [0], "P3": [1]}


def test_all_problems_reported_together(tmp_path):
    recs = rows(30)
    write_catalog(tmp_path, recs)
    recs[0]["title"] = ""
    recs[1]["product_id"] = 7
    recs[2]["image"] = "img/missing.png"
    for r in recs[5:]:
        del r["listing_id"]
    err = bad(write_catalog(tmp_path, recs), r"catalog\.jsonl line 1 \(listing_id 'L0'\): field 'title' is empty")
    assert len(err.problems) == 28
    assert any("line 2 (listing_id 'L1'): field 'product_id'" in p for p in err.problems)
    assert any("line 3 (listing_id 'L2'): field 'image'" in p for p in err.problems)
    assert "... and 8 more" in str(err)


# ------------------------------------------------------------------ bad catalogs: one per case


def test_missing_required_field(tmp_path):
    recs = rows()
    del recs[1]["title"]
    bad(write_catalog(tmp_path, recs), r"line 2 \(listing_id 'L1'\): field 'title' is missing")


def test_duplicate_listing_id_names_both_lines(tmp_path):
    recs = rows()
    recs[3]["listing_id"] = "L1"
    bad(write_catalog(tmp_path, recs), r"line 4 \(listing_id 'L1'\): field 'listing_id' duplicates line 2")


def test_int_product_id_is_wrong_type(tmp_path):
    recs = rows()
    recs[0]["product_id"] = 123
    bad(
        write_catalog(tmp_path, recs),
        r"line 1 \(listing_id 'L0'\): field 'product_id' must be a string, found int",
    )


def test_title_as_list_is_wrong_type(tmp_path):
    recs = rows()
    recs[2]["title"] = ["red", "mug"]
    bad(
        write_catalog(tmp_path, recs),
        r"line 3 \(listing_id 'L2'\): field 'title' must be a string, found list",
    )


def test_whitespace_title_is_empty(tmp_path):
    recs = rows()
    recs[0]["title"] = "   "
    bad(write_catalog(tmp_path, recs), r"line 1 \(listing_id 'L0'\): field 'title' is empty")


def test_missing_image_file(tmp_path):
    root = write_catalog(tmp_path / "c")
    (root / "img" / "3.png").unlink()
    bad(root, r"line 4 \(listing_id 'L3'\): field 'image': image file not found")


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_image_path_outside_catalog_dir(tmp_path, where):
    outside = png(tmp_path / "outside.png")  # exists, so only the location is wrong
    recs = rows()
    recs[1]["image"] = "../outside.png" if where == "relative" else str(outside)
    bad(
        write_catalog(tmp_path / "c", recs),
        r"line 2 \(listing_id 'L1'\): field 'image': path .* outside the catalog directory",
    )


def test_symlink_pointing_outside_is_outside(tmp_path):
    outside = png(tmp_path / "secret.png")
    root = write_catalog(tmp_path / "c")
    (root / "img" / "0.png").unlink()
    (root / "img" / "0.png").symlink_to(outside)
    bad(
        root,
        r"line 1 \(listing_id 'L0'\): field 'image': path 'img/0.png' resolves to .* outside the catalog",
    )


def test_corrupt_image(tmp_path):
    root = write_catalog(tmp_path / "c")
    (root / "img" / "2.png").write_bytes(os.urandom(300))
    bad(root, r"line 3 \(listing_id 'L2'\): field 'image': cannot read image 'img/2.png'")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_image(tmp_path, fmt):
    root = write_catalog(tmp_path / "c")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, fmt)  # noise: a long compressed stream
    data = buf.getvalue()
    (root / "img" / "1.png").write_bytes(data[: len(data) // 2])  # PIL sniffs the format, not the name
    if fmt == "JPEG":  # the case verify() misses; the draft decode must catch it
        with Image.open(root / "img" / "1.png") as im:
            im.verify()
    bad(
        root,
        r"line 2 \(listing_id 'L1'\): field 'image': cannot read image 'img/1.png': OSError: (?i:.*truncated)",
    )
    assert len(load_catalog(root, verify_images=False)) == 4  # without verification it is not opened


def test_invalid_json_line(tmp_path):
    lines = [json.dumps(r) for r in rows()]
    lines[1] = lines[1][:-1]
    bad(write_catalog(tmp_path, lines=lines), r"catalog\.jsonl line 2: invalid JSON")


def test_non_object_json_line(tmp_path):
    lines = [json.dumps(r) for r in rows()]
    lines[2] = json.dumps(["L9", "P9"])
    bad(write_catalog(tmp_path, lines=lines), r"catalog\.jsonl line 3: expected a JSON object, found list")


def test_non_utf8_bytes(tmp_path):
    lines = [json.dumps(r).encode() for r in rows()]
    lines[1] = lines[1].replace(b"red mug 1", b"r\xe9d mug")  # Latin-1, not UTF-8
    bad(write_catalog(tmp_path, raw=b"\n".join(lines)), r"catalog\.jsonl line 2: not valid UTF-8 \(byte 0xe9")


@pytest.mark.parametrize("raw", [b"", b"\n  \n\n"])
def test_empty_catalog(tmp_path, raw):
    bad(write_catalog(tmp_path, raw=raw), r"the catalog has no listings")


def test_split_requested_without_split_field(tmp_path):
    recs = rows()
    for r in recs:
        del r["split"]
    bad(write_catalog(tmp_path, recs), r"no line has the field 'split'", split="train")


def test_split_that_selects_nothing(tmp_path):
    bad(
        write_catalog(tmp_path),
        r"no listings have field 'split' == 'val' \(splits present: 'test', 'train'\)",
        split="val",
    )


def test_both_image_and_images(tmp_path):
    recs = rows()
    recs[2]["images"] = ["img/0.png"]
    bad(write_catalog(tmp_path, recs), r"line 3 \(listing_id 'L2'\): fields 'image' and 'images' are both set")


def test_nested_attribute_value_rejected(tmp_path):
    recs = rows()
    recs[1]["attributes"] = {"color": {"body": "red"}}
    bad(
        write_catalog(tmp_path, recs),
        r"line 2 \(listing_id 'L1'\): field 'attributes' key 'color' must have a string.*found dict",
    )


def test_dataset_with_int_product_column_is_wrong_type(tmp_path):
    recs = rows()
    for i, r in enumerate(recs):
        r["product_id"] = i
    bad(
        datasets.Dataset.from_list(recs),
        r"field 'product_id' must be a string column, found Value\('int64'\)",
    )


def test_nonexistent_path_is_not_a_hub_id(tmp_path):
    bad("./no/such/catalog", r"no such catalog directory: \./no/such/catalog")
    bad(str(tmp_path / "nope"), r"no such catalog directory")


def test_datasetdict_listing_in_two_splits_is_a_duplicate(tmp_path):
    ds = load_catalog(write_catalog(tmp_path)).remove_columns("split")
    dd = datasets.DatasetDict({"train": ds.select([0, 1, 2]), "test": ds.select([2, 3])})
    bad(dd, r"\[test\] row 0: field 'listing_id' 'L2' duplicates in-memory dataset\[train\] row 2")
    assert len(load_catalog(dd, split="test")) == 2  # one split alone is fine


def test_hub_id_goes_through_load_dataset_and_validation(tmp_path, monkeypatch):
    good = load_catalog(write_catalog(tmp_path))
    calls = []

    def fake_load_dataset(name, split=None, num_proc=None):
        calls.append((name, split))
        return good.map(lambda r: {"product_id": "" if r["listing_id"] == "L1" else r["product_id"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    bad(
        "acme/catalog",
        r"acme/catalog\[train\] row 1 \(listing_id 'L1'\): field 'product_id' is empty",
        split="train",
    )
    assert calls == [("acme/catalog", "train")]


def test_corrupt_embedded_image_bytes_in_dataset():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    recs = [
        {
            "listing_id": "A",
            "product_id": "P",
            "title": "t",
            "image": {"bytes": buf.getvalue(), "path": None},
        },
        {
            "listing_id": "B",
            "product_id": "P",
            "title": "t",
            "image": {"bytes": b"not an image", "path": None},
        },
    ]
    features = datasets.Features(
        {
            "listing_id": datasets.Value("string"),
            "product_id": datasets.Value("string"),
            "title": datasets.Value("string"),
            "image": datasets.Image(),
        }
    )
    ds = datasets.Dataset.from_list(recs, features=features)
    bad(ds, r"row 1 \(listing_id 'B'\): field 'image': cannot read image '<embedded bytes>'")
    assert load_catalog(ds.select([0]))[0]["image"].size == (8, 8)


def test_mixed_image_and_images_rows_rejected(tmp_path):
    recs = rows()
    recs[3]["images"] = [recs[3].pop("image")]
    bad(
        write_catalog(tmp_path, recs),
        r"line 4 \(listing_id 'L3'\): field 'images' is used, but earlier rows use 'image'",
    )


def test_title_column_replaces_titles_keeps_blank_rows_and_names_bad_input():
    from afmrl.catalog.load import use_title_column

    ds = datasets.Dataset.from_dict(
        {
            "listing_id": ["a", "b", "c"],
            "title": ["mug", "cup", "jar"],
            "enriched_title": ["red mug with star", None, "  "],
        }
    )
    out, kept = use_title_column(ds, "enriched_title")
    assert out["title"] == ["red mug with star", "cup", "jar"] and out["title_original"] == ["mug", "cup", "jar"]
    assert kept == 2
    assert use_title_column(ds, "title") == (ds, 0)
    with pytest.raises(ValueError, match="--title_column 'nope'"):
        use_title_column(ds, "nope")
    numbers = datasets.Dataset.from_dict({"listing_id": ["a"], "title": ["mug"], "t2": [3]})
    with pytest.raises(ValueError, match="row 0 \\(listing_id 'a'\\) holds a int"):
        use_title_column(numbers, "t2")
