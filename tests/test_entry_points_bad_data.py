"""Every entry point, run as a process on bad input: exit code 2, one `error:` line naming the row and
field, no traceback, and no model loaded (each fails in well under the time a model load takes)."""

import json
import shutil
import subprocess
import sys

import pytest
from test_reliability_images import huge_header_png

ENTRY_POINTS = {
    "agcl_train": [
        "recipes/agcl_train.py",
        "--config",
        "recipes/configs/agcl_demo.yaml",
        "--catalog",
        "{catalog}",
        "--output_dir",
        "{out}",
    ],
    "evaluate": ["recipes/evaluate.py", "--encoder", "{out}", "--catalog", "{catalog}", "--split", "none"],
    "sft_attributes": [
        "recipes/sft_attributes.py",
        "--config",
        "recipes/configs/sft_demo.yaml",
        "--catalog",
        "{catalog}",
        "--output_dir",
        "{out}",
    ],
    "extract_attributes": [
        "recipes/extract_attributes.py",
        "--model",
        "tiny-qwen2-vl",
        "--catalog",
        "{catalog}",
        "--output_dir",
        "{out}",
    ],
    "rar_grpo": [
        "recipes/rar_grpo.py",
        "--config",
        "recipes/configs/rar_demo.yaml",
        "--catalog",
        "{catalog}",
        "--split",
        "{split}",
        "--eval_split",
        "none",
        "--output_dir",
        "{out}",
        "--encoder_recipe",
        "",
        "--sft_recipe",
        "",
    ],
}


@pytest.fixture(scope="module")
def bad_catalogs(small_catalog_dir, tmp_path_factory):
    """Copies of the small catalog, each broken in one way on its 3rd line."""
    root = tmp_path_factory.mktemp("bad")
    lines = (small_catalog_dir / "catalog.jsonl").read_bytes().splitlines(keepends=True)
    row = json.loads(lines[2])
    cases = {}

    def make(name, third_line):
        d = root / name
        shutil.copytree(small_catalog_dir, d)
        (d / "catalog.jsonl").write_bytes(b"".join([*lines[:2], third_line, *lines[3:]]))
        cases[name] = d

    make(
        "non_utf8",
        json.dumps(row).replace(row["title"], "caf\u00e9").encode("utf-8").replace(b"\xc3\xa9", b"\xe9") + b"\n",
    )
    make("missing_image", json.dumps({**row, "image": "images/nope.png"}).encode() + b"\n")
    make("int_product_id", json.dumps({**row, "product_id": 7}).encode() + b"\n")
    return cases, row["listing_id"], row["split"]


FIELD = {"non_utf8": "UTF-8", "missing_image": "image", "int_product_id": "product_id"}
# Every entry point gets one case as a real process (about 15 s each, mostly imports); the rest of the
# cross product, these cases included, runs in process below.
CASES = [(e, "non_utf8") for e in ENTRY_POINTS if e != "rar_grpo"] + [("rar_grpo", "missing_image")]


@pytest.mark.slow
@pytest.mark.parametrize("entry,case", CASES)
def test_bad_catalog_through_every_entry_point(entry, case, bad_catalogs, tmp_path):
    field = FIELD[case]
    catalogs, listing_id, split = bad_catalogs  # image checks cover the split a run reads: read the broken row's
    argv = [a.format(catalog=catalogs[case], out=tmp_path / "out", split=split) for a in ENTRY_POINTS[entry]]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "line 3" in proc.stderr and field in proc.stderr
    if case != "non_utf8":  # a line that does not decode has no listing id to name
        assert listing_id in proc.stderr


# ----------------------------------------------------------------------------- the full cross product, in process

IN_PROCESS = {
    "agcl_train": [
        "--config",
        "recipes/configs/agcl_demo.yaml",
        "--catalog",
        "{catalog}",
        "--output_dir",
        "{out}",
        "--train_split",
        "{split}",
        "--eval_split",
        "none",
    ],
    "evaluate": ["--encoder", "{out}", "--catalog", "{catalog}", "--split", "{split}"],
    "sft_attributes": [
        "--config",
        "recipes/configs/sft_demo.yaml",
        "--catalog",
        "{catalog}",
        "--output_dir",
        "{out}",
        "--split",
        "{split}",
    ],
    "extract_attributes": [
        "--model",
        "tiny-qwen2-vl",
        "--catalog",
        "{catalog}",
        "--output_dir",
        "{out}",
        "--split",
        "{split}",
    ],
    "rar_grpo": [
        "--config",
        "recipes/configs/rar_demo.yaml",
        "--catalog",
        "{catalog}",
        "--split",
        "{split}",
        "--eval_split",
        "none",
        "--output_dir",
        "{out}",
        "--encoder_recipe",
        "",
        "--sft_recipe",
        "",
    ],
}


