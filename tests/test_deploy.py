"""Deployment (deploy/, recipes/index_catalog.py, recipes/search.py): search equals a brute-force cosine ranking,
search.py's Recall@K equals the both-sides evaluation, the match threshold is the one the definition gives,
and bad input is one clear line."""

import json

import numpy as np
import pytest

from afmrl.catalog.load import load_catalog
from afmrl.encoder.crops import catalog_views
from afmrl.encoder.model import ProductEncoder
from deploy import ProductIndex, calibrate_threshold
from rar.evaluation import evaluate_attribute_sources

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def test_split(small_catalog_dir):
    return load_catalog(small_catalog_dir, split="test")


def test_search_equals_brute_force_cosine_ranking(tiny_encoder_dir, test_split, tmp_path):
    index = ProductIndex.build(test_split, str(tiny_encoder_dir), attribute_column="attributes", batch_size=16)
    index.save(tmp_path / "index")
    index = ProductIndex.load(tmp_path / "index")
    answers = index.search(test_split, k=5)

    encoder = ProductEncoder.from_pretrained(tiny_encoder_dir)
    texts = [index.attributes[i] for i in range(len(test_split))]
    assert sum(t is not None for t in texts) > len(texts) // 2  # the stored attributes really are appended
    vectors = encoder.encode(catalog_views(test_split), list(test_split["title"]), texts, batch_size=16)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -np.inf)  # a listing is not its own result
    ids = list(test_split["listing_id"])
    for i, answer in enumerate(answers):
        expected = np.argsort(-similarity[i], kind="stable")[:5]
        assert [r["listing_id"] for r in answer["results"]] == [ids[j] for j in expected]
        np.testing.assert_allclose([r["score"] for r in answer["results"]], similarity[i, expected], atol=1e-5)


def test_search_recall_equals_the_both_sides_evaluation(
    tiny_encoder_dir, warm_policy_dir, small_catalog_dir, test_split, tmp_path, load_recipe, capsys
):
    """index_catalog.py + search.py over the test split (the generator annotates every listing) give the
    Recall@K that rar.evaluation's both-sides protocol gives for the same generator."""
    out = tmp_path / "index"
    load_recipe("index_catalog").cli(
        [
            "--catalog",
            str(small_catalog_dir),
            "--split",
            "test",
            "--encoder",
            str(tiny_encoder_dir),
            "--generator",
            str(warm_policy_dir),
            "--max_new_tokens",
            "24",
            "--output_dir",
            str(out),
            "--batch_size",
            "16",
        ]
    )
    generated = [json.loads(line)["attributes"] for line in (out / "attributes.jsonl").read_text().splitlines()]
    assert sum(g is not None for g in generated) > 0  # the warm policy writes parsable attributes
    answers = load_recipe("search").cli(
        [
            "--index",
            str(out),
            "--catalog",
            str(small_catalog_dir),
            "--split",
            "test",
            "--top_k",
            "10",
            "--output_jsonl",
            str(tmp_path / "results.jsonl"),
        ]
    )
    assert [a["attributes"] for a in answers] == generated  # queries annotated as the index was
    err = capsys.readouterr().err
    reference = evaluate_attribute_sources(
        ProductEncoder.from_pretrained(tiny_encoder_dir),
        test_split,
        {"generated": generated},
        protocol="both_sides",
        batch_size=16,
    )["generated"]
    for k in (1, 5, 10):
        assert f"recall@{k} {100 * reference[f'recall@{k}']:.1f}" in err, err


def test_threshold_is_the_lowest_score_that_reaches_the_precision():
    answers = [
        {
            "listing_id": "q1",
            "results": [
                {"listing_id": "a", "score": 0.9},
                {"listing_id": "x", "score": 0.8},
                {"listing_id": "b", "score": 0.7},
            ],
        },
        {"listing_id": "q2", "results": [{"listing_id": "c", "score": 0.85}, {"listing_id": "y", "score": 0.6}]},
    ]
    product_of = {"q1": "P", "a": "P", "b": "P", "x": "X", "q2": "Q", "c": "Q", "y": "Y"}
    # pairs by score: .9 hit, .85 hit, .8 miss, .7 hit, .6 miss -> precision 1, 1, 2/3, 3/4, 3/5
    calibration = calibrate_threshold(answers, product_of, positives=[3, 1], target_precision=0.75)
    assert calibration["score"] == 0.7 and calibration["precision"] == 0.75 and calibration["recall"] == 0.75
    assert calibrate_threshold(answers, product_of, positives=[3, 1], target_precision=1.0)["score"] == 0.85
    assert calibrate_threshold(answers, product_of, positives=[3, 1], target_precision=0.5)["score"] == 0.6


