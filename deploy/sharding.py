"""Indexing a large catalog in shards: several processes, each resumable, merged into one index.

Annotating and embedding are the slow part of indexing (a generation and an encoder forward per
listing), and both are independent per listing. So the catalog is cut into fixed-size shards of
``shard_size`` rows; under ``accelerate launch`` process r of W takes shards r, r + W, r + 2W, ...
and writes each one, when finished, to ``<output_dir>/shards/NNNNN/`` (its vectors, its attribute
texts, and a stamp of what made them). A killed run loses at most the shards in progress (whose
generations are logged as they go, so even those resume); a rerun with any number of processes
skips every shard whose stamp still matches the catalog rows, encoder and generator, and redoes the
others (a shard's generations log is dropped when it was written with another generator or prompt). The main
process then waits for all shards, copies their vectors into one memory-mapped ``vectors.npy`` and
builds the faiss index from it (``deploy.ProductIndex.from_vectors``).

    accelerate launch --num_processes 4 recipes/index_catalog.py --catalog DIR --encoder ENC --output_dir INDEX
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from afmrl.retrieval.fingerprints import catalog_fingerprint, encoder_fingerprints

SHARDS_DIR = "shards"
STAMP_FILE = "done.json"  # written last: the shard is complete
STARTED_FILE = "started.json"  # what the shard's generations log was written with
GENERATIONS_FILE = "generations.jsonl"


def shard_bounds(n: int, shard_size: int) -> list[tuple[int, int]]:
    if shard_size < 1:
        raise ValueError(f"--shard_size must be >= 1, got {shard_size}")
    return [(start, min(start + shard_size, n)) for start in range(0, n, shard_size)]


def shard_stamp(listings, index_config: dict, encoder_fingerprint: dict, start: int, stop: int) -> dict:
    """What a shard's vectors depend on: its rows, the encoder's weights and how listings are annotated."""
    return {
        "rows": [start, stop],
        "catalog_fingerprint": catalog_fingerprint(listings),
        "encoder_fingerprint": encoder_fingerprint,
        "generator": index_config["generator"],
        "attribute_column": index_config["attribute_column"],
        "generation": index_config["generation"],
    }


def shard_is_done(shard_dir: Path, stamp: dict) -> bool:
    path = shard_dir / STAMP_FILE
    return path.is_file() and json.loads(path.read_text(encoding="utf-8")) == stamp


def planned_shards(listings, index, shard_size: int) -> list[tuple[int, int, int, dict]]:
    """(number, start, stop, stamp) of every shard of ``listings`` as ``index`` (a ``ProductIndex``) makes it."""
    fingerprint = encoder_fingerprints(index.config["encoder"])
    return [
        (number, start, stop, shard_stamp(listings.select(range(start, stop)), index.config, fingerprint, start, stop))
        for number, (start, stop) in enumerate(shard_bounds(len(listings), shard_size))
    ]


def encode_shards(
    listings,
    index,
    output_dir: str | Path,
    *,
    shard_size: int,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 32,
    show_progress: bool | None = None,
) -> list[int]:
    """Annotate and embed this process's shards of ``listings`` with ``index`` (a ``ProductIndex``, whose
    config says how); returns the shards this call computed (those already done are skipped)."""
    computed = []
    for number, start, stop, stamp in planned_shards(listings, index, shard_size):
        shard_dir = Path(output_dir) / SHARDS_DIR / f"{number:05d}"
        if number % world_size != rank or shard_is_done(shard_dir, stamp):
            continue
        shard_dir.mkdir(parents=True, exist_ok=True)
        (shard_dir / STAMP_FILE).unlink(missing_ok=True)
        started = shard_dir / STARTED_FILE
        if started.is_file() and json.loads(started.read_text(encoding="utf-8")) != stamp:
            (shard_dir / GENERATIONS_FILE).unlink(missing_ok=True)  # another generator's or prompt's completions
        started.write_text(json.dumps(stamp), encoding="utf-8")
        shard = listings.select(range(start, stop))
        attributes = index.annotate(
            shard, log_path=shard_dir / GENERATIONS_FILE, batch_size=batch_size, show_progress=show_progress
        )
        vectors = index.embed(shard, attributes, batch_size=batch_size, show_progress=show_progress)
        np.save(shard_dir / "vectors.npy", vectors.astype(np.float32))
        (shard_dir / "attributes.json").write_text(json.dumps(attributes, ensure_ascii=False), encoding="utf-8")
        (shard_dir / STAMP_FILE).write_text(json.dumps(stamp), encoding="utf-8")  # last: the shard is complete
        computed.append(number)
        print(f"[index_catalog] rank {rank}: shard {number} (rows {start}-{stop}) done", flush=True)
    return computed


def merge_shards(
    listings,
    index,
    output_dir: str | Path,
    *,
    shard_size: int,
    poll_seconds: float = 10.0,
    timeout_seconds: float | None = None,
) -> tuple[np.ndarray, list[str | None]]:
    """Wait until every shard carries the stamp this run expects (other processes may still be writing theirs;
    a stamp left by an earlier run with another encoder or generator does not count), then copy the shards'
    vectors into ``<output_dir>/vectors.npy`` (memory-mapped, never all in memory) and return it with the
    attribute texts in row order."""
    plan = planned_shards(listings, index, shard_size)
    dirs = [Path(output_dir) / SHARDS_DIR / f"{number:05d}" for number, *_ in plan]
    waited, reported = time.time(), None
    while missing := [d for d, (*_, stamp) in zip(dirs, plan, strict=True) if not shard_is_done(d, stamp)]:
        if timeout_seconds is not None and time.time() - waited > timeout_seconds:
            raise TimeoutError(
                f"{len(missing)} of {len(dirs)} shards unfinished after {timeout_seconds:.0f} s (first: {missing[0]})"
            )
        if reported is None or time.time() - reported > 300:  # a line every 5 minutes, not every poll
            print(f"[index_catalog] waiting for {len(missing)} of {len(dirs)} shards ...", flush=True)
            reported = time.time()
        time.sleep(poll_seconds)
    dim = np.load(dirs[0] / "vectors.npy", mmap_mode="r").shape[1]
    n = len(listings)
    merged = np.lib.format.open_memmap(Path(output_dir) / "vectors.npy", mode="w+", dtype=np.float32, shape=(n, dim))
    attributes: list[str | None] = []
    for shard_dir, (_, start, stop, _) in zip(dirs, plan, strict=True):
        part = np.load(shard_dir / "vectors.npy", mmap_mode="r")
        if part.shape != (stop - start, dim):
            raise ValueError(
                f"{shard_dir / 'vectors.npy'} holds {part.shape}, expected {(stop - start, dim)}: "
                f"delete {shard_dir} and run again"
            )
        merged[start:stop] = part
        attributes += json.loads((shard_dir / "attributes.json").read_text(encoding="utf-8"))
    merged.flush()
    return np.load(Path(output_dir) / "vectors.npy", mmap_mode="r"), attributes


def remove_shards(output_dir: str | Path) -> None:
    shutil.rmtree(Path(output_dir) / SHARDS_DIR, ignore_errors=True)
