"""The DuckDB file: prompt centroids and classifications, written in whole transactions.

DuckDB allows one writing process at a time, so connections are opened briefly, writes wait (with
a bound) for another process's lock to go, and every write replaces whole units (all centroids, or
one batch's classifications) inside a single transaction: readers never see a half-written batch.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterable, Iterator

import duckdb
import numpy as np
import pyarrow as pa

from clip_assets.centroids import KINDS, CentroidSet

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS prompt_centroids (
    category VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,            -- positive / negative / neutral
    vector FLOAT[] NOT NULL,          -- L2-normalised mean of the descriptions' text embeddings
    prompt_count INTEGER NOT NULL,
    prompt_hash VARCHAR NOT NULL,     -- hash of this set's descriptions
    model VARCHAR NOT NULL,
    prompt_version VARCHAR NOT NULL   -- hash of all prompt files
);
CREATE TABLE IF NOT EXISTS prompt_categories (
    category VARCHAR NOT NULL,
    position INTEGER NOT NULL,
    source VARCHAR NOT NULL,          -- prompt file the category comes from
    mode VARCHAR NOT NULL,            -- multi_label / single_label
    threshold DOUBLE NOT NULL,
    neutral_margin DOUBLE NOT NULL,
    top_k INTEGER NOT NULL,
    logit_scale DOUBLE NOT NULL,
    model VARCHAR NOT NULL,
    prompt_version VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS image_classifications (
    batch VARCHAR NOT NULL,
    image_id VARCHAR NOT NULL,
    category VARCHAR NOT NULL,
    mode VARCHAR NOT NULL,
    pos_sim FLOAT,
    neg_sim FLOAT,
    neutral_sim FLOAT,
    score FLOAT,
    probability FLOAT,                -- single_label: softmax probability; NULL for multi_label
    rank SMALLINT,                    -- single_label: 1 = most probable; NULL for multi_label
    threshold DOUBLE,
    neutral_margin DOUBLE,
    matched BOOLEAN,
    model VARCHAR,
    prompt_version VARCHAR
);
-- One row per image: what it matched (best first), and its best-scoring category overall.
CREATE OR REPLACE VIEW image_labels AS
SELECT batch, image_id,
       coalesce(list(category ORDER BY score DESC) FILTER (WHERE matched), []) AS categories,
       arg_max(category, score) AS best_category,
       max(score) AS best_score
FROM image_classifications
GROUP BY batch, image_id;
-- Per category: images classified and images matched, in the prompt files' order.
CREATE OR REPLACE VIEW category_counts AS
SELECT p.category, p.mode,
       count(c.image_id) AS images_classified,
       count(c.image_id) FILTER (WHERE c.matched) AS images_matched
FROM prompt_categories p LEFT JOIN image_classifications c USING (category)
GROUP BY p.category, p.mode, p.position
ORDER BY p.position;
"""


class CentroidsMissingError(LookupError):
    """Classification was asked for before any prompt centroids were stored."""


@contextlib.contextmanager
def connect(path: Path, read_only: bool = False, wait_s: float = 120.0) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the DuckDB file, waiting while another process holds its write lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    delay = 0.05
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
    try:
        if not read_only:
            con.execute(SCHEMA_SQL)
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def _transaction(con: duckdb.DuckDBPyConnection):
    con.begin()
    try:
        yield
    except BaseException:
        con.rollback()
        raise
    con.commit()