# case -> (how line 3 is broken, what the error must name besides "line 3")
def _break(case, row, first, image_dir):
    if case == "missing_field":
        return {k: v for k, v in row.items() if k != "title"}, "title"
    if case == "wrong_type":
        return {**row, "product_id": 7}, "product_id"
    if case == "duplicate_id":
        return {**row, "listing_id": first["listing_id"]}, "line 1"
    if case == "empty_title":
        return {**row, "title": "   "}, "title"
    if case == "missing_image":
        return {**row, "image": "images/nope.png"}, "image"
    if case == "corrupt_image":
        (image_dir / "corrupt.png").write_bytes(b"this is not a png")
        return {**row, "image": "images/corrupt.png"}, "image"
    if case == "truncated_image":
        good = (image_dir.parent / row["image"]).read_bytes()
        (image_dir / "truncated.png").write_bytes(good[: len(good) // 2])
        return {**row, "image": "images/truncated.png"}, "image"
    if case == "huge_image":
        huge_header_png(image_dir / "huge.png")
        return {**row, "image": "images/huge.png"}, "DecompressionBomb"
    if case == "outside_path":
        return {**row, "image": "../outside.png"}, "image"
    raise KeyError(case)


BAD_ROW_CASES = [
    "missing_field",
    "wrong_type",
    "duplicate_id",
    "empty_title",
    "missing_image",
    "corrupt_image",
    "truncated_image",
    "huge_image",
    "outside_path",
    "non_utf8",
]


@pytest.fixture(scope="module")
def broken_catalogs(small_catalog_dir, tmp_path_factory):
    """One copy of the small catalog per case, broken on its 3rd line.

    -> ({case: (dir, text the error must hold, listing id it must name)}, the broken row's split)."""
    root = tmp_path_factory.mktemp("broken")
    lines = (small_catalog_dir / "catalog.jsonl").read_bytes().splitlines(keepends=True)
    first, row = json.loads(lines[0]), json.loads(lines[2])
    cases = {}
    for case in BAD_ROW_CASES:
        d = root / case
        shutil.copytree(small_catalog_dir, d)
        if case == "non_utf8":
            third = json.dumps(row).replace(row["title"], "caf\u00e9").encode().replace(b"\xc3\xa9", b"\xe9") + b"\n"
            must_name = "UTF-8"
        else:
            broken, must_name = _break(case, row, first, d / "images")
            third = json.dumps(broken).encode() + b"\n"
        (d / "catalog.jsonl").write_bytes(b"".join([*lines[:2], third, *lines[3:]]))
        listing_id = None if case == "non_utf8" else (first if case == "duplicate_id" else row)["listing_id"]
        cases[case] = (d, must_name, listing_id)  # a line that does not decode has no listing id to name
    return cases, row["split"]


def run_in_process(load_recipe, capsys, entry, argv) -> str:
    """``recipes/<entry>.py``'s cli on ``argv``: must exit 2 with exactly one ``error:`` line; returns it.
    No stage may start a child recipe (rar_grpo's stage 1 / SFT) before the inputs are checked."""
    module = load_recipe(entry)
    if hasattr(module, "run_recipe"):
        module.run_recipe = lambda *a, **k: pytest.fail(f"a stage ran: {a[0]}")
    with pytest.raises(SystemExit) as info:
        module.cli(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0]


@pytest.mark.usefixtures("no_weights")
@pytest.mark.parametrize("case", BAD_ROW_CASES)
@pytest.mark.parametrize("entry", list(IN_PROCESS))
def test_every_bad_row_through_every_entry_point(entry, case, broken_catalogs, load_recipe, capsys, tmp_path):
    """Each catalog-reading entry point x each way a row can be bad: exit 2, one error line naming line 3, the
    field (or the other line) and the listing id, and no weights loaded."""
    catalogs, split = broken_catalogs
    catalog, must_name, listing_id = catalogs[case]
    argv = [a.format(catalog=catalog, out=tmp_path / "out", split=split) for a in IN_PROCESS[entry]]
    error = run_in_process(load_recipe, capsys, entry, argv)
    assert "line 3" in error and must_name in error, error
    assert listing_id is None or listing_id in error, error


@pytest.mark.usefixtures("no_weights")
@pytest.mark.parametrize("entry", list(IN_PROCESS))
def test_empty_split_through_every_entry_point(entry, small_catalog_dir, load_recipe, capsys, tmp_path):
    argv = [a.format(catalog=small_catalog_dir, out=tmp_path / "out", split="holdout") for a in IN_PROCESS[entry]]
    error = run_in_process(load_recipe, capsys, entry, argv)
    assert "holdout" in error, error


def test_make_catalog_rejects_bad_flags():
    proc = subprocess.run(
        [sys.executable, "recipes/make_catalog.py", "--output_dir", "/nonexistent/x", "--num_products", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "num_products" in proc.stderr and "Traceback" not in proc.stderr
