"""Embedding vectors made for tests: random unit vectors written as a batch's embeddings file, and
how closely two ways of embedding the same images agree."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from clip_assets.config.layout import DataLayout
from clip_assets.embedding.engine import embeddings_schema
from clip_assets.storage.atomic_files import write_parquet_atomically


def planted(rows: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def write_vectors(layout: DataLayout, batch: str, vectors: np.ndarray) -> list[str]:
    ids = [f"{batch}-{i:06d}" for i in range(len(vectors))]
    write_parquet_atomically(pa.table({
        "image_id": ids,
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]),
        "model": ["test/planted"] * len(ids), "precision": ["float32"] * len(ids), "size": [0] * len(ids), "mtime": [0.0] * len(ids), "fingerprint": ids,
        "perceptual_hash": [None] * len(ids),
    }, schema=embeddings_schema(vectors.shape[1])), layout.embeddings_path(batch))
    return ids


def agreement(out) -> tuple[float, float, float]:
    """(lowest cosine of an image between the two paths, median and highest between different images)."""
    pillow, tensor = out["pillow"][0], out["tensor"][0]
    ids = sorted(pillow)
    a, b = np.stack([pillow[i] for i in ids]), np.stack([tensor[i] for i in ids])
    same = (a * b).sum(1)
    cross = (a @ a.T)[~np.eye(len(ids), dtype=bool)]
    return float(same.min()), float(np.median(cross)), float(cross.max())
