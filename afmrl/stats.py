"""How experiments here are summarised: mean, sample sd (ddof=1), a 95% Student-t interval, and n.

Seeds are few (3 to 10) and the differences between rungs of a ladder are paired by seed, so a result is the
mean of the per-seed differences with its t-interval, never one seed and never numpy's default population sd
(ddof=0, which understates the spread of a small sample). ::

    summary = summarize([+4.8, +5.4, +2.9])     # {"mean": 4.37, "sd": 1.31, "ci95": (1.12, 7.61), "n": 3}
    print(format_summary(summary))              # "+4.4 ± 1.3 (95% CI +1.1 to +7.6, n = 3)"
    verdict(summary, paper_delta=1.9)           # "reproduced": the interval lies above 0
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["format_summary", "summarize", "verdict"]


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample sd (ddof=1), the two-sided Student-t interval of the mean at ``confidence``, and n. With one
    value the sd and interval are NaN (one seed measures nothing about the spread)."""
    from scipy import stats

    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("summarize needs at least one value")
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "sd": math.nan, "ci95": (math.nan, math.nan), "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, df=n - 1)) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci95": (mean - half, mean + half), "n": n}


def format_summary(summary: dict, digits: int = 1, signed: bool = True) -> str:
    """``"+4.4 ± 1.3 (95% CI +1.1 to +7.6, n = 3)"``; a single value shows as ``"+4.4 (n = 1)"``."""
    sign = "+" if signed else ""
    mean = f"{summary['mean']:{sign}.{digits}f}"
    if summary["n"] < 2:
        return f"{mean} (n = 1)"
    low, high = summary["ci95"]
    return (
        f"{mean} ± {summary['sd']:.{digits}f} (95% CI {low:{sign}.{digits}f} to {high:{sign}.{digits}f}, "
        f"n = {summary['n']})"
    )


def verdict(summary: dict, paper_delta: float | None = None) -> str:
    """The README's rule for a paired gain, fixed before the fair test ran (docs/experiments/fair_test_plan.md):
    **reproduced** when the 95% interval lies above 0; **contradicted** when it lies below the paper's gain with a
    mean <= 0; **inconclusive** otherwise. Without a paper figure a gain can only be reproduced or inconclusive; one
    seed decides nothing ("n = 1")."""
    if summary["n"] < 2:
        return "n = 1"
    low, high = summary["ci95"]
    if low > 0:
        return "reproduced"
    if paper_delta is not None and high < paper_delta and summary["mean"] <= 0:
        return "contradicted"
    return "inconclusive"
