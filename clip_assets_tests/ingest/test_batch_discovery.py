"""Batch discovery and change detection as plain functions: no Dagster, real folders."""

import os
import time

from clip_assets.config.layout import DataLayout
from clip_assets.demo.shapes import write_collection
from clip_assets.ingest.batch_discovery import (
    DiscoveryCursor,
    changed_batches,
    discover_new_batches,
    files_fingerprint,
    manifest_fingerprint,
    read_rescan_position,
    rescan_slice,
    write_rescan_position,
)
from clip_assets.ingest.steps import write_manifest


def test_new_folders_are_found_and_an_unchanged_root_is_not_listed(tmp_path):
    root = tmp_path / "images"
    for i in range(3000):
        (root / f"b{i:05d}").mkdir(parents=True)
    (root / ".incoming").mkdir()  # a batch still being copied: hidden until renamed
    asked = []

    def known():
        asked.append(1)
        return [f"b{i:05d}" for i in range(2990)]

    first = discover_new_batches(root, known, DiscoveryCursor())
    assert first.listed and first.new == [f"b{i:05d}" for i in range(2990, 3000)]

    again = discover_new_batches(root, known, first.cursor)
    assert not again.listed and again.new == [] and len(asked) == 1  # no listing, no partition query

    (root / ".incoming").rename(root / "b99999")
    third = discover_new_batches(root, known, DiscoveryCursor.parse(again.cursor.serialize()))
    assert third.listed and "b99999" in third.new


def test_changed_batches_sees_added_rewritten_and_removed_files_only(tmp_path):
    root, layout = tmp_path / "images", DataLayout(tmp_path / "data")
    write_collection(root, batches=3, per_batch=3, seed=1)
    batches = ["batch-001", "batch-002", "batch-003"]
    assert changed_batches(root, layout, batches) == batches  # no manifest yet
    for b in batches:
        write_manifest(root, layout, b)
        assert manifest_fingerprint(layout.manifest_path(b)) == files_fingerprint(root, b)
    assert changed_batches(root, layout, batches) == []

    (root / "batch-001" / "new.png").write_bytes((root / "batch-002").glob("*.png").__next__().read_bytes())
    rewritten = next((root / "batch-002").iterdir())
    os.utime(rewritten, (time.time() + 5, time.time() + 5))
    (root / "batch-003" / sorted(os.listdir(root / "batch-003"))[0]).unlink()
    assert changed_batches(root, layout, batches + ["gone"]) == batches
    write_manifest(root, layout, "batch-002")
    assert changed_batches(root, layout, batches) == ["batch-001", "batch-003"]


def test_contiguous_ranges_never_span_a_batch_that_was_not_asked_for():
    from clip_assets.ingest.batch_discovery import contiguous_ranges

    order = ["a", "b", "c", "d", "e", "f", "g"]
    assert contiguous_ranges(order, ["a", "b", "c", "d", "e", "f", "g"], 3) == [("a", "c"), ("d", "f"), ("g", "g")]
    assert contiguous_ranges(order, ["b", "c", "e", "g"], 8) == [("b", "c"), ("e", "e"), ("g", "g")]
    assert contiguous_ranges(order, [], 8) == []


def test_a_batch_of_odd_entries_is_unchanged_right_after_its_manifest(tmp_path):
    """Every entry the manifest records (skipped ones too) is fingerprinted the way the manifest stores it."""
    root, layout = tmp_path / "images", DataLayout(tmp_path / "data")
    write_collection(root, batches=1, per_batch=2, seed=1)
    batch = root / "batch-001"
    (root / "batch-001" / "empty.png").write_bytes(b"")
    os.mkfifo(batch / "pipe.jpg")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", batch / "linked-folder")
    os.symlink(tmp_path / "elsewhere", batch / "link-out.jpg")
    with open(os.path.join(os.fsencode(batch), b"caf\xe9.png"), "wb") as f:
        f.write(next(batch.glob("*.png")).read_bytes())
    write_manifest(root, layout, "batch-001")
    assert manifest_fingerprint(layout.manifest_path("batch-001")) == files_fingerprint(root, "batch-001")
    assert changed_batches(root, layout, ["batch-001"]) == []
    os.utime(os.path.join(os.fsencode(batch), b"caf\xe9.png"), (time.time() + 5, time.time() + 5))
    assert changed_batches(root, layout, ["batch-001"]) == []  # not listed with a size or mtime
    (batch / "new.png").write_bytes(b"x")
    assert changed_batches(root, layout, ["batch-001"]) == ["batch-001"]


