"""Embedding columns (Arrow fixed-size lists of float32) as numpy matrices, without torch."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def vectors_matrix(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size-list column of float32 as an (n, dim) array, zero-copy where possible."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    values = column.values.slice(column.offset * dim, len(column) * dim)
    return values.to_numpy(zero_copy_only=False).reshape(len(column), dim)
