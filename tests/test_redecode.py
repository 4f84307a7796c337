"""experiments.redecode: which stored lines a policy's masked greedy decoding reproduces."""

import json

import pytest

from afmrl.catalog import load_catalog
from experiments import redecode
from rar.annotate import annotate


def test_stored_lines_are_compared_with_the_masked_decoding(tiny_model_dir, small_catalog_dir, tmp_path, capsys):
    test = load_catalog(small_catalog_dir, split="test", verify_images=False).select(range(4))
    lines = annotate(test, str(tiny_model_dir), show_progress=False)  # the defaults redecode reads back
    stored = tmp_path / "attributes.jsonl"
    rows = [{"listing_id": lid, "rar_attributes": line} for lid, line in zip(test["listing_id"], lines, strict=True)]
    rows[1]["rar_attributes"] = "color: cut short;"  # one line written before the fix
    stored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "redecode.json"
    result = redecode.main(["--policy", str(tiny_model_dir), "--catalog", str(small_catalog_dir), "--stored",
                            str(stored), "--out", str(out), "--limit", "4"])  # fmt: skip
    assert lines[1].strip() != "color: cut short;"
    assert result["reproduced"] == 0.75 and result["examples"] == [{"stored": "color: cut short;", "masked": lines[1]}]
    assert result["listings"] == 4 and json.loads(out.read_text())["reproduced"] == result["reproduced"]
    with pytest.raises(SystemExit) as err:
        redecode.main(["--policy", str(tiny_model_dir), "--catalog", str(small_catalog_dir), "--stored", str(stored),
                       "--column", "sft_attributes"])  # fmt: skip
    assert err.value.code == 2 and "--column 'sft_attributes'" in capsys.readouterr().err
