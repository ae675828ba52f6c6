"""Damaged files the embedding step reads: its part files and previous embeddings file are moved aside
and what they held encoded again; a damaged manifest stops it with the command that rebuilds it. Each
test runs with each kind of damage (clip_assets_tests.support.damage), the real tiny model encoding."""

from __future__ import annotations

import dagster as dg
import pyarrow.parquet as pq
import pytest

from clip_assets.classification.steps import write_classifications
from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.embedding.store import PartFiles
from clip_assets.ingest.steps import unusable_in_manifest, write_manifest
from clip_assets.instance.execution import materialize, register_batches
from clip_assets.search.query import search
from clip_assets.storage.damaged_files import DamagedFileError, damaged_copies
from clip_assets_tests.conftest import BATCHES
from clip_assets_tests.support.damage import DAMAGES, damage

BATCH = "batch-001"
OPTIONS = EncodeOptions(batch_size=8, num_workers=0)


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_part_file_is_moved_aside_and_its_images_encoded_again(how, settings, clip):
    layout = DataLayout(settings.data_dir)
    write_manifest(settings.image_root, layout, BATCH)
    done = write_embeddings(clip, settings.image_root, layout, BATCH, OPTIONS)
    table = pq.read_table(done.path)
    done.path.unlink()  # an interrupted run: two part files and no batch file yet
    parts = PartFiles(layout.embedding_parts_dir(BATCH), clip.identity, clip.computed_precision)
    parts.write(table.slice(0, 4))
    parts.write(table.slice(4))
    first = parts.paths()[0]
    damage(first, how)
    damaged_bytes = first.read_bytes()

    again = write_embeddings(clip, settings.image_root, layout, BATCH, OPTIONS)
    assert (again.resumed, again.encoded, again.rows) == (6, 4, 10)  # the healthy part resumed, the rest encoded
    assert pq.read_table(again.path).sort_by("image_id").equals(table.sort_by("image_id"))
    (aside,) = damaged_copies(first)  # kept for a look, where the finished batch's other parts are gone
    assert aside.read_bytes() == damaged_bytes and parts.paths() == []


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_previous_embeddings_file_is_moved_aside_and_the_batch_encoded_afresh(
    how, settings, clip, classified
):
    path = classified.embeddings_path(BATCH)
    before = pq.read_table(path)
    damage(path, how)
    damaged_bytes = path.read_bytes()

    # what reads it names it and the command that rebuilds it
    with pytest.raises(DamagedFileError) as caught:
        write_classifications(classified, BATCH)
    assert str(path) in str(caught.value)
    assert f"dagster asset materialize -m clip_assets.definitions --select image_embeddings --partition {BATCH}" in str(
        caught.value
    )

    reports: list[str] = []
    summary = write_embeddings(clip, settings.image_root, classified, BATCH, OPTIONS, report=reports.append)
    assert summary.encoded == summary.rows == 10 and summary.carried_over == 0
    assert any(str(path) in r and "moved aside" in r for r in reports)
    (aside,) = damaged_copies(path)
    assert aside.read_bytes() == damaged_bytes
    assert pq.read_table(path).sort_by("image_id").equals(before.sort_by("image_id"))
    assert write_classifications(classified, BATCH).images == 10  # and the batch classifies again


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_manifest_is_named_with_its_rebuild_and_rebuilt_by_its_step(how, settings, clip):
    layout = DataLayout(settings.data_dir)
    write_manifest(settings.image_root, layout, BATCH)
    manifest = layout.manifest_path(BATCH)
    damage(manifest, how)
    for read in (
        lambda: write_embeddings(clip, settings.image_root, layout, BATCH, OPTIONS),
        lambda: unusable_in_manifest(layout, BATCH),
    ):
        with pytest.raises(DamagedFileError) as caught:
            read()
        assert str(manifest) in str(caught.value)
        assert f"--select image_manifest --partition {BATCH}" in str(caught.value)
    write_manifest(settings.image_root, layout, BATCH)  # what `image_manifest --partition batch-001` runs
    assert write_embeddings(clip, settings.image_root, layout, BATCH, OPTIONS).rows == 10


def test_the_reported_case_through_dagster_a_truncated_embeddings_file_heals_by_materializing_its_batch(
    settings, clip, classified, instance
):
    path = classified.embeddings_path("batch-002")
    damage(path, "truncated")
    damaged: list[DamagedFileError] = []
    assert {h.batch for h in search(settings, text="a red circle", k=20, clip=clip, damaged=damaged)} == {"batch-001"}
    assert [e.path for e in damaged] == [path]

    defs = build_definitions(settings)
    register_batches(instance, BATCHES)
    result = materialize(defs, instance, [dg.AssetKey("image_embeddings")], partition_key="batch-002")
    assert result.success
    assert damaged_copies(path) and pq.read_table(path).num_rows == 10
    damaged = []
    hits = search(settings, text="a red circle", k=20, clip=clip, damaged=damaged)
    assert not damaged and {h.batch for h in hits} == {"batch-001", "batch-002"}
