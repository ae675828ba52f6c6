"""The precision of the image tower is recorded with every embedding, and a batch never mixes them.

Rows computed at another precision are not reused, like rows of another model: changing
CLIP_ASSETS_PRECISION re-encodes a batch the next time it is materialized, and the
one_precision_in_collection check warns while other batches still hold the old precision.
"""

from __future__ import annotations

import pyarrow.parquet as pq

from clip_assets.checks import one_precision_in_collection, recorded_precisions
from clip_assets.config.layout import DataLayout
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.model.clip_model import with_precision

OPTIONS = EncodeOptions(batch_size=8, num_workers=0)


def test_each_row_records_its_precision_and_another_precision_is_encoded_again(settings, clip):
    layout = DataLayout(settings.data_dir)
    for batch in ("batch-001", "batch-002"):
        write_manifest(settings.image_root, layout, batch)
    first = write_embeddings(clip, settings.image_root, layout, "batch-001", OPTIONS)
    assert clip.computed_precision == "float32"  # the CPU default
    assert set(pq.read_table(first.path)["precision"].to_pylist()) == {"float32"}
    assert first.figures.precisions == {"float32"}
    again = write_embeddings(clip, settings.image_root, layout, "batch-001", OPTIONS)
    assert (again.encoded, again.carried_over) == (0, first.rows)

    bf16 = with_precision(clip, "bfloat16")
    changed = write_embeddings(bf16, settings.image_root, layout, "batch-001", OPTIONS)
    assert (changed.encoded, changed.carried_over) == (first.rows, 0)  # nothing mixed into the batch
    assert recorded_precisions(changed.path) == {"bfloat16"} == changed.figures.precisions

    other = write_embeddings(clip, settings.image_root, layout, "batch-002", OPTIONS)
    outcome = one_precision_in_collection(layout, "batch-002", other.figures.precisions)
    assert not outcome.passed
    assert "batch-001 (bfloat16)" in outcome.description and "CLIP_ASSETS_PRECISION" in outcome.description
    write_embeddings(clip, settings.image_root, layout, "batch-001", OPTIONS)
    assert one_precision_in_collection(layout, "batch-002", other.figures.precisions).passed


def test_a_file_written_before_precisions_were_recorded_is_encoded_afresh(settings, clip):
    layout = DataLayout(settings.data_dir)
    write_manifest(settings.image_root, layout, "batch-001")
    first = write_embeddings(clip, settings.image_root, layout, "batch-001", OPTIONS)
    pq.write_table(pq.read_table(first.path).drop_columns(["precision"]), first.path)
    assert recorded_precisions(first.path) == {"unrecorded"}
    assert not one_precision_in_collection(layout, "batch-002", {"float32"}).passed
    again = write_embeddings(clip, settings.image_root, layout, "batch-001", OPTIONS)
    assert (again.encoded, again.carried_over) == (first.rows, 0)
    assert recorded_precisions(again.path) == {"float32"}
