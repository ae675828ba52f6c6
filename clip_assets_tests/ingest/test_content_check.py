"""Content replaced under an unchanged size and mtime is found by the content check and encoded again."""

from __future__ import annotations

import os

import dagster as dg
import pyarrow.parquet as pq

from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.defs.ingest.schedules import CONTENT_CHECK_SCHEDULE
from clip_assets.embedding.decode import fingerprint
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.content_check import (
    content_check_slice,
    read_content_changes,
    read_content_check_position,
    record_content_changes,
    write_content_check_position,
)
from clip_assets.ingest.steps import write_manifest
from clip_assets_tests.support.dagster_ticks import run_requests, tick

OPTIONS = EncodeOptions(batch_size=8, num_workers=0)
BATCH = "batch-001"


def replace_keeping_stat(target, source) -> None:
    """`source`'s picture written over `target`, padded to its size, with its mtime kept (as `cp -p` would)."""
    st = target.stat()
    data = source.read_bytes()
    assert len(data) <= st.st_size
    target.write_bytes(data + b"\0" * (st.st_size - len(data)))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))


def pick_pair(folder):
    """The largest image of a batch and the next largest, a different picture, to put in its place (the
    smallest files of the shared collection are an empty file and a text file named as images)."""
    files = sorted((p for p in folder.iterdir() if p.suffix in (".png", ".jpg")), key=lambda p: p.stat().st_size)
    return files[-1], files[-2]


def test_a_replaced_file_with_the_same_stat_is_found_and_encoded_again(settings, clip, tmp_path):
    layout = DataLayout(settings.data_dir)
    write_manifest(settings.image_root, layout, BATCH)
    write_embeddings(clip, settings.image_root, layout, BATCH, OPTIONS)
    quiet = content_check_slice(settings.image_root, layout, [BATCH], None, budget_s=60)
    assert quiet.changed == {} and quiet.checked_files == 10 and quiet.next_position is None

    # a copy of the collection, so the session's shared images stay as they were
    root = tmp_path / "images"
    (root / BATCH).mkdir(parents=True)
    for f in (settings.image_root / BATCH).iterdir():
        (root / BATCH / f.name).write_bytes(f.read_bytes())
        os.utime(root / BATCH / f.name, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns))
    target, source = pick_pair(root / BATCH)
    replace_keeping_stat(target, source)

    unnoticed = write_embeddings(clip, root, layout, BATCH, OPTIONS)  # stat alone: carried as it was
    assert unnoticed.encoded == 0 and unnoticed.carried_over == 10

    found = content_check_slice(root, layout, [BATCH], None, budget_s=60)
    manifest = pq.read_table(layout.manifest_path(BATCH))
    target_id = manifest["image_id"][manifest["path"].to_pylist().index(f"{BATCH}/{target.name}")].as_py()
    assert found.changed == {BATCH: [target_id]}
    record_content_changes(layout, found.changed)
    assert read_content_changes(layout, BATCH) == {target_id}

    healed = write_embeddings(clip, root, layout, BATCH, OPTIONS)
    assert healed.encoded == 1 and healed.carried_over == 9
    stored = pq.read_table(layout.embeddings_path(BATCH))
    assert stored["fingerprint"][stored["image_id"].to_pylist().index(target_id)].as_py() == fingerprint(
        target.read_bytes())
    assert not layout.content_changes_path(BATCH).exists()
    assert content_check_slice(root, layout, [BATCH], None, budget_s=60).changed == {}


def test_each_call_stops_at_its_budget_and_the_next_goes_on_from_there(settings, clip):
    layout = DataLayout(settings.data_dir)
    batches = ["batch-001", "batch-002"]
    for batch in batches:
        write_manifest(settings.image_root, layout, batch)
        write_embeddings(clip, settings.image_root, layout, batch, OPTIONS)
    position, calls, checked = None, 0, 0
    while True:  # a budget of 0 s: one file per call
        found = content_check_slice(settings.image_root, layout, batches, position, budget_s=0)
        calls += 1
        checked += found.checked_files
        assert found.checked_files == 1
        position = found.next_position
        if position is None:
            break
    embedded = sum(pq.read_metadata(layout.embeddings_path(b)).num_rows for b in batches)
    assert calls == checked == embedded


def test_the_schedule_is_off_by_default_and_reruns_only_the_batch_with_replaced_content(settings, instance):
    defs = build_definitions(settings.model_copy(update={"content_check_budget_s": 60}))
    first = tick(defs, instance, None)
    tick(defs, instance, first.cursor)  # both batches listed, encoded and classified
    schedule = defs.resolve_schedule_def(CONTENT_CHECK_SCHEDULE)
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED

    def evaluate():
        with dg.build_schedule_context(
            instance=instance, repository_def=defs.get_repository_def(), resources=defs.resources
        ) as context:
            return schedule.evaluate_tick(context)

    quiet = evaluate()
    assert not quiet.run_requests and "None changed" in quiet.skip_message
    target, source = pick_pair(settings.image_root / "batch-002")
    original = target.read_bytes(), target.stat()
    try:
        replace_keeping_stat(target, source)
        data = evaluate()
        assert [r.partition_key for r in data.run_requests] == ["batch-002"]
        assert data.run_requests[0].tags["clip_assets/trigger"] == "content_check"
        run_requests(defs, instance, data.run_requests)
        embeddings = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("image_embeddings"), asset_partitions=["batch-002"]), limit=1
        ).records[0].asset_materialization
        assert embeddings.metadata["encoded"].value == 1
        assert not evaluate().run_requests
    finally:  # the collection is shared by the session's tests
        target.write_bytes(original[0])
        os.utime(target, ns=(original[1].st_atime_ns, original[1].st_mtime_ns))


def test_a_damaged_changes_or_position_file_reads_as_none_recorded_and_is_written_again(tmp_path):
    layout = DataLayout(tmp_path / "data")
    layout.content_changes_path(BATCH).parent.mkdir(parents=True)
    for damage in (b"", b'{"image_ids": ["a"', b"\x00\xff garbage"):
        layout.content_changes_path(BATCH).write_bytes(damage)
        layout.content_check_position_path.write_bytes(damage)
        assert read_content_changes(layout, BATCH) == set()
        assert read_content_check_position(layout) is None  # the next pass starts at the first batch
    record_content_changes(layout, {BATCH: ["b"]})
    write_content_check_position(layout, (BATCH, 3))
    assert read_content_changes(layout, BATCH) == {"b"} and read_content_check_position(layout) == (BATCH, 3)