def test_bad_input_is_one_clear_line(
    tiny_encoder_dir, tiny_model_dir, small_catalog_dir, test_split, tmp_path, load_recipe, capsys
):
    import shutil

    index_catalog, search = load_recipe("index_catalog"), load_recipe("search")

    def expect_exit(recipe, argv, *fragments):
        with pytest.raises(SystemExit) as info:
            recipe.cli(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert [line for line in err.splitlines() if line.startswith("error: ")], err
        for fragment in fragments:
            assert fragment in err, err

    encoder = tmp_path / "encoder"
    shutil.copytree(tiny_encoder_dir, encoder)
    out = tmp_path / "index"
    base = ["--catalog", str(small_catalog_dir), "--encoder", str(encoder), "--output_dir", str(out)]
    expect_exit(index_catalog, [*base, "--split", "nosuchsplit"], "nosuchsplit")
    expect_exit(index_catalog, [*base, "--attribute_column", "nope"], "'nope' is not a column")
    expect_exit(index_catalog, [*base, "--encoder", str(tiny_model_dir)], "not an AGCL encoder")
    expect_exit(index_catalog, [*base, "--shard_size", "0"], "--shard_size must be >= 1, got 0")
    index_catalog.cli([*base, "--split", "test", "--attribute_column", "attributes"])
    query = ["--index", str(out), "--catalog", str(small_catalog_dir), "--split", "test"]
    expect_exit(search, [*query, "--same_product_only", "true"], "needs a calibrated threshold")
    with pytest.raises(ValueError, match="carries the catalog's 'attributes' attributes"):
        ProductIndex.load(out).search(test_split.remove_columns("attributes"))
    expect_exit(search, [*query, "--listing_ids", "NOPE"], "NOPE")
    expect_exit(search, ["--index", str(tmp_path), "--catalog", str(small_catalog_dir)], "is not a product index")
    # The encoder retrained after indexing: the index is stale and refused by fingerprint.
    weights = next(p for p in encoder.iterdir() if p.suffix == ".safetensors")
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights)
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1
    save_file(tensors, weights)
    expect_exit(search, query, "fingerprint")


def test_a_shard_left_by_another_run_is_redone_not_merged(tiny_encoder_dir, test_split, tmp_path):
    """The main process merges a shard only when its stamp is this run's: a stamp an earlier run left (another
    encoder, generator or prompt) is waited for, not merged; and that run's generations log is dropped."""
    from deploy.sharding import STAMP_FILE, STARTED_FILE, encode_shards, merge_shards

    index = ProductIndex.configure(str(tiny_encoder_dir), attribute_column="attributes")
    assert encode_shards(test_split, index, tmp_path, shard_size=20) == list(range(-(-len(test_split) // 20)))
    shard = tmp_path / "shards" / "00001"
    stale = json.loads((shard / STAMP_FILE).read_text())
    stale["generator"] = "an earlier generator"
    for name in (STAMP_FILE, STARTED_FILE):
        (shard / name).write_text(json.dumps(stale))
    (shard / "generations.jsonl").write_text('{"listing_id": "x", "completion": "color: red"}\n')
    with pytest.raises(TimeoutError, match="1 of .* shards unfinished"):
        merge_shards(test_split, index, tmp_path, shard_size=20, poll_seconds=0.01, timeout_seconds=0)
    assert encode_shards(test_split, index, tmp_path, shard_size=20) == [1]  # only the stale shard is redone
    assert not (shard / "generations.jsonl").exists()
    vectors, attributes = merge_shards(test_split, index, tmp_path, shard_size=20, timeout_seconds=0)
    assert attributes == index.annotate(test_split)
    np.testing.assert_allclose(vectors, index.embed(test_split, attributes, batch_size=16), atol=1e-5)


@pytest.mark.slow
def test_two_processes_build_the_single_process_index_and_a_killed_run_resumes(
    tiny_encoder_dir, small_catalog_dir, test_split, tmp_path, load_recipe, capsys
):
    """accelerate launch with two CPU processes: each encodes its shards, the main one merges them into the
    index that one process builds; a rerun recomputes only the shard whose stamp is gone."""
    import subprocess
    import sys

    out = tmp_path / "index"
    args = [
        "--catalog",
        str(small_catalog_dir),
        "--split",
        "test",
        "--encoder",
        str(tiny_encoder_dir),
        "--attribute_column",
        "attributes",
        "--output_dir",
        str(out),
        "--batch_size",
        "16",
        "--shard_size",
        "7",
    ]
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "deepspeed_configs/cpu_2proc.yaml",
        "recipes/index_catalog.py",
        *args,
        "--keep_shards",
        "true",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = -(-len(test_split) // 7)
    assert {int(s) for s in __import__("re").findall(r"rank 1: shard (\d+)", proc.stdout)} == set(range(1, shards, 2))
    assert "2 processes" in proc.stdout and not (out / "vectors.npy").exists()  # flat: the index holds the vectors

    merged = ProductIndex.load(out)
    single = ProductIndex.build(test_split, str(tiny_encoder_dir), attribute_column="attributes", batch_size=16)
    assert merged.gallery.listing_ids == single.gallery.listing_ids and merged.attributes == single.attributes
    got, want = merged.search(test_split, k=5), single.search(test_split, k=5)
    assert [[r["listing_id"] for r in a["results"]] for a in got] == [
        [r["listing_id"] for r in a["results"]] for a in want
    ]

    (out / "shards" / "00002" / "done.json").unlink()  # killed while writing shard 2
    capsys.readouterr()
    load_recipe("index_catalog").cli(args)
    assert __import__("re").findall(r"shard (\d+) \(rows", capsys.readouterr().out) == ["2"]
    assert not (out / "shards").exists()  # removed once the index is saved
    assert ProductIndex.load(out).search(test_split, k=5) == got
