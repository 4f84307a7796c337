"""Match scale: match groups at 100k and 1M listings, and Milvus Lite beside faiss, on this machine.

    python -m benchmarks.match_scale              # writes docs/results/match_scale.md (+ .json); resumes per case
    python -m benchmarks.match_scale --quick      # 20k vectors, nothing written (checks the script)

Two questions a marketplace asks before it groups its whole catalog. (1) What does ``ProductIndex.match`` cost at
100k and 1M listings: the kNN graph (each listing's top ``--k`` from the index), the groups (scipy's connected
components over the mutual edges above a threshold) and the peak memory of both, with the groups' pairwise and
B-cubed F1 against the known products. (2) What a vector database costs here: Milvus Lite (in-process, a local
file) inserting and searching the same vectors as faiss, exact (FLAT) and approximate (HNSW, IVF_FLAT), with the
approximate indexes' recall of the exact top-10. Encoding a million listings would take days on this machine, so the
vectors are the synthetic catalog-shaped ones of ``benchmarks/index_scale.py`` (families of near-duplicate products,
several listings per product). The threshold is the lowest edge score at which edges are still 95% same-product,
as a calibration on labelled listings would choose it. Each case runs in its own process (its memory is its own)
and is saved in ``--work_dir`` as it finishes, so a stopped run resumes. The 100M arithmetic: docs/deploy.md.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.index_scale import PeakMemory, make_vectors

ROOT = Path(__file__).resolve().parents[1]
MATCH_HEADER = (
    "| listings | index | build s | graph s | groups s | peak GiB | edges | graph recall | threshold | groups | "
    "pairwise F1 | B-cubed F1 | mean F1 |\n" + "|---" * 13 + "|"
)


def threshold_at_precision(scores, same, precision: float = 0.95) -> float:
    """The lowest score whose edges at or above it are still ``precision`` same-product."""
    order = np.argsort(-scores, kind="stable")
    kept = np.cumsum(same[order]) / np.arange(1, len(order) + 1)
    ok = np.flatnonzero(kept >= precision)
    return float(scores[order][ok[-1]]) if len(ok) else float(scores.max())


def match_case(data: Path, index_type: str, per_product: int, k: int) -> dict:
    """Build the index, then the kNN graph and the groups, as ``ProductIndex.match`` does."""
    from afmrl.retrieval.gallery import ProductGallery
    from afmrl.retrieval.tuning import exact_top_k
    from deploy.matching import group_metrics, knn_graph, match_groups

    vectors = np.load(data / "vectors.npy")
    n = len(vectors)
    products = np.arange(n) // per_product
    started = time.perf_counter()
    gallery = ProductGallery.from_embeddings(vectors, [str(i) for i in range(n)], [str(p) for p in products],
                                             index_type=index_type, recall_k=k, target_recall=0.98)  # fmt: skip
    build_s = time.perf_counter() - started
    memory = PeakMemory()
    started = time.perf_counter()
    rows, cols, scores = knn_graph(gallery, k)
    graph_s = time.perf_counter() - started
    limit = threshold_at_precision(scores, products[rows] == products[cols])
    started = time.perf_counter()
    labels, kept = match_groups(rows, cols, scores, n, thresholds=limit, guard="mutual")
    group_s = time.perf_counter() - started
    peak = memory.stop()
    sample = np.random.default_rng(0).choice(n, 1000, replace=False)
    exact = exact_top_k(vectors[sample], vectors, k + 1)[:, 1:]  # a listing's own vector is its first hit
    found = np.full((1000, k), -1)
    position = {int(s): i for i, s in enumerate(sample)}
    counts = np.zeros(1000, dtype=int)
    for r, c in zip(rows, cols, strict=True):
        i = position.get(int(r))
        if i is not None and counts[i] < k:
            found[i, counts[i]], counts[i] = c, counts[i] + 1
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)]))
    metrics = group_metrics(labels, products.astype(str).tolist())
    return {"case": "match", "n": n, "dim": int(vectors.shape[1]), "index": index_type, "k": k,
            "params": {key: v for key, v in gallery.index.params.items() if key != "tuning"},
            "build_s": build_s, "graph_s": graph_s, "group_s": group_s, "peak_gib": peak,
            "edges": int(len(rows)), "kept_edges": int(kept.sum()), "threshold": limit,
            "graph_recall_at_k": recall, "groups": metrics["groups"],
            **{key: metrics[key] for key in ("pairwise_precision", "pairwise_recall", "pairwise_f1", "bcubed_f1",
                                              "mean_f1")}}  # fmt: skip


def store_case(data: Path, backend: str, index_type: str, per_product: int, work: Path) -> dict:
    """Insert the vectors, then search the held-out queries (batches of 256, top 10)."""
    from afmrl.retrieval.tuning import exact_top_k

    vectors, queries = np.load(data / "vectors.npy"), np.load(data / "queries.npy")
    n = len(vectors)
    truth = exact_top_k(queries, vectors, 10)
    if backend == "faiss":
        from afmrl.retrieval.gallery import ProductGallery

        started = time.perf_counter()
        ids, products = [f"L{i}" for i in range(n)], [f"P{i // per_product}" for i in range(n)]
        store = ProductGallery.from_embeddings(vectors, ids, products, index_type=index_type.lower(), recall_k=10,
                                               target_recall=0.98)  # fmt: skip
        insert_s = time.perf_counter() - started
    else:
        from deploy.milvus_store import MilvusGallery

        path = work / f"milvus-{index_type}-{n}.db"
        store = MilvusGallery.create(str(path), "bench", vectors.shape[1], index_type=index_type)
        rows = [{"listing_id": f"L{i}", "product_id": f"P{i // per_product}", "vector": vectors[i],
                 "category": "bench", "split": "test"} for i in range(n)]  # fmt: skip
        started = time.perf_counter()
        store.add(rows, batch=5000)
        insert_s = time.perf_counter() - started
    store.search(queries[:256], 10)  # warm
    started = time.perf_counter()
    found = np.concatenate([store.search(queries[s : s + 256], 10)[1] for s in range(0, len(queries), 256)])
    search_s = time.perf_counter() - started
    if backend == "milvus":
        found = np.asarray([[-1 if r < 0 else r for r in row] for row in found])  # row keys = positions here
        store.client.close()
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))
    return {"case": "store", "backend": backend, "index": index_type, "n": n, "dim": int(vectors.shape[1]),
            "insert_s": insert_s, "insert_per_s": n / insert_s, "queries": len(queries),
            "queries_per_s": len(queries) / search_s, "recall_at_10_of_exact": recall}  # fmt: skip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--match_index", nargs="+", default=["flat", "hnsw"], help="Index per size, in order.")
    parser.add_argument("--store_size", type=int, default=100_000, help="Vectors for the Milvus/faiss comparison.")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--listings_per_product", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.7, help="Listing = product + noise (as index_scale).")
    parser.add_argument("--family_size", type=int, default=8)
    parser.add_argument("--product_spread", type=float, default=0.5)
    parser.add_argument("--work_dir", default="outputs/match-scale", help="Vectors and one JSON per finished case.")
    parser.add_argument("--out", default="docs/results/match_scale", help="Writes OUT.md and OUT.json.")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        kind, data, *rest = args.case
        if kind == "match":
            result = match_case(Path(data), rest[0], int(rest[1]), int(rest[2]))
        else:
            result = store_case(Path(data), rest[0], rest[1], int(rest[2]), Path(rest[3]))
        print(json.dumps(result))
        return
    if args.quick:
        args.sizes, args.store_size, args.queries, args.work_dir = [20_000], 20_000, 300, "outputs/match-scale-quick"
        args.match_index = ["flat"]
    if len(args.match_index) != len(args.sizes):
        raise SystemExit(f"--match_index needs one index type per size ({len(args.sizes)})")
    from benchmarks._machine import describe_machine

    work = ROOT / args.work_dir
    (work / "cases").mkdir(parents=True, exist_ok=True)

    def data_for(n: int) -> Path:
        data = work / f"vectors-{n}x{args.dim}"
        if not (data / "query_products.npy").is_file():
            data.mkdir(parents=True, exist_ok=True)
            make_vectors(data / "vectors.npy", n, args.dim, args.listings_per_product, args.queries, args.noise,
                         family_size=args.family_size, product_spread=args.product_spread)  # fmt: skip
        return data

    cases = [(f"match-{kind}-{n}", ["match", str(data_for(n)), kind, str(args.listings_per_product), str(args.k)])
             for n, kind in zip(args.sizes, args.match_index, strict=True)]  # fmt: skip
    store = data_for(args.store_size)
    for backend, kind in [("faiss", "flat"), ("faiss", "hnsw"), ("milvus", "FLAT"), ("milvus", "HNSW"),
                          ("milvus", "IVF_FLAT")]:  # fmt: skip
        cases.append((f"store-{backend}-{kind}-{args.store_size}",
                      ["store", str(store), backend, kind, str(args.listings_per_product), str(work)]))  # fmt: skip
    results = []
    for name, case in cases:
        saved = work / "cases" / f"{name}.json"
        if not saved.is_file():
            started, machine = time.time(), describe_machine()  # the load average before the case, not after
            proc = subprocess.run([sys.executable, "-m", "benchmarks.match_scale", "--case", *case], cwd=ROOT,
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0:
                raise SystemExit(f"{name}: {proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            result["machine"] = machine
            saved.write_text(json.dumps(result, indent=1) + "\n")
            print(f"[match_scale] {name} done in {time.time() - started:.0f} s", flush=True)
        results.append(json.loads(saved.read_text()))
        print(f"[match_scale] {name}: {json.dumps({k: v for k, v in results[-1].items() if k != 'machine'})}")
    if args.quick:
        return
    out = ROOT / args.out
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1) + "\n")
    match_rows = "\n".join(
        f"| {r['n']:,} x {r['dim']} | {' '.join([r['index'], *(f'{k} {v}' for k, v in r['params'].items())])} | "
        f"{r['build_s']:.1f} | {r['graph_s']:.1f} | {r['group_s']:.2f} | {r['peak_gib']:.2f} | {r['edges']:,} | "
        f"{r['graph_recall_at_k']:.3f} | {r['threshold']:.3f} | {r['groups']:,} | {r['pairwise_f1']:.3f} | "
        f"{r['bcubed_f1']:.3f} | {r['mean_f1']:.3f} |"
        for r in results
        if r["case"] == "match"
    )
    store_rows = "\n".join(
        f"| {r['backend']} | {r['index']} | {r['insert_s']:.1f} | {r['insert_per_s']:,.0f} | "
        f"{r['queries_per_s']:,.0f} | {r['recall_at_10_of_exact']:.3f} |"
        for r in results
        if r["case"] == "store"
    )
    loads = [re.search(r"load average ([\d.]+)", r["machine"]) for r in results]
    machines = sorted({re.sub(r" \(load average [^)]*\)", "", r["machine"]) for r in results})
    loads = ", ".join(m.group(1) if m else "?" for m in loads)
    command = " ".join(["python -m benchmarks.match_scale", *(sys.argv[1:] if argv is None else argv)])
    out.with_suffix(".md").write_text(f"""# Match scale (generated by `{command}`)

