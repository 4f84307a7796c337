"""Match groups (deploy/matching.py, recipes/match_catalog.py): groups on hand-made graphs with the chaining guard,
the group metrics against a brute-force count over every pair, per-category thresholds, and the command end to end."""

import itertools
import json

import numpy as np
import pytest

from afmrl.catalog import load_catalog
from deploy import ProductIndex
from deploy.calibration import threshold_of
from deploy.matching import group_metrics, match_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_mutual_guard_breaks_a_one_way_chain():
    # 0-1 and 1-2 are mutual; 2 -> 3 is one way (3's own neighbours rank 2 below the threshold)
    rows, cols = np.array([0, 1, 1, 2, 2, 3]), np.array([1, 0, 2, 1, 3, 2])
    scores = np.array([0.9, 0.9, 0.8, 0.8, 0.7, 0.5])
    labels, kept = match_groups(rows, cols, scores, 4, thresholds=0.6, guard="mutual")
    assert labels.tolist() == [0, 0, 0, 1] and kept.tolist() == [True] * 4 + [False, False]
    labels, _ = match_groups(rows, cols, scores, 4, thresholds=0.6, guard="none")
    assert labels.tolist() == [0, 0, 0, 0]  # the chain swallows listing 3
    labels, _ = match_groups(rows, cols, scores, 4, thresholds=[0.95, 0.6, 0.6, 0.6], guard="mutual")
    assert labels.tolist() == [0, 1, 1, 2]  # listing 0's own (category) threshold cuts 0 -> 1, so 1 -> 0 is one way
    with pytest.raises(ValueError, match="guard"):
        match_groups(rows, cols, scores, 4, thresholds=0.6, guard="loose")


def brute_force(labels, products):
    pairs = list(itertools.combinations(range(len(labels)), 2))
    same_group = {p for p in pairs if labels[p[0]] == labels[p[1]]}
    same_product = {p for p in pairs if products[p[0]] == products[p[1]]}
    precision = len(same_group & same_product) / len(same_group) if same_group else 1.0
    recall = len(same_group & same_product) / len(same_product) if same_product else 1.0
    group = [{j for j in range(len(labels)) if labels[j] == labels[i]} for i in range(len(labels))]
    truth = [{j for j in range(len(labels)) if products[j] == products[i]} for i in range(len(labels))]
    b_p = np.mean([len(g & t) / len(g) for g, t in zip(group, truth, strict=True)])
    b_r = np.mean([len(g & t) / len(t) for g, t in zip(group, truth, strict=True)])
    mean_f1 = np.mean([2 * len(g & t) / (len(g) + len(t)) for g, t in zip(group, truth, strict=True)])
    return precision, recall, b_p, b_r, mean_f1


@pytest.mark.parametrize("seed", range(5))
def test_group_metrics_equal_a_count_over_every_pair(seed):
    rng = np.random.default_rng(seed)
    labels, products = rng.integers(0, 6, 30), [f"P{x}" for x in rng.integers(0, 8, 30)]
    m = group_metrics(labels, products)
    p, r, b_p, b_r, mean_f1 = brute_force(labels.tolist(), products)
    assert m["pairwise_precision"] == pytest.approx(p) and m["pairwise_recall"] == pytest.approx(r)
    assert m["bcubed_precision"] == pytest.approx(b_p) and m["bcubed_recall"] == pytest.approx(b_r)
    assert m["mean_f1"] == pytest.approx(mean_f1) and m["groups"] == len(set(labels.tolist()))


def test_a_category_without_its_own_threshold_falls_back_to_the_global_one():
    threshold = {"score": 0.9, "per_category": {"mug": {"score": 0.8}, "cap": {"fallback": "12 pairs"}}}
    assert threshold_of(threshold, "mug") == 0.8 and threshold_of(threshold, "cap") == 0.9
    assert threshold_of(threshold, None) == 0.9 and threshold_of(None, "mug") is None


@pytest.fixture(scope="module")
def calibrated_index(small_catalog_dir, tiny_encoder_dir, tmp_path_factory):
    test = load_catalog(small_catalog_dir, split="test")
    index = ProductIndex.build(test, str(tiny_encoder_dir), attribute_column="attributes", batch_size=16)
    calibration = index.calibrate(test, k=5, target_precision=0.3, batch_size=16)
    assert "per_category" in calibration
    out = tmp_path_factory.mktemp("index") / "index"
    index.save(out)
    return out


def test_match_catalog_writes_groups_and_scores_them(load_recipe, calibrated_index, tmp_path):
    recipe = load_recipe("match_catalog")
    summary = recipe.cli(["--index", str(calibrated_index), "--output_dir", str(tmp_path / "m"), "--k", "5"])
    rows = [json.loads(line) for line in (tmp_path / "m" / "groups.jsonl").read_text().splitlines()]
    index = ProductIndex.load(calibrated_index)
    assert [r["listing_id"] for r in rows] == index.gallery.listing_ids
    sizes = {}
    for r in rows:
        sizes.setdefault(r["group_id"], []).append(r["listing_id"])
        assert all(e["score"] >= threshold_of(index.config["threshold"]) - 1 for e in r["edges"])
    assert all(len(members) == r["group_size"] for r in rows for g, members in sizes.items() if g == r["group_id"])
    assert set(summary["metrics"]) == {"mutual", "none"} and 0 <= summary["metrics"]["mutual"]["mean_f1"] <= 1
    assert (tmp_path / "m" / "thresholds.png").is_file()
    # the Python API gives the same groups
    api = index.match(k=5)
    assert api["labels"].tolist() == [int(r["group_id"][1:]) for r in rows]


def test_bad_input_is_one_error_line(
    load_recipe, calibrated_index, tiny_encoder_dir, small_catalog_dir, tmp_path, capsys
):
    recipe = load_recipe("match_catalog")
    uncalibrated = tmp_path / "raw"
    ProductIndex.build(load_catalog(small_catalog_dir, split="test"), str(tiny_encoder_dir), batch_size=16).save(
        uncalibrated
    )
    cases = [(["--index", str(tmp_path / "nowhere")], "not a product index"), (["--index", str(calibrated_index),
             "--k", "0"], "--k"), (["--index", str(uncalibrated)], "--calibration_split"),
             (["--index", str(calibrated_index), "--split", "nope"], "split 'nope'")]  # fmt: skip
    for argv, fragment in cases:
        with pytest.raises(SystemExit) as info:
            recipe.cli([*argv, "--output_dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]  # progress bars go to stderr too
        assert info.value.code == 2 and len(errors) == 1 and fragment in errors[0], err
