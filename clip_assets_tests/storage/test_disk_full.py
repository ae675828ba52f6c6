"""Every writer on a real full disk (a tmpfs filled to its last block): a clear error that names the
file and what to do, never an abort; the previous result intact; no temp file left. The text search
goes on without its cache, with a warning."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from clip_assets.classification.steps import write_centroids, write_classifications
from clip_assets.config.layout import DataLayout
from clip_assets.definitions import build_definitions
from clip_assets.defs.asset_keys import IMAGE_MANIFEST
from clip_assets.demo.shapes import LABELS_FILE
from clip_assets.embedding.options import EncodeOptions
from clip_assets.embedding.steps import write_embeddings
from clip_assets.ingest.steps import write_manifest
from clip_assets.instance.execution import materialize, register_batches
from clip_assets.model.fine_tuned_weights import record_fine_tuned_checkpoint
from clip_assets.pages.gallery import write_gallery
from clip_assets.search import ann_index
from clip_assets.search.search_rows import ensure_search_rows
from clip_assets.storage.atomic_files import DiskFullError, folder_removed_on_failure
from clip_assets.storage.warehouse import connect, read_centroids
from clip_assets.tuning.calibration import calibrate, load_labelled_scores, write_overrides
from clip_assets.tuning.fine_tuning import write_checkpoint
from clip_assets.tuning.labels_file import read_labels_file
from clip_assets.tuning.steps import write_adapters
from clip_assets_tests.support.models import TINY
from clip_assets_tests.support.shell_environment import settings_environment
from clip_assets_tests.support.small_filesystem import (
    SmallFilesystem,
    small_filesystem_fixture,  # noqa: F401 (the fixture)
)
from clip_assets_tests.support.vectors import planted, write_vectors

BATCHES = ["batch-001", "batch-002"]
OPTIONS = EncodeOptions(batch_size=8, num_workers=0)


def fails_for_lack_of_space(disk: SmallFilesystem, write, leave_bytes: int = 0) -> DiskFullError:
    """Fill the disk, run `write`: it must raise DiskFullError, leave every file as it was and no temp
    file. The disk is emptied again afterwards."""
    before = disk.files()
    disk.fill(leave_bytes)
    try:
        with pytest.raises(DiskFullError) as failed:
            write()
        after, temps = disk.files(), disk.temp_files()
    finally:
        disk.empty()
    assert temps == []
    assert after == before  # the previous files, byte for byte, and nothing new
    message = str(failed.value)
    assert "could not be written: no space left on device" in message, message
    assert "Nothing was replaced" in message and "run again" in message
    return failed.value


@pytest.fixture
def on_small_disk(settings, small_filesystem, tmp_path):
    """The settings with the data directory and the prompt files on the small disk, and a copy of the
    images (on the ordinary disk) that a test may change."""
    images = tmp_path / "images"
    shutil.copytree(settings.image_root, images)
    prompts = small_filesystem.root / "prompts"
    shutil.copytree(settings.prompts_dir, prompts)
    return settings.model_copy(
        update={"data_dir": small_filesystem.root / "data", "prompts_dir": prompts, "image_root": images}
    )


@pytest.fixture
def classified_on_small_disk(on_small_disk, clip) -> DataLayout:
    layout = DataLayout(on_small_disk.data_dir)
    write_centroids(clip, on_small_disk.prompts_dir, layout)
    for batch in BATCHES:
        write_manifest(on_small_disk.image_root, layout, batch)
        write_embeddings(clip, on_small_disk.image_root, layout, batch, OPTIONS)
        write_classifications(layout, batch)
    return layout


def test_manifest_embeddings_and_search_rows(on_small_disk, classified_on_small_disk, small_filesystem, clip):
    settings, layout, disk = on_small_disk, classified_on_small_disk, small_filesystem
    changed = sorted((settings.image_root / "batch-001").glob("*.png"))[0]
    changed.write_bytes(next((settings.image_root / "batch-002").glob("*.png")).read_bytes())

    error = fails_for_lack_of_space(disk, lambda: write_manifest(settings.image_root, layout, "batch-001"))
    assert str(layout.manifest_path("batch-001")) in str(error)
    write_manifest(settings.image_root, layout, "batch-001")  # with room: the changed image is listed

    # the changed image is encoded again: its part file is what the full disk refuses
    fails_for_lack_of_space(disk, lambda: write_embeddings(clip, settings.image_root, layout, "batch-001", OPTIONS))

    embeddings = layout.embeddings_path("batch-001")
    ensure_search_rows(embeddings)
    os.utime(embeddings)  # the rows are stale now, and rebuilt
    fails_for_lack_of_space(disk, lambda: ensure_search_rows(embeddings))


def test_centroids_and_classifications_in_duckdb(on_small_disk, classified_on_small_disk, small_filesystem, clip):
    settings, layout, disk = on_small_disk, classified_on_small_disk, small_filesystem

    def stored():
        with connect(layout.duckdb_path, read_only=True) as con:
            centroids = con.execute("SELECT * FROM prompt_centroids ORDER BY ALL").fetchall()
            rows = con.execute("SELECT * FROM image_classifications ORDER BY ALL").fetchall()
        return centroids, rows

    previous = stored()
    prompt = sorted(settings.prompts_dir.glob("*.toml"))[0]
    prompt.write_text(prompt.read_text().replace("threshold", "# threshold", 1))  # an edit: new centroids

    def outcome(write):
        """DuckDB may have written some of the transaction into its file before the disk ran out: the
        stored rows, not the file's bytes, are what must not change."""
        disk.fill()
        try:
            with pytest.raises(DiskFullError, match="clip_assets.duckdb could not be written: no space left"):
                write()
            temps = disk.temp_files()
        finally:
            disk.empty()
        assert temps == []
        assert stored() == previous

    outcome(lambda: write_centroids(clip, settings.prompts_dir, layout))
    assert read_centroids(layout.duckdb_path).categories  # still readable as a whole
    outcome(lambda: write_classifications(layout, "batch-001"))

    def beside_it() -> dict[str, int]:
        return {p.name: p.stat().st_size for p in layout.duckdb_path.parent.glob("clip_assets.duckdb?*")}

    assert beside_it() in ({}, {"clip_assets.duckdb.wal": 0})  # DuckDB's log, emptied: its next writer removes it
    write_classifications(layout, "batch-001")  # with room again
    assert beside_it() == {}