Machine: {"; ".join(machines)}; the cores are shared: load average {loads} recorded with each case (in
table order; cases run one at a time, and the load includes the benchmark's own recent work).
Synthetic catalog-shaped vectors (`benchmarks/index_scale.py`: families of {args.family_size} products, product spread
{args.product_spread}, {args.listings_per_product} listings per product, noise {args.noise}), dim {args.dim}.
What the figures mean, and the arithmetic for 100M listings: [deploy.md](../deploy.md#matching-at-scale).

## Match groups (`ProductIndex.match`: top-{args.k} graph, mutual edges above the threshold, connected components)

Build = the index (tuned to recall 0.98 of the exact top-{args.k}); graph = every listing's top-{args.k} search;
groups = threshold, mutual guard and scipy's connected components; peak = anonymous memory of graph + groups
above the process's start (the vectors and index excluded); graph recall = the graph's recall of the exact
top-{args.k} on 1000 listings; threshold = lowest edge score with 95% same-product edges above it.

{MATCH_HEADER}
{match_rows}

## Milvus Lite beside faiss ({args.store_size:,} vectors, {args.queries} queries in batches of 256, top 10)

Insert = building the faiss index (tuned), or inserting into a Milvus Lite collection with its index (and the
listing id, product id and text fields the backend stores); recall = of the exact top-10. Milvus Lite runs its
engine in a child process, so its memory is not measured here.

| backend | index | insert s | rows/s | queries/s | recall@10 of exact |
|---|---|---|---|---|---|
{store_rows}
""")
    print(f"[match_scale] wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
