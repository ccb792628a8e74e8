"""Vectors as numpy arrays and Arrow columns (the stores' and the recall index's form)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as float32."""
    out = np.asarray(vectors, dtype=np.float32)
    if out.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {out.shape}")
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)


def vector_column(vectors: Sequence[np.ndarray | None]) -> pa.Array:
    """Vectors (or None) as an Arrow list<float32> column (null where None)."""
    lengths = [0 if v is None else len(v) for v in vectors]
    offsets = np.zeros(len(vectors) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    present = [v for v in vectors if v is not None]
    flat = (
        np.concatenate([np.asarray(v, np.float32) for v in present])
        if present
        else np.zeros(0, np.float32)
    )
    mask = pa.array([v is None for v in vectors], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat), mask=mask)


def vector_matrix(column: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(vectors (n, dim) float32, which rows have one of length `dim`) from a list column."""

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    out = np.zeros((n, dim), np.float32)
    if n == 0 or dim == 0:
        return out, np.zeros(n, bool)
    lengths = pc.fill_null(pc.list_value_length(arr), 0).to_numpy(zero_copy_only=False)
    ok = lengths == dim
    if ok.any():
        flat = pc.list_flatten(arr.filter(pa.array(ok))).to_numpy(zero_copy_only=False)
        out[ok] = flat.astype(np.float32, copy=False).reshape(-1, dim)
    return out, ok
