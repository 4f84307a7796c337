"""experiments.line_accuracy on hand-made lines: the truth's own values score 100% against the truth, the teacher's
own line 100% against the teacher, and the paired change against SFT is their difference."""

import json
from pathlib import Path

import pytest

from afmrl.attributes import format_attributes, parse_attributes
from afmrl.catalog import load_catalog
from experiments import line_accuracy


def test_truth_and_teacher_lines_score_as_they_should(small_catalog_dir, tmp_path):
    test = load_catalog(small_catalog_dir, split="test", verify_images=False)
    truth = [format_attributes(parse_attributes(t).attributes) for t in test["true_attributes"]]
    teacher = list(test["attributes"])
    ladder, variant = tmp_path / "ladder", tmp_path / "variant"
    (ladder / "seed0" / "rar").mkdir(parents=True)
    (variant / "seed0").mkdir(parents=True)
    with open(ladder / "seed0" / "rar" / "attributes.jsonl", "w") as f:  # SFT wrote the teacher's line, RAR the truth
        for lid, a, b in zip(test["listing_id"], teacher, truth, strict=True):
            f.write(json.dumps({"listing_id": lid, "sft_attributes": a, "rar_attributes": b}) + "\n")
    with open(variant / "seed0" / "attributes.jsonl", "w") as f:  # the variant wrote nothing
        for lid, a in zip(test["listing_id"], teacher, strict=True):
            f.write(json.dumps({"listing_id": lid, "sft_attributes": a, "rar_attributes": ""}) + "\n")
    out = tmp_path / "page.md"
    argv = ["--ladder_dir", str(ladder), "--catalog", str(small_catalog_dir), "--variant", f"V={variant}"]
    per_seed = line_accuracy.main([*argv, "--output", str(out)])
    seed = per_seed[0]
    assert all(v == 1.0 for v in seed["RAR"]["truth"].values()) and seed["RAR"]["truth"]
    assert all(v == 1.0 for v in seed["SFT"]["teacher"].values())
    assert all(v == 0.0 for v in seed["V"]["truth"].values())
    pattern = 100 * seed["SFT"]["truth"]["pattern"]
    assert f"| pattern | {pattern:.1f} | 100.0 (Δ {100 - pattern:+.1f} (n = 1)) |" in out.read_text()
    assert json.loads(out.with_suffix(".json").read_text())["0"]["RAR"]["truth"]["pattern"] == 1.0
    with pytest.raises(SystemExit):
        line_accuracy.main([*argv, "--seeds", "1"])  # that seed has no lines
    # --add_seeds: seed 0 from the JSON beside --output (its lines gone), seed 1 computed now
    for directory in (ladder / "seed0" / "rar", variant / "seed0"):
        target = Path(str(directory).replace("seed0", "seed1"))
        target.mkdir(parents=True)
        (target / "attributes.jsonl").write_bytes((directory / "attributes.jsonl").read_bytes())
        (directory / "attributes.jsonl").unlink()
    both = line_accuracy.main([*argv, "--seeds", "1", "--output", str(out), "--add_seeds"])
    assert sorted(both) == [0, 1] and both[1] == json.loads(json.dumps(seed)) and both[0] == both[1]
    assert list(json.loads(out.with_suffix(".json").read_text())) == ["0", "1"] and "seeds 0 kept" in out.read_text()
    for wrong in (["--seeds", "1"], ["--seeds", "2"]):  # seed 1 is recorded already; seed 2 ran with no variant V2
        with pytest.raises(SystemExit) as info:
            line_accuracy.main([*argv, *wrong, "--output", str(out), "--add_seeds", "--variant", f"V2={variant}"])
        assert info.value.code == 2
