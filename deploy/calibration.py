"""The match decision: the score above which a search result is called "the same product".

Retrieval ranks; a marketplace must also decide. On a labelled split, every (query, result) pair of the
top-k answers is a positive when the two listings share a product id. Sorting the pairs by score gives
the precision/recall curve of the rule "same product when score >= t" (recall over every other listing
of the query's product that is indexed, so a positive missed by the top-k counts as missed). The
chosen threshold is the lowest score whose precision still reaches the target: the most matches at
that precision.

    threshold = calibrate_threshold(index.search(labelled, k=10), product_of=dict(zip(ids, products)),
                                    positives=positives_per_query, target_precision=0.95)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["calibrate_by_category", "calibrate_threshold", "plot_precision_recall", "threshold_of"]

MIN_CATEGORY_POSITIVES = 50  # a category with fewer labelled same-product pairs falls back to the global threshold


def calibrate_threshold(
    answers: Sequence[Mapping],
    product_of: Mapping[str, str],
    positives: Sequence[int],
    *,
    target_precision: float = 0.95,
) -> dict:
    """``answers``: ``ProductIndex.search`` output for labelled listings; ``product_of``: listing id -> product
    id for queries and results; ``positives[i]``: how many indexed listings (other than itself) share query
    i's product. Returns ``{"score", "precision", "recall", "target_precision", "pairs", "curve"}`` where
    ``score`` is None when no threshold reaches the target."""
    if not 0 < target_precision <= 1:
        raise ValueError(f"--target_precision must be in (0, 1], got {target_precision}")
    scores, hits = [], []
    for answer in answers:
        product = product_of[answer["listing_id"]]
        for result in answer["results"]:
            scores.append(result["score"])
            hits.append(product_of.get(result["listing_id"], result.get("product_id")) == product)
    total = int(sum(positives))
    if not scores or total == 0:
        raise ValueError("calibration needs labelled queries whose product has other indexed listings")
    order = np.argsort(-np.asarray(scores), kind="stable")
    sorted_scores = np.asarray(scores)[order]
    true_positives = np.cumsum(np.asarray(hits)[order])
    precision = true_positives / np.arange(1, len(order) + 1)
    recall = true_positives / total
    # A threshold keeps every pair scoring at least it: evaluate the curve at the last pair of each score.
    last = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    precision, recall, sorted_scores = precision[last], recall[last], sorted_scores[last]
    ok = np.flatnonzero(precision >= target_precision)
    chosen = None if len(ok) == 0 else int(ok[-1])  # the lowest score that still reaches the target
    return {
        "score": None if chosen is None else float(sorted_scores[chosen]),
        "precision": None if chosen is None else float(precision[chosen]),
        "recall": None if chosen is None else float(recall[chosen]),
        "target_precision": target_precision,
        "pairs": len(scores),
        "positives": total,
        "curve": {"score": sorted_scores.tolist(), "precision": precision.tolist(), "recall": recall.tolist()},
    }


def calibrate_by_category(
    answers: Sequence[Mapping],
    product_of: Mapping[str, str],
    positives: Sequence[int],
    categories: Sequence[str | None],
    *,
    target_precision: float = 0.95,
    min_positives: int = MIN_CATEGORY_POSITIVES,
) -> dict:
    """A threshold per query category (``categories[i]`` of ``answers[i]``) where that category has at least
    ``min_positives`` labelled same-product pairs and some score reaches the target; every other category falls back
    to the global threshold, and the result says which and why: ``{category: {"score", "precision", "recall",
    "positives"} or {"fallback": reason}}``."""
    out = {}
    for category in sorted({c for c in categories if c is not None}):
        rows = [i for i, c in enumerate(categories) if c == category]
        count = int(sum(positives[i] for i in rows))
        if count < min_positives:
            out[category] = {"fallback": f"{count} labelled same-product pairs (fewer than {min_positives})"}
            continue
        cal = calibrate_threshold([answers[i] for i in rows], product_of, [positives[i] for i in rows],
                                  target_precision=target_precision)  # fmt: skip
        out[category] = (
            {key: cal[key] for key in ("score", "precision", "recall", "positives")}
            if cal["score"] is not None
            else {"fallback": f"no score reaches precision {target_precision}"}
        )
    return out


def threshold_of(threshold: Mapping | None, category: str | None = None) -> float | None:
    """The "same product" score for a listing of ``category``: its category's own, else the global one (None when
    the index was never calibrated or no score reached the target)."""
    if not threshold:
        return None
    own = (threshold.get("per_category") or {}).get(category) or {}
    return own["score"] if "score" in own else threshold.get("score")


def plot_precision_recall(calibration: Mapping, path: str | Path) -> Path:
    """The precision/recall curve with the chosen threshold marked (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = calibration["curve"]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(curve["recall"], curve["precision"], label="same product when score >= t")
    if calibration["score"] is not None:
        ax.scatter(
            [calibration["recall"]],
            [calibration["precision"]],
            color="C3",
            zorder=3,
            label=f"t = {calibration['score']:.3f} (precision {calibration['precision']:.3f})",
        )
    ax.axhline(calibration["target_precision"], color="0.6", ls="--", lw=1)
    ax.set_xlabel("recall of same-product pairs")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
