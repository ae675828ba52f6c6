"""Classifying image embeddings against prompt centroids, as matrix products over chunks of images.

Two modes, chosen per prompt file:

- multi_label (the first seed's rule): score = pos_sim - neg_sim; matched when score >= threshold
  and pos_sim >= neutral_sim + neutral_margin. A category without negative descriptions has
  neg_sim 0; one without neutral descriptions skips the neutral condition (neutral_sim NULL).
  An image can match several categories or none.
- single_label (the third seed's zero-shot): softmax over the file's categories of
  logit_scale * cos(image, positive centroid); the `top_k` most probable categories whose
  probability reaches the threshold are matched, with their probability and rank.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from clip_assets.centroids import CentroidSet
from clip_assets.prompts import SINGLE_LABEL

DEFAULT_CHUNK_IMAGES = 32_768


class ModelMismatchError(ValueError):
    """Embeddings and centroids come from different models: their similarities mean nothing."""


_LABEL = pa.dictionary(pa.int32(), pa.string())  # repeated strings stay small in memory

CLASSIFICATION_SCHEMA = pa.schema(
    [
        pa.field("batch", _LABEL, nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("category", _LABEL, nullable=False),
        pa.field("mode", _LABEL, nullable=False),
        pa.field("pos_sim", pa.float32()),
        pa.field("neg_sim", pa.float32()),
        pa.field("neutral_sim", pa.float32()),
        pa.field("score", pa.float32()),
        pa.field("probability", pa.float32()),
        pa.field("rank", pa.int16()),
        pa.field("threshold", pa.float64()),
        pa.field("neutral_margin", pa.float64()),
        pa.field("matched", pa.bool_()),
        pa.field("model", _LABEL),
        pa.field("prompt_version", _LABEL),
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


def single_label_groups(centroids: CentroidSet) -> list[np.ndarray]:
    """Category indices of each single_label prompt file: the sets a softmax runs over."""
    groups: dict[str, list[int]] = {}
    for i, (mode, source) in enumerate(zip(centroids.modes, centroids.sources)):
        if mode == SINGLE_LABEL:
            groups.setdefault(source, []).append(i)
    return [np.array(g) for g in groups.values()]


def score_matrices(embeddings: np.ndarray, c: CentroidSet) -> dict[str, np.ndarray]:
    """Every per-(image, category) number of both rules, as (n, C) arrays."""
    if embeddings.shape[1:] != (c.dim,):
        raise ModelMismatchError(
            f"Embedding dimension {embeddings.shape[1:]} does not match centroid dimension {c.dim}."
        )
    n = embeddings.shape[0]
    multi = np.array([mode != SINGLE_LABEL for mode in c.modes])
    pos = embeddings @ c.positive.T
    # 0 where a category has no negatives; single_label categories never use them.
    neg = (embeddings @ c.negative.T) * (c.has_negative & multi)
    neutral = embeddings @ c.neutral.T
    score = pos - neg
    matched = (score >= c.thresholds) & (~c.has_neutral | (pos >= neutral + c.neutral_margins))
    probability = np.full(pos.shape, np.nan, dtype=np.float32)
    rank = np.zeros(pos.shape, dtype=np.int16)
    for group in single_label_groups(c):
        logits = c.logit_scale * pos[:, group]
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        probability[:, group] = p
        order = np.argsort(-p, axis=1, kind="stable")
        ranks = np.empty_like(order)
        ranks[np.arange(n)[:, None], order] = np.arange(1, len(group) + 1)
        rank[:, group] = ranks
        matched[:, group] = (ranks <= c.top_k[group]) & (p >= c.thresholds[group])
    return {"pos": pos, "neg": neg, "neutral": neutral, "score": score, "matched": matched,
            "probability": probability, "rank": rank}


def _repeated(value: str, count: int) -> pa.DictionaryArray:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(count, dtype=np.int32)), pa.array([value]))


def classify_batch(
    batch: str, image_ids: list[str], embeddings: np.ndarray, centroids: CentroidSet
) -> pa.Table:
    """One row per (image, category), images in input order, categories in centroid order."""
    m = score_matrices(embeddings, centroids)
    n, c = m["pos"].shape
    is_single = np.array([mode == SINGLE_LABEL for mode in centroids.modes])
    no_neutral = np.broadcast_to(~centroids.has_neutral | is_single, (n, c)).reshape(-1)
    multi = np.broadcast_to(~is_single, (n, c)).reshape(-1)
    mode_codes = np.tile(is_single.astype(np.int32), n)
    return pa.table(
        {
            "batch": _repeated(batch, n * c),
            "image_id": pa.array(np.repeat(np.asarray(image_ids, dtype=object), c), pa.string()),
            "category": pa.DictionaryArray.from_arrays(
                pa.array(np.tile(np.arange(c, dtype=np.int32), n)), pa.array(centroids.categories)
            ),
            "mode": pa.DictionaryArray.from_arrays(pa.array(mode_codes), pa.array(["multi_label", SINGLE_LABEL])),
            "pos_sim": pa.array(m["pos"].reshape(-1), pa.float32()),
            "neg_sim": pa.array(m["neg"].reshape(-1), pa.float32()),
            "neutral_sim": pa.array(m["neutral"].reshape(-1), pa.float32(), mask=no_neutral),
            "score": pa.array(m["score"].reshape(-1), pa.float32()),
            "probability": pa.array(m["probability"].reshape(-1), pa.float32(), mask=multi),
            "rank": pa.array(m["rank"].reshape(-1), pa.int16(), mask=multi),
            "threshold": pa.array(np.tile(centroids.thresholds, n), pa.float64()),
            "neutral_margin": pa.array(np.tile(centroids.neutral_margins, n), pa.float64()),
            "matched": pa.array(m["matched"].reshape(-1), pa.bool_()),
            "model": _repeated(centroids.model, n * c),
            "prompt_version": _repeated(centroids.prompt_version, n * c),
        },
        schema=CLASSIFICATION_SCHEMA,
    )


def classify_in_chunks(
    batch: str,
    image_ids: list[str],
    embeddings: np.ndarray,
    centroids: CentroidSet,
    chunk_images: int = DEFAULT_CHUNK_IMAGES,
) -> Iterator[pa.Table]:
    """The rows of `classify_batch`, a bounded number of images at a time."""
    for start in range(0, len(image_ids), chunk_images):
        stop = start + chunk_images
        yield classify_batch(batch, image_ids[start:stop], embeddings[start:stop], centroids)
