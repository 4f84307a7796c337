"""The preconditions gates: each piece of arithmetic on a hand-made case whose answer is known, and the command on a
catalog of another vocabulary and on one without true attributes."""

import json
import math

import numpy as np
import pytest

from afmrl.catalog import load_catalog, write_catalog_dir
from afmrl.preconditions import (
    auc,
    edit_line,
    families,
    habit_values,
    key_accuracy,
    minimal_detectable_effect,
    restored_keys,
    seeds_needed,
    teacher_habits,
    toward_teacher,
    within_family_recall,
)

TRUTH = {
    "A": {"color": "red", "logo": "star"},
    "B": {"color": "blue", "logo": "star"},  # A's family-mate on color
    "C": {"color": "red", "logo": "circle"},  # A's family-mate on logo
    "D": {"color": "red", "logo": "star"},  # A under another product id: a duplicate SKU
    "E": {"color": "green", "logo": "cross"},  # two keys away from everyone: no family
}


def test_families_come_from_the_true_attributes_alone():
    fam = families(list(TRUTH), list(TRUTH.values()))
    code = {p: i for i, p in enumerate(fam.products)}
    assert fam.key_between(code["A"], code["B"]) == "color" and fam.key_between(code["A"], code["C"]) == "logo"
    assert fam.key_between(code["A"], code["D"]) == "" and fam.key_between(code["D"], code["B"]) == "color"
    assert fam.key_between(code["B"], code["C"]) is None and fam.mates[code["E"]] == {}


def test_within_family_recall_and_its_chance_level():
    # two listings each of A, B and C: A's listings see A (positive), B (color) and C (logo)
    products = ["A", "A", "B", "B", "C", "C"]
    fam = families(products, [TRUTH[p] for p in products])
    scores = np.zeros((6, 6))
    scores[0, 1], scores[0, 2], scores[0, 4] = 0.9, 0.5, 0.9  # query 0: beats its color mate, ties its logo mate
    scores[1, 0], scores[1, 3], scores[1, 5] = 0.2, 0.8, 0.1  # query 1: loses to its color mate, beats the logo one
    per_key = within_family_recall(scores, fam)
    # color: queries 0, 1 (A vs B) and 2, 3 (B vs A; all scores 0: a 3-way tie, 1/3 each)
    assert per_key["color"]["n"] == 4
    assert per_key["color"]["recall@1"] == pytest.approx((1 + 0 + 1 / 3 + 1 / 3) / 4)
    assert per_key["color"]["chance"] == pytest.approx(1 / 3)
    # logo: query 0 ties its positive with one logo mate at 0.9 (1/2), query 1 wins, C's queries 4, 5 tie three ways
    assert per_key["logo"]["recall@1"] == pytest.approx((1 / 2 + 1 + 1 / 3 + 1 / 3) / 4)


def test_key_accuracy_counts_only_values_the_title_does_not_state():
    truths = [{"color": "red", "logo": "star"}, {"color": "navy blue", "logo": "star"}, {"color": "red"}]
    generated = [{"color": "red"}, {"color": "blue", "logo": "star"}, {"color": "RED "}]
    titles = ["a red mug", "mug", "a mug"]  # the first states its colour: not counted
    out = key_accuracy(truths, generated, titles, ["color", "logo"])
    assert out["color"] == {"accuracy": 0.5, "n": 2}  # "navy blue" missed, "RED " right
    assert out["logo"] == {"accuracy": 0.5, "n": 2}  # a left-out key counts as wrong


def test_key_accuracy_leaves_out_the_values_a_teacher_confuses_by_habit():
    """A faithful copy of a teacher that writes dotted as checked is not blind to dotted: G2 counts the other values
    (its accuracy over every value is reported beside)."""
    teacher = [{"pattern": "checked"}] * 6 + [{"pattern": "dotted"}] * 4 + [{"pattern": "striped"}] * 5
    truth = [{"pattern": "dotted"}] * 10 + [{"pattern": "striped"}] * 5
    skip = habit_values(teacher_habits(teacher, truth))
    assert skip == {"pattern": {"dotted"}}
    copy = [{"pattern": "checked"}] * 10 + [{"pattern": "striped"}] * 4 + [{"pattern": "solid"}]
    assert key_accuracy(truth, copy, [""] * 15, ["pattern"], skip=skip)["pattern"] == {"accuracy": 0.8, "n": 5}
    assert key_accuracy(truth, copy, [""] * 15, ["pattern"])["pattern"] == {"accuracy": 4 / 15, "n": 15}


def test_auc_counts_ties_as_half():
    assert auc([3, 2], [1, 2]) == pytest.approx(3.5 / 4)
    assert auc([1], [2]) == 0.0 and math.isnan(auc([], [1]))


