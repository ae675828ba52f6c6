"""The data checks catch what they claim to; the DuckDB views agree with the rows; the UI metadata is there."""

import base64

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_assets import checks
from clip_assets.classification.prompts import load_categories
from clip_assets.classification.steps import write_centroids, write_classifications
from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.instance.execution import BATCH_ASSETS, materialize, materialize_everything
from clip_assets.model.clip_model import load_clip_model
from clip_assets.storage.warehouse import connect
from clip_assets_tests.support.models import TINY


@pytest.fixture
def done(settings, clip):
    """Batch-001 through all four steps, without Dagster."""
    layout = DataLayout(settings.data_dir)
    write_manifest(settings.image_root, layout, "batch-001")
    write_embeddings(clip, settings.image_root, layout, "batch-001", EncodeOptions(batch_size=8, num_workers=0))
    write_centroids(clip, settings.prompts_dir, layout)
    write_classifications(layout, "batch-001")
    return layout


def sql(layout, query, params=()):
    with connect(layout.duckdb_path) as con:
        return con.execute(query, params).fetchall()


def test_checks_pass_on_a_good_run(settings, clip, done):
    assert checks.embeddings_are_unit_norm(done, "batch-001", clip.embed_dim).passed
    assert checks.embeddings_match_centroid_model(done, "batch-001").passed
    assert checks.every_category_has_centroids(done.duckdb_path, load_categories(settings.prompts_dir)).passed
    assert checks.one_row_per_image_and_category(done, "batch-001").passed


def test_unit_norm_check_catches_bad_vectors_and_wrong_dimension(clip, done):
    table = pq.read_table(done.embeddings_path("batch-001"))
    vectors = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    vectors[0] *= 2
    vectors[1, 0] = np.nan
    bad = table.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), clip.embed_dim))
    pq.write_table(bad, done.embeddings_path("batch-001"))
    outcome = checks.embeddings_are_unit_norm(done, "batch-001", clip.embed_dim)
    assert not outcome.passed and outcome.metadata["nan_rows"] == 1 and outcome.metadata["off_norm_rows"] == 2
    assert not checks.embeddings_are_unit_norm(done, "batch-001", clip.embed_dim + 1).passed


def test_centroid_check_catches_a_missing_centroid(settings, done):
    sql(done, "DELETE FROM prompt_centroids WHERE category = 'star' AND kind = 'negative'")
    outcome = checks.every_category_has_centroids(done.duckdb_path, load_categories(settings.prompts_dir))
    assert not outcome.passed and outcome.metadata["missing"] == ["star/negative"]


def test_row_check_catches_duplicates_and_gaps(done):
    sql(done, "INSERT INTO image_classifications SELECT * FROM image_classifications LIMIT 1")
    assert not checks.one_row_per_image_and_category(done, "batch-001").passed
    sql(done, "DELETE FROM image_classifications WHERE rowid IN (SELECT rowid FROM image_classifications LIMIT 2)")
    assert not checks.one_row_per_image_and_category(done, "batch-001").passed
    sql(done, "DELETE FROM image_classifications WHERE batch = 'batch-001'")
    write_classifications(done, "batch-001")
    assert checks.one_row_per_image_and_category(done, "batch-001").passed
    # a duplicate hiding a gap: the count is right, the pairs are not
    sql(done, "DELETE FROM image_classifications WHERE rowid = (SELECT min(rowid) FROM image_classifications "
              "WHERE batch = 'batch-001')")
    sql(done, "INSERT INTO image_classifications SELECT * FROM image_classifications WHERE batch = 'batch-001' LIMIT 1")
    outcome = checks.one_row_per_image_and_category(done, "batch-001")
    assert not outcome.passed and outcome.metadata["rows"] == outcome.metadata["expected_rows"]


def test_model_check_catches_centroids_of_another_model(settings, done, other_checkpoint):
    write_centroids(load_clip_model(TINY, str(other_checkpoint), "cpu"), settings.prompts_dir, done)
    outcome = checks.embeddings_match_centroid_model(done, "batch-001")
    assert not outcome.passed and "re-materialize" in outcome.description