def test_folders_that_cannot_be_batches_are_refused_with_why_and_the_others_are_found(tmp_path):
    root = tmp_path / "images"
    for name in ("batch-001", "two\nlines", "a...b", "batch-002"):
        (root / name).mkdir(parents=True)
    os.mkdir(os.path.join(os.fsencode(root), b"caf\xe9"))  # a name Linux allows that is not UTF-8
    found = discover_new_batches(root, lambda: [], DiscoveryCursor())
    assert found.new == ["batch-001", "batch-002"]
    assert sorted(found.refused) == sorted(["two\nlines", "a...b", os.fsdecode(b"caf\xe9")])
    assert "'\\n'" in found.refused["two\nlines"] and "'...'" in found.refused["a...b"]
    assert "not valid UTF-8" in found.refused[os.fsdecode(b"caf\xe9")]


def test_a_manifest_that_cannot_be_read_counts_as_changed_and_the_others_are_still_compared(tmp_path):
    root, layout = tmp_path / "images", DataLayout(tmp_path / "data")
    write_collection(root, batches=3, per_batch=2, seed=1)
    batches = ["batch-001", "batch-002", "batch-003"]
    for b in batches:
        write_manifest(root, layout, b)
    layout.manifest_path("batch-002").write_bytes(b"PAR1 truncated by a full disk")
    (root / "batch-003" / "new.png").write_bytes(b"x")
    reports = []
    assert changed_batches(root, layout, batches, reports.append) == ["batch-002", "batch-003"]
    assert len(reports) == 1 and reports[0].startswith("batch-002: its manifest could not be read")


def test_a_symlink_loop_is_a_new_entry_for_the_rescan_and_never_stops_it(tmp_path):
    root, layout = tmp_path / "images", DataLayout(tmp_path / "data")
    write_collection(root, batches=3, per_batch=2, seed=1)
    batches = ["batch-001", "batch-002", "batch-003"]
    for b in batches:
        write_manifest(root, layout, b)
    os.symlink(root / "batch-002" / "loop", root / "batch-002" / "loop")
    found = rescan_slice(root, layout, batches, None, budget_s=60)
    assert found.changed == ["batch-002"] and found.checked == 3
    write_manifest(root, layout, "batch-002")  # the loop is a row with its reason, and the batch is listed
    assert rescan_slice(root, layout, batches, None, budget_s=60).changed == []


def test_a_rescan_too_long_for_one_tick_goes_on_where_the_last_slice_stopped(tmp_path):
    root, layout = tmp_path / "images", DataLayout(tmp_path / "data")
    write_collection(root, batches=5, per_batch=2, seed=3)
    batches = [f"batch-00{i}" for i in range(1, 6)]
    for b in batches:
        write_manifest(root, layout, b)
    for b in ("batch-002", "batch-005"):
        (root / b / "added.png").write_bytes(next((root / "batch-001").glob("*.png")).read_bytes())
    ticks = iter(range(1000))  # each look at the clock is one second later: a budget of 2.5 s is 3 batches

    def clock():
        return float(next(ticks))

    found, position, slices = [], None, []
    assert read_rescan_position(layout) is None
    while True:
        part = rescan_slice(root, layout, batches, position, budget_s=2.5, clock=clock)
        write_rescan_position(layout, part.next_start)
        slices.append(part.checked)
        found += part.changed
        position = read_rescan_position(layout)
        if position is None:
            break
    assert slices == [3, 2] and found == ["batch-002", "batch-005"]  # every batch once, changed ones found

    write_rescan_position(layout, "batch-004")  # a slice that begins part-way ends at the last batch
    part = rescan_slice(root, layout, batches, read_rescan_position(layout), budget_s=1000)
    assert part.checked == 2 and part.changed == ["batch-005"] and part.next_start is None
    write_rescan_position(layout, "batch-gone")  # a position that is no longer a batch starts at the first
    assert rescan_slice(root, layout, batches, read_rescan_position(layout), budget_s=0).checked == 1