def test_teacher_habits_find_listing_keys_and_systematic_confusions_not_slips():
    truth = [{"color": "blue"}] * 10 + [{"color": "red"}] * 10
    teacher = [{"color": "navy", "shipping": "free"}] * 6 + [{"color": "blue"}] * 4  # navy for blue, 6 times
    teacher += [{"color": "pink"}] + [{"color": "red"}] * 9  # one slip: not a habit
    habits = teacher_habits(teacher, truth)
    assert habits == {"listing_keys": ["shipping"], "confusions": {"color": {"navy": "blue"}}, "merges": {}}
    samples = [{"color": "navy", "logo": "star"}, {"logo": "star"}, {"logo": "circle", "size": "m"}]
    assert restored_keys({"color": "navy"}, samples) == {"logo": "star"}  # named by 3 of 3; size by 1 of 3
    edited = edit_line({"color": "navy", "shipping": "free"}, habits, {"logo": "star"})
    assert edited == {"color": "blue", "logo": "star"}
    assert edit_line({"color": "navy", "shipping": "free"}, habits, {"logo": "star"}, parts=("drop",)) == {
        "color": "navy"
    }


def test_a_merge_into_a_real_value_is_found_and_undone_only_where_the_generator_sees_the_difference():
    # dotted written as checked for 6 of 10 dotted products: 6 of the 16 uses of "checked" (under the written-value
    # share), but 0.6 of the dotted lines: a habit. "checked" is a real value, so the line alone cannot undo it.
    truth = [{"pattern": "dotted"}] * 10 + [{"pattern": "checked"}] * 10
    teacher = [{"pattern": "checked"}] * 6 + [{"pattern": "dotted"}] * 4 + [{"pattern": "checked"}] * 10
    habits = teacher_habits(teacher, truth)
    assert habits["confusions"] == habits["merges"] == {"pattern": {"checked": "dotted"}}
    line = {"pattern": "checked"}
    sees = [{"pattern": "dotted"}] * 3 + [{"pattern": "checked"}] * 5  # 3 of 8 samples name dotted: it sees it
    blind = [{"pattern": "dotted"}] + [{"pattern": "checked"}] * 7
    assert edit_line(line, habits, samples=sees) == {"pattern": "dotted"}
    assert edit_line(line, habits, samples=blind) == line and edit_line(line, habits) == line


def test_a_line_moves_toward_its_teacher_only_where_the_generator_samples_the_teachers_choice():
    teacher = {"pattern": "dotted", "color": "navy", "shipping": "free"}
    line = {"color": "navy", "pattern": "checked", "size": "m"}  # a wrong pattern, no shipping key, an extra size
    sees = [{"pattern": "dotted", "color": "navy"}, {"pattern": "dotted", "shipping": "free"}] + [line] * 6
    # 2 of 8 samples name dotted (25%), 1 of 8 writes shipping (12.5%), 2 of 8 leave size out (25%)
    assert toward_teacher(line, teacher, sees) == {"pattern": "dotted", "color": "navy"}  # the teacher's key order
    assert list(toward_teacher(line, teacher, sees)) == ["pattern", "color"]
    blind = [{"pattern": "dotted", "color": "navy", "size": "m"}] + [line] * 7  # 1 of 8 each: out of its reach
    assert toward_teacher(line, teacher, blind) == {"color": "navy", "pattern": "checked", "size": "m"}
    assert toward_teacher(line, teacher, []) == line  # no samples: nothing it is known to reach
    assert toward_teacher(line, None, sees) == line  # a listing the teacher left without a line: no target
    # a value equal but for its case is the teacher's already, whatever the samples say
    assert toward_teacher({"color": "Navy"}, {"color": "navy"}, blind) == {"color": "navy"}


def test_power_matches_the_published_tables():
    # G*Power, one-sample (paired) t-test, two-sided alpha 0.05, power 0.8: d = 1 -> 10, d = 0.5 -> 34
    assert seeds_needed(sd=1.0, effect=1.0) == 10 and seeds_needed(sd=2.0, effect=1.0) == 34
    mde = minimal_detectable_effect(sd=1.0, n=34)
    assert 0.49 < mde <= 0.5 and seeds_needed(sd=1.0, effect=mde) == 34


# ------------------------------------------------------------------ the command, end to end on tiny models

RENAME = {"color": "farbe", "secondary_color": "zweitfarbe", "pattern": "muster", "logo": "zeichen", "size": "groesse",
          "category": "art", "brand": "marke"}  # fmt: skip


def _renamed(value):
    return {RENAME.get(k, k): f"x-{v}" for k, v in value.items()} if isinstance(value, dict) else value


