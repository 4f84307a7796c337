"""afmrl.stats against a hand computation: sample sd (ddof=1) and the Student-t interval of a mean."""

import math

import pytest

from afmrl.stats import format_summary, summarize


def test_summary_equals_the_hand_computation():
    # mean 13.1/3; squared deviations 0.18778 + 1.06778 + 2.15111 = 3.40667; sd = sqrt(3.40667 / 2) = 1.30512;
    # t(0.975, df=2) = 4.302653, half-width 4.302653 * 1.305118 / sqrt(3) = 3.24209
    s = summarize([4.8, 5.4, 2.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(4.366667, abs=1e-6)
    assert s["sd"] == pytest.approx(1.305118, abs=1e-6)  # numpy's default (ddof=0) would give 1.065625
    assert s["ci95"] == pytest.approx((4.366667 - 3.24209, 4.366667 + 3.24209), abs=1e-4)
    assert format_summary(s) == "+4.4 ± 1.3 (95% CI +1.1 to +7.6, n = 3)"


def test_one_value_has_no_spread_and_none_is_an_error():
    s = summarize([2.0])
    assert s["mean"] == 2.0 and math.isnan(s["sd"]) and format_summary(s) == "+2.0 (n = 1)"
    with pytest.raises(ValueError, match="at least one"):
        summarize([])


def test_verdict_follows_the_rule_fixed_before_the_fair_test():
    from afmrl.stats import verdict

    assert verdict(summarize([4.8, 5.4, 2.9]), paper_delta=1.4) == "reproduced"  # the interval +1.1 to +7.6
    assert verdict(summarize([-0.5, 0.1, -0.4, 0.0, -0.3]), paper_delta=1.9) == "contradicted"  # below +1.9, mean < 0
    assert verdict(summarize([-0.5, 0.1, -0.4, 0.0, 0.9]), paper_delta=1.9) == "inconclusive"  # mean > 0
    assert verdict(summarize([-3.0, 4.0, -1.0]), paper_delta=1.9) == "inconclusive"  # the interval reaches past +1.9
    assert verdict(summarize([-0.5, 0.1, -0.4, 0.0, -0.3])) == "inconclusive"  # no paper figure: never contradicted
    assert verdict(summarize([2.0])) == "n = 1"
