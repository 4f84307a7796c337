"""Embedding matrices as faiss wants them: float32, C-contiguous, finite, L2-normalised, checked by row.

Galleries are built from whatever a caller has -- a numpy array, a torch tensor, a ``np.memmap`` of a
catalog too large for memory -- so the checks run on chunks of rows and an error names the row of the
whole matrix ("embeddings row 4321 has L2 norm 2.0"), never a position inside a chunk.

    x = checked_rows(vectors, 0, 65_536)               # rows 0..65535, checked, float32
    save_vectors(x, Path("index/vectors.npy"))         # written in chunks (nothing to do for its own memmap)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

NORM_TOLERANCE = 1e-3


def as_float32_matrix(x: Any, name: str) -> np.ndarray:
    """A C-contiguous float32 (n, d) copy/view of x, with non-finite rows reported by index."""
    if hasattr(x, "detach"):  # a torch tensor (any dtype/device) without importing torch
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be a 2-D array (n, dim), got shape {x.shape}; use x.reshape(1, -1) for one vector"
        )
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(
            f"{name} has NaN or infinite values in row {int(rows[0])}"
            + (f" (and {len(rows) - 1} more rows)" if len(rows) > 1 else "")
        )
    return x


def checked_rows(x, start: int, stop: int, rows: np.ndarray | None = None, normalize: bool = False) -> np.ndarray:
    """Rows ``start:stop`` of ``x`` (only those in the sorted ``rows`` when given) as checked float32,
    L2-normalised when ``normalize``; errors name the row of ``x``."""
    if rows is not None:
        rows = rows[(rows >= start) & (rows < stop)]
        offsets = rows
        chunk = x[rows]
    else:
        offsets = np.arange(start, stop)
        chunk = x[start:stop]
    try:
        chunk = as_float32_matrix(chunk, "embeddings")
    except ValueError as err:  # the row number of the chunk -> the row of x
        found = re.search(r"in row (\d+)", str(err))
        if found is None:
            raise
        raise ValueError(str(err).replace(found.group(0), f"in row {int(offsets[int(found.group(1))])}")) from None
    norms = np.linalg.norm(chunk, axis=1)
    if normalize:
        if (norms == 0).any():
            raise ValueError(
                f"embeddings row {int(offsets[np.flatnonzero(norms == 0)[0]])} is all zeros and cannot be normalised"
            )
        return np.ascontiguousarray(chunk / norms[:, None], dtype=np.float32)
    off = np.abs(norms - 1.0) > NORM_TOLERANCE
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise ValueError(
            f"embeddings row {int(offsets[row])} has L2 norm {norms[row]:.4f}, expected 1 (inner product is cosine "
            f"only for normalised vectors); {int(off.sum())} rows are off. Pass normalize=True to normalise them."
        )
    return chunk


def save_vectors(vectors: np.ndarray, path: Path) -> None:
    """Write ``vectors`` as a float32 .npy in chunks; nothing to do when they are that file, memory-mapped."""
    if isinstance(vectors, np.memmap) and vectors.filename and Path(vectors.filename).resolve() == path.resolve():
        return
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=vectors.shape)
    for start in range(0, len(vectors), 65_536):
        out[start : start + 65_536] = vectors[start : start + 65_536]
    out.flush()
    del out
