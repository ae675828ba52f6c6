"""Prompt centroids of any number of categories without a prompt file or a text encoder: random unit
vectors stored in the project's DuckDB as `prompt_centroids` would store them, for the steps after it
(with clip_assets_tests.support.synthetic_embeddings for the batches)."""

from __future__ import annotations

import numpy as np

from clip_assets.classification.centroids import KINDS, CentroidSet
from clip_assets.config.layout import DataLayout
from clip_assets.storage.warehouse import replace_centroids


def _unit(rng: np.random.Generator, rows: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((rows, dim), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def synthetic_centroids(categories: int, dim: int, model: str, seed: int = 0) -> CentroidSet:
    """`categories` multi_label categories named category-0000..., each with a positive, a negative and
    a shared neutral centroid."""
    rng = np.random.default_rng(seed)
    names = [f"category-{i:04d}" for i in range(categories)]
    return CentroidSet(
        categories=names,
        sources=["synthetic.toml"] * categories,
        thresholds=rng.uniform(-0.05, 0.05, categories),
        neutral_margins=np.zeros(categories),
        positive=_unit(rng, categories, dim),
        negative=_unit(rng, categories, dim),
        neutral=np.repeat(_unit(rng, 1, dim), categories, axis=0),
        has_negative=np.ones(categories, dtype=bool),
        has_neutral=np.ones(categories, dtype=bool),
        modes=["multi_label"] * categories,
        top_k=np.ones(categories, dtype=np.int64),
        logit_scale=100.0,
        prompt_counts={(n, kind): 1 for n in names for kind in KINDS},
        prompt_hashes={(n, kind): f"{kind}-{n}" for n in names for kind in KINDS},
        model=model,
        prompt_version=f"synthetic-{categories}-{seed}",
    )


def store_synthetic_centroids(layout: DataLayout, categories: int, dim: int, model: str, seed: int = 0) -> CentroidSet:
    centroids = synthetic_centroids(categories, dim, model, seed)
    replace_centroids(layout.duckdb_path, centroids)
    return centroids
