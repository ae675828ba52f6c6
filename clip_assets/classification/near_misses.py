"""Near misses: the condition an unmatched image failed, and an image as the pages show it.

The rule of clip_assets.classification.rules, read backwards: for an image a category did not match,
which of its conditions failed. The contact sheet of each batch (clip_assets.classification.figures)
and the gallery page (clip_assets.pages.gallery) group near misses by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The condition an unmatched image failed (see clip_assets.classification.rules for the rules).
UNDER_THRESHOLD = "under_threshold"  # score (multi_label) or probability (single_label) < threshold
NOT_ABOVE_NEUTRAL = "not_above_neutral"  # multi_label: score >= threshold, pos_sim < neutral_sim + margin
NOT_IN_TOP_K = "not_in_top_k"  # single_label: probability >= threshold, but top_k categories are more probable
NEAR_MISS_KINDS = (UNDER_THRESHOLD, NOT_ABOVE_NEUTRAL, NOT_IN_TOP_K)

# Compares as classification.score_matrices does: float32 scores against float32 thresholds and
# margins (multi_label), probabilities against the double threshold (single_label).
FAILED_CONDITION_SQL = f"""
CASE WHEN c.matched THEN NULL
     WHEN c.mode = 'single_label' THEN
         CASE WHEN c.probability < c.threshold THEN '{UNDER_THRESHOLD}' ELSE '{NOT_IN_TOP_K}' END
     WHEN c.score < c.threshold::FLOAT THEN '{UNDER_THRESHOLD}'
     WHEN c.neutral_sim IS NOT NULL AND c.pos_sim < c.neutral_sim + c.neutral_margin::FLOAT THEN '{NOT_ABOVE_NEUTRAL}'
     ELSE '{UNDER_THRESHOLD}' END
"""


def failed_conditions(m: dict[str, np.ndarray | None], modes: list[str], thresholds: np.ndarray,
                      neutral_margins: np.ndarray, has_neutral: np.ndarray) -> np.ndarray:
    """FAILED_CONDITION_SQL over `classification.score_matrices`' numbers, as an (n, C) int8 array:
    0 where matched, else 1 + the failed condition's index in NEAR_MISS_KINDS."""
    single = np.array([mode == "single_label" for mode in modes])
    under = 1 + NEAR_MISS_KINDS.index(UNDER_THRESHOLD)
    codes = np.full(m["pos"].shape, under, dtype=np.int8)
    not_above = (m["score"] >= thresholds.astype(np.float32)) & (
        m["pos"] < m["neutral"] + neutral_margins.astype(np.float32)) & has_neutral
    codes[not_above & ~single] = 1 + NEAR_MISS_KINDS.index(NOT_ABOVE_NEUTRAL)
    if single.any():
        in_reach = m["probability"][:, single] >= thresholds[single]
        codes[:, single] = np.where(in_reach, 1 + NEAR_MISS_KINDS.index(NOT_IN_TOP_K), under)
    codes[m["matched"]] = 0
    return codes


@dataclass(frozen=True)
class GalleryImage:
    image_id: str
    path: str
    batch: str
    score: float  # what the threshold applies to: the score, or the probability for single_label
    matched: bool
    failed: str | None = None  # for a near miss, the condition it failed (one of NEAR_MISS_KINDS); DUPLICATE on the duplicates page
    above_neutral: float | None = None  # pos_sim - neutral_sim, where the category has neutral descriptions
