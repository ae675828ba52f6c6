"""Synthetic clustered unit vectors for the index benchmarks, generated chunk by chunk from a seed.

Real CLIP image embeddings are not uniform noise: they share a common direction (random pairs of
photos have cosine similarity around 0.3-0.5), fall into clusters of very uneven size, and vary
within a cluster along a few dozen directions more than along the rest. These vectors do the same:

- 20,000 cluster centres around a shared mean direction (random pairs: cosine ~0.37);
- cluster sizes drawn from a power law (weight of the i-th cluster ~ i^-0.7), spreads uneven;
- within a cluster, noise with a decaying spectrum over 128 random directions (1/i), plus an
  isotropic part (a fifth of the noise energy) over all 512 dimensions;
- a query's nearest stored neighbour has cosine ~0.83 at 200,000 vectors, its tenth ~0.76: close
  ranks, so recall@10 is a fair test.

Any chunk can be regenerated from (seed, stream, chunk number) alone, so a benchmark can write
10,000,000 vectors a chunk at a time, never hold them, and regenerate instead of storing.
"""

from __future__ import annotations

import numpy as np

DIM = 512
CHUNK_ROWS = 50_000
VECTOR_STREAM = 1  # the stored collection
QUERY_STREAM = 2  # held-out queries from the same distribution


class ClusteredVectors:
    def __init__(self, dim: int = DIM, clusters: int = 20_000, seed: int = 0, rank: int = 128,
                 noise: float = 0.9, isotropic_share: float = 0.2, mean_weight: float = 1.3):
        rng = np.random.default_rng([seed, 0])
        self.dim, self.seed, self.rank = dim, seed, rank
        spectrum = (1.0 + np.arange(rank)) ** -1.0
        spectrum *= np.sqrt((1 - isotropic_share) / (spectrum**2).sum())
        rotation = np.linalg.qr(rng.standard_normal((dim, dim)))[0][:rank]
        self.basis = (spectrum[:, None] * rotation).astype(np.float32)  # (rank, dim)
        self.isotropic = np.float32(np.sqrt(isotropic_share / dim))
        mean = rng.standard_normal(dim)
        mean /= np.linalg.norm(mean)
        directions = rng.standard_normal((clusters, dim)) * (1.0 + np.arange(dim)) ** -0.3
        directions = directions @ np.linalg.qr(rng.standard_normal((dim, dim)))[0]
        directions /= np.linalg.norm(directions, axis=1, keepdims=True)
        centres = mean_weight * mean + directions
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        weights = (1.0 + np.arange(clusters)) ** -0.7
        self.weights = rng.permutation(weights / weights.sum())
        self.spread = (noise * rng.uniform(0.5, 1.5, clusters)).astype(np.float32)

    def chunk(self, number: int, rows: int = CHUNK_ROWS, stream: int = VECTOR_STREAM) -> np.ndarray:
        """(rows, dim) float32 unit vectors; the same (number, rows, stream) always gives the same ones."""
        rng = np.random.default_rng([self.seed, stream, number])
        cluster = rng.choice(len(self.centres), rows, p=self.weights)
        x = rng.standard_normal((rows, self.dim), dtype=np.float32)
        x *= self.isotropic
        x += rng.standard_normal((rows, self.rank), dtype=np.float32) @ self.basis
        x *= self.spread[cluster, None]
        x += self.centres[cluster]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x
