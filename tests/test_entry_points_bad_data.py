"""Every entry point, run as a process on bad input: exit code 2, one `error:` line naming the row and
field, no traceback, and no model loaded (each fails in well under the time a model load takes)."""

import json
import shutil
import subprocess
import sys

import pytest

ENTRY_POINTS = {
    "agcl_train": ["recipes/agcl_train.py", "--config", "recipes/configs/agcl_demo.yaml", "--catalog", "{catalog}",
                   "--output_dir", "{out}"],
    "evaluate": ["recipes/evaluate.py", "--encoder", "{out}", "--catalog", "{catalog}", "--split", "none"],
    "sft_attributes": ["recipes/sft_attributes.py", "--config", "recipes/configs/sft_demo.yaml", "--catalog",
                       "{catalog}", "--output_dir", "{out}"],
    "extract_attributes": ["recipes/extract_attributes.py", "--model", "tiny-qwen2-vl", "--catalog", "{catalog}",
                           "--output_dir", "{out}"],
    "rar_grpo": ["recipes/rar_grpo.py", "--config", "recipes/configs/rar_demo.yaml", "--catalog", "{catalog}",
                 "--split", "{split}", "--eval_split", "none", "--output_dir", "{out}", "--encoder_recipe", "",
                 "--sft_recipe", ""],
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

    make("non_utf8", json.dumps(row).replace(row["title"], "caf\u00e9").encode("utf-8").replace(b"\xc3\xa9", b"\xe9")
         + b"\n")
    make("missing_image", json.dumps({**row, "image": "images/nope.png"}).encode() + b"\n")
    make("int_product_id", json.dumps({**row, "product_id": 7}).encode() + b"\n")
    return cases, row["listing_id"], row["split"]


FIELD = {"non_utf8": "UTF-8", "missing_image": "image", "int_product_id": "product_id"}
# Every entry point gets one case; the two training recipes get all three.
CASES = [(e, "non_utf8") for e in ENTRY_POINTS] + [
    (e, c) for e in ("agcl_train", "rar_grpo") for c in ("missing_image", "int_product_id")]


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


def test_make_catalog_rejects_bad_flags():
    proc = subprocess.run([sys.executable, "recipes/make_catalog.py", "--output_dir", "/nonexistent/x",
                           "--num_products", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "num_products" in proc.stderr and "Traceback" not in proc.stderr
