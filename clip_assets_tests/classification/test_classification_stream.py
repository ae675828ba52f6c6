"""The classification step reads a batch in record batches and writes it as one Arrow stream: its rows
and its figures (matches, score distribution, top images, contact-sheet rows) are those of the
whole-batch computation, whatever the record-batch size."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_assets.classification.rules import classify_batch
from clip_assets.classification.steps import write_centroids, write_classifications
from clip_assets.config.layout import DataLayout
from clip_assets.ingest.manifest import image_paths
from clip_assets.pages.gallery import gallery_rows
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.storage.warehouse import connect, read_centroids
from clip_assets_tests.support.synthetic_embeddings import write_synthetic_batch
from clip_assets_tests.support.warehouse_oracles import score_histograms, top_images

BATCH = "synthetic"
IMAGES = 1_000
COLUMNS = ["image_id", "category", "mode", "pos_sim", "neg_sim", "neutral_sim", "score", "probability", "rank",
           "threshold", "neutral_margin", "matched", "model", "prompt_version"]


@pytest.fixture
def synthetic(settings, clip) -> DataLayout:
    """1,000 clustered embeddings of the tiny model, against the repo's prompts plus a single_label file."""
    (settings.prompts_dir / "single.toml").write_text(
        'mode = "single_label"\nthreshold = 0.3\ntop_k = 1\n'
        '[categories.warm]\npositive = ["a red shape", "an orange shape"]\n'
        '[categories.cold]\npositive = ["a blue shape", "a green shape"]\n')
    layout = DataLayout(settings.data_dir)
    write_centroids(clip, settings.prompts_dir, layout)
    write_synthetic_batch(layout, BATCH, IMAGES, clip.embed_dim, clip.identity, clusters=8, spread=1.0,
                          rows_per_write=300)
    return layout


def stored_rows(layout: DataLayout) -> list[tuple]:
    with connect(layout.duckdb_path, read_only=True) as con:
        return con.execute(f"SELECT {', '.join(COLUMNS)} FROM image_classifications WHERE batch = ? "
                           "ORDER BY image_id, category", [BATCH]).fetchall()


def assert_same_rows(got: list[tuple], expected: list[tuple]) -> None:
    """Equal rows, up to the last bit of float32 products summed in another order: so a row whose score
    sits on its threshold may flip; every other row agrees exactly."""
    assert [r[:3] for r in got] == [r[:3] for r in expected]
    col = {c: COLUMNS.index(c) for c in COLUMNS}
    for column in ("pos_sim", "neg_sim", "neutral_sim", "score", "probability"):
        k = col[column]
        assert [r[k] for r in got] == [pytest.approx(r[k], abs=1e-6) if r[k] is not None else None
                                       for r in expected], column
    flipped = [(g, e) for g, e in zip(got, expected)
               if (g[col["matched"]], g[col["rank"]]) != (e[col["matched"]], e[col["rank"]])]
    for g, _ in flipped:
        on_edge = abs(g[col["score"]] - g[col["threshold"]]) < 1e-5 or (
            g[col["probability"]] is not None and abs(g[col["probability"]] - g[col["threshold"]]) < 1e-5) or (
            g[col["neutral_sim"]] is not None
            and abs(g[col["pos_sim"]] - g[col["neutral_sim"]] - g[col["neutral_margin"]]) < 1e-5)
        assert on_edge, g
    assert len(flipped) <= 2


def test_streamed_rows_equal_the_whole_batch_computation(synthetic):
    summary = write_classifications(synthetic, BATCH, rows_per_read=37)  # 28 record batches
    table = pq.read_table(synthetic.embeddings_path(BATCH))
    whole = classify_batch(BATCH, table["image_id"].to_pylist(), vectors_matrix(table["embedding"]), read_centroids(
        synthetic.duckdb_path))
    expected = sorted(zip(*(whole[c].to_pylist() for c in COLUMNS)), key=lambda r: (r[0], r[1]))
    got = stored_rows(synthetic)
    assert summary.rows == len(got) == len(expected) == IMAGES * len(summary.matches)
    assert_same_rows(got, expected)


