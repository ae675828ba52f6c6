"""The embedding step's final write streams: part files and the previous file's carried rows are copied
a record batch at a time, and the asset checks' figures are counted as the file is written."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clip_assets import checks
from clip_assets.config.layout import DataLayout
from clip_assets.embedding.engine import EncodeJob, embeddings_schema
from clip_assets.embedding.store import EmbeddingFileFigures, EncodingPlan, PartFiles, write_final
from clip_assets.storage.arrow_vectors import vectors_matrix
from clip_assets_tests.support.synthetic_embeddings import write_synthetic_batch

DIM, MODEL, BATCH = 16, "tiny/test", "b"


def plan_for(previous: pa.Table, parts_ids: list[str], carried: set[str], previous_file) -> EncodingPlan:
    empty = EncodeJob(image_ids=[], paths=[], sizes=[], mtimes=[], expected_fingerprints=[], previous_vectors={})
    return EncodingPlan(job=empty, carried_ids=carried, resumed_ids=set(parts_ids),
                        keep_ids=carried | set(parts_ids), dropped=0, previous_file=previous_file)


def test_final_write_streams_the_carried_rows_and_counts_the_checks_figures(tmp_path):
    layout = DataLayout(tmp_path / "data")
    write_synthetic_batch(layout, BATCH, 500, DIM, MODEL, clusters=4, rows_per_write=64)
    previous_file = layout.embeddings_path(BATCH)
    previous = pq.read_table(previous_file)
    ids = previous["image_id"].to_pylist()
    # a part file re-encoded 20 images (its rows win), two of them broken: NaN, and norm 2
    redone = previous.slice(100, 20)
    vectors = vectors_matrix(redone["embedding"]).copy() * 0.5 + 0.01
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors[1] *= 2
    vectors[0, 3] = np.nan
    redone = redone.set_column(1, "embedding", pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM))
    parts = PartFiles(layout.embedding_parts_dir(BATCH), MODEL, "float32")
    parts.write(redone)
    carried = set(ids[:400])  # the last 100 images left the manifest
    plan = plan_for(previous, redone["image_id"].to_pylist(), carried, previous_file)

    schema = embeddings_schema(DIM)
    written = {}
    for rows_per_read in (7, 100_000):
        out = tmp_path / f"out-{rows_per_read}.parquet"
        figures = write_final(out, schema, plan, parts, rows_per_read=rows_per_read)
        written[rows_per_read] = (pq.read_table(out), figures)
    (small, small_figures), (whole, whole_figures) = written[7], written[100_000]
    assert small_figures == whole_figures
    assert small.drop_columns("embedding").equals(whole.drop_columns("embedding"))
    np.testing.assert_array_equal(vectors_matrix(small["embedding"]), vectors_matrix(whole["embedding"]))  # NaN included

    assert small.num_rows == small_figures.rows == 400
    assert sorted(small["image_id"].to_pylist()) == sorted(ids[:400])
    by_id = dict(zip(small["image_id"].to_pylist(), vectors_matrix(small["embedding"])))
    np.testing.assert_array_equal(by_id[ids[120]], vectors_matrix(previous["embedding"])[120])  # carried as it was
    np.testing.assert_array_equal(by_id[ids[105]], vectors[5])  # the part file's row won
    assert (small_figures.nan_rows, small_figures.off_norm_rows) == (1, 2)  # NaN norms are off too
    assert small_figures == EmbeddingFileFigures.of_file(tmp_path / "out-7.parquet")
    assert small_figures.models == {MODEL} and small_figures.dimension == DIM

    outcome = checks.unit_norm_outcome(small_figures, DIM)
    (layout.embeddings_path(BATCH)).write_bytes((tmp_path / "out-7.parquet").read_bytes())
    assert outcome == checks.embeddings_are_unit_norm(layout, BATCH, DIM)
    assert not outcome.passed and outcome.metadata["off_norm_rows"] == 2