def test_adapters_calibration_and_fine_tuned_checkpoint(
    on_small_disk, classified_on_small_disk, small_filesystem, clip
):
    settings, layout, disk = on_small_disk, classified_on_small_disk, small_filesystem
    labels = settings.image_root / LABELS_FILE
    write_adapters(layout, labels)
    fails_for_lack_of_space(disk, lambda: write_adapters(layout, labels, shots=1))

    report = calibrate(load_labelled_scores(layout, read_labels_file(labels)))
    write_overrides(report, settings.prompts_dir)
    fails_for_lack_of_space(disk, lambda: write_overrides(report, settings.prompts_dir))

    checkpoint = write_checkpoint(clip.model, layout.fine_tuned_models_dir, TINY, {"run": 1})
    record_fine_tuned_checkpoint(layout, checkpoint)
    error = fails_for_lack_of_space(
        disk, lambda: write_checkpoint(clip.model, layout.fine_tuned_models_dir, TINY, {"run": 2})
    )
    assert "clip-assets-tiny-fine-tuned-<content hash>.pt could not be written" in str(error)


def test_a_gallery_page_that_runs_out_of_space_leaves_no_half_folder(
    on_small_disk, classified_on_small_disk, small_filesystem
):
    settings, layout, disk = on_small_disk, classified_on_small_disk, small_filesystem
    write_gallery(layout, settings.image_root, layout.gallery_dir("run-a"))

    def next_run_page():  # as the classification_gallery asset writes it
        with folder_removed_on_failure(layout.gallery_dir("run-b")):
            write_gallery(layout, settings.image_root, layout.gallery_dir("run-b"))

    fails_for_lack_of_space(disk, next_run_page, leave_bytes=12 * 1024)  # room for a few thumbnails only
    assert not layout.gallery_dir("run-b").exists()


def test_an_index_shard_on_a_full_disk(small_filesystem):
    layout = DataLayout(small_filesystem.root / "data")
    write_vectors(layout, "batch-1", planted(ann_index.MIN_ROWS_FOR_IVF, 64, seed=1))
    assert ann_index.build_batch_shard(layout, "batch-1").kind == ann_index.KIND_IVF  # codec trained, shard filled
    error = fails_for_lack_of_space(small_filesystem, lambda: ann_index.build_batch_shard(layout, "batch-1"))
    assert str(layout.ann_shard_path("batch-1")) in str(error)


def test_a_text_search_on_a_full_disk_goes_on_without_saving_its_encoder(
    on_small_disk, classified_on_small_disk, small_filesystem
):
    """The reported case: torch's TorchScript writer aborted the process (exit 134) and left a temp
    file of the encoder's size behind, every search, until the disk was full."""
    settings, layout, disk = on_small_disk, classified_on_small_disk, small_filesystem
    for batch in BATCHES:
        ensure_search_rows(layout.embeddings_path(batch))  # what a search would otherwise build first
    env = {**os.environ, **settings_environment(settings)}
    before = disk.files()
    disk.fill()
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from clip_assets.cli import run; run()",
                "search",
                "a red circle",
                "-k",
                "4",
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        after, temps = disk.files(), disk.temp_files()
    finally:
        disk.empty()
    assert done.returncode == 0, done.stderr  # not 134 (abort)
    assert len(done.stdout.strip().splitlines()) == 4  # the hits
    assert "text encoder not saved for fast search start-up" in done.stderr
    assert "could not be written: no space left on device" in done.stderr
    assert temps == [] and after == before
    assert not list(layout.text_query_encoder_dir.glob("*.pt"))


def test_the_filler_leaves_what_it_was_asked_to(small_filesystem):
    small_filesystem.fill(64 * 1024)
    try:
        assert 60 * 1024 <= small_filesystem.free_bytes() <= 72 * 1024
        with pytest.raises(OSError):
            Path(small_filesystem.root / "big").write_bytes(np.zeros(1 << 20, np.uint8).tobytes())
    finally:
        (small_filesystem.root / "big").unlink(missing_ok=True)
        small_filesystem.empty()


def test_a_step_on_a_full_disk_fails_in_dagster_with_one_line_and_what_to_do(on_small_disk, small_filesystem, instance):
    settings, disk = on_small_disk, small_filesystem
    defs = build_definitions(settings)
    register_batches(instance, ["batch-001"])
    materialize(defs, instance, [IMAGE_MANIFEST], partition_key="batch-001")
    changed = sorted((settings.image_root / "batch-001").glob("*.png"))[0]
    changed.write_bytes(next((settings.image_root / "batch-002").glob("*.png")).read_bytes())
    before = disk.files()
    disk.fill()
    try:
        result = materialize(defs, instance, [IMAGE_MANIFEST], partition_key="batch-001", raise_on_error=False)
        after, temps = disk.files(), disk.temp_files()
    finally:
        disk.empty()
    assert not result.success and after == before and temps == []
    (entry,) = instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    said = entry.dagster_event.step_failure_data.user_failure_data
    assert "batch-001.parquet could not be written: no space left on device" in said.description
    assert "Free some space" in said.metadata["fix"].value and said.metadata["error"].value == "DiskFullError"
