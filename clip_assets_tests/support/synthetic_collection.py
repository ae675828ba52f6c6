"""A classified collection written straight into the project's layout (DuckDB rows and manifests), no model:
for the readers of the whole collection (gallery, calibration), with many tied scores and several batches."""

from pathlib import Path

from clip_assets.config.layout import DataLayout
from clip_assets.storage.warehouse import connect


def tied_collection(tmp_path: Path, images: int = 300, batches: int = 3) -> DataLayout:
    """Classifications of `images` images in `batches` batches, scores rounded so that many tie, one
    single_label category; the manifests hold the paths."""
    layout = DataLayout(tmp_path / "data")
    layout.manifest_dir.mkdir(parents=True)
    with connect(layout.duckdb_path) as con:
        con.executemany(
            "INSERT INTO prompt_categories VALUES (?, ?, 'f.toml', ?, ?, ?, 1, 100.0, 'm', 'v')",
            [("dog", 0, "multi_label", 0.02, 0.01), ("cat", 1, "multi_label", 0.0, 0.0), ("kind", 2, "single_label", 0.4, 0.0)])
        con.execute(f"""
            CREATE TEMP TABLE ids AS SELECT i, 'b' || (i % {batches}) AS batch, md5(i::VARCHAR)[:16] AS image_id
            FROM range({images}) t(i)""")
        con.execute("""
            INSERT INTO image_classifications
            SELECT batch, image_id, category, mode, pos, 0.2, CASE WHEN category = 'cat' THEN NULL ELSE neu END, score,
                   CASE WHEN mode = 'single_label' THEN prob END, NULL, threshold, neutral_margin,
                   CASE WHEN mode = 'single_label' THEN prob >= threshold
                        ELSE score >= threshold AND (category = 'cat' OR pos >= neu + neutral_margin) END,
                   'm', 'v', 'none', NULL, NULL, NULL  -- model_matched, rule_matched, decided_by: as in files from before them
            FROM (SELECT ids.*, p.*, round((hash(i, p.category) % 7) / 100.0, 2)::FLOAT AS score,
                         round(0.2 + (hash(p.category, i) % 5) / 100.0, 2)::FLOAT AS pos, 0.22::FLOAT AS neu,
                         round((hash(i) % 10) / 10.0, 1)::FLOAT AS prob
                  FROM ids CROSS JOIN prompt_categories p)""")
        for b in range(batches):
            con.execute(f"""COPY (SELECT image_id, batch || '/' || i || '.jpg' AS path FROM ids WHERE batch = 'b{b}')
                            TO '{layout.manifest_path(f"b{b}")}' (FORMAT parquet)""")
    return layout
