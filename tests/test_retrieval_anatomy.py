"""experiments.retrieval_anatomy: where the top hit goes, on vectors whose answer is known by hand."""

import numpy as np

from experiments.retrieval_anatomy import anatomy


def test_top_hits_are_split_into_own_product_family_mate_and_other_family():
    # A1 and A2 are one product; B is A's family-mate; C is in another family and nearest to B.
    vectors = np.array([[1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [0.6, 0.8, 0.0], [0.5, 0.85, 0.1]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = anatomy(vectors, ["A", "A", "B", "C"], ["F", "F", "F", "G"])
    # A1 → A2 and A2 → A1 (own product), B → C and C → B (each other's family is not theirs)
    assert out["R@1"] == 0.5 and out["top1_family_mate"] == 0.0 and out["top1_other_family"] == 0.5
    # B and C have no other listing of their product: their rank is the gallery size, A's is 1
    assert out["own_rank_median"] == (1 + 4) / 2 and out["own_rank_p85"] > 1


def test_a_family_mate_above_the_own_product_counts_as_a_family_mate():
    vectors = np.array([[1.0, 0.0], [0.0, 1.0], [0.99, 0.1]])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    out = anatomy(vectors, ["A", "A", "B"], ["F", "F", "F"])
    # A1's top hit is B (a family-mate), A2's is B too, B's is A1 (a family-mate)
    assert out["R@1"] == 0.0 and out["top1_family_mate"] == 1.0
    # A1 and A2 find each other second; B has no other listing (rank = the gallery's size, 3)
    assert out["own_rank_median"] == 2 and out["own_rank_p85"] > 2


def test_a_split_the_catalog_lacks_is_one_error_line(small_catalog_dir, tiny_encoder_dir, capsys):
    import pytest

    from experiments.retrieval_anatomy import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--catalog", str(small_catalog_dir), "--encoder", str(tiny_encoder_dir), "--split", "nope"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "error: --split 'nope': 0 listings" in errors[0]
