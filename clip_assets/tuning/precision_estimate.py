"""Precision and recall a person can quote, per category, from the estimate queue's labels alone.

The estimate queue (clip_assets.tuning.review_queues) shows a uniform random sample of a category's
matches and of its non-matches, as the rule or adapter decided them (`model_matched`). So:

- precision = the share of labelled matches a person said yes to; a Wilson score interval (Wilson,
  1927) at the confidence asked (95% by default) around it;
- recall = TP / (TP + FN), estimated as N_m * p / (N_m * p + N_n * q), with N_m and N_n the category's
  matches and non-matches, p the share of yes among labelled matches and q among labelled
  non-matches. Its interval combines a Wilson interval for p and one for q, each at the square root
  of the confidence (97.47% for 95%): recall rises with p and falls with q, so when both lie in
  their intervals, which happens with at least the confidence asked (the two samples are
  independent), recall lies between the two ends computed from them.

Only `yes` and `no` verdicts of the estimate queue count, the latest of each image and category that
is not undone: labels of the improve queue (chosen for being uncertain, so not a random sample) and
imported ones never do, and a skipped image is left out. What is measured is the decision of the
rule or adapter, not the tags after a person's corrections. `more_labels_to_halve_*` says roughly how
many more labels of the estimate queue would halve an interval's width, at the same shares: about
three times as many as so far, as a width shrinks with the square root of the labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import pyarrow as pa

from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import image_id_for
from clip_assets.storage.warehouse import connect
from clip_assets.storage.warehouse import exists as warehouse_exists
from clip_assets.tuning.review_labels import ESTIMATE, NO, YES, current_verdicts

CONFIDENCE = 0.95


def z_score(confidence: float) -> float:
    """The standard normal quantile of a two-sided interval at `confidence`."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: float, n: float, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion: `successes` of `n`; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    z = z_score(confidence)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _recall(matches: int, non_matches: int, p: float, q: float) -> float | None:
    found, missed = matches * p, non_matches * q
    return found / (found + missed) if found + missed > 0 else None


def recall_interval(
    matches: int,
    non_matches: int,
    yes_matches: int,
    labelled_matches: int,
    yes_non_matches: int,
    labelled_non_matches: int,
    confidence: float = CONFIDENCE,
) -> tuple[float, float]:
    """The recall interval from a Wilson interval for each side at sqrt(confidence) (see the module)."""
    side = math.sqrt(confidence)
    p_lo, p_hi = wilson_interval(yes_matches, labelled_matches, side)
    q_lo, q_hi = wilson_interval(yes_non_matches, labelled_non_matches, side)
    low = _recall(matches, non_matches, p_lo, q_hi)
    high = _recall(matches, non_matches, p_hi, q_lo)
    return (0.0 if low is None else low), (1.0 if high is None else high)


def _more_to_halve(width, labelled: int) -> int | None:
    """The fewest more labels m with width(m) at most half of width(0); None without labels."""
    if labelled == 0:
        return None
    target = width(0) / 2
    high = max(1, labelled)
    while width(high) > target:
        high *= 2
        if high > 1_000_000_000:
            return None
    low = 0
    while high - low > 1:  # width(low) > target >= width(high)
        middle = (low + high) // 2
        low, high = (low, middle) if width(middle) <= target else (middle, high)
    return high


@dataclass(frozen=True)
class CategoryEstimate:
    """One category's precision and recall estimated from the estimate queue's labels."""

    category: str
    matches: int  # images the rule or adapter puts in the category
    non_matches: int
    labelled_matches: int  # of them, labelled yes or no in the estimate queue
    yes_matches: int
    labelled_non_matches: int
    yes_non_matches: int
    confidence: float
    precision: float | None  # None before any match is labelled
    precision_low: float
    precision_high: float
    recall: float | None  # None before the labels show any image of the category
    recall_low: float
    recall_high: float
    more_labels_to_halve_precision: int | None  # more labelled matches
    more_labels_to_halve_recall: int | None  # more labels, matches and non-matches in today's proportion

    def as_row(self) -> dict:
        """The estimate as a table row (rounded), as the Dagster metadata and the review page show it."""

        def r(x):
            return None if x is None else round(x, 4)

        return {
            "category": self.category,
            "precision": r(self.precision),
            "precision_low": r(self.precision_low),
            "precision_high": r(self.precision_high),
            "recall": r(self.recall),
            "recall_low": r(self.recall_low),
            "recall_high": r(self.recall_high),
            "labelled_matches": self.labelled_matches,
            "labelled_non_matches": self.labelled_non_matches,
            "matches": self.matches,
            "non_matches": self.non_matches,
            "more_labels_to_halve_precision": self.more_labels_to_halve_precision,
            "more_labels_to_halve_recall": self.more_labels_to_halve_recall,
        }


