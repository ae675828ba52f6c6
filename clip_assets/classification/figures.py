"""Figures about one batch's classifications, gathered while its rows stream to DuckDB.

Each record batch of scores updates running counts, fine histograms and bounded best-k lists, so a
batch of any size is summarised in memory that does not grow with it: matches per category, the
distribution of the score each category is matched on (as the tests' SQL oracle
`clip_assets_tests.support.warehouse_oracles.score_histograms` gives it), the top images (as its
`top_images`) and the contact sheet's rows (as `gallery.gallery_rows`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pyarrow as pa

from clip_assets.classification.centroids import CentroidSet
from clip_assets.classification.near_misses import NEAR_MISS_KINDS, GalleryImage, failed_conditions
from clip_assets.classification.prompts import SINGLE_LABEL

# The score distribution is counted in fine bins over the range a value can take, then folded into
# the plot's bins between the batch's lowest and highest value once every row was seen.
FINE_BINS = 1 << 14
SCORE_RANGE = (-2.0, 2.0)  # pos_sim - neg_sim of unit vectors
PROBABILITY_RANGE = (0.0, 1.0)
MATCHED = 0  # failed_conditions' code of a matched image


class BestImages:
    """Per (category, group), the k images with the highest value, highest first, ties by image_id.

    Memory holds at most k entries per key (plus one record batch's candidates), whatever the
    number of images offered.
    """

    def __init__(self, k_per_group: dict[int, int]):
        self.k_per_group = k_per_group
        self.best: dict[tuple[int, int], list[tuple[float, str, tuple]]] = defaultdict(list)

    def offer(self, values: np.ndarray, image_ids: pa.Array, groups: np.ndarray | None = None,
              extras: tuple[np.ndarray, ...] = ()) -> None:
        """values, groups, extras: (n, C) arrays; groups None puts every image in group 0."""
        n = values.shape[0]
        candidates: dict[tuple[int, int], list] = defaultdict(list)
        for group, k in self.k_per_group.items():
            in_group = np.isfinite(values) if groups is None else (groups == group) & np.isfinite(values)
            masked = np.where(in_group, values, -np.inf)
            if n > k:  # the k-th highest of each column: everything at or above it is a candidate (ties kept)
                kth = np.partition(masked, n - k, axis=0)[n - k]
                in_group &= masked >= kth
            rows, cols = np.nonzero(in_group)
            if not len(rows):
                continue
            ids = image_ids.take(pa.array(rows)).to_pylist()
            extra_values = [e[rows, cols].tolist() for e in extras]
            for j, (row, col) in enumerate(zip(rows.tolist(), cols.tolist())):
                candidates[(col, group)].append(
                    (-float(values[row, col]), ids[j], tuple(e[j] for e in extra_values)))
        for key, entries in candidates.items():
            self.best[key] = sorted(self.best[key] + entries)[: self.k_per_group[key[1]]]

    def entries(self, category: int, group: int = 0) -> list[tuple[float, str, tuple]]:
        """(value, image_id, extras) of the key's best images, highest value first."""
        return [(-v, i, e) for v, i, e in self.best.get((category, group), [])]

    def image_ids(self) -> set[str]:
        return {i for entries in self.best.values() for _, i, _ in entries}


class ClassificationFigures:
    """Running figures of one batch, fed each record batch's `score_matrices` by `add`."""

    def __init__(self, centroids: CentroidSet, top_per_category: int = 3, matched_per_category: int = 3,
                 near_misses: int = 2, bins: int = 30):
        self.centroids = centroids
        self.bins = bins
        c = len(centroids.categories)
        self.images = 0
        self._matches = np.zeros(c, dtype=np.int64)
        self._single = np.array([mode == SINGLE_LABEL for mode in centroids.modes], dtype=bool)
        self._range_low = np.where(self._single, PROBABILITY_RANGE[0], SCORE_RANGE[0])
        self._range_width = np.where(self._single, PROBABILITY_RANGE[1] - PROBABILITY_RANGE[0],
                                     SCORE_RANGE[1] - SCORE_RANGE[0])
        self._low = np.full(c, np.inf, dtype=np.float32)
        self._high = np.full(c, -np.inf, dtype=np.float32)
        self._fine = np.zeros(c * FINE_BINS, dtype=np.int64)
        self._top = BestImages({0: top_per_category})
        self._gallery = BestImages({MATCHED: matched_per_category,
                                    **{1 + k: near_misses for k in range(len(NEAR_MISS_KINDS))}})

    def _values(self, m: dict[str, np.ndarray | None]) -> np.ndarray:
        """What a category is matched on: the probability (single_label) or the score."""
        if m["probability"] is None:
            return m["score"]
        return np.where(self._single, m["probability"], m["score"])

    def add(self, image_ids: pa.Array, m: dict[str, np.ndarray | None]) -> None:
        c = self.centroids
        values = self._values(m)
        self.images += values.shape[0]
        self._matches += m["matched"].sum(axis=0)
        finite = np.isfinite(values)
        self._low = np.minimum(self._low, np.where(finite, values, np.inf).min(axis=0))
        self._high = np.maximum(self._high, np.where(finite, values, -np.inf).max(axis=0))
        fine = np.floor((values - self._range_low) / self._range_width * FINE_BINS)
        fine = np.clip(np.nan_to_num(fine), 0, FINE_BINS - 1).astype(np.int64) + np.arange(values.shape[1]) * FINE_BINS
        self._fine += np.bincount(fine[finite], minlength=self._fine.size)
        self._top.offer(values, image_ids, extras=(m["matched"],))
        codes = failed_conditions(m, c.modes, c.thresholds, c.neutral_margins, c.has_neutral)
        has_neutral = c.has_neutral & ~self._single
        above_neutral = np.where(has_neutral, m["pos"] - m["neutral"], np.nan)
        self._gallery.offer(values, image_ids, codes, extras=(above_neutral,))

    def matches_per_category(self) -> dict[str, int]:
        return dict(zip(self.centroids.categories, self._matches.tolist()))

    def histograms(self) -> dict[str, tuple[float, float, list[int], float, str]]:
        """Per category: (low, high, counts per bin, threshold, mode), bins spread from low to high."""
        if not self.images:
            return {}
        out = {}
        fine = self._fine.reshape(len(self.centroids.categories), FINE_BINS)
        centres = (np.arange(FINE_BINS) + 0.5) / FINE_BINS
        for j, name in enumerate(self.centroids.categories):
            low, high = float(self._low[j]), float(self._high[j])
            if not np.isfinite(low):
                continue
            x = self._range_low[j] + centres * self._range_width[j]
            b = np.clip(np.floor((x - low) / max(high - low, 1e-9) * self.bins), 0, self.bins - 1).astype(np.int64)
            counts = np.bincount(b, weights=fine[j], minlength=self.bins).astype(np.int64)
            out[name] = (low, high, counts.tolist(), float(self.centroids.thresholds[j]), self.centroids.modes[j])
        return out

    def image_ids(self) -> set[str]:
        """Every image some figure names: the paths to look up."""
        return self._top.image_ids() | self._gallery.image_ids()

    def top_images(self) -> list[tuple[str, str, float, bool]]:
        """(category, image_id, value, matched) of each category's best images, as the tests' SQL oracle top_images."""
        return [(name, image_id, value, bool(matched))
                for j, name in enumerate(self.centroids.categories)
                for value, image_id, (matched,) in self._top.entries(j)]

    def gallery_rows(self, paths: dict[str, str], batch: str) -> dict[str, list[GalleryImage]]:
        """Per category (prompt order): best matched images, then the best near misses of each failed
        condition, as gallery.gallery_rows gives them for one batch; images without a path are left out."""
        out: dict[str, list[GalleryImage]] = {}
        order = sorted(range(1, 1 + len(NEAR_MISS_KINDS)), key=lambda code: NEAR_MISS_KINDS[code - 1])
        for j, name in enumerate(self.centroids.categories):
            images = []
            for code in [MATCHED, *order]:
                for value, image_id, (above_neutral,) in self._gallery.entries(j, code):
                    if image_id in paths:
                        images.append(GalleryImage(
                            image_id, paths[image_id], batch, value, code == MATCHED,
                            None if code == MATCHED else NEAR_MISS_KINDS[code - 1],
                            None if np.isnan(above_neutral) else above_neutral))
            out[name] = images
        return out