def replace_centroids(path: Path, centroids: CentroidSet) -> int:
    """Replace every stored centroid and category setting at once; returns centroid rows written."""
    rows = {k: [] for k in ("category", "kind", "vector", "prompt_count", "prompt_hash")}
    for i, name in enumerate(centroids.categories):
        for kind in KINDS:
            if (name, kind) in centroids.prompt_counts:
                rows["category"].append(name)
                rows["kind"].append(kind)
                rows["vector"].append(getattr(centroids, kind)[i].tolist())
                rows["prompt_count"].append(centroids.prompt_counts[(name, kind)])
                rows["prompt_hash"].append(centroids.prompt_hashes[(name, kind)])
    n = len(rows["category"])
    centroid_rows = pa.table(
        {
            **{k: v for k, v in rows.items() if k != "vector"},
            "vector": pa.array(rows["vector"], pa.list_(pa.float32())),
            "model": [centroids.model] * n,
            "prompt_version": [centroids.prompt_version] * n,
        }
    )
    c = len(centroids.categories)
    category_rows = pa.table(
        {
            "category": centroids.categories,
            "position": list(range(c)),
            "source": centroids.sources,
            "mode": centroids.modes,
            "threshold": centroids.thresholds,
            "neutral_margin": centroids.neutral_margins,
            "top_k": centroids.top_k,
            "logit_scale": [centroids.logit_scale] * c,
            "model": [centroids.model] * c,
            "prompt_version": [centroids.prompt_version] * c,
        }
    )
    with connect(path) as con, _transaction(con):
        con.execute("DELETE FROM prompt_centroids")
        con.execute("DELETE FROM prompt_categories")
        con.register("new_centroids", centroid_rows)
        con.register("new_categories", category_rows)
        con.execute(
            "INSERT INTO prompt_centroids SELECT category, kind, vector, prompt_count, prompt_hash, "
            "model, prompt_version FROM new_centroids"
        )
        con.execute(
            "INSERT INTO prompt_categories BY NAME SELECT * FROM new_categories"
        )
    return n


def read_centroids(path: Path) -> CentroidSet:
    """The stored centroids as matrices, in the prompt files' category order."""
    if not path.exists():
        raise CentroidsMissingError(
            f"No DuckDB file at {path}: materialize prompt_centroids before image_classifications."
        )
    with connect(path, read_only=True) as con:  # a reader: never takes the write lock
        cats = con.execute(
            "SELECT category, source, threshold, neutral_margin, model, prompt_version, mode, top_k, "
            "logit_scale FROM prompt_categories ORDER BY position"
        ).fetchall()
        rows = con.execute(
            "SELECT category, kind, vector, prompt_count, prompt_hash FROM prompt_centroids"
        ).fetchall()
    if not cats:
        raise CentroidsMissingError(
            f"No prompt centroids in {path}: materialize prompt_centroids before image_classifications."
        )
    names = [r[0] for r in cats]
    index = {name: i for i, name in enumerate(names)}
    dim = len(rows[0][2])
    mats = {kind: np.zeros((len(names), dim), dtype=np.float32) for kind in KINDS}
    has = {kind: np.zeros(len(names), dtype=bool) for kind in KINDS}
    counts, hashes = {}, {}
    for category, kind, vector, count, digest in rows:
        mats[kind][index[category]] = np.asarray(vector, dtype=np.float32)
        has[kind][index[category]] = True
        counts[(category, kind)] = count
        hashes[(category, kind)] = digest
    return CentroidSet(
        categories=names,
        sources=[r[1] for r in cats],
        thresholds=np.array([r[2] for r in cats], dtype=np.float64),
        neutral_margins=np.array([r[3] for r in cats], dtype=np.float64),
        positive=mats["positive"],
        negative=mats["negative"],
        neutral=mats["neutral"],
        has_negative=has["negative"],
        has_neutral=has["neutral"],
        modes=[r[6] for r in cats],
        top_k=np.array([r[7] for r in cats], dtype=np.int64),
        logit_scale=float(cats[0][8]),
        prompt_counts=counts,
        prompt_hashes=hashes,
        model=cats[0][4],
        prompt_version=cats[0][5],
    )


def replace_batch_classifications(path: Path, batch: str, chunks: Iterable[pa.Table]) -> int:
    """Swap one batch's rows for new ones in a single transaction: no duplicates, no half batch.

    `chunks` is consumed inside the transaction, so a batch never has to sit in memory whole.
    Returns the number of rows written.
    """
    written = 0
    with connect(path) as con, _transaction(con):
        con.execute("DELETE FROM image_classifications WHERE batch = ?", [batch])
        for chunk in chunks:
            con.register("new_rows", chunk)
            con.execute("INSERT INTO image_classifications BY NAME SELECT * FROM new_rows")
            con.unregister("new_rows")
            written += chunk.num_rows
    return written


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
