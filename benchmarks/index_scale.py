"""Index scale: build time, memory and search time of the deployment index at 100k and 1M vectors.

    python -m benchmarks.index_scale                # 100k and 1M x 256, writes docs/results/index_scale.md (+ .json)
    python -m benchmarks.index_scale --quick              # 20k vectors, nothing written (checks the script)
    python -m benchmarks.index_scale --sizes 100000 --dim 1536 --out docs/index_scale_1536

Encoding a million listings would take days on this machine, so the vectors are synthetic but shaped
like a catalog's: families of ``--family_size`` near-duplicate products around a random direction, each
product listed ``--listings_per_product`` times as its direction plus noise, so that a listing's nearest
neighbours are its product's other listings, then its family's (the hard negatives), then noise; the
queries are further listings of indexed products. Each index type that ``afmrl.retrieval.index`` offers a deployment
(flat; IVF; IVF-PQ with exact re-ranking from the memory-mapped vectors) is built the way
``recipes/index_catalog.py`` builds it -- ``afmrl.retrieval.ProductGallery.from_embeddings`` tuned to recall
0.98 of the exact top-10 -- in its own process, which reports: build time (training, adding, tuning),
peak anonymous memory (sampled every 20 ms; a memory-mapped file's pages are the page cache's, not the
process's), the index's bytes in memory, search time per query (batches of 256, and one at a time),
recall of the exact top-10 and instance Recall@1 on the queries. The 100M arithmetic is in the doc.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_vectors(
    path: Path,
    n: int,
    dim: int,
    per_product: int,
    queries: int,
    noise: float,
    *,
    family_size: int,
    product_spread: float,
    seed: int = 0,
):
    """Catalog-shaped unit vectors in a .npy at ``path`` (written in chunks) + held-out queries and their products."""
    rng = np.random.default_rng(seed)
    products = -(-n // per_product)

    def around(centre, spread):  # unit vectors at about cos 1/sqrt(1 + spread^2) from their centre
        x = centre + spread * rng.standard_normal(centre.shape).astype(np.float32) / np.sqrt(dim)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    families = around(np.zeros((-(-products // family_size), dim), np.float32), 1.0)
    centres = around(families[np.arange(products) // family_size], product_spread)

    def listings(product_of):
        return around(centres[product_of], noise)

    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, 65_536):
        out[start : start + 65_536] = listings(np.arange(start, min(start + 65_536, n)) // per_product)
    out.flush()
    query_products = rng.choice(products, queries, replace=False)
    np.save(path.with_name("queries.npy"), listings(query_products))
    np.save(path.with_name("query_products.npy"), query_products)


def anon_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class PeakMemory:
    """Peak anonymous resident memory above the start, sampled in a thread."""

    def __init__(self):
        self.start = self.peak = anon_kib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, anon_kib())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (max(self.peak, anon_kib()) - self.start) / 2**20  # GiB


def run_case(data: Path, kind: str, per_product: int) -> dict:
    """One index type over the vectors in ``data`` (run in a fresh process: its memory is its own)."""
    import faiss

    from afmrl.retrieval.gallery import ProductGallery
    from afmrl.retrieval.tuning import exact_top_k

    vectors = np.load(data / "vectors.npy", mmap_mode="r")
    queries = np.load(data / "queries.npy")
    n = len(vectors)
    truth_file = data / "truth.npy"
    if not truth_file.is_file():
        np.save(truth_file, exact_top_k(queries, vectors, 10))
    truth = np.load(truth_file)
    ids = [str(i) for i in range(n)]
    products = [str(i // per_product) for i in range(n)]
    memory = PeakMemory()
    started = time.perf_counter()
    # flat and IVF hold the float vectors in memory (read from the file); IVF-PQ keeps the memmap for re-ranking
    base = vectors if kind == "ivfpq" else np.asarray(vectors)
    gallery = ProductGallery.from_embeddings(base, ids, products, index_type=kind, recall_k=10, target_recall=0.98)
    build_s = time.perf_counter() - started
    build_gib = memory.stop()
    index_bytes = len(faiss.serialize_index(gallery.index.index))
    gallery.search(queries[:256], 10)  # warm
    started = time.perf_counter()
    scores, rows = gallery.search(queries, 10)
    batch_ms = 1000 * (time.perf_counter() - started) / len(queries)
    started = time.perf_counter()
    for q in queries[:100]:
        gallery.search(q[None], 10)
    single_ms = 1000 * (time.perf_counter() - started) / 100
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth, strict=True)]))
    query_products = np.load(data / "query_products.npy")
    r_at_1 = float(np.mean(rows[:, 0] // per_product == query_products))
    return {
        "kind": kind,
        "n": n,
        "dim": int(vectors.shape[1]),
        "build_s": build_s,
        "build_peak_gib": build_gib,
        "index_mib": index_bytes / 2**20,
        "vectors_on_disk_mib": (data / "vectors.npy").stat().st_size / 2**20,
        "search_ms_per_query_batched": batch_ms,
        "search_ms_single": single_ms,
        "recall_at_10_of_exact": recall,
        "instance_recall_at_1": r_at_1,
        "params": {k: v for k, v in gallery.index.params.items() if k != "tuning"},
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivf", "ivfpq"])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--listings_per_product", type=int, default=4)
    parser.add_argument(
        "--noise", type=float, default=1.2, help="Listing = product + noise (per-dim std noise / sqrt(dim))."
    )
    parser.add_argument("--family_size", type=int, default=8, help="Products per family of near-duplicates.")
    parser.add_argument("--product_spread", type=float, default=0.5, help="Product = family + spread (as --noise).")
    parser.add_argument("--out", default="docs/results/index_scale", help="Writes OUT.md and OUT.json.")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", nargs=3, metavar=("DATA", "KIND", "PER_PRODUCT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(Path(args.case[0]), args.case[1], int(args.case[2]))))
        return
    if args.quick:
        args.sizes, args.queries = [20_000], 200
    from benchmarks._machine import describe_machine

    machine, results = describe_machine(), []
    with tempfile.TemporaryDirectory(prefix="index_scale_") as tmp:
        for n in args.sizes:
            data = Path(tmp) / str(n)
            data.mkdir()
            started = time.perf_counter()
            make_vectors(
                data / "vectors.npy",
                n,
                args.dim,
                args.listings_per_product,
                args.queries,
                args.noise,
                family_size=args.family_size,
                product_spread=args.product_spread,
            )
            print(
                f"[index_scale] {n} x {args.dim} vectors written in {time.perf_counter() - started:.0f} s", flush=True
            )
            for kind in args.kinds:
                proc = subprocess.run(
                    [sys.executable, __file__, "--case", str(data), kind, str(args.listings_per_product)],
                    capture_output=True,
                    text=True,
                )
                if proc.returncode != 0:
                    raise SystemExit(f"{kind} at {n}: {proc.stderr[-2000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(result)
                print(
                    f"[index_scale] {n:>9} {kind:<6} build {result['build_s']:7.1f} s, peak "
                    f"{result['build_peak_gib']:.2f} GiB, "
                    f"index {result['index_mib']:8.1f} MiB, {result['search_ms_per_query_batched']:.3f} ms/query "
                    "batched, "
                    f"{result['search_ms_single']:.2f} ms single, recall@10 {result['recall_at_10_of_exact']:.3f}, "
                    f"R@1 {result['instance_recall_at_1']:.3f}",
                    flush=True,
                )
    if args.quick:
        return
    out = ROOT / args.out
    out.with_suffix(".json").write_text(
        json.dumps({"machine": machine, "args": vars(args), "results": results}, indent=1) + "\n"
    )
    rows = "\n".join(
        f"| {r['n']:,} x {r['dim']} | {r['kind']} | {r['build_s']:.1f} | {r['build_peak_gib']:.2f} | "
        f"{r['index_mib']:.1f} | "
        f"{r['search_ms_per_query_batched']:.3f} | {r['search_ms_single']:.2f} | {r['recall_at_10_of_exact']:.3f} | "
        f"{r['instance_recall_at_1']:.3f} | {', '.join(f'{k} {v}' for k, v in r['params'].items() if k != 'tuning')} |"
        for r in results
    )
    command = " ".join(["python -m benchmarks.index_scale", *(sys.argv[1:] if argv is None else argv)])
    out.with_suffix(".md").write_text(f"""# Index scale (generated by `{command}`)

Machine: {machine}.
Synthetic catalog-shaped vectors (families of {args.family_size} products, product spread {args.product_spread},
{args.listings_per_product} listings per
product, noise {args.noise}); {args.queries} held-out
queries. Build = training + adding + tuning to recall 0.98 of the exact top-10 (as recipes/index_catalog.py
builds it); peak = anonymous memory during the build, above the process's start; index = faiss's bytes in
memory (IVF-PQ's float vectors stay in vectors.npy on disk and only the re-ranked candidates are read).
What the figures mean, and the arithmetic for 100M listings: [deploy.md](../deploy.md).

| vectors | index | build s | build peak GiB | index MiB | ms/query (1000 at once) | ms/query (one) | recall@10 of
exact | instance R@1 | parameters |
|---|---|---|---|---|---|---|---|---|---|
{rows}
""")
    print(f"[index_scale] wrote {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