def test_views_agree_with_the_rows(settings, done):
    labels = sql(done, "SELECT image_id, categories, best_category, best_score FROM image_labels")
    assert len(labels) == 10
    for image_id, categories, best, best_score in labels:
        rows = sql(done, "SELECT category, score, matched FROM image_classifications WHERE image_id = ?", [image_id])
        matched = sorted((r for r in rows if r[2]), key=lambda r: -r[1])
        assert categories == [r[0] for r in matched]
        top = max(rows, key=lambda r: r[1])
        assert best == top[0] and best_score == pytest.approx(top[1])
    counts = dict(sql(done, "SELECT category, images_matched FROM category_counts"))
    assert list(counts) == [c.name for c in load_categories(settings.prompts_dir)]
    expected = dict(sql(done, "SELECT category, count(*) FILTER (WHERE matched) FROM image_classifications GROUP BY 1"))
    assert counts == expected


def latest_check(instance, key, name):
    return instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey(key), name)]
    )[dg.AssetCheckKey(dg.AssetKey(key), name)]


def test_dagster_records_checks_and_shows_plot_and_preview(settings, instance):
    materialize_everything(build_definitions(settings), instance, ["batch-001"])
    for key, name in [
        ("image_embeddings", "unit_norm_with_model_dimension"),
        ("image_embeddings", "same_model_as_centroids"),
        ("prompt_centroids", "every_category_has_centroids"),
        ("image_classifications", "one_row_per_image_and_category"),
    ]:
        execution = latest_check(instance, key, name)
        assert execution.event.dagster_event.event_specific_data.passed, (key, name)
        if key != "prompt_centroids":  # a batch's check says which batch it is about
            assert execution.event.dagster_event.event_specific_data.description.startswith("batch-001: "), (key, name)
    record = instance.fetch_materializations(dg.AssetKey("image_classifications"), limit=1).records[0]
    meta = record.asset_materialization.metadata
    png = base64.b64decode(meta["score_distribution"].value.split("base64,")[1].rstrip(")"))
    assert png.startswith(b"\x89PNG")
    preview = meta["top_images"].value
    assert [c.name for c in preview.schema.columns] == ["category", "path", "score", "matched"]
    assert all(r.data["path"].startswith("batch-001/img-") for r in preview.records)
    assert "circle" in {r.data["category"] for r in preview.records}


def test_blocking_model_check_stops_the_classification(settings, instance, other_checkpoint):
    defs = build_definitions(settings)
    materialize_everything(defs, instance, ["batch-001"])
    before = sql(DataLayout(settings.data_dir), "SELECT count(*), any_value(model) FROM image_classifications")
    other = build_definitions(settings.model_copy(update={"pretrained": str(other_checkpoint)}))
    result = materialize(other, instance, BATCH_ASSETS, partition_key="batch-001", raise_on_error=False)
    assert not result.success
    assert not latest_check(instance, "image_embeddings", "same_model_as_centroids").event.dagster_event.event_specific_data.passed
    succeeded = {e.step_key for e in result.all_events if e.is_step_success}
    assert "image_classifications" not in succeeded
    assert result.asset_materializations_for_node("image_classifications") == []
    assert sql(DataLayout(settings.data_dir), "SELECT count(*), any_value(model) FROM image_classifications") == before


def test_a_check_over_several_batches_names_each_batch_failed_ones_first():
    from clip_assets.defs.check_results import combined as _combined

    ok = checks.CheckOutcome(True, "2 of 122 files could not be embedded (1.6%; warns above 5.0%)", {"failure_share": 0.0164})
    bad = checks.CheckOutcome(False, "9 of 100 files could not be embedded (9.0%; warns above 5.0%)", {"failure_share": 0.09})
    combined = _combined({"batch-001": ok, "batch-002": bad, "batch-003": ok})
    assert not combined.passed
    lines = combined.description.splitlines()
    assert lines[0] == "1 of 3 batches failed"
    assert lines[1].startswith("batch-002: FAILED: 9 of 100") and lines[2].startswith("batch-001: passed: 2 of 122")
    assert combined.metadata["failed_batches"] == "batch-002" and combined.metadata["batches"] == 3
    table = combined.metadata["by_batch"].value
    assert table.count("| passed |") == 2 and "| batch-002 | failed | 9 of 100" in table
    assert _combined({"batch-001": ok, "batch-003": ok}).metadata["failed_batches"] == "none"
    one = _combined({"batch-004": ok})
    assert one.description.startswith("batch-004: 2 of 122") and one.metadata == {"batch": "batch-004", "failure_share": 0.0164}
