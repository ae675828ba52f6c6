"""Prompt centroids: per category and kind, the normalised mean of the L2-normalised text embeddings.

This is the first seed's recipe (mean of the description embeddings, normalised again). The result
carries everything classification needs, so classification never re-reads the prompt files.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clip_assets.classification.prompts import Category

if TYPE_CHECKING:  # torch loads with the model that encodes the prompts, not with the centroids' readers
    from clip_assets.model.clip_model import ClipModel

KINDS = ("positive", "negative", "neutral")


def normalised_mean(embeddings: np.ndarray) -> np.ndarray:
    mean = embeddings.mean(axis=0)
    return mean / np.linalg.norm(mean)


def description_hash(descriptions: tuple[str, ...]) -> str:
    return hashlib.sha256("\n".join(descriptions).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class CentroidSet:
    """Centroids of every category, as matrices aligned on `categories`.

    `negative`/`neutral` rows are zero where a category has no such descriptions; the `has_*` masks
    say which rows are real.
    """

    categories: list[str]
    sources: list[str]
    thresholds: np.ndarray  # (C,)
    neutral_margins: np.ndarray  # (C,)
    positive: np.ndarray  # (C, d)
    negative: np.ndarray  # (C, d)
    neutral: np.ndarray  # (C, d)
    has_negative: np.ndarray  # (C,) bool
    has_neutral: np.ndarray  # (C,) bool
    modes: list[str]  # per category: multi_label or single_label
    top_k: np.ndarray  # (C,) int, single_label only
    logit_scale: float
    prompt_counts: dict[tuple[str, str], int]
    prompt_hashes: dict[tuple[str, str], str]
    model: str
    prompt_version: str

    @property
    def dim(self) -> int:
        return self.positive.shape[1]


def compute_centroids(categories: list[Category], clip: ClipModel, prompt_version: str) -> CentroidSet:
    """Encode every description once (shared ones are not encoded twice) and average per set."""
    texts = sorted({t for c in categories for kind in KINDS for t in getattr(c, kind)})
    vectors = clip.encode_texts(texts).numpy()
    row_of = {t: i for i, t in enumerate(texts)}
    dim = clip.embed_dim
    n = len(categories)
    mats = {kind: np.zeros((n, dim), dtype=np.float32) for kind in KINDS}
    has = {kind: np.zeros(n, dtype=bool) for kind in KINDS}
    counts: dict[tuple[str, str], int] = {}
    hashes: dict[tuple[str, str], str] = {}
    for i, cat in enumerate(categories):
        for kind in KINDS:
            descriptions = getattr(cat, kind)
            if descriptions:
                mats[kind][i] = normalised_mean(vectors[[row_of[t] for t in descriptions]])
                has[kind][i] = True
                counts[(cat.name, kind)] = len(descriptions)
                hashes[(cat.name, kind)] = description_hash(descriptions)
    return CentroidSet(
        categories=[c.name for c in categories],
        sources=[c.source for c in categories],
        thresholds=np.array([c.threshold for c in categories], dtype=np.float64),
        neutral_margins=np.array([c.neutral_margin for c in categories], dtype=np.float64),
        positive=mats["positive"],
        negative=mats["negative"],
        neutral=mats["neutral"],
        has_negative=has["negative"],
        has_neutral=has["neutral"],
        modes=[c.mode for c in categories],
        top_k=np.array([c.top_k for c in categories], dtype=np.int64),
        logit_scale=clip.logit_scale,
        prompt_counts=counts,
        prompt_hashes=hashes,
        model=clip.identity,
        prompt_version=prompt_version,
    )
