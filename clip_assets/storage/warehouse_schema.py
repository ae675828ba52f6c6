"""The warehouse's tables and views, as SQL, and an in-memory DuckDB to run queries in: shared by the
DuckDB file (clip_assets.storage.warehouse) and the parquet files with views over them
(clip_assets.storage.parquet_warehouse)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import duckdb

TABLES_SQL = """
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
    prompt_version VARCHAR,
    adapter_version VARCHAR DEFAULT 'none', -- category_adapters version, or 'none' (zero-shot)
    model_matched BOOLEAN,            -- what the rule or the adapter decided; matched follows a person's verdict
    rule_matched BOOLEAN,             -- what the zero-shot rule alone decided (differs where an adapter changed it)
    decided_by VARCHAR                -- rule, adapter or person: who set matched
);
-- Files from before adapters: their rows were zero-shot.
ALTER TABLE image_classifications ADD COLUMN IF NOT EXISTS adapter_version VARCHAR DEFAULT 'none';
-- Files from before the review pages: NULL until the batch is classified again.
ALTER TABLE image_classifications ADD COLUMN IF NOT EXISTS model_matched BOOLEAN;
ALTER TABLE image_classifications ADD COLUMN IF NOT EXISTS rule_matched BOOLEAN;
ALTER TABLE image_classifications ADD COLUMN IF NOT EXISTS decided_by VARCHAR;
-- Near-duplicate groups across the collection (the near_duplicates asset): one row per image in a group.
CREATE TABLE IF NOT EXISTS duplicate_groups (
    group_id VARCHAR NOT NULL,        -- image_id of the group's first image (by batch, then path)
    position INTEGER NOT NULL,        -- 0 = the first image
    image_id VARCHAR NOT NULL,
    path VARCHAR NOT NULL,
    batch VARCHAR NOT NULL,
    similarity FLOAT NOT NULL,        -- cosine similarity to the group's first image
    threshold DOUBLE NOT NULL,        -- the similarity threshold of the group's tier (exact copies: 1)
    tier VARCHAR NOT NULL DEFAULT 'look-alike', -- exact (same bytes), copy (same picture), look-alike (similar)
    same_bytes BOOLEAN NOT NULL DEFAULT false,  -- the first image's bytes exactly
    hash_distance SMALLINT,           -- bits of the perceptual hash that differ from the first image's
    width INTEGER,                    -- pixels, from the file's header
    height INTEGER,
    file_size BIGINT,                 -- bytes
    mtime DOUBLE,
    suggested_keep BOOLEAN NOT NULL DEFAULT false -- the file kept by default: the largest, then the oldest
);
-- Files from before the tiers: their groups were look-alikes at one threshold.
ALTER TABLE duplicate_groups ADD COLUMN IF NOT EXISTS tier VARCHAR DEFAULT 'look-alike';
ALTER TABLE duplicate_groups ADD COLUMN IF NOT EXISTS same_bytes BOOLEAN DEFAULT false;
ALTER TABLE duplicate_groups ADD COLUMN IF NOT EXISTS hash_distance SMALLINT;
ALTER TABLE duplicate_groups ADD COLUMN IF NOT EXISTS width INTEGER;
ALTER TABLE duplicate_groups ADD COLUMN IF NOT EXISTS height INTEGER;
ALTER TABLE duplicate_groups ADD COLUMN IF NOT EXISTS file_size BIGINT;
ALTER TABLE duplicate_groups ADD COLUMN IF NOT EXISTS mtime DOUBLE;
ALTER TABLE duplicate_groups ADD COLUMN IF NOT EXISTS suggested_keep BOOLEAN DEFAULT false;
"""
# The views every reader queries, over the tables above (or, in a parquet warehouse, over views of the same
# names and columns: clip_assets.storage.parquet_warehouse).
VIEWS_SQL = """
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
-- One row per group: its tier, size, batches, paths (first image first) and the least similar member.
CREATE OR REPLACE VIEW near_duplicate_groups AS
SELECT group_id, any_value(tier) AS tier, count(*) AS images, list(DISTINCT batch ORDER BY batch) AS batches,
       list(path ORDER BY position) AS paths, min(similarity) AS min_similarity
FROM duplicate_groups
GROUP BY group_id
ORDER BY CASE any_value(tier) WHEN 'exact' THEN 0 WHEN 'copy' THEN 1 ELSE 2 END, images DESC, group_id;
"""
SCHEMA_SQL = TABLES_SQL + VIEWS_SQL


@contextlib.contextmanager
def scratch() -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB, for queries over the parquet files: no file, so no lock to wait for."""
    con = duckdb.connect()
    try:
        yield con
    finally:
        con.close()
