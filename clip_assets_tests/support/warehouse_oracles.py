"""What the classification step's figures are checked against: the same numbers computed in SQL
from the stored classifications (the step gathers them while the rows stream to DuckDB, see
clip_assets.classification.figures). Only tests use them, so they live here, not in the warehouse.
"""

from __future__ import annotations

from pathlib import Path

from clip_assets.storage.warehouse import connect


def top_images(path: Path, batch: str, per_category: int = 3) -> list[tuple[str, str, float, bool]]:
    """(category, image_id, score, matched) of the best-scoring images of each category in a batch."""
    with connect(path, read_only=True) as con:
        return con.execute(
            """
            SELECT c.category, c.image_id, coalesce(c.probability, c.score) AS value, c.matched
            FROM image_classifications c JOIN prompt_categories p USING (category)
            WHERE c.batch = ?
            QUALIFY row_number() OVER (PARTITION BY c.category ORDER BY value DESC) <= ?
            ORDER BY p.position, value DESC
            """,
            [batch, per_category],
        ).fetchall()


def score_histograms(path: Path, batch: str, bins: int = 30) -> dict[str, tuple[float, float, list[int], float, str]]:
    """Per category: (low, high, counts per bin, threshold, mode) of the score it is matched on.

    That is the score for multi_label categories and the probability for single_label ones; the
    binning runs inside DuckDB, so a batch of millions of rows comes back as a few numbers.
    """
    with connect(path, read_only=True) as con:
        rows = con.execute(
            """
            WITH v AS (
                SELECT category, mode, threshold, CASE WHEN mode = 'single_label' THEN probability ELSE score END AS x
                FROM image_classifications WHERE batch = ?
            ), r AS (
                SELECT category, min(x) AS lo, max(x) AS hi FROM v GROUP BY category
            )
            SELECT v.category, any_value(v.mode), any_value(v.threshold), r.lo, r.hi,
                   list(b ORDER BY b), list(n ORDER BY b)
            FROM (
                SELECT category, least(?::INTEGER - 1, floor((x - lo) / greatest(hi - lo, 1e-9) * ?)::INTEGER) AS b,
                       count(*) AS n, any_value(mode) AS mode, any_value(threshold) AS threshold
                FROM v JOIN r USING (category) GROUP BY category, b
            ) v JOIN r USING (category) JOIN prompt_categories p USING (category)
            GROUP BY v.category, r.lo, r.hi, p.position
            ORDER BY p.position
            """,
            [batch, bins, bins],
        ).fetchall()
    out = {}
    for category, mode, threshold, lo, hi, bin_ids, counts in rows:
        dense = [0] * bins
        for b, n in zip(bin_ids, counts):
            dense[b] = n
        out[category] = (lo, hi, dense, threshold, mode)
    return out
