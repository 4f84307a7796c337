"""Which listings are the same product: groups from the index's nearest neighbours, and how good they are.

A marketplace indexes its catalog to get one answer: the groups of identical listings. Every indexed listing's top-k
neighbours (its own row excluded) form a graph; an edge is kept when its score reaches the calibrated "same product"
threshold (the pair's category's own threshold where calibration gave one, ``deploy.calibration``); groups are the
connected components (``scipy.sparse.csgraph``). Components chain: A~B and B~C join A and C although nothing says A
is C, and on near-duplicate catalogs one chain can swallow a family. The guard is **mutual kNN**: an edge is kept only
when each listing is among the other's top-k (both above the threshold), measured against no guard in
``docs/deploy.md``. Where product ids are known, ``group_metrics`` scores the groups as the field does: pairwise
precision / recall / F1 over listing pairs, B-cubed F1 (per listing), and the Shopee-style mean F1 (per listing, of
its predicted group against its true one).

    rows, cols, scores = knn_graph(gallery, k=10)
    labels, kept = match_groups(rows, cols, scores, len(gallery), thresholds=0.83, guard="mutual")
    print(group_metrics(labels, gallery.product_ids))
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = ["GUARDS", "group_metrics", "knn_graph", "match_groups", "metrics_over_thresholds", "plot_thresholds"]

GUARDS = ("mutual", "none")


def knn_graph(gallery, k: int = 10, batch: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every gallery row's top-``k`` other rows: ``(rows, cols, scores)``, one entry per directed edge (the vectors are
    read from the index in batches, so a memory-mapped IVF-PQ gallery works too)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = gallery.size
    keys = np.asarray(getattr(gallery, "row_keys", np.arange(n)))  # a vector database's keys may have gaps
    out_rows, out_cols, out_scores = [], [], []
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        scores, found = gallery.search(gallery.vectors(keys[rows]), min(k, max(n - 1, 1)), exclude=keys[rows])
        keep = found >= 0
        out_rows.append(np.repeat(rows, found.shape[1])[keep.ravel()])
        out_cols.append(np.searchsorted(keys, found[keep]))  # keys -> positions
        out_scores.append(scores[keep])
    return np.concatenate(out_rows), np.concatenate(out_cols), np.concatenate(out_scores).astype(np.float32)


def match_groups(
    rows: np.ndarray,
    cols: np.ndarray,
    scores: np.ndarray,
    n: int,
    *,
    thresholds: float | Sequence[float] | np.ndarray,
    guard: str = "mutual",
) -> tuple[np.ndarray, np.ndarray]:
    """Group labels (``n``,) from directed kNN edges: an edge survives when its score reaches the threshold (one
    number, or one per source row: the listing's category's) and, with ``guard="mutual"``, when the reverse edge
    survives too. Returns the labels and the mask of surviving edges."""
    if guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {guard!r}")
    limit = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n,)) if np.ndim(thresholds) else None
    above = scores >= (limit[rows] if limit is not None else float(thresholds))
    if guard == "mutual":  # the reverse edge (col -> row) must have survived the threshold too
        kept = rows[above].astype(np.int64) * n + cols[above]
        above &= np.isin(cols.astype(np.int64) * n + rows, kept)
    graph = coo_matrix((np.ones(int(above.sum())), (rows[above], cols[above])), shape=(n, n))
    _, labels = connected_components(graph, directed=True, connection="weak")
    return labels.astype(np.int64), above


def _pairs(counts: np.ndarray) -> float:
    return float((counts * (counts - 1) / 2).sum())


def group_metrics(labels: Sequence[int], product_ids: Sequence[str]) -> dict:
    """Pairwise, B-cubed and Shopee-style mean F1 of predicted groups against the product ids (listings of one
    product are one true group); also the number of groups and the largest."""
    labels = np.asarray(labels)
    _, truth = np.unique(np.asarray(product_ids, dtype=object).astype(str), return_inverse=True)
    cells, cell_of = np.unique(np.stack([labels, truth], axis=1), axis=0, return_inverse=True)
    cell_size = np.bincount(cell_of.ravel())
    group_size = np.bincount(labels)
    true_size = np.bincount(truth)
    agree = _pairs(cell_size)
    predicted, actual = _pairs(group_size), _pairs(true_size)
    precision = agree / predicted if predicted else 1.0
    recall = agree / actual if actual else 1.0
    c = cell_size[cell_of.ravel()]  # per listing: its (group, product) cell's size
    g, t = group_size[labels], true_size[truth]
    b_precision, b_recall = float(np.mean(c / g)), float(np.mean(c / t))
    return {
        "pairwise_precision": precision,
        "pairwise_recall": recall,
        "pairwise_f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "bcubed_precision": b_precision,
        "bcubed_recall": b_recall,
        "bcubed_f1": 2 * b_precision * b_recall / (b_precision + b_recall),
        "mean_f1": float(np.mean(2 * c / (g + t))),  # Shopee's: F1 of each listing's group against its product's
        "groups": int(len(group_size)),
        "largest_group": int(group_size.max()),
        "listings": int(len(labels)),
    }


def metrics_over_thresholds(rows, cols, scores, n: int, product_ids, grid: Sequence[float], guard: str) -> list[dict]:
    """``group_metrics`` at each global threshold of ``grid`` (the precision/recall trade-off of the groups)."""
    return [{"threshold": float(t), **group_metrics(match_groups(rows, cols, scores, n, thresholds=t, guard=guard)[0],
                                                   product_ids)} for t in grid]  # fmt: skip


def plot_thresholds(curves: dict[str, list[dict]], chosen: float | None, path: str | Path) -> Path:
    """Pairwise precision against recall of the groups over thresholds, one line per guard; the chosen one marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for guard, curve in curves.items():
        ax.plot([c["pairwise_recall"] for c in curve], [c["pairwise_precision"] for c in curve], marker=".",
                label=f"guard: {guard}")  # fmt: skip
    if chosen is not None:
        ax.axvline(0, color="0.8", lw=0.5)
        ax.set_title(f"groups over thresholds (calibrated: {chosen:.3f})", fontsize=9)
    ax.set_xlabel("pairwise recall")
    ax.set_ylabel("pairwise precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