def test_figures_gathered_while_streaming_equal_the_stored_rows(synthetic):
    summary = write_classifications(synthetic, BATCH, rows_per_read=37)
    db = synthetic.duckdb_path
    with connect(db, read_only=True) as con:
        matched = dict(con.execute("SELECT category, count(*) FILTER (WHERE matched) FROM image_classifications "
                                   "WHERE batch = ? GROUP BY category", [BATCH]).fetchall())
    assert summary.images == IMAGES
    assert summary.matches == {c: matched[c] for c in summary.matches}
    assert 0 < sum(summary.matches.values()) < IMAGES * len(summary.matches)

    stored = score_histograms(db, BATCH)
    assert list(summary.histograms) == list(stored)
    for category, (low, high, counts, threshold, mode) in summary.histograms.items():
        s_low, s_high, s_counts, s_threshold, s_mode = stored[category]
        assert (low, high, threshold, mode) == (pytest.approx(s_low), pytest.approx(s_high), s_threshold, s_mode)
        assert sum(counts) == sum(s_counts) == IMAGES
        # folded from fine bins: a value within a fine bin's width of a plot bin's edge may land next door
        assert sum(abs(a - b) for a, b in zip(counts, s_counts)) <= IMAGES * 0.02, category

    paths = image_paths(synthetic, {BATCH: {i for _, i, _, _ in top_images(db, BATCH)}})
    assert summary.top_images == [
        {"category": c, "path": paths[i], "score": round(v, 4), "matched": m} for c, i, v, m in top_images(db, BATCH)
    ]
    assert summary.gallery_rows == gallery_rows(synthetic, matched_per_category=3, near_misses=2, batch=BATCH)
    assert any(not image.matched for rows in summary.gallery_rows.values() for image in rows)


def test_record_batch_size_changes_nothing(synthetic):
    """Small reads give the rows and figures of one read of the whole file: the step holds one record
    batch, not the batch."""
    small = write_classifications(synthetic, BATCH, rows_per_read=16)
    small_rows = stored_rows(synthetic)
    whole = write_classifications(synthetic, BATCH, rows_per_read=IMAGES)
    assert_same_rows(stored_rows(synthetic), small_rows)  # replaced, not appended
    assert (small.images, small.rows) == (whole.images, whole.rows)
    assert sum(abs(small.matches[c] - whole.matches[c]) for c in small.matches) <= 2
    assert [(t["category"], t["path"]) for t in small.top_images] == [(t["category"], t["path"]) for t in whole.top_images]
    assert {c: [i.image_id for i in rows] for c, rows in small.gallery_rows.items()} == {
        c: [i.image_id for i in rows] for c, rows in whole.gallery_rows.items()}
    for category, (low, high, counts, _, _) in small.histograms.items():
        assert (low, high) == (pytest.approx(whole.histograms[category][0]), pytest.approx(whole.histograms[category][1]))
        assert sum(abs(a - b) for a, b in zip(counts, whole.histograms[category][2])) <= 2


def test_a_failing_stream_leaves_the_previous_rows(synthetic):
    write_classifications(synthetic, BATCH)
    before = stored_rows(synthetic)
    path = synthetic.embeddings_path(BATCH)
    table = pq.read_table(path).slice(0, 600)
    ids = pa.array(table["image_id"].to_pylist()[:500] + [None] * 100, pa.string())  # a later record batch is bad
    pq.write_table(table.set_column(0, pa.field("image_id", pa.string()), ids), path, row_group_size=100)
    with pytest.raises(duckdb.ConstraintException):
        write_classifications(synthetic, BATCH, rows_per_read=100)
    assert stored_rows(synthetic) == before