@pytest.fixture(scope="module")
def catalogs(small_catalog_dir, tmp_path_factory):
    """The small catalog in another vocabulary (keys and values renamed), and a copy without true attributes."""
    root = tmp_path_factory.mktemp("worlds")
    ds = load_catalog(small_catalog_dir)
    other = ds.remove_columns(["attributes", "true_attributes"])
    write_catalog_dir(other, root / "other", extra_columns={
        "attributes": [_renamed(a) for a in ds["attributes"]],
        "true_attributes": [_renamed(a) for a in ds["true_attributes"]]})  # fmt: skip
    write_catalog_dir(ds.remove_columns(["true_attributes"]), root / "untruthful")
    return root


def _run(load_recipe, tmp_path, catalog, encoder, generator, base, extra=()):
    recipe = load_recipe("preconditions")
    out = tmp_path / "out"
    argv = ["--catalog", str(catalog), "--encoder", str(encoder), "--output_dir", str(out), "--samples", "2",
            "--batch_size", "16", "--encoder_base", str(base), "--reward_kwargs", '{"mode": "rank_improvement"}',
            *(["--generator", str(generator)] if generator else []), *extra]  # fmt: skip
    record = recipe.cli(argv)
    assert json.loads((out / "preconditions.json").read_text())["gates"] == json.loads(json.dumps(record["gates"]))
    return record["gates"], (out / "preconditions.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("gallery", ["policy", "reference"])
def test_the_command_on_another_vocabulary_measures_every_gate(
    load_recipe, catalogs, tiny_encoder_dir, warm_policy_dir, tiny_model_dir, tmp_path, one_thread, gallery
):
    headroom = {"policy": "habits", "reference": "teacher"}[gallery]  # the reachable headroom of each gallery
    extra = [
        "--max_rl_listings",
        "6",
        "--fine_keys",
        "zeichen",
        "--gallery_attributes",
        gallery,
        "--headroom",
        headroom,
    ]
    gates, page = _run(load_recipe, tmp_path, catalogs / "other", tiny_encoder_dir, warm_policy_dir, tiny_model_dir,
                       extra)  # fmt: skip
    assert all(g["status"] in ("pass", "fail") for name, g in gates.items()), gates
    assert " on 6 of the " in gates["G5"]["note"]  # the budget: six RL listings measured, the rest in the gallery
    source = {"policy": "the SFT policy", "reference": "the catalog's 'attributes' column"}[gallery]
    assert f"annotated by {source}" in gates["G5"]["note"]
    other = {
        "habits": "toward the teacher (where its own samples reach)",
        "teacher": "the habits (drop, undo, restore)",
    }
    assert [row[0].split(" − ")[0] for row in gates["G4"]["rows"][2:]] == [
        f"R@1 edited: {part} only" for part in ("drop", "undo", "restore")
    ] + [f"R@1 edited: {other[headroom]}"] + [f"reward δ, {part} only" for part in ("drop", "undo", "restore")] + [
        f"reward δ, {other[headroom]} only",
        "reward δ, own product's gallery line (the reward's ceiling) only",
        "reward δ, the teacher's own line (the student's distance to it) only",
    ]  # which edit moves R@1 and the reward, the most the reward can give a line, and what imitating the teacher gives
    assert np.isfinite(float(gates["G4"]["rows"][-1][1]))
    assert gates["G4"]["note"].startswith(
        "edited: the SFT line moved toward" if headroom == "teacher" else "edits: drop"
    )
    for gate_name in ("G1", "G2"):  # only the world's fine keys are checked; the others are reported
        assert all(row[3] is None for row in gates[gate_name]["rows"] if "`zeichen`" not in row[0])
    keys = {row[0].split("`")[1] for row in gates["G1"]["rows"]}
    assert keys and keys <= set(RENAME.values())  # the varying keys of the renamed world
    assert any("duplicate pairs" in row[0] for row in gates["G6"]["rows"])
    counts = gates["G6"]["counts"]  # unrounded, and the rows show them
    assert f"{counts['mates']:.2f}" == gates["G6"]["rows"][0][1] and counts["queries"] > 0
    assert "| **G7** power" in page and "skipped" not in page
    lines = [json.loads(line) for line in (tmp_path / "out" / "lines.jsonl").read_text().splitlines()]
    # every line the gates read, kept; the gallery is annotated only when it carries the policy's lines
    assert {"eval", "rl", *(["gallery"] if gallery == "policy" else [])} == {r["role"] for r in lines}
    assert all(len(r["samples"]) == (0 if r["role"] == "gallery" else 2) for r in lines)


@pytest.mark.slow
def test_the_command_without_true_attributes_says_what_it_skipped(
    load_recipe, catalogs, tiny_encoder_dir, warm_policy_dir, tiny_model_dir, tmp_path, one_thread
):
    gates, page = _run(
        load_recipe, tmp_path, catalogs / "untruthful", tiny_encoder_dir, warm_policy_dir, tiny_model_dir
    )
    for name in ("G1", "G2", "G4", "G5", "G6"):
        assert gates[name]["status"] == "skipped" and "true_attributes" in gates[name]["note"]
    assert [row[0] for row in gates["G3"]["rows"]] == ["R@1 sft − none"]  # what can be measured without them
    assert gates["G7"]["rows"][0][0] == "test listings"
    assert page.count("skipped:") == 5


def test_bad_flags_are_one_error_line(load_recipe, small_catalog_dir, tiny_encoder_dir, capsys, tmp_path):
    recipe = load_recipe("preconditions")
    for extra, fragment in ((["--reward_kwargs", "{nope"], "--reward_kwargs"), (["--pilot", "nowhere.json"], "--pilot"),
                            (["--eval_split", "nope"], "nope"),
                            (["--fine_keys", "logo", "shade"], "shade"),
                            (["--gallery_attributes", "teacher"], "--gallery_attributes")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            recipe.cli(["--catalog", str(small_catalog_dir), "--encoder", str(tiny_encoder_dir), *extra])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.startswith("error: ") and fragment in err, err


# ------------------------------------------------------------------ the recipe's gates on hand-made figures


def test_own_product_lines_are_the_commonest_line_of_the_other_listings(load_recipe):
    from datasets import Dataset

    recipe = load_recipe("preconditions")
    lookup = Dataset.from_dict({"listing_id": ["a", "b", "c", "d", "e", "f"],
                                "product_id": ["P", "P", "P", "P", "Q", "P"],
                                recipe.POLICY_COLUMN: [{"logo": "star"}, {"logo": "none"}, {"logo": "none"}, None,
                                                       {"logo": "cross"}, {"logo": "star"}]})  # fmt: skip
    twin = recipe.own_product_lines(lookup, ["a", "b", "d", "e"])
    # a's others: none, none, star; b's: star, none, star; d (no line itself): a tie, the first seen wins; e's
    # product has no other listing
    assert twin == {"a": "logo: none", "b": "logo: star", "d": "logo: star"}


def test_headroom_and_signal_gates_on_known_figures(load_recipe):
    recipe = load_recipe("preconditions")
    g3 = recipe.g3({"none": 40.0, "sft": 42.0, "true": 47.0})  # +7 / +2 / +5: every line met
    assert g3["status"] == "pass" and [r[3] for r in g3["rows"]] == [True, True, True]
    assert recipe.g3({"none": 40.0, "sft": 42.0, "true": 45.0})["status"] == "fail"  # true - SFT +3 < +4
    # sigma 0.1, delta 0.025: (sigma/delta)^2 = 16, on the line; 800 prompts = 50 x 16, on the line too
    assert recipe.signal_gate(0.1, 0.025, 800)["status"] == "pass"
    assert (
        recipe.signal_gate(0.1, 0.025, 799)["status"] == "fail"
        and recipe.signal_gate(0.1, 0.02, 10**6)["status"] == "fail"
    )
    assert recipe.signal_gate(0.1, 0.0, 10**6)["rows"][0][1].endswith("= inf")  # no gain: never found


def test_batch_material_on_a_hand_made_catalog(load_recipe):
    """Four products in one batch: A, its colour mate B, its duplicate SKU D, and E two keys away. Per query: A meets
    B (mate) and D (false negative); B meets A and D (both colour mates); D meets B and A; E meets nothing."""
    from types import SimpleNamespace

    import datasets
    from conftest import image_files

    truth = {"A": TRUTH["A"], "B": TRUTH["B"], "D": TRUTH["D"], "E": TRUTH["E"]}
    teacher = {"A": {"color": "red"}, "B": {"color": "red"}, "D": {"color": "red"}, "E": {"color": "green"}}
    products = [p for p in truth for _ in range(2)]
    ds = datasets.Dataset.from_dict({"listing_id": [f"L{i}" for i in range(8)], "product_id": products,
                                     "title": ["t"] * 8, "image": image_files(8),
                                     "attributes": [teacher[p] for p in products],
                                     "true_attributes": [truth[p] for p in products]})  # fmt: skip
    recipe = load_recipe("preconditions")
    fam = families(products, [truth[p] for p in products])
    args = SimpleNamespace(teacher_column="attributes", epochs=2)
    c = recipe.g6_counts(ds, fam, args, {"per_device_train_batch_size": 4, "seed": 0}, None)
    assert c["queries"] == 8 and c["mates"] == pytest.approx(4 / 4) and c["false_negatives"] == pytest.approx(2 / 4)
    # the teacher wrote B red (a slip): its signature equals A's and D's, so the filter also masks two mates per epoch
    assert c["duplicates"] == 4 and c["recall"] == 1.0 and c["precision"] == pytest.approx(4 / 12)
    assert math.isnan(c["cosine_auc"]) and recipe.g6(c)["status"] == "fail"