ROW_COLUMNS = {
    "category": "string",
    "precision": "float",
    "precision_low": "float",
    "precision_high": "float",
    "recall": "float",
    "recall_low": "float",
    "recall_high": "float",
    "labelled_matches": "int",
    "labelled_non_matches": "int",
    "matches": "int",
    "non_matches": "int",
    "more_labels_to_halve_precision": "int",
    "more_labels_to_halve_recall": "int",
}


def estimate_from_counts(
    category: str,
    matches: int,
    non_matches: int,
    yes_matches: int,
    labelled_matches: int,
    yes_non_matches: int,
    labelled_non_matches: int,
    confidence: float = CONFIDENCE,
) -> CategoryEstimate:
    """The estimate from the counts of a stratified sample: the category's matches and non-matches,
    and how many of each were labelled, and said yes to."""
    precision = yes_matches / labelled_matches if labelled_matches else None
    p_lo, p_hi = wilson_interval(yes_matches, labelled_matches, confidence)
    p = yes_matches / labelled_matches if labelled_matches else 0.0
    q = yes_non_matches / labelled_non_matches if labelled_non_matches else 0.0
    recall = (
        _recall(matches, non_matches, p, q) if labelled_matches and (labelled_non_matches or not non_matches) else None
    )
    r_lo, r_hi = recall_interval(
        matches, non_matches, yes_matches, labelled_matches, yes_non_matches, labelled_non_matches, confidence
    )

    def precision_width(more: int) -> float:
        lo, hi = wilson_interval(p * (labelled_matches + more), labelled_matches + more, confidence)
        return hi - lo

    def recall_width(more: int) -> float:
        scale = 1 + more / (labelled_matches + labelled_non_matches)
        n_m, n_n = labelled_matches * scale, labelled_non_matches * scale
        lo, hi = recall_interval(matches, non_matches, p * n_m, n_m, q * n_n, n_n, confidence)
        return hi - lo

    return CategoryEstimate(
        category,
        matches,
        non_matches,
        labelled_matches,
        yes_matches,
        labelled_non_matches,
        yes_non_matches,
        confidence,
        precision,
        p_lo,
        p_hi,
        recall,
        r_lo,
        r_hi,
        _more_to_halve(precision_width, labelled_matches),
        _more_to_halve(
            recall_width, labelled_matches and labelled_non_matches and labelled_matches + labelled_non_matches
        ),
    )


def estimate_labels(layout: DataLayout) -> pa.Table:
    """The estimate queue's current yes/no labels: image_id (a hash of the path), category, yes."""
    current = [
        r for r in current_verdicts(layout.review_labels_path, queues=[ESTIMATE]).values() if r.verdict in (YES, NO)
    ]
    return pa.table(
        {
            "image_id": pa.array([image_id_for(r.path) for r in current], pa.string()),
            "category": pa.array([r.category for r in current], pa.string()),
            "yes": pa.array([r.verdict == YES for r in current], pa.bool_()),
        }
    )


def estimate_precision(
    layout: DataLayout, categories: list[str] | None = None, confidence: float = CONFIDENCE
) -> list[CategoryEstimate]:
    """Per category (in the prompt files' order; `categories`: those only), precision and recall of
    the stored decisions estimated from the estimate queue's labels, with their intervals. Labels of
    an image or category no longer classified are left out (the store keeps them)."""
    if not warehouse_exists(layout.duckdb_path):
        return []
    decided = "coalesce(c.model_matched, c.matched)"
    with connect(layout.duckdb_path, read_only=True) as con:
        con.register("labels", estimate_labels(layout))
        sides = con.execute(f"""
            SELECT c.category, count(*) FILTER (WHERE {decided}), count(*) FILTER (WHERE NOT {decided})
            FROM image_classifications c JOIN prompt_categories p USING (category)
            GROUP BY c.category, p.position ORDER BY p.position""").fetchall()
        labelled = {
            row[0]: row[1:]
            for row in con.execute(f"""
                SELECT l.category, count(*) FILTER (WHERE {decided}), count(*) FILTER (WHERE {decided} AND l.yes),
                       count(*) FILTER (WHERE NOT {decided}), count(*) FILTER (WHERE NOT {decided} AND l.yes)
                FROM labels l JOIN image_classifications c USING (image_id, category)
                GROUP BY l.category""").fetchall()
        }
    wanted = None if categories is None else set(categories)
    estimates = []
    for category, matches, non_matches in sides:
        if wanted is not None and category not in wanted:
            continue
        lm, ym, ln, yn = labelled.get(category, (0, 0, 0, 0))
        estimates.append(estimate_from_counts(category, matches, non_matches, ym, lm, yn, ln, confidence))
    return estimates
