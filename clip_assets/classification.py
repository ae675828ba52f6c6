"""The first seed's multi-label rule, as matrix products over a whole batch.

Per image and category: score = pos_sim - neg_sim, matched when score >= threshold and
pos_sim >= neutral_sim + neutral_margin. A category without negative descriptions has neg_sim 0;
one without neutral descriptions skips the neutral condition (neutral_sim NULL).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from clip_assets.centroids import CentroidSet


class ModelMismatchError(ValueError):
    """Embeddings and centroids come from different models: their similarities mean nothing."""


CLASSIFICATION_SCHEMA = pa.schema(
    [
        pa.field("batch", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("pos_sim", pa.float32()),
        pa.field("neg_sim", pa.float32()),
        pa.field("neutral_sim", pa.float32()),
        pa.field("score", pa.float32()),
        pa.field("threshold", pa.float64()),
        pa.field("neutral_margin", pa.float64()),
        pa.field("matched", pa.bool_()),
        pa.field("model", pa.string()),
        pa.field("prompt_version", pa.string()),
    ]
)


def check_same_model(embedding_models: set[str], centroid_model: str) -> None:
    if embedding_models - {centroid_model}:
        raise ModelMismatchError(
            f"Embeddings were made by {sorted(embedding_models)} but the prompt centroids by "
            f"'{centroid_model}'. Similarities across models are meaningless, so nothing was "
            "classified. Re-materialize image_embeddings (for this batch) or prompt_centroids so "
            "both use the configured model."
        )


def classify_batch(
    batch: str, image_ids: list[str], embeddings: np.ndarray, centroids: CentroidSet
) -> pa.Table:
    """One row per (image, category), images in input order, categories in centroid order."""
    if embeddings.shape[1:] != (centroids.dim,):
        raise ModelMismatchError(
            f"Embedding dimension {embeddings.shape[1:]} does not match centroid dimension {centroids.dim}."
        )
    n, c = embeddings.shape[0], len(centroids.categories)
    pos = embeddings @ centroids.positive.T  # (n, C)
    neg = (embeddings @ centroids.negative.T) * centroids.has_negative  # 0 where no negatives
    neutral = embeddings @ centroids.neutral.T
    score = pos - neg
    neutral_ok = ~centroids.has_neutral | (pos >= neutral + centroids.neutral_margins)
    matched = (score >= centroids.thresholds) & neutral_ok
    neutral_mask = np.broadcast_to(~centroids.has_neutral, (n, c)).reshape(-1)
    return pa.table(
        {
            "batch": pa.array([batch] * (n * c), pa.string()),
            "image_id": pa.array(np.repeat(np.asarray(image_ids, dtype=object), c), pa.string()),
            "category": pa.array(np.tile(np.asarray(centroids.categories, dtype=object), n), pa.string()),
            "pos_sim": pa.array(pos.reshape(-1), pa.float32()),
            "neg_sim": pa.array(neg.reshape(-1), pa.float32()),
            "neutral_sim": pa.array(neutral.reshape(-1), pa.float32(), mask=neutral_mask),
            "score": pa.array(score.reshape(-1), pa.float32()),
            "threshold": pa.array(np.tile(centroids.thresholds, n), pa.float64()),
            "neutral_margin": pa.array(np.tile(centroids.neutral_margins, n), pa.float64()),
            "matched": pa.array(matched.reshape(-1), pa.bool_()),
            "model": pa.array([centroids.model] * (n * c), pa.string()),
            "prompt_version": pa.array([centroids.prompt_version] * (n * c), pa.string()),
        },
        schema=CLASSIFICATION_SCHEMA,
    )
