"""The review pages' two queues for one category, as plain functions over the stored classifications.

- `estimate_queue`: a uniform random sample of the category's matches and of its non-matches (as
  the rule or adapter decided them, `model_matched`), alternating one and the other. Each image's
  place is a hash of the seed, the category and its id, so the order is the same on every request,
  in every tab and process, and any first part of it is a uniform random sample of each side: what
  makes the precision and recall estimated from its labels unbiased
  (clip_assets.tuning.precision_estimate). It leaves out the images labelled in the estimate queue
  already, and only those: an image labelled in the improve queue stays in (labelling it again is
  one click), since leaving the least certain images out would bias the sample.
- `improve_queue`: the images whose decision is least certain, first those where the zero-shot rule
  and the adapter disagree (`rule_matched` differs from `model_matched`), then by the distance of
  the decision to its boundary: for a multi_label category the smaller of score - threshold and
  (pos_sim - neutral_sim) - neutral_margin (the decision flips when the smaller crosses zero), for a
  single_label one probability - threshold. It leaves out every image already judged on the category
  (in any queue, skips included).

Both read the DuckDB file read-only, the labels store, and the few manifest rows of the images they
return (for their paths; an image id is a hash of its path, so the labelled images are left out
without reading the manifests).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import image_id_for, image_paths
from clip_assets.storage.warehouse import connect
from clip_assets.storage.warehouse import exists as warehouse_exists
from clip_assets.tuning.review_labels import ESTIMATE, current_verdicts

DEFAULT_LIMIT = 50


@dataclass(frozen=True)
class QueueItem:
    """One image to show for one category, with what the pages record with its verdict."""

    image_id: str
    batch: str
    path: str  # relative to the image root
    category: str
    matched: bool  # in the category now (a person's earlier verdict included)
    model_matched: bool  # what the rule or adapter decided
    rule_matched: bool  # what the zero-shot rule alone decided
    decided_by: str  # rule, adapter or person
    score: float  # what the threshold applies to: score (multi_label) or probability (single_label)
    threshold: float
    margin: float  # signed distance of the decision to its boundary (see the module's docstring)
    model: str
    prompt_version: str


_ROWS = """
SELECT image_id, batch, matched, coalesce(model_matched, matched) AS model_matched,
       coalesce(rule_matched, model_matched, matched) AS rule_matched, coalesce(decided_by, 'rule') AS decided_by,
       CASE WHEN mode = 'single_label' THEN probability ELSE score END::DOUBLE AS value, threshold,
       CASE WHEN mode = 'single_label' THEN probability - threshold
            ELSE least(score - threshold, (pos_sim - neutral_sim) - neutral_margin) END::DOUBLE AS margin,
       model, prompt_version
FROM image_classifications
WHERE category = $category AND image_id NOT IN (SELECT image_id FROM labelled)
"""


def _queue(layout: DataLayout, category: str, labelled: set[str], query: str, limit: int, **params) -> list[QueueItem]:
    """The rows `query` picks from the category's classifications ({rows}), without the `labelled`
    paths, with their paths from the manifests (only those rows of them are read)."""
    if not warehouse_exists(layout.duckdb_path):
        return []
    with connect(layout.duckdb_path, read_only=True) as con:
        con.register("labelled", pa.table({"image_id": pa.array(sorted(map(image_id_for, labelled)), pa.string())}))
        rows = con.execute(query.format(rows=_ROWS), {"category": category, "limit": limit, **params}).fetchall()
    by_batch: dict[str, list[str]] = {}
    for row in rows:
        by_batch.setdefault(row[1], []).append(row[0])
    paths = image_paths(layout, by_batch)
    return [QueueItem(i, batch, paths[i], category, *rest) for i, batch, *rest in rows if i in paths]


def estimate_queue(layout: DataLayout, category: str, limit: int = DEFAULT_LIMIT, seed: int = 0) -> list[QueueItem]:
    """The next `limit` images of the category's estimate queue: matches and non-matches alternately,
    each side in the order of a hash of (`seed`, category, image id), without the images labelled
    in the estimate queue already. The same on every call until a label changes it."""
    labelled = {path for path, _ in current_verdicts(layout.review_labels_path, category, queues=[ESTIMATE])}
    # the first `limit` of each side (a top-n over two columns, not a sort of the whole category), then
    # one of each in turn; the rows' other columns are read for those alone
    query = """
        WITH c AS MATERIALIZED (
            SELECT image_id, coalesce(model_matched, matched) AS side, hash($salt || image_id) AS place
            FROM image_classifications WHERE category = $category AND image_id NOT IN (SELECT image_id FROM labelled)
        ), picked AS (
            SELECT image_id, side, row_number() OVER (PARTITION BY side ORDER BY place) AS turn FROM (
                (SELECT * FROM c WHERE side ORDER BY place LIMIT $limit)
                UNION ALL (SELECT * FROM c WHERE NOT side ORDER BY place LIMIT $limit))
        )
        SELECT r.* FROM ({rows}) r JOIN picked p USING (image_id) ORDER BY p.turn, p.side DESC LIMIT $limit"""
    return _queue(layout, category, labelled, query, limit, salt=f"{seed}:{category}:")


def improve_queue(layout: DataLayout, category: str, limit: int = DEFAULT_LIMIT) -> list[QueueItem]:
    """The `limit` images of the category whose decision is least certain, not judged on it yet:
    where the rule and the adapter disagree first, then nearest the threshold or the neutral margin."""
    labelled = {path for path, _ in current_verdicts(layout.review_labels_path, category)}
    query = "{rows} ORDER BY rule_matched != model_matched DESC, abs(margin) ASC NULLS LAST, image_id LIMIT $limit"
    return _queue(layout, category, labelled, query, limit)
