"""Each step on its own, without Dagster: real model, real parquet files, real DuckDB file."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clip_assets.classification.centroids import normalised_mean
from clip_assets.classification.prompts import PromptFileError, load_categories
from clip_assets.classification.rules import ModelMismatchError
from clip_assets.classification.steps import write_centroids, write_classifications
from clip_assets.config.layout import DataLayout
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.manifest import STATUS_OK
from clip_assets.ingest.steps import write_manifest
from clip_assets.model.clip_model import load_clip_model
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets.storage.warehouse import connect
from clip_assets_tests.support.models import TINY


@pytest.fixture
def layout(settings):
    return DataLayout(settings.data_dir)


def query(layout, sql, params=()):
    with connect(layout.duckdb_path, read_only=True) as con:
        return con.execute(sql, params).fetchall()


def test_manifest_step_writes_parquet(settings, layout):
    summary = write_manifest(settings.image_root, layout, "batch-002")
    table = pq.read_table(layout.manifest_path("batch-002"))
    assert summary.files == table.num_rows == 12
    # stat alone: the empty file is known here; the text file named .png is left to the embedding step
    assert summary.usable == 11 and summary.unusable == 1
    assert summary.errors == {"batch-002/broken-empty.jpg": "empty file"}


def test_a_file_that_is_not_an_image_is_recorded_by_the_embedding_step(settings, layout, clip):
    write_manifest(settings.image_root, layout, "batch-002")
    summary = write_embeddings(clip, settings.image_root, layout, "batch-002", EncodeOptions(batch_size=4, num_workers=0))
    assert (summary.encoded, summary.failed) == (10, 1)
    failures = pq.read_table(layout.embedding_failures_path("batch-002")).to_pylist()
    assert [(r["path"], r["error"].split(":")[0]) for r in failures] == [
        ("batch-002/notes-not-an-image.png", "UnidentifiedImageError")]
    assert summary.failures == {r["path"]: r["error"] for r in failures}


def test_embedding_step_encodes_usable_images(settings, layout, clip):
    write_manifest(settings.image_root, layout, "batch-002")
    summary = write_embeddings(clip, settings.image_root, layout, "batch-002", EncodeOptions(batch_size=4, num_workers=0))
    table = pq.read_table(layout.embeddings_path("batch-002"))
    manifest = pq.read_table(layout.manifest_path("batch-002"))
    failed = {r["image_id"] for r in pq.read_table(layout.embedding_failures_path("batch-002")).to_pylist()}
    usable_ids = [r["image_id"] for r in manifest.to_pylist() if r["status"] == STATUS_OK and r["image_id"] not in failed]
    assert table["image_id"].to_pylist() == usable_ids and summary.encoded == 10 and len(failed) == 1
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), clip.embed_dim)
    assert set(table["model"].to_pylist()) == {clip.identity}
    np.testing.assert_allclose(np.linalg.norm(vectors_matrix(table["embedding"]), axis=1), 1.0, atol=1e-5)


def test_worker_processes_give_the_same_embeddings(settings, layout, clip, tmp_path):
    write_manifest(settings.image_root, layout, "batch-001")
    write_embeddings(clip, settings.image_root, layout, "batch-001", EncodeOptions(batch_size=4, num_workers=0))
    single = pq.read_table(layout.embeddings_path("batch-001"))
    other = DataLayout(tmp_path / "other")
    write_manifest(settings.image_root, other, "batch-001")
    write_embeddings(clip, settings.image_root, other, "batch-001", EncodeOptions(batch_size=4, num_workers=2))
    multi = pq.read_table(other.embeddings_path("batch-001"))
    assert multi["image_id"].to_pylist() == single["image_id"].to_pylist()
    np.testing.assert_allclose(vectors_matrix(multi["embedding"]), vectors_matrix(single["embedding"]), atol=1e-5)


def test_file_broken_after_the_manifest_is_recorded_and_the_batch_goes_on(settings, layout, clip, tmp_path):
    import shutil

    root = tmp_path / "images"
    shutil.copytree(settings.image_root / "batch-001", root / "batch-001")
    write_manifest(root, layout, "batch-001")
    victim = sorted((root / "batch-001").glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # truncated after it was listed
    summary = write_embeddings(clip, root, layout, "batch-001", EncodeOptions(batch_size=4, num_workers=0))
    assert summary.failed == 1 and summary.encoded == 9
    failures = pq.read_table(layout.embedding_failures_path("batch-001")).to_pylist()
    assert failures[0]["path"] == f"batch-001/{victim.name}" and failures[0]["error"]


def test_centroid_step_stores_normalised_means(settings, layout, clip):
    summary = write_centroids(clip, settings.prompts_dir, layout)
    cats = load_categories(settings.prompts_dir)
    expected_rows = sum(bool(c.positive) + bool(c.negative) + bool(c.neutral) for c in cats)
    assert summary.centroid_rows == expected_rows == query(layout, "SELECT count(*) FROM prompt_centroids")[0][0]
    circle = next(c for c in cats if c.name == "circle")
    (vector, count, model) = query(
        layout, "SELECT vector, prompt_count, model FROM prompt_centroids WHERE category='circle' AND kind='positive'"
    )[0]
    expected = normalised_mean(clip.encode_texts(list(circle.positive)).numpy())
    np.testing.assert_allclose(vector, expected, atol=1e-5)
    assert count == len(circle.positive) and model == clip.identity


def test_classification_step_writes_one_row_per_image_and_category(settings, layout, clip):
    for batch in ("batch-001", "batch-002"):
        write_manifest(settings.image_root, layout, batch)
        write_embeddings(clip, settings.image_root, layout, batch, EncodeOptions(batch_size=8, num_workers=0))
    write_centroids(clip, settings.prompts_dir, layout)
    n_cats = len(load_categories(settings.prompts_dir))
    s1 = write_classifications(layout, "batch-001")
    write_classifications(layout, "batch-002")
    assert s1.rows == 10 * n_cats and s1.images == 10
    count = "SELECT batch, count(*), count(DISTINCT (image_id, category)) FROM image_classifications GROUP BY batch ORDER BY batch"
    assert query(layout, count) == [("batch-001", 10 * n_cats, 10 * n_cats), ("batch-002", 10 * n_cats, 10 * n_cats)]
    # Re-materializing a batch replaces its rows: no duplicates, the other batch untouched.
    write_classifications(layout, "batch-001")
    assert query(layout, count) == [("batch-001", 10 * n_cats, 10 * n_cats), ("batch-002", 10 * n_cats, 10 * n_cats)]


def test_broken_prompt_file_keeps_the_last_good_centroids(settings, layout, clip):
    write_centroids(clip, settings.prompts_dir, layout)
    before = query(layout, "SELECT * FROM prompt_centroids ORDER BY category, kind")
    path = settings.prompts_dir / "demo_shapes.toml"
    path.write_text(path.read_text().replace('[categories.star]\npositive = [', '[categories.star]\npositive = 3 #['))
    with pytest.raises(PromptFileError, match="demo_shapes.toml: categories.star.positive"):
        write_centroids(clip, settings.prompts_dir, layout)
    assert query(layout, "SELECT * FROM prompt_centroids ORDER BY category, kind") == before


def test_embeddings_from_another_model_are_refused(settings, layout, clip, other_checkpoint):
    write_manifest(settings.image_root, layout, "batch-001")
    write_embeddings(clip, settings.image_root, layout, "batch-001", EncodeOptions(batch_size=8, num_workers=0))
    write_centroids(clip, settings.prompts_dir, layout)
    write_classifications(layout, "batch-001")
    before = query(layout, "SELECT count(*), any_value(model) FROM image_classifications")
    other = load_clip_model(TINY, str(other_checkpoint), "cpu")
    write_centroids(other, settings.prompts_dir, layout)
    with pytest.raises(ModelMismatchError, match="Re-materialize image_embeddings"):
        write_classifications(layout, "batch-001")
    assert query(layout, "SELECT count(*), any_value(model) FROM image_classifications") == before
