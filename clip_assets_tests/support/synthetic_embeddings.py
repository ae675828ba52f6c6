"""A batch's manifest and embeddings written in the project's own layout, as if the embedding step had
run, from clustered unit vectors (real embeddings cluster; uniform noise would not) with random
perceptual hashes: benchmarks and tests of the steps after the encoder use it to skip the encoder.

The vectors are written a slice at a time, so a batch of millions never sits in memory whole.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.embedding.engine import embeddings_schema
from clip_assets.ingest.manifest import MANIFEST_SCHEMA, STATUS_OK, image_id_for
from clip_assets.storage.atomic_files import atomic_write


def clustered_unit_vectors(rng: np.random.Generator, count: int, centres: np.ndarray, spread: float) -> np.ndarray:
    """`count` unit vectors, each a random centre plus Gaussian noise of `spread` per unit of norm."""
    dim = centres.shape[1]
    picked = centres[rng.integers(0, len(centres), count)]
    vectors = picked + rng.standard_normal((count, dim), dtype=np.float32) * (spread / np.sqrt(dim))
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def write_synthetic_batch(
    layout: DataLayout,
    batch: str,
    images: int,
    dim: int,
    model: str,
    clusters: int = 100,
    spread: float = 0.6,
    seed: int = 0,
    rows_per_write: int = 65_536,
) -> None:
    """Write `<batch>`'s manifest (every file usable) and embeddings file, `images` rows of `model`."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    schema = embeddings_schema(dim)
    mtime = 1_700_000_000.0
    with atomic_write(layout.manifest_path(batch)) as manifest_tmp, atomic_write(layout.embeddings_path(batch)) as tmp, \
            pq.ParquetWriter(manifest_tmp, MANIFEST_SCHEMA) as manifest, pq.ParquetWriter(tmp, schema) as embeddings:
        for start in range(0, images, rows_per_write):
            n = min(rows_per_write, images - start)
            paths = [f"{batch}/{i // 1000:04d}/img-{i:08d}.jpg" for i in range(start, start + n)]
            ids = pa.array([image_id_for(p) for p in paths], pa.string())
            sizes = pa.array(np.full(n, 40_000, dtype=np.int64))
            mtimes = pa.array(np.full(n, mtime))
            vectors = clustered_unit_vectors(rng, n, centres, spread)
            manifest.write_table(pa.table({
                "image_id": ids, "path": paths, "size": sizes, "mtime": mtimes,
                "status": [STATUS_OK] * n, "error": pa.nulls(n, pa.string()),
            }, schema=MANIFEST_SCHEMA))
            embeddings.write_table(pa.table({
                "image_id": ids,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
                "model": [model] * n, "precision": ["float32"] * n, "size": sizes, "mtime": mtimes,
                "fingerprint": [i + "0000" for i in ids.to_pylist()],
                "perceptual_hash": pa.array(rng.integers(-(2**63), 2**63 - 1, n, dtype=np.int64)),
            }, schema=schema))
