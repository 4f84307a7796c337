"""Does the generator's text help retrieval? Held-out evaluation of stage 2 and its report.

The question RAR optimises, asked on products the policy never saw: each listing of the held-out
split is a query once, its other listings are the positives, and the frozen stage-1 encoder embeds
image + title (+ attributes) (``afmrl.retrieval.evaluation.instance_retrieval``, the ``instance`` task). Two
protocols:

- ``both_sides`` (deployment): the generator under test annotates every listing once, and queries
  and gallery alike are embedded with their own generated attributes. This is what a marketplace
  runs, so the demo reports it as its headline numbers.
- ``query_side``: only the queries carry the source's attributes; the gallery is fixed for all sources and
  encoded once. Two galleries go by their own names in the reports: the **reward gallery** (annotated once before
  RL by the starting policy, or a stored column, with ``--gallery_attributes``: the reward's protocol, the demo's
  ``metrics.json["reward_gallery"]``) and the **plain gallery** (image + title, no attributes: the ladder's
  ``instance_plain_gallery``).

With no attributes (or a generator whose every output is empty) the protocols are the same
computation and give the same numbers. The attributes come from ``rar.annotate`` (greedy), are parsed with the
reward's tolerant parser and re-written canonically; a completion that does not parse adds nothing to its
query (as in the reward, which scores it but has no text to append).

``write_report`` saves ``metrics.json`` ({"no_attributes": {"recall@1": ...}, "sft_attributes":
..., "rar_attributes": ...}, fractions), the generated attributes, and two PNG plots: the reward
curve from the trainer's log history and Recall@K per attribute source.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from afmrl.retrieval.evaluation import instance_retrieval

__all__ = ["PROTOCOLS", "SOURCES", "evaluate_attribute_sources", "format_table", "reward_trend", "write_report"]

SOURCES = ("no_attributes", "sft_attributes", "rar_attributes")
PROTOCOLS = ("both_sides", "query_side")
REPORTED = ("recall@1", "recall@5", "recall@10", "mAP@10", "mrr")


def evaluate_attribute_sources(
    encoder,
    catalog,
    sources: Mapping[str, Sequence[str | None] | None],
    *,
    protocol: str = "query_side",
    gallery_attributes: Sequence[str | None] | None = None,
    batch_size: int = 32,
    show_progress: bool | None = None,
) -> dict[str, dict]:
    """Instance retrieval on ``catalog`` for each source of attributes (None = no attributes).

    ``protocol="query_side"``: the sources annotate the queries, and ``gallery_attributes`` (the reward gallery's
    texts, or None for the plain image + title gallery) the gallery, encoded once. ``"both_sides"``: each source
    annotates queries and gallery alike (one gallery encoding per source); ``gallery_attributes`` must then be None."""
    options = {"batch_size": batch_size, "show_progress": show_progress}
    if protocol == "query_side":
        scores = instance_retrieval(encoder, catalog, sources, gallery_attributes=gallery_attributes, **options)
    elif protocol == "both_sides":
        if gallery_attributes is not None:
            raise ValueError(
                "protocol 'both_sides' annotates the gallery with each source: gallery_attributes must be None"
            )
        scores = {
            name: instance_retrieval(encoder, catalog, {name: texts}, gallery_attributes=texts, **options)[name]
            for name, texts in sources.items()
        }
    else:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    results = {}
    for name, texts in sources.items():
        instance = scores[name]
        metrics = {k: instance[k] for k in REPORTED if k in instance}
        metrics["n_queries"] = instance["n_queries"]
        metrics["n_skipped"] = instance.get("n_skipped", 0)  # queries whose product has no other listing
        if texts is not None:
            metrics["valid_fraction"] = sum(t is not None for t in texts) / max(len(texts), 1)
        results[name] = metrics
    return results


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A Markdown table of Recall@1/5/10 and mAP@10 (percent) per attribute source."""
    cols = [c for c in REPORTED if any(c in m for m in results.values())]
    lines = [
        "| query attributes | " + " | ".join(c.replace("recall", "Recall") for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, metrics in results.items():
        lines.append(
            f"| {name} | " + " | ".join(f"{100 * metrics[c]:.1f}" if c in metrics else "" for c in cols) + " |"
        )
    return "\n".join(lines)


def reward_curve(log_history: Sequence[Mapping]) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and per-reward means (plus the weighted total ``reward``) from a trainer's log history."""
    steps, curves = [], {}
    for entry in log_history:
        if "reward" not in entry:
            continue
        steps.append(int(entry.get("step", len(steps) + 1)))
        for key, value in entry.items():
            if key == "reward" or (key.startswith("rewards/") and key.endswith("/mean")):
                curves.setdefault(key, []).append(float(value))
    return steps, {k: v for k, v in curves.items() if len(v) == len(steps)}


def reward_trend(log_history: Sequence[Mapping]) -> dict[str, dict[str, float]]:
    """Mean of each reward curve over the first and the last quarter of the logged steps (did it rise?)."""
    steps, curves = reward_curve(log_history)
    quarter = max(1, len(steps) // 4)
    return (
        {
            key.removeprefix("rewards/").removesuffix("/mean"): {
                "first_quarter": sum(v[:quarter]) / quarter,
                "last_quarter": sum(v[-quarter:]) / quarter,
            }
            for key, v in curves.items()
        }
        if steps
        else {}
    )


def _plot_rewards(log_history, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, curves = reward_curve(log_history)
    if not steps:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.2), squeeze=False)
    window = max(1, len(steps) // 10)  # a rolling mean over a tenth of the run shows the trend through the noise
    for ax, (key, values) in zip(axes[0], curves.items(), strict=True):
        label = "total (weighted)" if key == "reward" else key.removeprefix("rewards/").removesuffix("/mean")
        smooth = [
            sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))
        ]
        ax.plot(steps, values, alpha=0.35, linewidth=1)
        ax.plot(steps, smooth, linewidth=2)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean reward (rolling mean bold)")
    fig.suptitle("RAR reward during training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_recall(results: Mapping[str, Mapping[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [k for k in ("recall@1", "recall@5", "recall@10") if all(k in m for m in results.values())]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(results), 1)
    for i, (name, metrics) in enumerate(results.items()):
        xs = [j + i * width for j in range(len(ks))]
        bars = ax.bar(xs, [100 * metrics[k] for k in ks], width, label=name.replace("_", " "))
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(ks))], [k.replace("recall", "R") for k in ks])
    ax.set_ylabel("instance retrieval (%)")
    ax.set_title("Held-out products: query attributes before / after RL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    output_dir,
    results: Mapping[str, Mapping],
    *,
    log_history: Sequence[Mapping] = (),
    generated: Mapping[str, Sequence] | None = None,
    extra: Mapping | None = None,
) -> dict[str, Path]:
    """metrics.json, attributes.jsonl (generated text per listing) and the two PNGs; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json"}
    trend = reward_trend(log_history)
    paths["metrics"].write_text(
        json.dumps({**results, **({"reward_trend": trend} if trend else {}), **(extra or {})}, indent=2) + "\n",
        encoding="utf-8",
    )
    if generated:
        paths["attributes"] = out / "attributes.jsonl"
        rows = zip(*generated.values(), strict=True)
        with paths["attributes"].open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(generated.keys(), row, strict=True)), ensure_ascii=False) + "\n")
    if _plot_rewards(log_history, out / "reward_curve.png"):
        paths["reward_curve"] = out / "reward_curve.png"
    _plot_recall(results, out / "recall.png")
    paths["recall"] = out / "recall.png"
    return paths
